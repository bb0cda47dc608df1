"""`good4cir eval --submission DIR`: CIRR and CIRCO test-server files from a checkpoint,
for data imported with the real importers (a CIRR root built like tests/fixtures/cirr but
with 60 test1 images, and the CIRCO fixture with more test queries), target-less queries
ranked, and the top-1 checked against the model's own scores through `load_retriever`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from good4cir.cli import main

FIXTURES = Path(__file__).parent / "fixtures"
GROUPS, GROUP_SIZE = 10, 6  # test1: 60 images, so the top-50 cap is reached


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from retrieval.model import build_model, save_weights, write_config

    import torch

    checkpoint_dir = tmp_path_factory.mktemp("ckpt")
    config = {"model": "tiny", "fusion": "residual"}
    write_config(checkpoint_dir, config)
    # Random weights from a fixed seed: otherwise they depend on which tests ran first,
    # and some orders give near-ties deep in the top 50 that the file and the store
    # paths may break apart in the last float bit.
    torch.manual_seed(0)
    save_weights(checkpoint_dir / "best.pt", build_model(config))
    return checkpoint_dir


def _cirr_root(root: Path) -> dict:
    """CIRR layout: test1 withholds targets (one pair per image set), val has them."""
    rng = np.random.default_rng(0)
    (root / "captions").mkdir(parents=True)
    (root / "image_splits").mkdir()
    colours = ["red", "blue", "green", "yellow", "black", "white"]
    expected = {}
    for split, groups, with_target in (("test1", GROUPS, False), ("val", 2, True)):
        (root / split).mkdir()
        names, entries = {}, []
        for g in range(groups):
            members = [f"{split}-{g}-0-img{m}" for m in range(GROUP_SIZE)]
            for name in members:
                pixels = rng.integers(0, 255, size=(40, 40, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / f"{name}.png")
                names[name] = f"./{split}/{name}.png"
            entry = {"pairid": 100 + g, "reference": members[0],
                     "caption": f"make it {colours[g % len(colours)]}",
                     "img_set": {"id": g, "members": members}}
            if with_target:
                entry["target_hard"] = members[1]
                entry["target_soft"] = {members[1]: 1.0}
            entries.append(entry)
        (root / "captions" / f"cap.rc2.{split}.json").write_text(json.dumps(entries))
        (root / "image_splits" / f"split.rc2.{split}.json").write_text(json.dumps(names))
        expected[split] = {"entries": entries, "names": names}
    return expected


@pytest.fixture(scope="module")
def cirr(tmp_path_factory):
    base = tmp_path_factory.mktemp("cirr")
    expected = _cirr_root(base / "root")
    db_path = base / "cirr.db"
    assert main(["import", "--db", str(db_path), "--format", "cirr", str(base / "root")]) == 0
    return base, db_path, expected


def _eval(capsys, *args) -> str:
    capsys.readouterr()
    assert main(["eval", *args]) == 0
    return capsys.readouterr().out


def test_cirr_test1_files_rank_every_query_and_match_the_model(cirr, checkpoint, tmp_path, capsys):
    from retrieval.model import load_retriever

    base, db_path, expected = cirr
    out_dir = tmp_path / "submission"
    printed = _eval(capsys, "--db", str(db_path), "--checkpoint", str(checkpoint), "--split", "test1",
                    "--submission", str(out_dir), "--cache-dir", str(tmp_path / "cache"))
    recall_path = out_dir / "recall_submission_test1.json"
    subset_path = out_dir / "recall_subset_submission_test1.json"
    assert f"wrote {recall_path}" in printed and f"wrote {subset_path}" in printed
    assert "metrics skipped for 10 of 10 queries" in printed
    assert sorted(p.name for p in out_dir.iterdir()) == sorted([recall_path.name, subset_path.name])  # no .tmp

    recall = json.loads(recall_path.read_text())
    subset = json.loads(subset_path.read_text())
    entries = expected["test1"]["entries"]
    gallery_names = set(expected["test1"]["names"])
    pair_keys = {str(e["pairid"]) for e in entries}
    assert set(recall) == pair_keys | {"version", "metric"}
    assert set(subset) == pair_keys | {"version", "metric"}
    assert (recall["version"], recall["metric"]) == ("rc2", "recall")
    assert (subset["version"], subset["metric"]) == ("rc2", "recall_subset")
    for entry in entries:
        ranked = recall[str(entry["pairid"])]
        assert len(ranked) == 50 and len(set(ranked)) == 50
        assert set(ranked) <= gallery_names and entry["reference"] not in ranked
        top3 = subset[str(entry["pairid"])]
        members = set(entry["img_set"]["members"]) - {entry["reference"]}
        assert len(top3) == 3 and len(set(top3)) == 3 and set(top3) <= members
        # Within the set, the subset order is the recall order restricted to the set.
        assert top3 == [name for name in ranked if name in members][:3]

    # The model's own scores, computed apart: the same top-1 (the reference left out).
    retriever = load_retriever(checkpoint)
    root = base / "root"
    names = sorted(gallery_names)
    gallery = retriever.encode_images([Image.open(root / expected["test1"]["names"][n]).convert("RGB")
                                       for n in names])
    refs = [Image.open(root / expected["test1"]["names"][e["reference"]]).convert("RGB") for e in entries]
    queries = retriever.encode_queries(refs, [e["caption"] for e in entries])
    scores = queries @ gallery.T
    checked = 0
    for q, entry in enumerate(entries):
        row = scores[q].copy()
        row[names.index(entry["reference"])] = -np.inf
        order = np.argsort(-row)
        if row[order[0]] - row[order[1]] < 1e-4:
            continue  # a near tie could go either way between the two image pipelines
        assert recall[str(entry["pairid"])][0] == names[order[0]], entry["pairid"]
        checked += 1
    assert checked >= 5


def test_cirr_submission_from_an_exported_file_and_metrics_where_targets_exist(cirr, checkpoint, tmp_path, capsys):
    base, db_path, expected = cirr
    export = tmp_path / "cirr.jsonl"
    assert main(["export", "--db", str(db_path), "--format", "jsonl", "--out", str(export),
                 "--include-unreviewed"]) == 0
    cache = str(tmp_path / "cache")
    from_db, from_file = tmp_path / "from_db", tmp_path / "from_file"
    _eval(capsys, "--db", str(db_path), "--checkpoint", str(checkpoint), "--split", "test1",
          "--submission", str(from_db), "--cache-dir", cache)
    _eval(capsys, "--data", str(export), "--checkpoint", str(checkpoint), "--split", "test1",
          "--submission", str(from_file), "--cache-dir", cache)
    for name in ("recall_submission_test1.json", "recall_subset_submission_test1.json"):
        assert json.loads((from_file / name).read_text()) == json.loads((from_db / name).read_text())

    printed = _eval(capsys, "--db", str(db_path), "--checkpoint", str(checkpoint), "--split", "val",
                    "--submission", str(from_db), "--cache-dir", cache, "--json")
    result = json.loads(printed)
    assert result["submission"]["without_target"] == 0 and result["submission"]["queries"] == 2
    assert set(result["recall"]) == {"1", "5", "10", "50"} and set(result["recall_subset"]) == {"1", "2", "3"}
    recall = json.loads((from_db / "recall_submission_val.json").read_text())
    assert all(len(recall[str(e["pairid"])]) == 11 for e in expected["val"]["entries"])  # 12 images - reference


def test_pairs_without_a_cirr_pairid_are_named(tmp_path, checkpoint):
    images = FIXTURES / "pairs" / "images"
    members = sorted(p.name for p in images.glob("*.png"))[:4]
    record = {"id": "p-no-pairid", "reference": f"images/{members[0]}", "target": None,
              "split": "test1", "captions": ["make it red"],
              "img_set": [f"images/{m}" for m in members]}
    shutil.copytree(images, tmp_path / "images")
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps(record) + "\n")
    with pytest.raises(ValueError, match="pair p-no-pairid: no CIRR pairid"):
        main(["eval", "--data", str(data), "--checkpoint", str(checkpoint), "--split", "test1",
              "--submission", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache")])
    assert not (tmp_path / "out").exists()


def test_submission_json_has_the_documented_keys_when_no_query_has_a_target(cirr, checkpoint, tmp_path, capsys):
    # CIRR test1 withholds every target: eval --submission --json printed no metric key
    # at all, so scripts indexing the documented {recall, recall_subset, median_rank,
    # baselines} died on a KeyError. They are null now, with a note saying why.
    base, db_path, _ = cirr
    capsys.readouterr()
    assert main(["eval", "--db", str(db_path), "--checkpoint", str(checkpoint), "--split", "test1",
                 "--submission", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"), "--json"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    for key in ("recall", "recall_subset", "median_rank", "baselines", "interval"):
        assert result[key] is None, key
    assert result["queries"] == 0 and "map" not in result  # CIRR data has no mAP, targets or not
    assert result["submission"]["queries"] == result["submission"]["without_target"] == 10
    reason = "null: split test1 withholds the target of all its 10 queries"
    assert any(reason in note for note in result["notes"]) and reason in captured.err
    # Where targets exist the same keys hold numbers, and no such note is given.
    assert main(["eval", "--db", str(db_path), "--checkpoint", str(checkpoint), "--split", "val",
                 "--submission", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["queries"] == 2 and set(result["recall"]) == {"1", "5", "10", "50"}
    assert result["median_rank"] is not None and set(result["baselines"]) == {"image", "text", "sum"}
    assert not any("withholds" in note for note in result.get("notes", []))


def test_circo_files_hold_int_ids_for_every_query(tmp_path, checkpoint, capsys):
    root = tmp_path / "circo"
    shutil.copytree(FIXTURES / "circo", root)
    concepts = ["a chair", "a slice of cake", "a dog", "a bicycle", "a cup"]
    test_queries = [{"id": 40 + i, "reference_img_id": ref, "relative_caption": f"is shown {i}",
                     "shared_concept": concepts[i]} for i, ref in enumerate([21, 11, 12, 13, 22])]
    (root / "annotations" / "test.json").write_text(json.dumps(test_queries))
    db_path = tmp_path / "circo.db"
    assert main(["import", "--db", str(db_path), "--format", "circo", str(root)]) == 0
    out_dir = tmp_path / "out"
    printed = _eval(capsys, "--db", str(db_path), "--checkpoint", str(checkpoint), "--split", "test",
                    "--submission", str(out_dir), "--cache-dir", str(tmp_path / "cache"))
    assert "metrics skipped for 5 of 5 queries" in printed
    # CIRCO test withholds its targets: its measure, mAP, is there and null too.
    result = json.loads(_eval(capsys, "--db", str(db_path), "--checkpoint", str(checkpoint), "--split", "test",
                              "--submission", str(out_dir), "--cache-dir", str(tmp_path / "cache"), "--json"))
    assert result["map"] is None and result["recall"] is None and result["recall_subset"] is None
    assert any("withholds the target of all its 5 queries" in note for note in result["notes"])
    submission = json.loads((out_dir / "circo_submission_test.json").read_text())
    assert set(submission) == {str(q["id"]) for q in test_queries}
    gallery = {q["reference_img_id"] for q in test_queries}
    for query in test_queries:
        ranked = submission[str(query["id"])]
        assert all(type(i) is int for i in ranked)
        assert len(ranked) == len(gallery) - 1 and set(ranked) == gallery - {query["reference_img_id"]}

    # With the images folder as gallery (as the server's whole unlabeled set): every image
    # once, the store's references not twice, the reference still left out.
    folder = root / "COCO2017_unlabeled" / "unlabeled2017"
    everything = {int(p.stem) for p in folder.iterdir()}
    _eval(capsys, "--db", str(db_path), "--checkpoint", str(checkpoint), "--split", "test",
          "--submission", str(out_dir), "--cache-dir", str(tmp_path / "cache"),
          "--gallery-images", str(folder))
    submission = json.loads((out_dir / "circo_submission_test.json").read_text())
    assert len(everything) == 6
    for query in test_queries:
        ranked = submission[str(query["id"])]
        assert len(ranked) == 5 and set(ranked) == everything - {query["reference_img_id"]}

    printed = _eval(capsys, "--db", str(db_path), "--checkpoint", str(checkpoint), "--split", "val",
                    "--submission", str(out_dir), "--cache-dir", str(tmp_path / "cache"), "--json")
    result = json.loads(printed)
    assert set(result["map"]) == {"5", "10", "25", "50"}  # val has several ground truths
    val = json.loads((out_dir / "circo_submission_val.json").read_text())
    assert set(val) == {"0", "1"} and all(type(i) is int for ids in val.values() for i in ids)


def test_cirr_names_of_byte_identical_images_are_all_ranked(checkpoint, tmp_path, capsys):
    # The store keeps byte-identical images once, under the first name it saw. The test1
    # files listed only that name: a pair whose target is the other name could only miss,
    # and its image set lost a member.
    root = tmp_path / "root"
    _cirr_root(root)
    entries = json.loads((root / "captions" / "cap.rc2.test1.json").read_text())
    names = json.loads((root / "image_splits" / "split.rc2.test1.json").read_text())
    members = entries[0]["img_set"]["members"]
    shutil.copy(root / names[members[1]], root / names[members[2]])  # two names, one image
    db_path = tmp_path / "cirr.db"
    assert main(["import", "--db", str(db_path), "--format", "cirr", str(root)]) == 0
    out_dir = tmp_path / "submission"
    _eval(capsys, "--db", str(db_path), "--checkpoint", str(checkpoint), "--split", "test1",
          "--submission", str(out_dir), "--cache-dir", str(tmp_path / "cache"))
    recall = json.loads((out_dir / "recall_submission_test1.json").read_text())
    subset = json.loads((out_dir / "recall_subset_submission_test1.json").read_text())
    # Both names of the one image, next to each other (one score), wherever it is ranked.
    seen = 0
    for entry in entries:
        ranked = recall[str(entry["pairid"])]
        assert len(ranked) == 50 and len(set(ranked)) == 50
        where = [ranked.index(n) for n in (members[1], members[2]) if n in ranked]
        assert where in ([], [49]) or (len(where) == 2 and abs(where[0] - where[1]) == 1), (entry["pairid"], where)
        seen += bool(where)
    assert seen
    # The image set ranks all six names (both of the one image among them).
    key = str(entries[0]["pairid"])
    assert len(subset[key]) == 3 and set(subset[key]) <= set(members[1:])
    if set(members[1:]) <= set(recall[key]):
        assert subset[key] == [name for name in recall[key] if name in members[1:]][:3]


def test_submission_metrics_of_a_tiny_split_carry_evals_warning(cirr, checkpoint, tmp_path, capsys):
    # eval warns that a split of under 20 queries (or a gallery of at most 51) gives
    # numbers that mean nothing; eval --submission printed the same metrics without it.
    base, db_path, _ = cirr
    args = ["--db", str(db_path), "--checkpoint", str(checkpoint), "--split", "val",
            "--submission", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache")]
    capsys.readouterr()
    assert main(["eval", *args]) == 0
    captured = capsys.readouterr()
    assert "metrics over the 2 queries with a target" in captured.out
    assert "warning: only 2 queries (fewer than 20" in captured.err
    assert main(["eval", *args, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["warning"].startswith("only 2 queries")
    # test1 has no metrics, so nothing to warn about
    assert main(["eval", *args[:5], "test1", *args[6:]]) == 0
    assert "warning:" not in capsys.readouterr().err


def test_a_circo_file_missing_a_query_the_server_wants_is_a_warning(tmp_path, checkpoint, capsys):
    # CIRCO's server refuses a file without every query id 0..N-1. A query whose reference
    # image was missing at import is not in the store, and the file was written without it
    # and without a word: the user learnt it from the server.
    root = tmp_path / "circo"
    shutil.copytree(FIXTURES / "circo", root)
    test_queries = [{"id": i, "reference_img_id": ref, "relative_caption": f"is shown {i}",
                     "shared_concept": "a thing"} for i, ref in enumerate([21, 99, 12, 13])]
    (root / "annotations" / "test.json").write_text(json.dumps(test_queries))
    db_path = tmp_path / "circo.db"
    assert main(["import", "--db", str(db_path), "--format", "circo", str(root), "--split", "test"]) == 3
    args = ["--db", str(db_path), "--checkpoint", str(checkpoint), "--split", "test",
            "--submission", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache")]
    capsys.readouterr()
    assert main(["eval", *args]) == 0
    err = capsys.readouterr().err
    assert "warning: split test has no query 1 (1 of the ids 0-3): the CIRCO server refuses" in err
    assert main(["eval", *args, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["submission"]["warnings"][0].startswith("split test has no query 1")
    # every query there: no warning
    test_queries[1]["reference_img_id"] = 22
    (root / "annotations" / "test.json").write_text(json.dumps(test_queries[:3]))
    fresh = tmp_path / "fresh.db"
    assert main(["import", "--db", str(fresh), "--format", "circo", str(root), "--split", "test"]) == 0
    assert main(["eval", *args[:1], str(fresh), *args[2:]]) == 0
    assert "warning" not in capsys.readouterr().err
