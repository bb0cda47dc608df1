"""The app's CSS and the page-level script (keyboard shortcuts, URL of the shown pair).

Kept apart from app.py so the layout code stays readable. Nothing here touches the
network: system fonts only, no external scripts.
"""

CSS = """
.g4c-images { display: grid; grid-template-columns: 1fr 1fr; gap: 14px; }
.g4c-fig { margin: 0; background: #111; border-radius: 8px; overflow: hidden; text-align: center; }
.g4c-fig img { width: 100%; max-height: 40vh; object-fit: contain; cursor: zoom-in; display: block;
  image-rendering: auto; background: #111; }
.g4c-fig figcaption, .g4c-fig figcaption b { color: #eee; font-size: 13px; padding: 4px 8px; text-align: left; }
.g4c-noimg { color: #bbb; padding: 80px 10px; }
.g4c-lightbox { position: fixed; inset: 0; background: rgba(0,0,0,.88); z-index: 10000; display: flex;
  align-items: center; justify-content: center; cursor: zoom-out; overflow: hidden; }
.g4c-lightbox img { width: 92vw; height: 92vh; object-fit: contain; transform-origin: center; }
.g4c-lightbox .g4c-hint { position: absolute; bottom: 10px; color: #ddd; font-size: 13px; }
/* Position and counts stay in view however far the reviewer scrolls (only while the
   Review tab is shown: the bar lives inside it). */
.g4c-progress { position: fixed; left: 0; right: 0; bottom: 0; z-index: 60; font-size: 15px; font-weight: 600;
  padding: 6px 16px; background: #1f2937; color: #f9fafb; box-shadow: 0 -2px 6px rgba(0,0,0,.2); }
body, .gradio-container { padding-bottom: 48px !important; }
.g4c-meta { font-size: 13px; padding: 4px 10px; }
.g4c-status { font-weight: 700; text-transform: uppercase; }
.g4c-s-approved { color: #15803d; } .g4c-s-rejected { color: #b91c1c; } .g4c-s-unreviewed { color: #6b7280; }
/* minmax(0, ...): a column never grows to fit a long unbroken word (the words break). */
.g4c-cols { display: grid; grid-template-columns: minmax(0, 1fr) minmax(0, 1fr); gap: 14px; }
.g4c-col h4 { margin: 4px 0 6px 0; }
.g4c-obj { border: 1px solid var(--border-color-primary); border-left-width: 5px; border-radius: 6px;
  padding: 4px 8px; margin-bottom: 6px; }
.g4c-o-unchanged, .g4c-o-kept { border-left-color: #9ca3af; }
.g4c-o-changed { border-left-color: #d97706; }
.g4c-o-new { border-left-color: #16a34a; }
.g4c-o-removed { border-left-color: #dc2626; }
.g4c-objhead { font-weight: 600; font-size: 14px; margin-bottom: 3px; overflow-wrap: anywhere; }
.g4c-pipeflag { font-size: 12px; color: #991b1b; margin-bottom: 3px; }
.g4c-badge { font-size: 11px; font-weight: 600; border-radius: 9px; padding: 1px 7px; margin-left: 6px; color: #fff; }
.g4c-b-unchanged, .g4c-b-kept { background: #6b7280; } .g4c-b-changed { background: #d97706; }
.g4c-b-new { background: #16a34a; } .g4c-b-removed { background: #dc2626; }
.g4c-chips { display: flex; flex-wrap: wrap; gap: 4px; }
.g4c-chip { font-size: 13px; border-radius: 12px; padding: 2px 9px; border: 1px solid #d1d5db;
  background: #f3f4f6; color: #111; cursor: pointer; max-width: 100%; overflow-wrap: anywhere; text-align: left; }
.g4c-chip:hover { border-color: #dc2626; }
.g4c-d-new { background: #dcfce7; border-color: #16a34a; }
.g4c-d-gone { text-decoration: line-through; color: #6b7280; }
.g4c-chip.g4c-flagged { background: #fee2e2; border-color: #dc2626; color: #991b1b; font-weight: 600; }
.g4c-legend { font-size: 12px; margin-bottom: 8px; display: flex; flex-wrap: wrap; gap: 6px; align-items: center; }
.g4c-legend .g4c-badge { margin-left: 0; }
.g4c-activity { font-size: 13px; background: #eff6ff; color: #1e3a8a; border: 1px solid #93c5fd;
  border-radius: 6px; padding: 4px 10px; }
.g4c-muted { color: #6b7280; font-size: 13px; }
.g4c-newer { font-size: 13px; color: #92400e; background: #fffbeb; border: 1px solid #f59e0b;
  border-radius: 6px; padding: 2px 8px; margin-top: 4px; }
.g4c-empty { padding: 40px; text-align: center; color: #6b7280; font-size: 18px; }
.g4c-gt { font-size: 13px; background: #fffbeb; color: #111; border-radius: 6px; padding: 6px 10px; }
.g4c-score { font-weight: 600; margin-top: 6px; }
.g4c-captions h4 { margin: 8px 0 4px 0; }
.g4c-caprow { display: flex; gap: 8px; align-items: flex-start; padding: 4px 6px; margin-bottom: 4px;
  border: 1px solid var(--border-color-primary); border-radius: 6px; }
.g4c-caprow.g4c-selected { outline: 2px solid #2563eb; }
.g4c-caprow.g4c-capflagged { border-color: #dc2626; background: #fef2f2; }
.g4c-caprow.g4c-conflict { border-color: #b45309; background: #fffbeb; }
.g4c-caprow.g4c-saving textarea { opacity: .6; }
.g4c-flaglabel { white-space: nowrap; font-size: 14px; color: #991b1b; cursor: pointer; padding-top: 18px; }
.g4c-capbody { flex: 1; min-width: 0; }  /* min-width 0: never wider than its row (see below) */
.g4c-capmeta { font-size: 11px; color: #6b7280; }
/* A box as tall as its text: a reviewer must see all of a caption to judge it (rows from
   the text's length hid the end of long ones). Browsers without field-sizing get the
   captions script's fitBox. */
.g4c-caprow textarea { width: 100%; box-sizing: border-box; font: inherit; font-size: 14px; resize: vertical;
  border: 1px solid var(--border-color-primary); border-radius: 4px; padding: 3px 6px;
  background: var(--input-background-fill); color: var(--body-text-color);
  field-sizing: content; min-height: 2em;
  /* A long unbroken run (snake_case, a path) breaks instead of widening the box past the panel. */
  max-width: 100%; overflow-wrap: anywhere; }
.g4c-capstatus { min-height: 1.3em; font-size: 13px; font-weight: 600; color: #15803d; }
.g4c-capstatus.g4c-bad { color: #b91c1c; }
.g4c-captools { display: flex; gap: 8px; align-items: flex-start; margin-top: 2px; }
.g4c-undo { font-size: 12px; padding: 0 8px; border: 1px solid var(--border-color-primary); border-radius: 4px;
  background: var(--button-secondary-background-fill); color: var(--body-text-color); cursor: pointer;
  white-space: nowrap; line-height: 1.6; }
.g4c-undo:disabled { opacity: .45; cursor: default; }
.g4c-caphist { flex: 1; min-width: 0; font-size: 12px; overflow-wrap: anywhere; }
.g4c-caphist summary { cursor: pointer; color: #6b7280; line-height: 1.6; }
.g4c-histlist { margin: 2px 0 4px 0; padding-left: 0; list-style: none; max-height: 220px; overflow-y: auto; }
.g4c-histlist li { border-left: 3px solid #d1d5db; padding: 1px 0 1px 8px; margin-bottom: 3px; }
.g4c-histlist li.g4c-current { border-left-color: #2563eb; }
.g4c-histmeta { color: #6b7280; font-size: 11px; }
.g4c-history { max-height: 320px; overflow-y: auto; }
.g4c-histtable { width: 100%; }
.g4c-histtable td { overflow-wrap: anywhere; }
.g4c-histtable .g4c-when { white-space: nowrap; color: #6b7280; }
.g4c-keys { font-size: 12px; }
.g4c-results { display: grid; grid-template-columns: repeat(auto-fill, minmax(170px, 1fr)); gap: 10px; }
.g4c-result { border: 2px solid transparent; border-radius: 8px; padding: 4px; font-size: 12px; }
.g4c-result img { width: 100%; border-radius: 6px; display: block; }
.g4c-result.g4c-true { border-color: #16a34a; background: #dcfce7; color: #111; }
.g4c-result.g4c-ref { border-color: #6b7280; }
.g4c-table { border-collapse: collapse; font-size: 13px; }
.g4c-table td, .g4c-table th { border: 1px solid var(--border-color-primary); padding: 3px 8px; text-align: left; }
"""

# Keyboard shortcuts on the review tab. Keys typed into a text field are left alone;
# Esc leaves the field (which saves it). Buttons are clicked by elem_id so the same
# Python handlers run as for a mouse click.
HEAD = """
<script>
(function () {
  const KEYS = {
    'j': 'g4c-next', 'ArrowRight': 'g4c-next', 'k': 'g4c-prev', 'ArrowLeft': 'g4c-prev',
    'a': 'g4c-approve', 'r': 'g4c-reject', 'u': 'g4c-reload', 'g': 'g4c-gt-toggle'
  };
  let selected = 0;
  function visibleRows() {
    return Array.from(document.querySelectorAll('.g4c-caprow')).filter(r => r.offsetParent !== null);
  }
  function select(i) {
    const rows = visibleRows();
    if (!rows.length) return;
    selected = Math.max(0, Math.min(i, rows.length - 1));
    rows.forEach((r, k) => r.classList.toggle('g4c-selected', k === selected));
  }
  window.g4cSelectCaption = select;
  // The note saves when its field is left; a reload or a closed tab leaves none, so the
  // browser asks first while the note holds text typed since the field was entered.
  let noteTyped = false;
  document.addEventListener('input', function (e) { if (e.target.closest && e.target.closest('#g4c-note')) noteTyped = true; });
  document.addEventListener('focusout', function (e) { if (e.target.closest && e.target.closest('#g4c-note')) noteTyped = false; });
  window.addEventListener('beforeunload', function (e) {
    if (noteTyped) { e.preventDefault(); e.returnValue = ''; }
  });
  window.g4cReselect = function () { select(selected); };
  document.addEventListener('keydown', function (e) {
    const t = e.target;
    // Text fields keep their keys; a focused checkbox, radio or button does not.
    const textInput = t && t.tagName === 'INPUT' && !['checkbox', 'radio', 'button', 'submit', 'range', 'file'].includes(t.type);
    const typing = t && (textInput || t.tagName === 'TEXTAREA' || t.tagName === 'SELECT' || t.isContentEditable);
    if (typing) {
      if (e.key === 'Escape') { t.blur(); }
      return;
    }
    if (e.ctrlKey || e.metaKey || e.altKey) return;
    const review = document.getElementById('g4c-next');
    if (!review || review.offsetParent === null) return;   // another tab is shown
    if (e.key === 'Escape') { const lb = document.querySelector('.g4c-lightbox'); if (lb) lb.remove(); return; }
    if (/^[1-9]$/.test(e.key)) { select(parseInt(e.key, 10) - 1); e.preventDefault(); return; }
    // f flags, z undoes, e edits the selected caption
    const inRow = {f: ['input[type=checkbox]', 'click'], z: ['button[data-undo]', 'click'],
                   e: ['textarea, input[type=text]', 'focus']}[e.key];
    if (inRow) {
      const rows = visibleRows();
      const row = rows[Math.min(selected, rows.length - 1)];
      const el = row && row.querySelector(inRow[0]);
      // A disabled Undo ignores the click: the captions panel says why instead of nothing.
      if (el && el.disabled) { el.dispatchEvent(new CustomEvent('g4c-nothing-to-undo', {bubbles: true})); e.preventDefault(); }
      else if (el) { el[inRow[1]](); e.preventDefault(); }
      return;
    }
    const id = KEYS[e.key];
    if (!id) return;
    const el = document.getElementById(id);
    const target = el && (el.tagName === 'BUTTON' ? el : (el.querySelector('input') || el.querySelector('button') || el));
    if (target) { target.click(); e.preventDefault(); }
  });
})();
</script>
"""

# Images: click to open full screen, wheel to zoom, drag-free; click or Esc closes.
IMAGES_JS = """
element.addEventListener('click', function (e) {
  const img = e.target.closest('img[data-g4c-zoom]');
  if (!img) return;
  const box = document.createElement('div');
  box.className = 'g4c-lightbox';
  const big = document.createElement('img');
  big.src = img.src; big.alt = img.alt;
  const hint = document.createElement('div');
  hint.className = 'g4c-hint'; hint.textContent = 'wheel: zoom · click or Esc: close';
  box.appendChild(big); box.appendChild(hint);
  let scale = 1;
  box.addEventListener('wheel', function (ev) {
    ev.preventDefault();
    scale = Math.min(8, Math.max(1, scale * (ev.deltaY < 0 ? 1.15 : 1 / 1.15)));
    const r = big.getBoundingClientRect();
    big.style.transformOrigin = ((ev.clientX - r.left) / r.width * 100) + '% ' + ((ev.clientY - r.top) / r.height * 100) + '%';
    big.style.transform = 'scale(' + scale + ')';
  }, {passive: false});
  box.addEventListener('click', function () { box.remove(); });
  document.body.appendChild(box);
});
"""

# Descriptor board: a click on a descriptor sends its id to Python, with the state the
# reviewer asked for (flag what is shown unflagged, unflag what is shown flagged), so a
# board that is a few seconds behind another reviewer's flag never undoes it.
BOARD_JS = """
element.addEventListener('click', function (e) {
  const chip = e.target.closest('[data-item]');
  if (!chip) return;
  const board = chip.closest('[data-annotation]');
  trigger('click', {item: chip.dataset.item, annotation: board ? board.dataset.annotation : '',
                    flagged: !chip.classList.contains('g4c-flagged')});
});
"""

# After a pair is shown, put its id in the address bar so a reload or a shared link
# opens the same pair.
URL_JS = """
(annotationId) => {
  if (annotationId) {
    const url = new URL(window.location.href);
    url.searchParams.set('pair', annotationId);
    window.history.replaceState(null, '', url.toString());
  }
  setTimeout(() => { if (window.g4cSelectCaption) window.g4cSelectCaption(0); }, 50);
  return annotationId;
}
"""

SHORTCUTS_MD = """**Keyboard** (outside text fields): `j` / `→` next · `k` / `←` previous · `a` approve (and go on) ·
`r` reject (and go on) · `1`–`9` select a caption · `f` flag / unflag the selected caption ·
`e` edit the selected caption · `z` undo the selected caption's last edit · `Esc` leave a text field
(saves it) · `u` reload the pair · `g` show / hide ground truth. Click a descriptor to flag it; click an
image to zoom. Captions are one line: they save when you press Enter or leave the field. Other reviewers' changes to the
shown pair appear within a few seconds; text you are typing is kept."""

# Captions panel: a caption is saved when its text area loses focus or on Enter (with or
# without Shift: a caption is one line), through a server function that answers with the new version or the
# conflict. Undo reverts a caption's last edit the same way. A flag box change goes to
# Python as an event. Saves and undos of one row never overlap: each waits for the last.
#
# Gradio morphs each new rendering into the old DOM (the same elements stay). After each
# one (told apart from this script's own changes by the panel's data-render token),
# `reconcile` decides what every text area shows: a box now holding another caption
# takes the stored text; a box with text typed and not saved keeps it on a live refresh
# (another reviewer's change), and keeps the version it was started from, so its save
# is checked against that version and refused if someone else saved meanwhile. A move
# or reload shows the stored text.
CAPTIONS_JS = """
const openHistory = new Set();   // caption ids whose history box the reviewer opened
// The last message and the pair it is about: a live redraw of that pair (the reviewer's
// own save moves the pair's stamp, so one follows every save) empties the status line,
// and puts this back.
let lastStatus = null;
function statusLine(text, bad) {
  const s = element.querySelector('.g4c-capstatus');
  const panel = element.querySelector('.g4c-captions');
  lastStatus = {annotation: panel ? panel.dataset.annotation : '', text: text || '', bad: !!bad};
  if (s) { s.textContent = text || ''; s.classList.toggle('g4c-bad', !!bad); }
}
// A save that was refused (or failed) with the text it carried: told again on the next
// rendering of another pair (or a reload), which replaces the box, so the text is never
// gone without a word.
let refused = null;
function tellRefused() {
  if (!refused) return;
  const panel = element.querySelector('.g4c-captions');
  const where = panel && panel.dataset.annotation === refused.annotation ? 'Before the reload' : 'On the pair you left';
  const told = refused;
  refused = null;
  statusLine(where + ' (caption ' + told.caption.split(':').pop() + '): ' + told.message +
             ' Your text was: “' + told.text + '”', true);
}
function reviewerName() {
  const f = document.querySelector('#g4c-reviewer textarea, #g4c-reviewer input');
  return f ? f.value.trim() : '';
}
function flagReason() {
  const f = document.querySelector('#g4c-reason input');
  return f ? f.value : '';
}
const fieldSizing = window.CSS && CSS.supports && CSS.supports('field-sizing', 'content');
function fitBox(area) {
  // A hidden tab measures 0: leave the box as it is until it is shown and typed in.
  if (fieldSizing || !area.scrollHeight) return;
  area.style.height = 'auto';
  area.style.height = (area.scrollHeight + 2) + 'px';
}
function captionLabel(row) { return 'caption ' + row.dataset.caption.split(':').pop(); }
// Typed by the reviewer and not saved. A redraw may change an untouched box's value too,
// so only typing counts.
function unsaved(area) { return !!area._typed && !!area._stored && area.value.trim() !== area._stored.text.trim(); }
let renderSeen = null;
function reconcile() {
  const panel = element.querySelector('.g4c-captions');
  if (!panel || panel.dataset.render === renderSeen) return;
  renderSeen = panel.dataset.render;
  const live = panel.dataset.live === '1';
  const overtaken = [];
  panel.querySelectorAll('.g4c-caprow').forEach((row) => {
    const area = row.querySelector('textarea');
    if (!area) return;
    const caption = row.dataset.caption, version = parseInt(row.dataset.version, 10);
    if (live && area._caption === caption && unsaved(area)) {
      if (row._saving) {
        // The reviewer's own save is on its way, and this redraw may show just that
        // save: its answer tells (saveRow), not the version seen here.
        row._seenWhileSaving = Math.max(row._seenWhileSaving || 0, version);
      } else if (version !== area._stored.version || area._conflict) {
        row.classList.add('g4c-conflict');
        if (version !== area._stored.version) overtaken.push(captionLabel(row));
      }
    } else {
      area._caption = caption;
      area._stored = {text: area.defaultValue, version: version};
      area._conflict = false;
      area._typed = false;
      if (area.value !== area.defaultValue) area.value = area.defaultValue;
    }
    fitBox(area);
    const box = row.querySelector('input[data-flag]');
    if (box) box.checked = box.defaultChecked;
    const details = row.querySelector('details.g4c-caphist');
    if (details && openHistory.has(caption) && !details.open) details.open = true;
  });
  if (overtaken.length) {
    statusLine(overtaken.join(', ') + ': changed by someone else while you are editing. Your text is kept ' +
               'but not saved; saving it will be refused. Reload (u) shows theirs.', true);
  } else if (live && lastStatus && lastStatus.annotation === panel.dataset.annotation) {
    statusLine(lastStatus.text, lastStatus.bad);
  } else {
    lastStatus = null;
  }
  if (!live) tellRefused();
  if (window.g4cReselect) window.g4cReselect();
}
function applyState(row, area, state, force) {
  if (!state || row.dataset.caption !== state.caption_id) return;
  const typedSince = !force && unsaved(area) && area.value.trim() !== state.text.trim();
  area._stored = {text: state.text, version: state.version};
  area._conflict = false;
  row.dataset.version = String(state.version);
  area.defaultValue = state.text;
  if (!typedSince) { area.value = state.text; area._typed = false; }
  fitBox(area);
  const meta = row.querySelector('.g4c-capmeta');
  if (meta) meta.textContent = state.meta;
  const undo = row.querySelector('button[data-undo]');
  if (undo) undo.disabled = !state.can_undo;
  // A save can clear the pipeline's 'over 77 CLIP tokens' flag: the box follows at once.
  const box = row.querySelector('input[data-flag]');
  if (box && typeof state.flagged === 'boolean') {
    box.checked = box.defaultChecked = state.flagged;
    row.classList.toggle('g4c-capflagged', state.flagged);
  }
  const details = row.querySelector('details.g4c-caphist');
  if (details) details.innerHTML = state.history_html;
  row.classList.remove('g4c-conflict');
}
async function serialized(row, work) {
  while (row._saving) { await row._saving; }
  const job = (async () => {
    row.classList.add('g4c-saving');
    try { await work(); }
    finally { row.classList.remove('g4c-saving'); }
  })();
  row._saving = job;
  try { await job; } finally { row._saving = null; }
}
function saveRow(area) {
  const row = area.closest('.g4c-caprow');
  if (!row) return;
  return serialized(row, async () => {
    if (!area._stored || !unsaved(area)) return;
    const caption = row.dataset.caption, sent = area.value;
    const panel = row.closest('.g4c-captions');
    const annotation = panel ? panel.dataset.annotation : '';
    row._seenWhileSaving = 0;
    try {
      let r = await server.save_caption({caption_id: caption, text: sent, version: area._stored.version,
                                         reviewer: reviewerName()});
      if (Array.isArray(r)) r = r[0];
      if (r.saved) { if (refused && refused.caption === caption) refused = null; }
      else if (r.conflict || r.error) refused = {annotation, caption, text: sent, message: r.message};
      if (row.dataset.caption !== caption) { tellRefused(); return; }   // another pair is shown by now
      if (r.conflict) { row.classList.add('g4c-conflict'); area._conflict = true; }
      // Nothing typed since the request: the box shows the text as stored (the save joins
      // line breaks into spaces).
      else if (r.state && (r.saved || r.text.trim() === r.state.text.trim())) applyState(row, area, r.state, area.value === sent);
      // A redraw during the save showed a version newer than the one this save left:
      // someone else saved right after it.
      const newer = row._seenWhileSaving > (r.state ? r.state.version : r.version);
      if (newer && !r.conflict) {
        row.classList.add('g4c-conflict');
        statusLine(r.message + '; then ' + captionLabel(row) + ' was changed by someone else (version ' +
                   row._seenWhileSaving + '). Reload (u) shows theirs.', true);
        return;
      }
      statusLine(r.message, r.conflict || r.error);
    } catch (e) {
      refused = {annotation, caption, text: sent, message: 'NOT SAVED: ' + e};
      if (row.dataset.caption !== caption) { tellRefused(); return; }
      statusLine('NOT SAVED: ' + e, true);
    }
  });
}
function undoRow(row) {
  const area = row.querySelector('textarea');
  if (!reviewerName()) {
    statusLine('type your name in the Reviewer box first: every action is recorded with it', true);
    return;
  }
  // A blur just before the click may be saving an edit of this row: undo waits for it
  // and then reverts it.
  return serialized(row, async () => {
    const caption = row.dataset.caption;
    try {
      let r = await server.undo_caption({caption_id: caption, version: area._stored.version,
                                         reviewer: reviewerName()});
      if (Array.isArray(r)) r = r[0];
      if (row.dataset.caption !== caption) return;
      if (r.saved) applyState(row, area, r.state, true);
      else if (r.conflict) { row.classList.add('g4c-conflict'); area._conflict = true; }
      statusLine(r.message, !r.saved);
    } catch (e) {
      statusLine('NOT UNDONE: ' + e, true);
    }
  });
}
element.addEventListener('input', (e) => {
  if (e.target.tagName === 'TEXTAREA') { e.target._typed = true; fitBox(e.target); }
});
element.addEventListener('focusout', (e) => { if (e.target.tagName === 'TEXTAREA') saveRow(e.target); });
// A caption is one line: Enter saves, with Shift too (a line break would only be
// joined into a space by the save). Not while an input method composes a word.
element.addEventListener('keydown', (e) => {
  if (e.target.tagName === 'TEXTAREA' && e.key === 'Enter' && !e.isComposing) { e.preventDefault(); saveRow(e.target); }
});
element.addEventListener('g4c-nothing-to-undo', (e) => {
  const row = e.target.closest('.g4c-caprow');
  if (row) statusLine(captionLabel(row) + ": nothing to undo, it shows the pipeline's original text", true);
});
element.addEventListener('click', (e) => {
  const undo = e.target.closest('button[data-undo]');
  if (undo && !undo.disabled) undoRow(undo.closest('.g4c-caprow'));
});
// toggle does not bubble; a capturing listener still sees it. Read .open when it fires:
// a redraw may close and reopen a box within one task.
element.addEventListener('toggle', (e) => {
  const details = e.target;
  if (!details.classList || !details.classList.contains('g4c-caphist')) return;
  const row = details.closest('.g4c-caprow');
  if (!row) return;
  if (details.open) openHistory.add(row.dataset.caption); else openHistory.delete(row.dataset.caption);
}, true);
element.addEventListener('change', (e) => {
  const box = e.target;
  if (!box.dataset || !box.dataset.flag) return;
  const row = box.closest('.g4c-caprow');
  const panel = box.closest('[data-annotation]');
  if (!reviewerName()) {
    box.checked = !box.checked;
    statusLine('type your name in the Reviewer box first: every action is recorded with it', true);
    return;
  }
  row.classList.toggle('g4c-capflagged', box.checked);
  trigger('click', {caption: row.dataset.caption, flagged: box.checked,
                    annotation: panel ? panel.dataset.annotation : '', reason: flagReason()});
});
// A caption saves when its box is left; a reload or a closed tab leaves none, so the
// browser asks first while a box holds text not saved (refused ones too) or a save is
// still on its way.
window.addEventListener('beforeunload', (e) => {
  const rows = Array.from(element.querySelectorAll('.g4c-caprow'));
  if (rows.some((row) => { const area = row.querySelector('textarea'); return row._saving || (area && unsaved(area)); })) {
    e.preventDefault();
    e.returnValue = '';
  }
});
// Runs after Gradio's morph of a new rendering, before the page is painted again.
new MutationObserver(reconcile).observe(element, {subtree: true, childList: true, characterData: true,
                                                  attributes: true, attributeFilter: ['data-render']});
reconcile();
"""
