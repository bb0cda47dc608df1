"""The review app end to end in headless Chromium (Debian's /usr/bin/chromium, Python
Playwright; never `playwright install`). One server and one browser for the module.

Screenshots of every tab go to artifacts/screenshots/.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

from store.db import open_db
from ui_store_builder import build_review_store

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
SHOTS = Path(__file__).resolve().parent.parent / "artifacts" / "screenshots"
TIMEOUT_MS = 15_000

if not os.path.exists(CHROMIUM):
    pytest.skip("Chromium is not installed (make chromium)", allow_module_level=True)
playwright_api = pytest.importorskip("playwright.sync_api")
expect = playwright_api.expect


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from ui.server import AppServer

    root = tmp_path_factory.mktemp("browser")
    info = build_review_store(root, 6, script_caption=True)
    with AppServer(info["db_path"]) as server:
        info["server"] = server
        info["db"] = open_db(info["db_path"])
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


def info_text(page) -> str:
    return page.locator(".g4c-progress").inner_text()


def wait_message(page, pattern: str):
    expect(page.locator("#g4c-message textarea, #g4c-message input").first).to_have_value(re.compile(pattern))


def caption_field(page, kind: str, index: int):
    return page.locator(f"#g4c-text-{kind}{index} textarea, #g4c-text-{kind}{index} input").first


def shown_pair(page) -> str:
    return page.locator(".g4c-board").get_attribute("data-annotation")


def test_keyboard_review_flag_edit_approve_and_reload(world, browser, external_requests):
    ids = world["annotation_ids"]
    context, page = open_page(browser, world, external_requests)
    assert shown_pair(page) == ids[0]
    assert "1 / 6 in 'unreviewed'" in info_text(page) and "0 / 6 reviewed" in info_text(page)
    page.locator("body").click(position={"x": 5, "y": 5})

    # pair 1: flag a descriptor (click), flag caption 2 (keys 2, f), edit caption 1 (keys 1, e)
    page.locator(".g4c-board [data-item='s2-0/2/0']").click()
    wait_message(page, "descriptor flagged")
    expect(page.locator(".g4c-board [data-item='s2-0/2/0']")).to_have_class(re.compile("g4c-flagged"))
    page.keyboard.press("2")
    page.keyboard.press("f")
    wait_message(page, "caption c1 flagged")
    page.keyboard.press("1")
    page.keyboard.press("e")
    page.keyboard.press("Control+a")
    page.keyboard.type("Paint the box yellow.")
    page.keyboard.press("Enter")
    wait_message(page, "saved as version 1")
    page.keyboard.press("Escape")
    page.keyboard.press("a")                          # approve, go on to pair 2
    expect(page.locator(".g4c-board")).to_have_attribute("data-annotation", ids[1])
    assert "1 / 6 reviewed" in info_text(page)
    page.keyboard.press("r")                          # reject pair 2
    expect(page.locator(".g4c-board")).to_have_attribute("data-annotation", ids[2])
    page.keyboard.press("k")                          # back to ... previous unreviewed: none before
    page.keyboard.press("j")
    expect(page.locator(".g4c-board")).to_have_attribute("data-annotation", ids[3])
    page.keyboard.press("k")
    expect(page.locator(".g4c-board")).to_have_attribute("data-annotation", ids[2])
    page.keyboard.press("a")                          # approve pair 3
    expect(page.locator(".g4c-board")).to_have_attribute("data-annotation", ids[3])
    assert "3 / 6 reviewed" in info_text(page)
    page.screenshot(path=str(SHOTS / "review.png"), full_page=True)

    # reload the first pair by its link: everything kept
    page.goto(world["server"].url + f"?pair={ids[0]}")
    page.wait_for_selector(".g4c-progress")
    assert shown_pair(page) == ids[0]
    expect(page.locator(".g4c-board [data-item='s2-0/2/0']")).to_have_class(re.compile("g4c-flagged"))
    expect(caption_field(page, "i", 0)).to_have_value("Paint the box yellow.")
    assert page.locator("#g4c-flag-i1 input").is_checked()
    assert "APPROVED BY ANN" in page.locator(".g4c-meta").inner_text().upper()
    context.close()

    db = world["db"]
    statuses = dict(db.execute("SELECT id, review_status FROM annotations").fetchall())
    assert [statuses[i] for i in ids[:3]] == ["approved", "rejected", "approved"]
    assert db.execute("SELECT reviewer FROM annotations WHERE id = ?", [ids[1]]).fetchone()[0] == "ann"
    flags = db.execute("SELECT target_kind, target_id, reviewer FROM flags WHERE annotation_id = ? AND"
                       " removed_at IS NULL ORDER BY target_kind", [ids[0]]).fetchall()
    assert flags == [("caption", f"{ids[0]}:c1", "ann"), ("descriptor", "s2-0/2/0", "ann")]
    edits = db.execute("SELECT caption_id, version, text, editor FROM caption_edits").fetchall()
    assert edits == [(f"{ids[0]}:c0", 1, "Paint the box yellow.", "ann")]
    events = db.execute("SELECT annotation_id, value, reviewer FROM review_events WHERE action = 'status'"
                        " ORDER BY id").fetchall()
    assert events == [(ids[0], "approved", "ann"), (ids[1], "rejected", "ann"), (ids[2], "approved", "ann")]


def test_two_reviewers_edit_one_pair_at_once(world, browser, external_requests):
    pair = world["annotation_ids"][4]
    ctx_a, a = open_page(browser, world, external_requests, "ann", f"?pair={pair}")
    ctx_b, b = open_page(browser, world, external_requests, "bob", f"?pair={pair}")
    caption_field(a, "i", 2).fill("Take away the lamp.")
    caption_field(b, "i", 3).fill("Put a plant in the corner.")
    caption_field(a, "i", 2).press("Enter")
    caption_field(b, "i", 3).press("Enter")
    wait_message(a, "saved as version 1")
    wait_message(b, "saved as version 1")
    # the same caption from a stale page: refused with a message, nothing overwritten
    caption_field(b, "i", 2).fill("Remove the lamp entirely.")
    caption_field(b, "i", 2).press("Enter")
    wait_message(b, "NOT SAVED: ann changed this caption")
    db = world["db"]
    current = dict(db.execute(
        "SELECT caption_id, text FROM caption_edits WHERE caption_id LIKE ? ORDER BY version", [pair + ":%"]).fetchall())
    assert current == {f"{pair}:c2": "Take away the lamp.", f"{pair}:c3": "Put a plant in the corner."}
    # each sees the other's work on reload
    a.keyboard.press("Escape")
    a.locator("#g4c-reload").click()
    expect(caption_field(a, "i", 3)).to_have_value("Put a plant in the corner.")
    assert "edited by bob" in a.locator("#g4c-text-i3").inner_text()
    ctx_a.close()
    ctx_b.close()


def test_markup_in_captions_is_text(world, browser, external_requests):
    pair = world["annotation_ids"][0]
    context, page = open_page(browser, world, external_requests, "ann", f"?pair={pair}")
    script = "<script>window.g4cPwned=1</script><img src=x onerror=\"window.g4cPwned=2\">${7*7}"
    expect(caption_field(page, "i", 3)).to_have_value(script)
    assert script in caption_field(page, "k", 1).input_value()
    page.wait_for_timeout(300)
    assert page.evaluate("window.g4cPwned") is None
    assert page.locator("img[src='x']").count() == 0
    context.close()


def test_image_requests_outside_the_dataset_are_refused(world, browser, external_requests):
    context, page = open_page(browser, world, external_requests, None)
    base = world["server"].url
    assert page.request.get(base + "g4c/image/" + "0" * 64).status == 404
    assert page.request.get(base + "gradio_api/file=/etc/passwd").status == 403
    assert page.request.get(base + f"gradio_api/file={world['image_dir']}/ref0.png").status == 403
    loaded = page.evaluate("Array.from(document.querySelectorAll('.g4c-images img')).map(i => i.naturalWidth)")
    assert loaded == [256, 256]
    context.close()


def test_tabs_screenshots_and_no_network(world, browser, external_requests):
    context, page = open_page(browser, world, external_requests, "ann")
    for tab in ("Pipeline", "Stats", "Export", "Retrieve"):
        page.get_by_role("tab", name=tab).click()
        page.wait_for_timeout(400)
        page.screenshot(path=str(SHOTS / f"{tab.lower()}.png"), full_page=True)
    context.close()
    assert external_requests == []


def setup_module(module):
    SHOTS.mkdir(parents=True, exist_ok=True)
