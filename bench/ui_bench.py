"""Review app latency at 100,000 pairs, measured in headless Chromium.

- next: from a click on "Next" to the new pair shown (the board names the new pair and
  both new images have loaded), timed in the page with performance.now(). Target: p95
  under 300 ms.
- first load: from navigation to the first pair shown with its images. Target: under 3 s.

Each is also measured on a baseline in the same run: a one-button Gradio app served the
same way (click -> new text shown; page load -> button shown), so the ratios say what
the review app adds on top of Gradio itself on this machine.

The store is bench/store_bench.py's 100,000-pair store (cached under /tmp) plus, on a
copy, real PNG files (300 distinct images, so consecutive pairs never share one and the
browser cache does not flatter the numbers) and stage 1 / stage 2 descriptor lists for
every pair.

usage: python bench/ui_bench.py [--pairs N] [--clicks C] [--rebuild]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from store import open_db, transaction  # noqa: E402

UI_BENCH_VERSION = 1
IMAGES = 300
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]


def _render_images(folder: Path) -> list[tuple[str, Path]]:
    from PIL import Image, ImageDraw

    import hashlib

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    out = []
    for i in range(IMAGES):
        img = Image.new("RGB", (256, 256), tuple(rng.randrange(256) for _ in range(3)))
        draw = ImageDraw.Draw(img)
        for _ in range(12):
            x, y = rng.randrange(220), rng.randrange(220)
            draw.rectangle([x, y, x + rng.randrange(10, 60), y + rng.randrange(10, 60)],
                           fill=tuple(rng.randrange(256) for _ in range(3)))
        path = folder / f"room{i:04d}.png"
        img.save(path)
        out.append((hashlib.sha256(path.read_bytes()).hexdigest(), path))
    return out


def _copy_store(source: Path, dest: Path) -> None:
    """Copy through SQLite's backup API: a WAL store's recent pages may not be in the main file."""
    import sqlite3

    src, dst = sqlite3.connect(str(source)), sqlite3.connect(str(dest))
    with dst:
        src.backup(dst)
    src.close()
    dst.close()


def ui_store(pairs: int, rebuild: bool) -> tuple[Path, Path]:
    """(db path, image folder): the store bench's store with images and descriptors."""
    from store_bench import cached_store

    base = cached_store(pairs, False)
    root = Path(tempfile.gettempdir()) / f"good4cir_ui_bench_v{UI_BENCH_VERSION}_{pairs}"
    db_path = root / "ui.db"
    if db_path.exists() and not rebuild:
        return db_path, root / "images"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    started = time.perf_counter()
    building = root / "building.db"
    _copy_store(base, building)
    images = _render_images(root / "images")
    db = open_db(building)
    now = "2026-01-01T00:00:00.000+00:00"
    objects = ["bed", "lamp", "chair", "plant", "painting", "window", "rug", "mirror"]
    colours = ["red", "blue", "green", "white", "black", "brown"]
    with transaction(db):
        conn = db.conn
        conn.executemany(
            "INSERT INTO images (id, name, path, root, width, height, format, created_at)"
            " VALUES (?, ?, ?, ?, 256, 256, 'PNG', ?)",
            [(image_id, path.name, str(path), str(root), now) for image_id, path in images])
        ids = [image_id for image_id, _ in images]
        pair_rows = conn.execute("SELECT rowid, id FROM pairs").fetchall()
        conn.executemany("UPDATE pairs SET reference_id = ?, target_id = ? WHERE rowid = ?",
                         [(ids[(2 * n) % IMAGES], ids[(2 * n + 1) % IMAGES], rowid)
                          for n, (rowid, _) in enumerate(pair_rows)])

        def described(seed: int, changed: bool) -> str:
            rng = random.Random(seed)
            chosen = rng.sample(objects, 5)
            out = [{"name": o, "descriptors": [rng.choice(colours), "small", "on the left"]} for o in chosen]
            if changed:
                out[0]["descriptors"][0] = "yellow"
                out.append({"name": "vase", "descriptors": ["blue", "tall"]})
            return json.dumps(out)

        for image_id in ids:
            conn.execute("INSERT INTO descriptions (id, stage, image_id, objects, created_at) VALUES (?, 1, ?, ?, ?)",
                         [f"s1:{image_id}", image_id, described(int(image_id[:8], 16), False), now])
        conn.executemany(
            "INSERT INTO descriptions (id, stage, image_id, pair_id, objects, created_at) VALUES (?, 2, ?, ?, ?, ?)",
            ((f"s2:{pair_id}", ids[(2 * n + 1) % IMAGES], pair_id,
              described(int(ids[(2 * n) % IMAGES][:8], 16), True), now)
             for n, (_, pair_id) in enumerate(pair_rows)))
        conn.execute(
            "UPDATE annotations SET stage1_id = 's1:' || (SELECT reference_id FROM pairs WHERE pairs.id = annotations.pair_id),"
            " stage2_id = 's2:' || pair_id")
    db.execute("ANALYZE")
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.conn.close()
    building.rename(db_path)
    print(f"built the UI bench store in {time.perf_counter() - started:.1f} s -> {db_path}")
    return db_path, root / "images"


def _baseline_server():
    """A one-button Gradio app served like the review app (FastAPI + uvicorn thread)."""
    import threading

    import fastapi
    import gradio as gr
    import uvicorn

    from ui.server import free_port

    with gr.Blocks(analytics_enabled=False) as demo:
        out = gr.Textbox(elem_id="out")
        button = gr.Button("go", elem_id="go")
        counter = {"n": 0}

        def click():
            counter["n"] += 1
            return f"value {counter['n']}"

        button.click(click, None, out)
        demo.queue(default_concurrency_limit=16)
    app = gr.mount_gradio_app(fastapi.FastAPI(), demo, path="/", ssr_mode=False, footer_links=[])
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    return server, thread, f"http://127.0.0.1:{port}/"


# Runs in the page: click, then wait until the board names another pair and every image
# of the new pair has loaded. Returns the elapsed ms.
NEXT_JS = """
async () => {
  const before = document.querySelector('.g4c-board').dataset.annotation;
  const t0 = performance.now();
  document.getElementById('g4c-next').click();
  return await new Promise((resolve, reject) => {
    const deadline = t0 + 10000;
    function check() {
      const board = document.querySelector('.g4c-board');
      const imgs = Array.from(document.querySelectorAll('.g4c-images img'));
      if (board && board.dataset.annotation !== before && imgs.length === 2 &&
          imgs.every(i => i.complete && i.naturalWidth > 0)) {
        resolve(performance.now() - t0);
      } else if (performance.now() > deadline) { reject('timeout'); }
      else { requestAnimationFrame(check); }
    }
    check();
  });
}
"""

BASELINE_JS = """
async () => {
  const box = () => document.querySelector('#out textarea, #out input');
  const before = box().value;
  const t0 = performance.now();
  document.querySelector('#go').click();
  return await new Promise((resolve, reject) => {
    function check() {
      if (box().value !== before) resolve(performance.now() - t0);
      else if (performance.now() - t0 > 10000) reject('timeout');
      else requestAnimationFrame(check);
    }
    check();
  });
}
"""


def percentile(samples: list[float], q: int) -> float:
    return statistics.quantiles(samples, n=100, method="inclusive")[q - 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=100_000)
    parser.add_argument("--clicks", type=int, default=100, help="timed Next clicks (and baseline clicks)")
    parser.add_argument("--loads", type=int, default=5, help="timed page loads of each app")
    parser.add_argument("--rebuild", action="store_true")
    args = parser.parse_args()

    from playwright.sync_api import sync_playwright

    from ui.server import AppServer

    source, _ = ui_store(args.pairs, args.rebuild)
    work_dir = Path(tempfile.mkdtemp(prefix="good4cir_ui_bench_"))
    try:
        work = work_dir / "store.db"
        _copy_store(source, work)
        base_server, base_thread, base_url = _baseline_server()
        with AppServer(work) as app, sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            loads, base_loads = [], []
            for _ in range(args.loads):
                for url, selector, into in ((app.url, ".g4c-images img", loads), (base_url, "#go", base_loads)):
                    context = browser.new_context(viewport={"width": 1440, "height": 1000})
                    page = context.new_page()
                    started = time.perf_counter()
                    page.goto(url)
                    page.wait_for_selector(selector)
                    if selector == ".g4c-images img":
                        page.wait_for_function("Array.from(document.querySelectorAll('.g4c-images img'))"
                                               ".every(i => i.complete && i.naturalWidth > 0)")
                    into.append((time.perf_counter() - started) * 1000)
                    context.close()
            # Separate contexts, each brought to the front before it is timed: a page in a
            # background tab gets its animation frames throttled to one a second.
            page = browser.new_context(viewport={"width": 1440, "height": 1000}).new_page()
            base_page = browser.new_context(viewport={"width": 1440, "height": 1000}).new_page()
            page.goto(app.url)
            page.wait_for_selector(".g4c-board")
            base_page.goto(base_url)
            base_page.wait_for_selector("#go")
            nexts, base_clicks = [], []
            for i in range(args.clicks + 5):  # alternate, so both see the same machine load
                page.bring_to_front()
                page.wait_for_timeout(50)  # a reviewer looks before moving on
                took = page.evaluate(NEXT_JS)
                base_page.bring_to_front()
                base_page.wait_for_timeout(50)
                base_took = base_page.evaluate(BASELINE_JS)
                if i >= 5:  # the first few warm both up
                    nexts.append(took)
                    base_clicks.append(base_took)
            position = page.locator(".g4c-progress").inner_text()
            browser.close()
        base_server.should_exit = True
        base_thread.join(timeout=10)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)

    def line(name, samples, base, target):
        p50, p95 = statistics.median(samples), percentile(samples, 95)
        b50, b95 = statistics.median(base), percentile(base, 95)
        verdict = "PASS" if p95 < target else "FAIL"
        print(f"{name:<28} p50 {p50:7.1f} ms  p95 {p95:7.1f} ms  | baseline p50 {b50:6.1f} p95 {b95:6.1f} ms"
              f"  | p95 ratio {p95 / b95:5.2f}x  | target p95 < {target:.0f} ms: {verdict}")

    print(f"\nreview app at {args.pairs:,} pairs, headless Chromium; {args.clicks} clicks, {args.loads} loads")
    print(f"queue position after the clicks: {position}")
    line("next pair shown (click)", nexts, base_clicks, 300)
    line("first page load", loads, base_loads, 3000)


if __name__ == "__main__":
    main()
