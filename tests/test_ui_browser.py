"""The review app end to end in headless Chromium (Debian's /usr/bin/chromium, Python
Playwright; never `playwright install`), on a real demo-world store annotated by the
simulator through the pipeline runner, with a FAISS index of a tiny random-init
retriever. One server and one browser for the module.

Screenshots of every tab go to artifacts/screenshots/.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from ui import review_logic as rl
from ui_store_builder import SCRIPT_CAPTION, build_demo_store

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
SHOTS = Path(__file__).resolve().parent.parent / "artifacts" / "screenshots"
TIMEOUT_MS = 20_000

if not os.path.exists(CHROMIUM):
    pytest.skip("Chromium is not installed (make chromium)", allow_module_level=True)
playwright_api = pytest.importorskip("playwright.sync_api")
expect = playwright_api.expect


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from ui.server import AppServer

    SHOTS.mkdir(parents=True, exist_ok=True)
    info = build_demo_store(tmp_path_factory.mktemp("browser"), pairs=16, annotate=10, index=True)
    with AppServer(info["db_path"], index_path=info["index_path"]) as server:
        info["server"] = server
        yield info


@pytest.fixture(scope="module")
def browser(world):
    with playwright_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def external_requests():
    return []


def open_page(browser, world, external_requests, name="ann", query=""):
    context = browser.new_context(viewport={"width": 1440, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    base = world["server"].url
    page.on("request", lambda r: None if r.url.startswith((base, "data:", "blob:")) else external_requests.append(r.url))
    page.goto(base + query)
    page.wait_for_selector(".g4c-progress")
    if name:
        box = page.locator("#g4c-reviewer textarea, #g4c-reviewer input").first
        box.fill(name)
        box.blur()
    return context, page


def error_toasts(page) -> int:
    return page.locator(".toast-body.error").count()


def info_text(page) -> str:
    return page.locator(".g4c-progress").inner_text()


def wait_message(page, pattern: str):
    expect(page.locator("#g4c-message textarea, #g4c-message input").first).to_have_value(re.compile(pattern))


def caption_field(page, kind: str, index: int):
    return page.locator(f"#g4c-cap-{kind}{index} textarea")


def wait_caption_status(page, pattern: str):
    expect(page.locator(".g4c-capstatus")).to_have_text(re.compile(pattern))


def shown(page):
    return page.locator(".g4c-board")


def test_keyboard_review_flag_edit_approve_and_reload(world, browser, external_requests):
    ids, db = world["annotation_ids"], world["db"]
    context, page = open_page(browser, world, external_requests)
    expect(shown(page)).to_have_attribute("data-annotation", ids[0])
    assert "1 / 10 in 'unreviewed'" in info_text(page) and "0 / 10 reviewed" in info_text(page)
    page.wait_for_function("Array.from(document.querySelectorAll('.g4c-images img')).every(i => i.naturalWidth > 0)")
    page.locator("body").click(position={"x": 5, "y": 5})

    # pair 1: flag a target descriptor (click), caption 2 (keys 2, f), edit caption 1 (keys 1, e)
    chip = page.locator(".g4c-col").nth(1).locator("[data-item]").first
    descriptor_id = chip.get_attribute("data-item")
    chip.click()
    wait_message(page, "descriptor flagged")
    expect(page.locator(f".g4c-board [data-item='{descriptor_id}']")).to_have_class(re.compile("g4c-flagged"))
    page.keyboard.press("2")
    page.keyboard.press("f")
    wait_message(page, "caption c1 flagged")
    page.keyboard.press("1")
    page.keyboard.press("e")
    page.keyboard.press("Control+a")
    page.keyboard.type("Paint the walls yellow.")
    page.keyboard.press("Enter")
    wait_caption_status(page, "saved as version 1")
    page.keyboard.press("Escape")
    page.locator("#g4c-note textarea").fill("plant colour looks off")
    page.locator("body").click(position={"x": 5, "y": 5})  # leaving the field saves the note
    wait_message(page, "note saved")
    page.keyboard.press("a")                          # approve, go on to pair 2
    expect(shown(page)).to_have_attribute("data-annotation", ids[1])
    # the message names the pair as the page does, not by its annotation id
    name = db.execute("SELECT p.external_id FROM annotations a JOIN pairs p ON p.id = a.pair_id WHERE a.id = ?",
                      [ids[0]]).fetchone()[0]
    wait_message(page, f"^pair {re.escape(name)} \\(run \\d+\\): approved$")
    assert "1 / 10 reviewed" in info_text(page)
    page.keyboard.press("r")                          # reject pair 2, go on to pair 3
    expect(shown(page)).to_have_attribute("data-annotation", ids[2])
    page.keyboard.press("j")
    expect(shown(page)).to_have_attribute("data-annotation", ids[3])
    page.keyboard.press("ArrowLeft")
    expect(shown(page)).to_have_attribute("data-annotation", ids[2])
    page.keyboard.press("a")                          # approve pair 3
    expect(shown(page)).to_have_attribute("data-annotation", ids[3])
    assert "3 / 10 reviewed" in info_text(page) and "1 / 7 in 'unreviewed'" in info_text(page)
    page.keyboard.press("k")                          # back past the reviewed pairs: start of the queue
    wait_message(page, "start of the 'unreviewed' queue")

    # a mouse click on a flag box leaves focus there; the keys still work
    page.locator("#g4c-cap-i0 input[data-flag]").click()
    wait_message(page, "caption c0 flagged")
    page.locator("#g4c-cap-i0 input[data-flag]").click()
    wait_message(page, "caption c0 unflagged")
    page.keyboard.press("j")
    expect(shown(page)).to_have_attribute("data-annotation", ids[4])
    # zoom: click an image, Esc closes
    page.locator(".g4c-images img").first.click()
    expect(page.locator(".g4c-lightbox img")).to_be_visible()
    page.keyboard.press("Escape")
    expect(page.locator(".g4c-lightbox")).to_have_count(0)
    # the approved queue holds the two approved pairs
    page.get_by_label("approved", exact=True).check()
    expect(shown(page)).to_have_attribute("data-annotation", ids[0])
    expect(page.locator(".g4c-progress")).to_contain_text("1 / 2 in 'approved'")

    # reload the first pair by its link: everything kept
    page.goto(world["server"].url + f"?pair={ids[0]}")
    page.wait_for_selector(".g4c-progress")
    expect(shown(page)).to_have_attribute("data-annotation", ids[0])
    expect(page.locator(f".g4c-board [data-item='{descriptor_id}']")).to_have_class(re.compile("g4c-flagged"))
    expect(caption_field(page, "i", 0)).to_have_value("Paint the walls yellow.")
    assert page.locator("#g4c-cap-i1 input[data-flag]").is_checked()
    assert "APPROVED BY ANN" in page.locator(".g4c-meta").inner_text().upper()
    expect(page.locator("#g4c-note textarea")).to_have_value("plant colour looks off")
    page.get_by_label("Show ground truth (demo world) (g)").check()
    expect(page.locator(".g4c-gt")).to_contain_text("Ground-truth edits")
    page.get_by_role("button", name="Score the flags against ground truth").click()
    expect(page.locator(".g4c-score")).to_contain_text(re.compile(r"descriptors: \d+ of \d+ hallucinated caught"))
    page.screenshot(path=str(SHOTS / "review.png"), full_page=True)
    assert error_toasts(page) == 0
    context.close()

    statuses = dict(db.execute("SELECT id, review_status FROM annotations").fetchall())
    assert [statuses[i] for i in ids[:3]] == ["approved", "rejected", "approved"]
    assert db.execute("SELECT reviewer FROM annotations WHERE id = ?", [ids[1]]).fetchone()[0] == "ann"
    flags = db.execute("SELECT target_kind, target_id, reviewer FROM flags WHERE annotation_id = ? AND"
                       " removed_at IS NULL ORDER BY target_kind", [ids[0]]).fetchall()
    assert flags == [("caption", f"{ids[0]}:c1", "ann"), ("descriptor", descriptor_id, "ann")]
    edits = db.execute("SELECT caption_id, version, text, editor FROM caption_edits WHERE editor = 'ann'").fetchall()
    assert edits == [(f"{ids[0]}:c0", 1, "Paint the walls yellow.", "ann")]
    assert db.execute("SELECT note FROM annotations WHERE id = ?", [ids[0]]).fetchone()[0] == "plant colour looks off"
    events = db.execute("SELECT annotation_id, value, reviewer FROM review_events WHERE action = 'status'"
                        " ORDER BY id").fetchall()
    assert events == [(ids[0], "approved", "ann"), (ids[1], "rejected", "ann"), (ids[2], "approved", "ann")]


def test_two_reviewers_edit_one_pair_at_once(world, browser, external_requests):
    pair = world["annotation_ids"][4]
    ctx_a, a = open_page(browser, world, external_requests, "ann", f"?pair={pair}")
    ctx_b, b = open_page(browser, world, external_requests, "bob", f"?pair={pair}")
    caption_field(a, "i", 0).fill("Take away the lamp.")
    caption_field(b, "i", 1).fill("Put a plant in the corner.")
    caption_field(a, "i", 0).press("Enter")
    caption_field(b, "i", 1).press("Enter")
    wait_caption_status(a, "saved as version 1")
    wait_caption_status(b, "saved as version 1")
    # one caption edited by both: bob starts typing, ann saves first; bob's save is
    # refused with a message, nothing overwritten (bob's page may have been refreshed
    # meanwhile: his unsaved text and the version he started from are kept)
    caption_field(b, "i", 2).fill("Remove the lamp entirely.")
    caption_field(a, "i", 2).fill("Take the lamp off the table.")
    caption_field(a, "i", 2).press("Enter")
    wait_caption_status(a, "saved as version 1")
    caption_field(b, "i", 2).press("Enter")
    wait_caption_status(b, "NOT SAVED: ann changed this caption")
    expect(b.locator("#g4c-cap-i2")).to_have_class(re.compile("g4c-conflict"))
    expect(caption_field(b, "i", 2)).to_have_value("Remove the lamp entirely.")
    db = world["db"]
    current = dict(db.execute(
        "SELECT caption_id, text FROM caption_edits WHERE caption_id LIKE ? ORDER BY version", [pair + ":%"]).fetchall())
    assert current == {f"{pair}:c0": "Take away the lamp.", f"{pair}:c1": "Put a plant in the corner.",
                       f"{pair}:c2": "Take the lamp off the table."}
    # each is told of the other's work while looking at the pair, and sees it on reload
    expect(a.locator(".g4c-activity")).to_contain_text("bob edited caption c1", timeout=15_000)
    a.keyboard.press("Escape")
    a.locator("#g4c-reload").click()
    expect(caption_field(a, "i", 1)).to_have_value("Put a plant in the corner.")
    expect(a.locator("#g4c-cap-i1 .g4c-capmeta")).to_contain_text("edited by bob")
    ctx_a.close()
    ctx_b.close()


def test_reviewers_working_down_one_queue_are_not_handed_the_same_pair(world, browser, external_requests):
    # Every page opened on the queue's first pair and Next (or 'go on') took each to the
    # same next one: two reviewers reviewed the same pairs in step, the later decision
    # replacing the earlier, and nothing on the page said someone else had the pair open.
    db = world["db"]
    flt = rl.make_filter("unreviewed", None, None, None)
    seq = {a: s for a, s in db.execute("SELECT id, seq FROM annotations").fetchall()}
    ctx_a, a = open_page(browser, world, external_requests, "ann")
    first_a = shown(a).get_attribute("data-annotation")
    ctx_b, b = open_page(browser, world, external_requests, "bob")
    first_b = shown(b).get_attribute("data-annotation")
    assert first_a and first_b and first_b != first_a
    before = rl.step_from(db, flt, first_b, "previous")
    assert before is not None
    goto = a.get_by_label("Go to pair")
    goto.fill(before)
    goto.press("Enter")
    expect(shown(a)).to_have_attribute("data-annotation", before)
    a.locator("body").click(position={"x": 5, "y": 5})
    a.keyboard.press("j")                        # passes over bob's pair
    expect(shown(a)).not_to_have_attribute("data-annotation", before)
    now_a = shown(a).get_attribute("data-annotation")
    assert now_a != first_b and seq[now_a] > seq[first_b]
    # both on one pair (Go to is never passed over): each page says who else has it open
    goto = b.get_by_label("Go to pair")
    goto.fill(now_a)
    goto.press("Enter")
    expect(shown(b)).to_have_attribute("data-annotation", now_a)
    expect(b.locator(".g4c-openby")).to_have_text("also open for ann")
    expect(a.locator(".g4c-openby")).to_have_text("also open for bob", timeout=15_000)   # the next live tick
    ctx_a.close()
    ctx_b.close()


def test_a_click_on_a_board_not_yet_refreshed_never_undoes_another_reviewers_flag(world, browser,
                                                                                     external_requests):
    # bob's board is drawn before ann's flag lands; his click on the descriptor (shown
    # unflagged) asks to flag it, so ann's flag must stay, not be toggled off.
    from store import review as store_review

    db, pair = world["db"], world["annotation_ids"][9]
    ctx_b, b = open_page(browser, world, external_requests, "bob", f"?pair={pair}")
    items = b.locator(".g4c-chip[data-item]").evaluate_all("chips => chips.map(c => c.dataset.item)")
    for item in items[:3]:
        store_review.add_flag(db, pair, "descriptor", item, "ann")
        was_flagged = b.evaluate(
            "(item) => { const c = document.querySelector(`#g4c-board [data-item='${item}']`);"
            " const was = c.classList.contains('g4c-flagged'); c.click(); return was; }", item)
        if not was_flagged:   # a live refresh did not land in between: the board was stale
            break
    assert not was_flagged
    wait_message(b, "descriptor flagged")
    rows = db.execute("SELECT reviewer, removed_at FROM flags WHERE annotation_id = ? AND target_id = ?",
                      [pair, item]).fetchall()
    assert rows == [("ann", None)]
    ctx_b.close()


def test_queue_counts_follow_other_reviewers_without_a_move(world, browser, external_requests):
    # the position and counts line is the reviewer's view of overall progress: another
    # reviewer's decision on another pair shows in it within a few seconds
    from store import queue as store_queue
    from store import review as store_review

    db, ids = world["db"], world["annotation_ids"]
    context, page = open_page(browser, world, external_requests, "ann", f"?pair={ids[8]}")
    before = store_queue.counts(db)
    expect(page.locator(".g4c-progress")).to_contain_text(f"{before['rejected']:,} rejected")
    store_review.set_review_status(db, ids[9], "rejected", "bob")
    after = store_queue.counts(db)
    assert after["rejected"] == before["rejected"] + 1
    expect(page.locator(".g4c-progress")).to_contain_text(f"{after['rejected']:,} rejected", timeout=15_000)
    expect(page.locator("#g4c-current textarea, #g4c-current input").first).to_have_value(ids[8])
    context.close()


def test_the_review_filters_offer_runs_made_after_the_page_opened(world, browser, external_requests):
    # The Run, Model and Split choices were read once, when the page loaded: a run started
    # later (Pipeline tab, CLI) could not be picked without reloading the page.
    from store.annotations import create_run

    context, page = open_page(browser, world, external_requests, "ann")
    run = create_run(world["db"], "simulator", "sim-later", name="started later")
    page.get_by_role("combobox", name="Run", exact=True).click()
    expect(page.locator("ul[role='listbox'] li").filter(has_text=f"run {run.id} · started later")).to_have_count(1)
    # the choice filters by that run's id (it has no pairs yet)
    page.locator("ul[role='listbox'] li").filter(has_text=f"run {run.id} · started later").click()
    expect(page.locator("#g4c-message textarea")).to_have_value("the 'unreviewed' queue is empty")
    page.get_by_role("combobox", name="Model", exact=True).click()
    expect(page.locator("ul[role='listbox'] li").filter(has_text="sim-later")).to_have_count(1)
    context.close()


def test_a_long_unbroken_descriptor_stays_inside_its_column(world, browser, external_requests):
    # The two descriptor columns were '1fr 1fr' grid tracks, which grow to fit their
    # longest word: one long unbroken descriptor (a VLM's hyphen-less run-on, a path)
    # squeezed the stage 1 column and pushed stage 2 under the captions, cut off.
    from store import review as store_review

    db, pair = world["db"], world["annotation_ids"][8]
    stage2_id = db.execute("SELECT stage2_id FROM annotations WHERE id = ?", [pair]).fetchone()[0]
    objects = json.loads(db.execute("SELECT objects FROM descriptions WHERE id = ?", [stage2_id]).fetchone()[0])
    objects[-1]["descriptors"].append("Supercalifragilisticexpialidocious" * 4)
    with db.conn:
        db.execute("UPDATE descriptions SET objects = ? WHERE id = ?", [json.dumps(objects), stage2_id])
    context, page = open_page(browser, world, external_requests, "ann", f"?pair={pair}")
    expect(page.locator(".g4c-chip", has_text="Supercalifragilistic")).to_be_visible()
    widths = page.locator(".g4c-col").evaluate_all(
        "cols => cols.map(c => [Math.round(c.getBoundingClientRect().width), c.scrollWidth - c.clientWidth])")
    (left, left_overflow), (right, right_overflow) = widths
    assert abs(left - right) <= 2 and left_overflow <= 0 and right_overflow <= 0, widths
    # the same in the pair's history: a long unbroken note stays inside the table
    store_review.set_note(db, pair, "see:" + "x" * 200, "bob")
    page.locator("#g4c-reload").click()
    page.locator("#g4c-history-box").get_by_text("History of this pair").click()
    table = page.locator(".g4c-histtable")
    expect(table).to_contain_text("see:xxx")
    assert table.evaluate("t => t.getBoundingClientRect().right <= t.parentElement.getBoundingClientRect().right + 1")
    context.close()


def test_a_long_unbroken_caption_stays_inside_its_row(world, browser, external_requests):
    # A caption box is as wide as its row: a long unbroken run (a VLM's snake_case
    # object name, a pasted path) made the box, sized to its content, as wide as that
    # word, so the end of the caption ran past the panel, cut off, as did its history.
    from store import review as store_review

    db, pair = world["db"], world["annotation_ids"][5]
    word = "bedside_table_with_two_drawers_and_brass_handles_" * 4
    store_review.edit_caption(db, f"{pair}:c0", f"Replace the lamp with a {word} next to the bed.", "bob")
    context, page = open_page(browser, world, external_requests, "ann", f"?pair={pair}")
    expect(caption_field(page, "i", 0)).to_have_value(re.compile("bedside_table"))
    page.locator("#g4c-cap-i0 details.g4c-caphist summary").click()
    expect(page.locator("#g4c-cap-i0 .g4c-histlist li").first).to_be_visible()
    overflow = page.locator("#g4c-captions .g4c-captions").evaluate(
        "panel => { const right = panel.getBoundingClientRect().right + 1;"
        " return Array.from(panel.querySelectorAll('.g4c-caprow, .g4c-caprow textarea, .g4c-histlist li'))"
        ".filter(e => e.getBoundingClientRect().right > right).map(e => e.tagName + '.' + e.className); }")
    assert overflow == []
    context.close()


def test_leaving_the_page_with_unsaved_text_asks_first(world, browser, external_requests):
    # A caption or the note saves when its field is left; a reload (F5) or a closed tab
    # leaves no field, so text typed and not yet saved was gone without a word.
    pair = world["annotation_ids"][5]
    context, page = open_page(browser, world, external_requests, "ann", f"?pair={pair}")
    asked = []
    page.on("dialog", lambda d: (asked.append(d.type), d.accept()))
    page.locator("body").click(position={"x": 5, "y": 5})
    page.reload()                                    # nothing typed: no question
    page.wait_for_selector(".g4c-progress")
    assert asked == []
    for field in (caption_field(page, "i", 1), page.locator("#g4c-note textarea")):
        field.click()
        page.keyboard.type(" and a typed word")
        page.reload()
        page.wait_for_selector(".g4c-progress")
        assert asked == ["beforeunload"], field
        asked.clear()
    context.close()


def test_undo_a_caption_edit_and_see_its_history(world, browser, external_requests):
    db, pair = world["db"], world["annotation_ids"][6]
    original = rl.load_pair(db, pair).individual[0].text
    context, page = open_page(browser, world, external_requests, "ann", f"?pair={pair}")
    field, undo = caption_field(page, "i", 0), page.locator("#g4c-cap-i0 button[data-undo]")
    expect(field).to_have_value(original)
    expect(undo).to_be_disabled()                     # the pipeline's text: nothing to undo
    field.fill("First edit of the caption.")
    field.press("Enter")
    wait_caption_status(page, "saved as version 1")
    field.fill("Second edit <b>of</b> the caption.")
    field.press("Enter")
    wait_caption_status(page, "saved as version 2")
    undo.click()
    wait_caption_status(page, "caption c0: undone")
    expect(field).to_have_value("First edit of the caption.")
    expect(page.locator("#g4c-cap-i0 .g4c-capmeta")).to_contain_text("v3 · undone by ann (back to v1)")
    # the keyboard: select caption 1, z
    page.locator("body").click(position={"x": 5, "y": 5})
    page.keyboard.press("1")
    page.keyboard.press("z")
    wait_caption_status(page, "caption c0: undone, back to")
    expect(field).to_have_value(original)
    expect(undo).to_be_disabled()
    page.keyboard.press("z")                          # nothing left to undo: said, not silent
    wait_caption_status(page, "^caption c0: nothing to undo, it shows the pipeline's original text$")
    # the caption's history: every version with text, editor and time, newest first
    page.locator("#g4c-cap-i0 details.g4c-caphist summary").click()
    versions = page.locator("#g4c-cap-i0 .g4c-histlist li")
    expect(versions).to_have_count(5)
    expect(versions.nth(0)).to_contain_text(re.compile(r"v4 · undo → text of v0 · ann · \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC · current"))
    expect(versions.nth(2)).to_contain_text("Second edit <b>of</b> the caption.")   # markup shown as text
    expect(versions.nth(4)).to_contain_text("v0 · original (pipeline)")
    assert page.locator("#g4c-cap-i0 .g4c-histlist b").count() == 0
    # the pair's history: flags and notes with who and when
    page.locator("#g4c-cap-i1 input[data-flag]").click()
    wait_message(page, "caption c1 flagged")
    page.locator("#g4c-note textarea").fill("c0 was fine as it was")
    page.locator("body").click(position={"x": 5, "y": 5})
    wait_message(page, "note saved")
    page.locator("#g4c-history-box").get_by_text("History of this pair").click()
    history = page.locator("#g4c-history")
    expect(history).to_contain_text("flagged caption c1")
    expect(history).to_contain_text("note: “c0 was fine as it was”", timeout=15_000)   # the next live tick
    expect(history).to_contain_text("undid caption c0 back to v0 (v4)")
    expect(page.locator("#g4c-cap-i0 details.g4c-caphist")).to_have_attribute("open", "")  # kept open by the tick
    page.wait_for_function("Array.from(document.querySelectorAll('.g4c-images img')).every(i => i.naturalWidth > 0)")
    page.screenshot(path=str(SHOTS / "review_history.png"), full_page=True)
    rows = db.execute("SELECT version, action, restores, editor FROM caption_edits WHERE caption_id = ?"
                      " ORDER BY version", [f"{pair}:c0"]).fetchall()
    assert rows == [(1, "edit", 1, "ann"), (2, "edit", 2, "ann"), (3, "undo", 1, "ann"), (4, "undo", 0, "ann")]
    # a box that was typed in shows the next pair's own caption after a move
    field.fill("Third edit.")
    field.press("Enter")
    wait_caption_status(page, "saved as version 5")
    page.keyboard.press("Escape")
    page.locator("#g4c-next").click()
    expect(shown(page)).not_to_have_attribute("data-annotation", pair)
    now_shown = shown(page).get_attribute("data-annotation")
    expect(field).to_have_value(rl.load_pair(db, now_shown).individual[0].text)
    assert error_toasts(page) == 0
    context.close()


def test_the_save_message_outlives_the_redraw_that_follows_the_save(world, browser, external_requests):
    # The live timer redraws the pair after the reviewer's own save (its stamp moved);
    # that redraw emptied the captions panel's status line within 4 s, so "saved", or
    # the warning that training cuts a long caption, was gone before it could be read.
    pair = world["annotation_ids"][3]
    context, page = open_page(browser, world, external_requests, "ann", f"?pair={pair}")
    field = caption_field(page, "i", 0)
    render = page.locator(".g4c-captions").get_attribute("data-render")
    field.fill("Make the lamp " + "very " * 80 + "red.")
    field.press("Enter")
    wait_caption_status(page, "saved as version 1; it is \\d+ CLIP tokens")
    page.wait_for_function(f"document.querySelector('.g4c-captions').dataset.render !== '{render}'"
                           " && document.querySelector('.g4c-captions').dataset.live === '1'", timeout=15_000)
    wait_caption_status(page, "saved as version 1; it is \\d+ CLIP tokens")
    # every caption box shows all of its text, the redrawn long one too (a box sized by
    # the text's length hid the end of long captions: a reviewer approved unread text)
    hidden = page.locator(".g4c-caprow textarea").evaluate_all(
        "areas => areas.filter(a => a.scrollHeight > a.clientHeight + 1).map(a => a.value)")
    assert hidden == []
    # a move shows another pair: its own message only
    page.keyboard.press("Escape")
    page.locator("#g4c-next").click()
    expect(shown(page)).not_to_have_attribute("data-annotation", pair)
    expect(page.locator(".g4c-capstatus")).to_have_text("")
    context.close()


def test_a_caption_never_keeps_a_line_break(world, browser, external_requests):
    # Shift+Enter put a line break into the caption box, and a save stored it (a pasted
    # line break too): captions are one line for exports and CLIP.
    from store import review as store_review

    db, pair = world["db"], world["annotation_ids"][9]
    caption_id = rl.load_pair(db, pair).individual[1].id
    context, page = open_page(browser, world, external_requests, "ann", f"?pair={pair}")
    field = caption_field(page, "i", 1)
    field.fill("Make the lamp red.")
    field.press("Shift+Enter")  # saves, as Enter does, instead of breaking the line
    wait_caption_status(page, "saved as version 1$")
    assert store_review.get_caption(db, caption_id).current_text == "Make the lamp red."
    field.fill("Make the lamp\nblue.")  # as a paste brings it
    field.press("Enter")
    wait_caption_status(page, "saved as version 2; its line breaks were replaced by spaces")
    expect(field).to_have_value("Make the lamp blue.")
    assert store_review.get_caption(db, caption_id).current_text == "Make the lamp blue."
    context.close()


def test_the_reviewers_own_slow_save_is_not_taken_for_someone_elses(world, browser, external_requests):
    # While a save's answer was on its way (the server's first save loads the CLIP
    # tokenizer: seconds), the live redraw already showed the saved version, and the row
    # turned red: 'changed by someone else while you are editing ... saving it will be
    # refused', about the reviewer's own save.
    import time

    db, pair = world["db"], world["annotation_ids"][9]
    row = len(rl.load_pair(db, pair).individual) - 1
    context, page = open_page(browser, world, external_requests, "ann", f"?pair={pair}")
    page.evaluate("""() => {
      window.g4cStatuses = [];
      const panel = document.querySelector('#g4c-captions');
      new MutationObserver(() => {
        const s = panel.querySelector('.g4c-capstatus');
        const text = s ? s.textContent : '';
        if (text && window.g4cStatuses[window.g4cStatuses.length - 1] !== text) window.g4cStatuses.push(text);
      }).observe(panel, {subtree: true, childList: true, characterData: true});
    }""")
    live_seconds = 4

    def slow_answer(route):
        response = route.fetch()          # saved now; its answer comes after the live redraw
        time.sleep(live_seconds + 3)
        route.fulfill(response=response)

    page.route("**/gradio_api/component_server/**", slow_answer)
    render = page.locator(".g4c-captions").get_attribute("data-render")
    field = caption_field(page, "i", row)
    field.fill("Make the wall a pale green.")
    field.press("Enter")
    page.wait_for_function(f"document.querySelector('.g4c-captions').dataset.render !== '{render}'",
                           timeout=15_000)
    wait_caption_status(page, "saved as version 1")
    page.unroute("**/gradio_api/component_server/**")
    statuses = page.evaluate("window.g4cStatuses")
    assert not [s for s in statuses if "someone else" in s], statuses
    assert "g4c-conflict" not in page.locator(f"#g4c-cap-i{row}").get_attribute("class")
    expect(field).to_have_value("Make the wall a pale green.")
    context.close()


def test_a_refused_save_answered_after_a_move_is_still_told_with_the_text(world, browser, external_requests):
    # Ann types over caption c1, presses Esc and moves on; Bob had saved c1 a moment
    # before. Her save is refused (his text is kept), but its answer came after the move,
    # and the page dropped it: her edit was gone without a word.
    from store import review as store_review

    db, pair = world["db"], world["annotation_ids"][8]
    caption = rl.load_pair(db, pair).individual[1]
    context, page = open_page(browser, world, external_requests, "ann", f"?pair={pair}")
    field = caption_field(page, "i", 1)
    field.fill("Ann's words for caption one.")
    store_review.edit_caption(db, caption.id, "Bob's words for caption one.", "bob", expected_version=caption.version)
    page.keyboard.press("Escape")
    goto = page.get_by_label("Go to pair")
    goto.fill(world["annotation_ids"][0])
    goto.press("Enter")
    expect(shown(page)).to_have_attribute("data-annotation", world["annotation_ids"][0])
    wait_caption_status(page, "^On the pair you left .*NOT SAVED: bob changed this caption .*"
                              "Your text was: “Ann's words for caption one.”")
    assert store_review.get_caption(db, caption.id).current_text == "Bob's words for caption one."
    context.close()


def test_shortening_a_caption_the_pipeline_flagged_unticks_its_flag_box_at_once(world, browser, external_requests):
    # The save clears the pipeline's 'over 77 CLIP tokens' flag and says so, but the row
    # kept its ticked flag box and red frame until the next live redraw.
    from store.models import PIPELINE_FLAG_REASONS, PIPELINE_REVIEWER

    db, pair = world["db"], world["annotation_ids"][2]
    caption = rl.load_pair(db, pair).individual[1]
    with db.conn:
        db.execute("INSERT INTO flags (annotation_id, target_kind, target_id, reason, reviewer, created_at)"
                   " VALUES (?, 'caption', ?, ?, ?, '2026-11-27T00:00:00.000+00:00')",
                   [pair, caption.id, PIPELINE_FLAG_REASONS[0], PIPELINE_REVIEWER])
    context, page = open_page(browser, world, external_requests, "ann", f"?pair={pair}")
    box = page.locator("#g4c-cap-i1 input[data-flag]")
    expect(box).to_be_checked()
    field = caption_field(page, "i", 1)
    field.fill("Make the lamp red.")
    field.press("Enter")
    wait_caption_status(page, "flag is cleared")
    assert not box.is_checked()
    assert "g4c-capflagged" not in page.locator("#g4c-cap-i1").get_attribute("class")
    context.close()


def test_other_reviewers_changes_appear_live_and_unsaved_text_is_kept(world, browser, external_requests):
    from store import review as store_review

    db, pair = world["db"], world["annotation_ids"][7]
    view = rl.load_pair(db, pair)
    c0, c1, c2 = view.individual[:3]
    context, page = open_page(browser, world, external_requests, "ann", f"?pair={pair}")
    mine, theirs = caption_field(page, "i", 0), caption_field(page, "i", 1)
    expect(mine).to_have_value(c0.text)
    mine.fill("Ann is still typing this")              # focused, not saved
    store_review.edit_caption(db, c1.id, "Bob's new text for caption one.", "bob", expected_version=0)
    store_review.add_flag(db, pair, "caption", c2.id, "bob", "wrong count")
    store_review.set_review_status(db, pair, "approved", "bob")
    expect(theirs).to_have_value("Bob's new text for caption one.", timeout=15_000)   # no reload
    expect(page.locator("#g4c-cap-i1 .g4c-capmeta")).to_contain_text("v1 · edited by bob")
    expect(page.locator("#g4c-cap-i2 input[data-flag]")).to_be_checked()
    expect(page.locator(".g4c-meta")).to_contain_text(re.compile("approved by bob", re.I))
    expect(page.locator(".g4c-activity")).to_contain_text("bob edited caption c1")
    expect(mine).to_have_value("Ann is still typing this")
    assert page.evaluate("document.activeElement === document.querySelector('#g4c-cap-i0 textarea')")

    # nothing changed: two ticks go by without a single change to what the pair panels
    # show (their parents: Gradio's own status tracker sits beside them and is not ours)
    page.evaluate("""() => {
      window.g4cMutations = 0;
      const seen = new MutationObserver((list) => { window.g4cMutations += list.length; });
      for (const sel of ['.g4c-captions', '.g4c-board', '.g4c-progress', '.g4c-activity'])
        seen.observe(document.querySelector(sel).parentElement,
                     {subtree: true, childList: true, attributes: true, characterData: true});
    }""")
    page.wait_for_timeout(9_000)
    assert page.evaluate("window.g4cMutations") == 0

    # ann's edit of c0 saves: nobody else touched c0
    mine.press("Enter")
    wait_caption_status(page, "saved as version 1")
    # ann types again; bob saves c0 meanwhile: the refresh keeps ann's text, says so, and
    # her save is refused (optimistic check against the version she started from)
    mine.fill("Ann's second thought")
    store_review.edit_caption(db, c0.id, "Bob's text for caption zero.", "bob", expected_version=1)
    wait_caption_status(page, "caption c0: changed by someone else while you are editing")
    assert page.evaluate("window.g4cMutations") > 0
    expect(mine).to_have_value("Ann's second thought")
    expect(page.locator("#g4c-cap-i0")).to_have_class(re.compile("g4c-conflict"))
    mine.press("Enter")
    wait_caption_status(page, "NOT SAVED: bob changed this caption")
    undo = page.locator("#g4c-cap-i0 button[data-undo]")
    undo.click()                                        # undo from the stale version: refused too
    wait_caption_status(page, "NOT UNDONE: bob changed caption c0 after your page showed it")
    assert store_review.get_caption(db, c0.id).current_text == "Bob's text for caption zero."
    # a reload shows the stored text
    page.keyboard.press("Escape")
    page.locator("#g4c-reload").click()
    expect(mine).to_have_value("Bob's text for caption zero.")
    expect(page.locator("#g4c-cap-i0")).not_to_have_class(re.compile("g4c-conflict"))
    # bob's note shows live (`rl.live_note` decides when the box may be replaced)
    store_review.set_note(db, pair, "Bob: check the lamp", "bob")
    expect(page.locator("#g4c-note textarea")).to_have_value("Bob: check the lamp", timeout=15_000)
    assert error_toasts(page) == 0
    context.close()


def test_markup_in_captions_is_text(world, browser, external_requests):
    pair = world["annotation_ids"][-1]
    context, page = open_page(browser, world, external_requests, "ann", f"?pair={pair}")
    expect(caption_field(page, "i", 0)).to_have_value(SCRIPT_CAPTION)
    page.get_by_label("Show ground truth (demo world) (g)").check()
    page.wait_for_timeout(300)
    assert page.evaluate("window.g4cPwned") is None
    assert page.locator("img[src='x']").count() == 0
    assert "49" not in page.locator("#g4c-cap-i0").inner_text()
    context.close()


def test_image_requests_outside_the_dataset_are_refused(world, browser, external_requests):
    context, page = open_page(browser, world, external_requests, None)
    base = world["server"].url
    assert page.request.get(base + "g4c/image/" + "0" * 64).status == 404
    assert page.request.get(base + "gradio_api/file=/etc/passwd").status == 403
    assert page.request.get(base + f"gradio_api/file={world['world_dir']}/images/000000.png").status == 403
    assert page.request.get(base + f"gradio_api/file={world['db_path']}").status == 403
    page.wait_for_function("Array.from(document.querySelectorAll('.g4c-images img')).every(i => i.naturalWidth > 0)")
    assert page.evaluate("Array.from(document.querySelectorAll('.g4c-images img')).map(i => i.naturalWidth)") == [256, 256]
    context.close()


def test_pipeline_tab_runs_in_background_and_fills_the_queue(world, browser, external_requests):
    db = world["db"]
    before = db.execute("SELECT COUNT(*) FROM annotations WHERE status = 'done'").fetchone()[0]
    context, page = open_page(browser, world, external_requests, "ann")
    page.get_by_role("tab", name="Pipeline").click()
    page.locator("#g4c-run-limit input, #g4c-run-limit textarea").first.fill("3")
    page.locator("#g4c-run-start").click()
    progress = page.locator("#g4c-run-progress textarea").first
    expect(progress).to_have_value(re.compile(r"run \d+ · finished"), timeout=60_000)
    assert "3 done" in progress.input_value() and "spend: $" in progress.input_value()
    page.screenshot(path=str(SHOTS / "pipeline.png"), full_page=True)
    after = db.execute("SELECT COUNT(*) FROM annotations WHERE status = 'done'").fetchone()[0]
    assert after == before + 3
    page.get_by_role("tab", name="Review").click()
    page.locator("#g4c-reload").click()
    expect(page.locator(".g4c-progress")).to_contain_text(f"/ {after} reviewed")
    assert error_toasts(page) == 0
    context.close()


def test_pipeline_progress_is_live_in_every_browser_that_opens_the_tab(world, browser, external_requests):
    # ann starts a run against a slow local OpenAI-protocol server; bob opens the
    # Pipeline tab while it goes and must watch it finish without pressing Refresh.
    from openai_server import start_server

    server = start_server(latency=0.3)
    try:
        ctx_a, a = open_page(browser, world, external_requests, "ann")
        ctx_b, b = open_page(browser, world, external_requests, "bob")
        a.get_by_role("tab", name="Pipeline").click()
        a.locator("#g4c-run-backend input").first.click()
        a.get_by_role("option", name="openai (chat completions)").click()
        a.get_by_role("textbox", name="Model").fill("live-progress-model")
        a.get_by_label("Base URL").fill(server.url)
        a.get_by_label("Concurrency (requests in flight)").fill("1")
        a.locator("#g4c-run-limit input, #g4c-run-limit textarea").first.fill("4")
        a.locator("#g4c-run-start").click()
        progress_a = a.locator("#g4c-run-progress textarea").first
        expect(progress_a).to_have_value(re.compile(r"· running"))
        b.get_by_role("tab", name="Pipeline").click()
        progress_b = b.locator("#g4c-run-progress textarea").first
        expect(progress_b).to_have_value(re.compile(r"· running"))
        expect(progress_b).to_have_value(re.compile(r"· finished"), timeout=60_000)
        assert "4 done" in progress_b.input_value()
        assert error_toasts(a) == 0 and error_toasts(b) == 0
        ctx_a.close()
        ctx_b.close()
    finally:
        server.stop()


def test_stats_tab_plots(world, browser, external_requests):
    from store.annotations import create_run

    # a run name is user text too: it reaches tables, dropdowns and plot legends
    create_run(world["db"], "simulator", "sim-x", name="<img src=x onerror=\"window.g4cPwned=3\">")
    context, page = open_page(browser, world, external_requests, "ann")
    page.get_by_role("tab", name="Pipeline").click()
    expect(page.locator("#g4c-runs")).to_contain_text("<img src=x")
    page.get_by_role("tab", name="Stats").click()
    table = page.locator("#g4c-stats-table")
    expect(table).to_contain_text("run 1", timeout=30_000)
    expect(page.locator("#g4c-stats-catch")).to_contain_text("descriptors")   # ann's flags on run 1
    plots = page.get_by_role("img", name=re.compile("plot"))
    expect(plots).to_have_count(4)
    assert all(box["height"] > 150 for box in (plots.nth(i).bounding_box() for i in range(4)))
    page.wait_for_timeout(500)
    page.screenshot(path=str(SHOTS / "stats.png"), full_page=True)
    assert error_toasts(page) == 0
    assert page.evaluate("window.g4cPwned") is None and page.locator("img[src='x']").count() == 0
    context.close()


def test_export_tab_download_has_edited_approved_captions(world, browser, external_requests):
    db, pair = world["db"], world["annotation_ids"][5]
    caption = rl.load_pair(db, pair).individual[0]
    rl.save_caption(db, caption.id, "Exported edit of the first caption.", "carol", caption.version)
    rl.set_status(db, pair, "approved", "carol")
    context, page = open_page(browser, world, external_requests, "ann")
    page.get_by_role("tab", name="Export").click()
    page.locator("#g4c-export-go").click()
    expect(page.locator("#g4c-export-summary textarea").first).to_have_value(re.compile(r"pairs?, .* captions written"))
    link = page.locator("#g4c-export-file a").first
    expect(link).to_be_visible()
    body = page.request.get(link.get_attribute("href")).text()
    exported = json.loads(body)
    texts = [t for item in exported for t in item["difference_captions"]]
    assert "Exported edit of the first caption." in texts
    assert caption.original not in texts or caption.original == "Exported edit of the first caption."
    page.screenshot(path=str(SHOTS / "export.png"), full_page=True)
    assert error_toasts(page) == 0
    context.close()


def test_retrieve_tab_returns_results_with_the_true_target(world, browser, external_requests):
    context, page = open_page(browser, world, external_requests, "ann")
    page.get_by_role("tab", name="Retrieve").click()
    page.locator("#g4c-q-go").click()                    # nothing chosen yet: a clear error
    expect(page.locator(".toast-body.error").first).to_be_visible()
    page.locator("#g4c-q-pair input").first.click()
    page.locator("ul[role='listbox'] li").first.click()
    expect(page.locator("#g4c-q-text textarea, #g4c-q-text input").first).not_to_have_value("")
    page.locator("#g4c-q-go").click()
    results = page.locator("#g4c-q-results .g4c-result")
    expect(results.first).to_be_visible(timeout=30_000)
    assert results.count() == 10
    expect(page.locator("#g4c-q-results")).to_contain_text(re.compile(r"True target .*(rank \d+|not in the top 10)"))
    page.locator("input[aria-label='number input for Top k'], #g4c-q-k input[type=number]").first.fill("50")
    page.locator("#g4c-q-go").click()
    expect(page.locator("#g4c-q-results .g4c-true")).to_have_count(1)   # the gallery is smaller than 50
    page.wait_for_function("Array.from(document.querySelectorAll('#g4c-q-results img')).every(i => i.naturalWidth > 0)")
    page.screenshot(path=str(SHOTS / "retrieve.png"), full_page=True)
    # an uploaded reference: results, and no true target to mark
    page.locator("input[type=file]").first.set_input_files(str(world["world_dir"] / "images" / "000000.png"))
    page.wait_for_timeout(500)
    page.locator("#g4c-q-go").click()
    expect(page.locator("#g4c-q-results")).not_to_contain_text("True target")
    gallery = world["db"].execute("SELECT COUNT(*) FROM images").fetchone()[0]
    expect(page.locator("#g4c-q-results .g4c-result")).to_have_count(min(50, gallery))
    context.close()
    assert external_requests == []


def test_login_user_is_the_reviewer(world, browser, external_requests):
    from ui.server import AppServer

    with AppServer(world["db_path"], auth=[("carol", "pw-carol")]) as server:
        context = browser.new_context(viewport={"width": 1440, "height": 1000})
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.on("request", lambda r: None if r.url.startswith((server.url, "data:", "blob:"))
                else external_requests.append(r.url))
        page.goto(server.url)
        page.locator("input[type=password]").wait_for()
        page.locator("input:not([type=password])").first.fill("carol")
        page.locator("input[type=password]").fill("pw-carol")
        page.keyboard.press("Enter")
        page.wait_for_selector(".g4c-progress")
        reviewer = page.locator("#g4c-reviewer textarea, #g4c-reviewer input").first
        expect(reviewer).to_have_value("carol")
        assert not reviewer.is_editable()
        annotation_id = shown(page).get_attribute("data-annotation")
        # the page cannot claim another reviewer: the login decides
        page.evaluate("document.querySelector('#g4c-reviewer textarea, #g4c-reviewer input').value = 'mallory'")
        field = page.locator("#g4c-cap-i0 textarea")
        field.fill("Written while logged in as carol.")
        field.press("Enter")
        wait_caption_status(page, "saved as version")
        edited = (annotation_id + ":c0", "Written while logged in as carol.")
        page.wait_for_function("Array.from(document.querySelectorAll('.g4c-images img')).every(i => i.naturalWidth > 0)")
        page.locator("#g4c-reject").click()
        expect(shown(page)).not_to_have_attribute("data-annotation", annotation_id)
        context.close()
    row = world["db"].execute("SELECT review_status, reviewer FROM annotations WHERE id = ?", [annotation_id]).fetchone()
    assert row == ("rejected", "carol")
    editor = world["db"].execute("SELECT editor FROM caption_edits WHERE caption_id = ? AND text = ?", edited).fetchone()
    assert editor == ("carol",)


def test_nothing_left_this_machine(external_requests):
    assert external_requests == []
