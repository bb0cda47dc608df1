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
.g4c-cols { display: grid; grid-template-columns: 1fr 1fr; gap: 14px; }
.g4c-col h4 { margin: 4px 0 6px 0; }
.g4c-obj { border: 1px solid var(--border-color-primary); border-left-width: 5px; border-radius: 6px;
  padding: 4px 8px; margin-bottom: 6px; }
.g4c-o-unchanged, .g4c-o-kept { border-left-color: #9ca3af; }
.g4c-o-changed { border-left-color: #d97706; }
.g4c-o-new { border-left-color: #16a34a; }
.g4c-o-removed { border-left-color: #dc2626; }
.g4c-objhead { font-weight: 600; font-size: 14px; margin-bottom: 3px; }
.g4c-badge { font-size: 11px; font-weight: 600; border-radius: 9px; padding: 1px 7px; margin-left: 6px; color: #fff; }
.g4c-b-unchanged, .g4c-b-kept { background: #6b7280; } .g4c-b-changed { background: #d97706; }
.g4c-b-new { background: #16a34a; } .g4c-b-removed { background: #dc2626; }
.g4c-chips { display: flex; flex-wrap: wrap; gap: 4px; }
.g4c-chip { font-size: 13px; border-radius: 12px; padding: 2px 9px; border: 1px solid #d1d5db;
  background: #f3f4f6; color: #111; cursor: pointer; }
.g4c-chip:hover { border-color: #dc2626; }
.g4c-d-new { background: #dcfce7; border-color: #16a34a; }
.g4c-d-gone { text-decoration: line-through; color: #6b7280; }
.g4c-chip.g4c-flagged { background: #fee2e2; border-color: #dc2626; color: #991b1b; font-weight: 600; }
.g4c-legend { font-size: 12px; margin-bottom: 8px; display: flex; flex-wrap: wrap; gap: 6px; align-items: center; }
.g4c-legend .g4c-badge { margin-left: 0; }
.g4c-activity { font-size: 13px; background: #eff6ff; color: #1e3a8a; border: 1px solid #93c5fd;
  border-radius: 6px; padding: 4px 10px; }
.g4c-muted { color: #6b7280; font-size: 13px; }
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
.g4c-capbody { flex: 1; }
.g4c-capmeta { font-size: 11px; color: #6b7280; }
.g4c-caprow textarea { width: 100%; box-sizing: border-box; font: inherit; font-size: 14px; resize: vertical;
  border: 1px solid var(--border-color-primary); border-radius: 4px; padding: 3px 6px;
  background: var(--input-background-fill); color: var(--body-text-color); }
.g4c-capstatus { min-height: 1.3em; font-size: 13px; font-weight: 600; color: #15803d; }
.g4c-capstatus.g4c-bad { color: #b91c1c; }
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
    if (e.key === 'f') {
      const rows = visibleRows();
      const row = rows[Math.min(selected, rows.length - 1)];
      const box = row && row.querySelector('input[type=checkbox]');
      if (box) { box.click(); e.preventDefault(); }
      return;
    }
    if (e.key === 'e') {
      const rows = visibleRows();
      const row = rows[Math.min(selected, rows.length - 1)];
      const field = row && row.querySelector('textarea, input[type=text]');
      if (field) { field.focus(); e.preventDefault(); }
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

# Descriptor board: a click on a descriptor sends its id to Python.
BOARD_JS = """
element.addEventListener('click', function (e) {
  const chip = e.target.closest('[data-item]');
  if (!chip) return;
  const board = chip.closest('[data-annotation]');
  trigger('click', {item: chip.dataset.item, annotation: board ? board.dataset.annotation : ''});
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
`e` edit the selected caption · `Esc` leave a text field (saves it) · `u` reload the pair ·
`g` show / hide ground truth. Click a descriptor to flag it; click an image to zoom.
Captions save when you press Enter or leave the field."""

# Captions panel: a caption is saved when its text area loses focus or on Enter (Shift+Enter
# is a new line), through a server function that answers with the new version or the
# conflict. A flag box change goes to Python as an event. Saves of one row never overlap:
# a second save waits for the first, then compares again.
CAPTIONS_JS = """
function statusLine(text, bad) {
  const s = element.querySelector('.g4c-capstatus');
  if (s) { s.textContent = text || ''; s.classList.toggle('g4c-bad', !!bad); }
}
function reviewerName() {
  const f = document.querySelector('#g4c-reviewer textarea, #g4c-reviewer input');
  return f ? f.value.trim() : '';
}
function flagReason() {
  const f = document.querySelector('#g4c-reason input');
  return f ? f.value : '';
}
async function saveRow(area) {
  const row = area.closest('.g4c-caprow');
  if (!row) return;
  while (row._saving) { await row._saving; }
  if (area.value.trim() === area.defaultValue.trim()) return;
  const job = (async () => {
    row.classList.add('g4c-saving');
    try {
      let r = await server.save_caption({caption_id: row.dataset.caption, text: area.value,
                                         version: parseInt(row.dataset.version, 10), reviewer: reviewerName()});
      if (Array.isArray(r)) r = r[0];
      if (r.saved) {
        row.dataset.version = String(r.version);
        area.defaultValue = r.text;
        const meta = row.querySelector('.g4c-capmeta');
        if (meta) meta.textContent = meta.textContent.replace(/ · v\\d+( · edited by [^·]*)?/, ' · v' + r.version + ' · edited by ' + r.editor + ' ');
        row.classList.remove('g4c-conflict');
      } else if (r.conflict) {
        row.classList.add('g4c-conflict');
      }
      statusLine(r.message, r.conflict || r.error);
    } catch (e) {
      statusLine('NOT SAVED: ' + e, true);
    } finally {
      row.classList.remove('g4c-saving');
    }
  })();
  row._saving = job;
  await job;
  row._saving = null;
}
element.addEventListener('focusout', (e) => { if (e.target.tagName === 'TEXTAREA') saveRow(e.target); });
element.addEventListener('keydown', (e) => {
  if (e.target.tagName === 'TEXTAREA' && e.key === 'Enter' && !e.shiftKey) { e.preventDefault(); saveRow(e.target); }
});
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
"""
