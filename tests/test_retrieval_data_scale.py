"""Training data at dataset scale: a store's image files are checked once each, not once
per pair naming them, and an exported JSONL file is read line by line, not whole."""

from __future__ import annotations

import json
import pathlib
import tracemalloc

from test_retrieval_world import make_world_store

from retrieval.data import load_file_triplets, load_store_triplets
from store.db import open_db


def _count_calls(monkeypatch, name: str) -> list:
    calls = []
    real = getattr(pathlib.Path, name)

    def counted(self, *args, **kwargs):
        calls.append(str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, name, counted)
    return calls


def test_each_image_file_of_a_store_is_checked_once(tmp_path, monkeypatch):
    db_path = make_world_store(tmp_path, pairs=90)
    db = open_db(db_path)
    images = db.execute("SELECT COUNT(*) FROM images").fetchone()[0]
    db.conn.close()
    checks = _count_calls(monkeypatch, "is_file")
    data = load_store_triplets(db_path)
    assert len(data.triplets) == 90
    image_checks = [path for path in checks if path != str(db_path)]
    # Pair by pair it was 684 checks of these 54 images.
    assert len(image_checks) == len(set(image_checks)) <= images, (len(image_checks), images)


def test_an_exported_jsonl_file_is_read_line_by_line(tmp_path, monkeypatch):
    for name in ("ref.png", "tgt.png", "other.png"):
        (tmp_path / name).write_bytes(name.encode())  # load_file_triplets hashes, never decodes
    provenance = {"captions_from": "import", "source": "big", "notes": ["x" * 200] * 100}
    with open(tmp_path / "big.jsonl", "w", encoding="utf-8") as out:
        for i in range(300):
            out.write(json.dumps({"id": f"p{i}", "reference": "ref.png", "target": "tgt.png",
                                  "img_set": ["ref.png", "tgt.png", "other.png"], "split": "train",
                                  "captions": [f"caption {i}\u2028with a line separator"],
                                  "provenance": provenance}, ensure_ascii=False) + "\n")
    size = (tmp_path / "big.jsonl").stat().st_size
    resolves = _count_calls(monkeypatch, "resolve")
    tracemalloc.start()
    try:
        data = load_file_triplets(tmp_path / "big.jsonl")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert not data.problems and len(data.triplets) == 300
    # U+2028 is a line break to str.splitlines, not to JSONL: the caption stays whole.
    assert data.triplets[7].captions == ["caption 7\u2028with a line separator"]
    assert len(data.image_paths) == 3
    assert len(resolves) == 3  # once per image, not per record naming it (1,500 before)
    # Read whole, parsed whole: 3.3x the file; one line at a time, a small share of it.
    assert peak < 0.5 * size, (peak, size)  # measured 0.19x
