"""The authors' dataset.json (and pairs.jsonl) with images named by http URLs, served by
a real local HTTP server: `import --download` fetches them into the dataset's folder,
where the review app serves them and training reads them; bad URLs are named per item.
Also the round trip through the authors' format: exported, imported back, repeated."""

from __future__ import annotations

import json
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from store import open_db
from store.exporters import export_dataset
from store.images import url_image_id
from store.importers import import_dataset
from ui.security import resolve_image


class _Handler(SimpleHTTPRequestHandler):
    def log_request(self, *args):  # one line per request: counted, not printed
        self.server.paths.append(self.path)

    def log_message(self, *args):
        pass


@pytest.fixture
def web(tmp_path):
    """A folder served over HTTP on 127.0.0.1: (base URL, folder, requested paths)."""
    folder = tmp_path / "web"
    folder.mkdir()
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_Handler, directory=str(folder)))
    server.paths = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", folder, server.paths
    server.shutdown()
    server.server_close()


def _picture(path: Path, colour, size=(64, 48), mode="RGB") -> None:
    Image.new(mode, size, colour).save(path)


def _dataset(tmp_path, web):
    base, served, _ = web
    for i, colour in enumerate(["red", "green", "blue"]):
        _picture(served / f"room{i}.jpg", colour)
    # Over the 50-megapixel limit, yet small on the wire (1 bit per pixel, one colour).
    _picture(served / "huge.png", 1, size=(8000, 6400), mode="1")
    (served / "page.html").write_text("<html><body>moved</body></html>")
    folder = tmp_path / "data"
    (folder / "local").mkdir(parents=True)
    _picture(folder / "local" / "a.png", "white")
    entries = [
        {"reference_image": f"{base}/room0.jpg", "target_image": f"{base}/room1.jpg",
         "difference_captions": ["make it green"]},
        {"reference_image": f"{base}/room2.jpg", "target_image": "local/a.png",
         "difference_captions": ["make it white"]},
        {"reference_image": f"{base}/missing.jpg", "target_image": f"{base}/room1.jpg",
         "difference_captions": ["404"]},
        {"reference_image": f"{base}/page.html", "target_image": f"{base}/room1.jpg",
         "difference_captions": ["html"]},
        {"reference_image": f"{base}/huge.png", "target_image": f"{base}/room1.jpg",
         "difference_captions": ["huge"]},
    ]
    (folder / "dataset.json").write_text(json.dumps(entries))
    return folder, base


def _dataset_folder(tmp_path, entries) -> Path:
    """tmp_path/data holding a dataset.json of `entries` (the authors' format)."""
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "dataset.json").write_text(json.dumps(entries), encoding="utf-8")
    return folder


def test_download_fetches_url_images_into_the_dataset_folder_where_the_app_serves_them(tmp_path, web):
    # Before: URLs were only recorded, so the review app showed "no local file" for every
    # URL image and training left those pairs out; nothing could fetch them.
    folder, base = _dataset(tmp_path, web)
    db = open_db(tmp_path / "s.db")
    report = import_dataset(db, "good4cir", folder / "dataset.json", download=True)
    assert report.pairs_added == 2
    reasons = {p.item: p.reason for p in report.problems}
    assert set(reasons) == {"dataset.json[2]", "dataset.json[3]", "dataset.json[4]"}
    assert f"{base}/missing.jpg" in reasons["dataset.json[2]"] and "404" in reasons["dataset.json[2]"]
    html = reasons["dataset.json[3]"]
    assert f"{base}/page.html" in html and "not an image" in html and "text/html" in html
    assert f"{base}/huge.png" in reasons["dataset.json[4]"] and "pixels" in reasons["dataset.json[4]"]
    assert not any("is a URL" in w.reason for w in report.warnings)
    for name in ("room0.jpg", "room1.jpg", "room2.jpg"):
        image_id = url_image_id(f"{base}/{name}")
        path, url, width = db.execute("SELECT path, url, width FROM images WHERE id = ?", [image_id]).fetchone()
        assert url == f"{base}/{name}" and width == 64
        assert Path(path).is_relative_to(folder.resolve())
        assert resolve_image(db, image_id).path == Path(path)  # the review app serves it
    # A rerun asks the server for nothing already fetched, and adds nothing.
    web[2].clear()
    again = import_dataset(db, "good4cir", folder / "dataset.json", download=True)
    assert (again.pairs_added, again.pairs_skipped, again.images_added) == (0, 2, 0)
    assert sorted(web[2]) == ["/huge.png", "/missing.jpg", "/page.html"]  # only the failures again


def test_download_fills_in_a_store_imported_without_it_and_exports_keep_the_urls(tmp_path, web):
    folder, base = _dataset(tmp_path, web)
    db = open_db(tmp_path / "s.db")
    first = import_dataset(db, "good4cir", folder / "dataset.json")
    assert first.pairs_added == 5  # recorded, not fetched: nothing to check them by
    assert any("--download" in w.reason for w in first.warnings)
    with pytest.raises(Exception, match="no local file"):
        resolve_image(db, url_image_id(f"{base}/room0.jpg"))
    again = import_dataset(db, "good4cir", folder / "dataset.json", download=True)
    assert (again.pairs_added, again.images_downloaded) == (0, 3)
    assert {p.item for p in again.warnings if "by URL only" in p.reason} == {
        f"{base}/missing.jpg", f"{base}/page.html", f"{base}/huge.png"}
    resolve_image(db, url_image_id(f"{base}/room0.jpg"))
    # The authors' format goes out with the URLs it came in with, not this machine's copies.
    out = tmp_path / "out.json"
    export_dataset(db, "good4cir", out, include_unreviewed=True)
    written = json.loads(out.read_text())
    assert written[0]["reference_image"] == f"{base}/room0.jpg"
    assert written[1]["target_image"] == str((folder / "local" / "a.png").resolve())


def test_importing_an_export_back_into_its_own_store_says_the_pairs_are_there_already(tmp_path):
    # The export names local images by absolute path and lies under another name, so its
    # pairs got new ids: importing it back doubled every pair without a word.
    fixtures = Path(__file__).parent / "fixtures" / "good4cir"
    db = open_db(tmp_path / "s.db")
    assert import_dataset(db, "good4cir", fixtures / "dataset.json").pairs_added == 3
    out = tmp_path / "export.json"
    export_dataset(db, "good4cir", out, include_unreviewed=True)
    report = import_dataset(db, "good4cir", out)
    assert report.pairs_added == 3
    (note,) = [w for w in report.warnings if "same reference and target" in w.reason]
    assert "3 pairs" in note.reason and "'dataset'" in note.reason and "new store" in note.reason
    fresh = import_dataset(open_db(tmp_path / "new.db"), "good4cir", out)
    assert fresh.pairs_added == 3 and not [w for w in fresh.warnings if "same reference" in w.reason]


def test_download_takes_urls_with_spaces_and_accents_as_a_browser_does(tmp_path, web):
    # A space or an accent in the path crashed the import (http.client.InvalidURL).
    base, served, _ = web
    _picture(served / "my room.jpg", "red")
    _picture(served / "chambre_étoile.jpg", "blue")
    folder = _dataset_folder(tmp_path, [
        {"reference_image": f"{base}/my room.jpg", "target_image": f"{base}/chambre_étoile.jpg"},
        {"reference_image": f"{base}/my%20room.jpg", "target_image": f"{base}/chambre_%C3%A9toile.jpg"},
        {"reference_image": f"{base}/a\\nb.jpg", "target_image": f"{base}/my room.jpg"},
    ])
    report = import_dataset(open_db(tmp_path / "s.db"), "good4cir", folder / "dataset.json", download=True)
    assert report.pairs_added == 2
    assert [p.item for p in report.problems] == ["dataset.json[2]"] and "404" in report.problems[0].reason


def test_a_downloaded_tiff_is_kept_under_its_own_suffix_and_not_fetched_again(tmp_path, web):
    base, served, requested = web
    _picture(served / "a.tif", "red")
    _picture(served / "b.png", "blue")
    folder = _dataset_folder(tmp_path, [
        {"reference_image": f"{base}/a.tif", "target_image": f"{base}/b.png"}])
    for _ in range(2):
        report = import_dataset(open_db(tmp_path / "s.db"), "good4cir", folder / "dataset.json", download=True)
        assert report.problems == []
    assert sorted(requested) == ["/a.tif", "/b.png"]  # each once: the rerun used the files
    assert sorted(p.suffix for p in (folder / "downloaded_images").iterdir()) == [".png", ".tiff"]


def test_download_works_for_the_pairs_format_too(tmp_path, web):
    # pairs.jsonl takes URLs as well; --download was refused for it.
    base, served, _ = web
    _picture(served / "r.png", "red")
    folder = tmp_path / "data"
    folder.mkdir()
    _picture(folder / "t.png", "blue")
    (folder / "pairs.jsonl").write_text(
        json.dumps({"id": "p0", "reference": f"{base}/r.png", "target": "t.png", "split": "train"}) + "\n"
        + json.dumps({"id": "p1", "reference": f"{base}/gone.png", "target": "t.png"}) + "\n")
    db = open_db(tmp_path / "s.db")
    report = import_dataset(db, "pairs", folder, download=True)
    assert report.pairs_added == 1 and len(report.problems) == 1
    assert "p1" in report.problems[0].item and f"{base}/gone.png" in report.problems[0].reason
    resolve_image(db, url_image_id(f"{base}/r.png"))


def test_an_entry_repeated_word_for_word_is_a_note_not_a_problem(tmp_path):
    # Concatenated dataset.json files repeat entries; nothing of the copy is lost, yet it
    # was a problem ("give each pair its own id", exit status 3) on every import.
    folder = tmp_path / "data"
    folder.mkdir()
    for name, colour in (("a.png", "red"), ("b.png", "blue")):
        _picture(folder / name, colour)
    same = {"reference_image": "a.png", "target_image": "b.png", "difference_captions": ["make it blue"]}
    other = dict(same, difference_captions=["paint it blue"])
    (folder / "dataset.json").write_text(json.dumps([same, same, other]))
    db = open_db(tmp_path / "s.db")
    for _ in range(2):
        report = import_dataset(db, "good4cir", folder / "dataset.json")
        assert [p.item for p in report.problems] == ["dataset.json[2]"]  # other captions: still named
        (note,) = [w for w in report.warnings if w.item == "dataset.json[1]"]
        assert "repeats dataset.json[0]" in note.reason


def test_download_with_split_fetches_only_that_splits_images(tmp_path, web):
    # `--split val` downloaded the images of every split (a whole dataset for a tenth of it).
    base, served, requested = web
    for name, colour in (("a.png", "red"), ("b.png", "blue"), ("c.png", "green"), ("d.png", "white")):
        _picture(served / name, colour)
    folder = _dataset_folder(tmp_path, [
        {"reference_image": f"{base}/a.png", "target_image": f"{base}/b.png", "split": "train"},
        {"reference_image": f"{base}/c.png", "target_image": f"{base}/d.png", "split": "val"}])
    report = import_dataset(open_db(tmp_path / "s.db"), "good4cir", folder / "dataset.json",
                            split="val", download=True)
    assert (report.pairs_added, report.problems) == (1, [])
    assert sorted(requested) == ["/c.png", "/d.png"]


def test_images_recorded_by_url_only_are_one_note_for_the_import(tmp_path):
    # Each URL image was a note of its own, two per pair: the authors' dataset of URLs
    # printed thousands of lines that buried the real problems; pairs.jsonl said nothing.
    folder = tmp_path / "data"
    folder.mkdir()
    entries = [{"reference_image": f"https://example.org/{i}a.jpg", "target_image": f"https://example.org/{i}b.jpg"}
               for i in range(30)]
    (folder / "dataset.json").write_text(json.dumps(entries))
    (folder / "pairs.jsonl").write_text("".join(
        json.dumps({"id": str(i), "reference": e["reference_image"], "target": e["target_image"]}) + "\n"
        for i, e in enumerate(entries)))
    for fmt, path in (("good4cir", folder / "dataset.json"), ("pairs", folder)):
        report = import_dataset(open_db(tmp_path / f"{fmt}.db"), fmt, path)
        assert report.pairs_added == 30
        (note,) = report.warnings
        assert "60 images" in note.reason and "https://example.org/0a.jpg" in note.reason, note.reason
        assert "--download" in note.reason and "review app" in note.reason


def test_ctrl_c_stops_a_download_at_once(tmp_path):
    # Every URL is queued on the thread pool up front: Ctrl-C must cancel those not begun
    # (Executor.map does), not wait while a large dataset is fetched to the end.
    import signal
    import subprocess
    import sys
    import time

    asked = []

    class Slow(SimpleHTTPRequestHandler):
        def do_GET(self):
            asked.append(self.path)
            time.sleep(1.0)
            self.send_error(404)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        folder = _dataset_folder(
            tmp_path, [{"reference_image": f"{base}/{i}a.jpg", "target_image": f"{base}/{i}b.jpg"} for i in range(40)])
        proc = subprocess.Popen([sys.executable, "-m", "good4cir", "import", "--db", str(tmp_path / "s.db"),
                                 "--format", "good4cir", str(folder / "dataset.json"), "--download"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while not asked and time.monotonic() < deadline:  # the downloads have begun
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode != 0
        assert len(asked) <= 16, f"{len(asked)} of 80 URLs fetched after Ctrl-C"  # those in flight
        # the new store held nothing yet and is gone: the message must not say it kept work
        assert not (tmp_path / "s.db").exists()
        assert "the new store" in err.decode() and "was removed again" in err.decode()
        assert "everything finished so far is saved" not in err.decode()
    finally:
        server.shutdown()
        server.server_close()


def test_a_damaged_downloaded_copy_is_fetched_again(tmp_path, web):
    # A copy cut short (a full disk, a file edited by hand) was a problem on every rerun,
    # naming the local file, until the user found and deleted it.
    base, served, requested = web
    _picture(served / "a.png", "red")
    _picture(served / "b.png", "blue")
    folder = _dataset_folder(tmp_path, 
        [{"reference_image": f"{base}/a.png", "target_image": f"{base}/b.png"}])
    db = open_db(tmp_path / "s.db")
    assert import_dataset(db, "good4cir", folder / "dataset.json", download=True).problems == []
    (copy,) = [p for p in (folder / "downloaded_images").iterdir()
               if p.read_bytes() == (served / "a.png").read_bytes()]
    copy.write_bytes(copy.read_bytes()[:20])
    requested.clear()
    again = import_dataset(open_db(tmp_path / "t.db"), "good4cir", folder / "dataset.json", download=True)
    assert (again.pairs_added, again.problems) == (1, [])
    assert requested == ["/a.png"] and copy.read_bytes() == (served / "a.png").read_bytes()
