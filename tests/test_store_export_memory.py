"""An export of tens of thousands of pairs is written as it is read: its memory must not
hold every pair's records, nor the whole file as one string (a CIRR export of 20,000
demo-world pairs, a 68 MB file, peaked at 888 MB of resident memory)."""

from __future__ import annotations

import json
import tracemalloc

import pytest

from store import annotations as ann
from store import open_db, transaction
from store.exporters import _json_array, export_dataset

PAIRS = 2000
IMAGES = 40
# Long captions, so that the file outweighs what an export holds of one chunk of pairs.
LONG = "the rest of the room stays as it was, " * 24


@pytest.fixture(scope="module")
def big_store(tmp_path_factory):
    """PAIRS annotated and approved pairs with demo-world-sized ground truth and image sets."""
    db = open_db(tmp_path_factory.mktemp("export_memory") / "s.db")
    now = "2026-01-01T00:00:00.000+00:00"
    edits = [{"op": "recolour", "kind": "lamp", "attribute": "colour", "from": "red", "to": "green",
              "object": {"kind": "lamp", "colour": "red", "pattern": "plain", "size": "small",
                         "position": "left", "count": 1}}] * 3
    with transaction(db):
        db.conn.executemany(
            "INSERT INTO images (id, name, path, width, height, size_bytes, format, created_at)"
            " VALUES (?, ?, ?, 256, 256, 1000, 'PNG', ?)",
            [(f"img{i:04d}", f"{i:06d}.png", f"/data/world/images/{i:06d}.png", now) for i in range(IMAGES)])
        db.conn.executemany(
            "INSERT INTO pairs (id, source, external_id, reference_id, target_id, split, original_captions,"
            " img_set, ground_truth, created_at) VALUES (?, 'demo', ?, ?, ?, 'train', ?, ?, ?, ?)",
            [(f"p{i}", f"pair-{i:06d}", f"img{i % IMAGES:04d}", f"img{(i + 1) % IMAGES:04d}",
              json.dumps([f"original caption {k} of pair {i}, about the lamp on the left" for k in range(4)]),
              json.dumps([f"img{(i + k) % IMAGES:04d}" for k in range(6)]), json.dumps(edits), now)
             for i in range(PAIRS)])
    run = ann.create_run(db, "simulator", "sim-1", prompt_versions={"stage3": "p3"})
    pair_ids = [f"p{i}" for i in range(PAIRS)]
    ann.ensure_annotations(db, run.id, pair_ids)
    with transaction(db):
        for i, pair_id in enumerate(pair_ids):
            ann.complete_annotation(
                db, ann.annotation_id_for(run.id, pair_id), stage1_id=None, stage2_id=None,
                captions=[f"make the lamp of pair {i} green instead of red, variant {j}; " + LONG for j in range(5)],
                compounds=[(f"compound {k} of pair {i}: the lamp is green and the chair is gone", [0, 1], 20)
                           for k in range(2)])
        db.execute("UPDATE annotations SET review_status = 'approved'")
    return db


# Peak traced memory over the file's size: the whole file as one string (and a CIRR
# export's every pair record) was measured at 3.0x (jsonl) and 7.8x (cirr); written as it
# is read, 0.7x and 2.2x (what remains is one chunk of pairs and the pairs' rows).
BOUNDS = {"jsonl": 1.5, "cirr": 4.0}


@pytest.mark.parametrize("fmt", sorted(BOUNDS))
def test_export_memory_stays_under_a_small_multiple_of_the_file(big_store, tmp_path, fmt):
    out = tmp_path / f"out.{fmt}"
    export_dataset(big_store, fmt, tmp_path / "warm-up")  # lazy imports and caches: not the export's
    tracemalloc.start()
    try:
        stats = export_dataset(big_store, fmt, out)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert stats["pairs"] == PAIRS and stats["captions"] == PAIRS * 7
    assert peak < BOUNDS[fmt] * out.stat().st_size, (peak, out.stat().st_size)


def test_files_written_piece_by_piece_are_the_json_of_the_whole(big_store, tmp_path):
    for entries in ([], [{}], [[]], [{"a": [1, {"b": "x\ny é"}], "c": {}}, "s", 2, None, {"d": []}]):
        assert "".join(_json_array(iter(entries))) == json.dumps(entries, indent=2, ensure_ascii=False) + "\n"
    for fmt, count in (("good4cir", PAIRS), ("cirr", PAIRS * 7)):
        export_dataset(big_store, fmt, tmp_path / fmt)
        text = (tmp_path / fmt).read_text()
        assert len(json.loads(text)) == count
        assert text == json.dumps(json.loads(text), indent=2, ensure_ascii=False) + "\n"
    export_dataset(big_store, "jsonl", tmp_path / "jsonl")
    lines = (tmp_path / "jsonl").read_text().splitlines()
    assert len(lines) == PAIRS and all(len(json.loads(line)["captions"]) == 7 for line in lines)
