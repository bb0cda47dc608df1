"""What a user meets on the retrieval journeys with bad inputs: each gives a clear error
naming the item (a ValueError or FileNotFoundError, which the CLI prints as
'error: ...'), or leaves the bad item out and carries on."""

from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch
from test_retrieval_data import annotated  # noqa: F401  (a fixture)
from test_retrieval_world import make_world_store

from good4cir.cli import main
from retrieval.data import load_store_triplets
from retrieval.evaluate import evaluate_checkpoint
from retrieval.train import TrainConfig, train

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    return root, make_world_store(root, pairs=40)


def _config(root, out, **overrides):
    values = dict(out=str(root / out), dbs=[str(root / "world.db")], image_size=32, batch_size=16,
                  epochs=1, cache_dir=str(root / "cache"), progress=False, rerank=False)
    values.update(overrides)
    return TrainConfig(**values)


@pytest.fixture(scope="module")
def checkpoint(world):
    root, _ = world
    train(_config(root, "model"))
    return root / "model"


def _set_only_members(db_path, split: str) -> list[tuple[str, str]]:
    """(image id, path) of image-set members of `split` that are no pair's reference or target."""
    conn = sqlite3.connect(db_path)
    used = {k for row in conn.execute("SELECT reference_id, target_id FROM pairs") for k in row}
    members = {k for (img_set,) in conn.execute("SELECT img_set FROM pairs WHERE split = ?", [split])
               for k in json.loads(img_set)} - used
    paths = dict(conn.execute("SELECT id, path FROM images"))
    conn.close()
    return sorted((k, paths[k]) for k in members)


def test_an_unreadable_image_set_member_is_left_out_not_fatal(tmp_path):
    """A near-duplicate that no longer decodes leaves the gallery and its image set;
    validation during training and `eval` go on (they stopped on 'image-set member
    <hash> is not in the gallery')."""
    db_path = make_world_store(tmp_path, pairs=40)
    broken = [_set_only_members(db_path, split)[0] for split in ("val", "test")]
    for _, path in broken:
        with open(path, "wb") as fh:
            fh.write(b"\x89PNG\r\n\x1a\n not really")
    result = train(_config(tmp_path, "model"))
    assert result.history["epochs"][0]["val"]["recall_subset"]
    metrics = evaluate_checkpoint(tmp_path / "model", dbs=[db_path], split="test",
                                  cache_dir=tmp_path / "cache", progress=False)
    assert metrics["images_failed"] == 1
    assert set(metrics["recall_subset"]) == {"1", "2", "3"}
    assert metrics["queries"] > 0


def test_submission_metrics_survive_an_unreadable_member_and_a_self_target(tmp_path, checkpoint, capsys):
    """`eval --submission` on a split with targets: the files skip the broken member, and
    the metrics over the queries with a target no longer stop on it."""
    from test_retrieval_submission_cli import _cirr_root

    _cirr_root(tmp_path / "root")
    db_path = tmp_path / "cirr.db"
    assert main(["import", "--db", str(db_path), "--format", "cirr", str(tmp_path / "root")]) == 0
    (tmp_path / "root" / "val" / "val-0-0-img3.png").write_bytes(b"not an image")  # after import
    conn = sqlite3.connect(db_path)  # and a pair whose target is its reference: ranked, not scored
    conn.execute("UPDATE pairs SET target_id = reference_id WHERE id = (SELECT MAX(id) FROM pairs WHERE split = 'val')")
    conn.commit()
    conn.close()
    capsys.readouterr()
    assert main(["eval", "--db", str(db_path), "--checkpoint", str(checkpoint), "--split", "val",
                 "--cache-dir", str(tmp_path / "cache"), "--submission", str(tmp_path / "sub"),
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["recall_subset"]) == {"1", "2", "3"}
    assert result["queries"] == 1 and result["submission"]["queries"] == 2
    subset = json.loads((tmp_path / "sub" / "recall_subset_submission_val.json").read_text())
    assert len(subset) == 2 + 2
    assert all("val-0-0-img3" not in names for key, names in subset.items() if key not in ("version", "metric"))


@pytest.mark.parametrize("below", [False, True])
def test_an_out_folder_that_is_a_file_is_a_clear_error(world, checkpoint, below):
    """train --out, index --out and eval --submission given a file (or a path under one)
    say so, before any work, instead of a FileExistsError / NotADirectoryError traceback."""
    root, db_path = world
    a_file = root / "a-file"
    a_file.write_text("not a folder")
    out = a_file / "sub" if below else a_file
    cache = str(root / "cache")
    with pytest.raises(ValueError, match=f"cannot write .* to {out}"):
        main(["train", "--db", str(db_path), "--out", str(out), "--epochs", "1", "--image-size", "32",
              "--no-rerank", "--cache-dir", cache])
    with pytest.raises(ValueError, match=f"cannot write .* to {out}"):
        main(["index", "--db", str(db_path), "--checkpoint", str(checkpoint), "--out", str(out),
              "--quiet", "--cache-dir", cache])
    with pytest.raises(ValueError, match=f"cannot write .* to {out}"):
        main(["eval", "--db", str(db_path), "--checkpoint", str(checkpoint), "--split", "test",
              "--submission", str(out), "--cache-dir", cache])
    assert a_file.read_text() == "not a folder"


def test_a_checkpoint_file_that_is_not_open_clip_weights_is_named(tmp_path):
    """--checkpoint FILE: a text file or a truncated weights file is a ValueError naming
    the file, not torch's UnpicklingError / PytorchStreamReader traceback."""
    from retrieval.encoders import create_encoder

    weights = tmp_path / "weights.pt"
    torch.save(create_encoder("tiny").clip.state_dict(), weights)
    create_encoder("tiny", checkpoint=weights)  # the whole file loads
    text = tmp_path / "notes.txt"
    text.write_text('{"not": "weights"}\n')
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(weights.read_bytes()[:5000])
    for path in (text, truncated):
        with pytest.raises(ValueError, match=f"{path}: not a file of open_clip weights"):
            create_encoder("tiny", checkpoint=path)


def test_retrieve_tab_and_query_engine_refuse_a_top_k_below_one_and_name_a_lost_reference(tmp_path, checkpoint):
    """The Retrieve tab's API (api_name="retrieve") takes any k: k=-3 gave the top 97
    (hits[:-3] of the re-ranker's 100), k=0 nothing. A dataset pair whose reference file
    has gone is a RetrieveError naming the pair, like every other refusal of the tab."""
    import sqlite_utils

    from retrieval.index import QueryEngine, build_gallery_index
    from ui.retrieve_logic import RetrieveError, RetrieveService, dataset_queries

    db_path = make_world_store(tmp_path, pairs=20)
    build_gallery_index(db_path, checkpoint, tmp_path / "index", progress=False,
                        cache_dir=tmp_path / "cache", num_workers=0)
    db = sqlite_utils.Database(db_path)
    service = RetrieveService(str(db_path), str(tmp_path / "index"))
    pair = dataset_queries(db)[0]
    assert len(service.query(db, pair=pair, upload=None, text=pair.text, k=3)) == 3
    for k in (0, -3, None, "many"):
        with pytest.raises(RetrieveError, match="top k"):
            service.query(db, pair=pair, upload=None, text=pair.text, k=k)
    engine = QueryEngine(tmp_path / "index")
    for k in (0, -3):
        with pytest.raises(ValueError, match="k must be at least 1"):
            engine.query(pair.reference_path, pair.text, k=k)
    other = next(q for q in dataset_queries(db) if q.reference_path != pair.reference_path)
    Path(other.reference_path).unlink()
    with pytest.raises(RetrieveError, match=f"reference image of pair {other.label.split(' · ')[0]}"):
        service.query(db, pair=other, upload=None, text=other.text, k=3)


def test_resume_with_the_budget_spent_is_refused_and_throughput_counts_all_runs(world):
    """--resume when last.pt already reached --epochs/--minutes trained nothing, deleted
    the re-ranker and reported ~1e11 triplets/s (triplets of the first run over zero
    seconds); a resume that trains on reports the throughput of both runs together."""
    root, _ = world
    first = train(_config(root, "resumed", epochs=3))
    rerank_file = root / "resumed" / "rerank.pt"
    rerank_file.write_bytes(b"a re-ranker")  # stands for the one a full run leaves
    for budget in ({"epochs": 3}, {"epochs": None, "minutes": 0.001}):
        with pytest.raises(ValueError, match="nothing to resume: .* has trained 3 epochs"):
            train(_config(root, "resumed", resume=True, **budget))
    assert rerank_file.read_bytes() == b"a re-ranker"
    rerank_file.unlink()
    # Re-ranking on: a finished run has nothing left either, but a run stopped while its
    # re-ranker trained (history.json not written yet) resumes into that stage.
    with pytest.raises(ValueError, match="nothing to resume"):
        train(_config(root, "resumed", resume=True, rerank=True, rerank_epochs=1))
    (root / "resumed" / "history.json").unlink()
    reranked = train(_config(root, "resumed", resume=True, rerank=True, rerank_epochs=1))
    assert reranked.epochs == 3 and "rerank" in reranked.history
    again = train(_config(root, "resumed", resume=True, epochs=4))
    summary, before = again.history["summary"], first.history["summary"]
    assert summary["epochs"] == 4 and summary["train_seconds"] >= before["train_seconds"]
    assert 0 < summary["triplets_per_second"] < 100 * before["triplets_per_second"]


def test_a_store_with_only_test_pairs_says_so(tmp_path):
    """It said 'is the store empty?' of a store holding pairs, all of them test pairs."""
    db_path = make_world_store(tmp_path, pairs=10)
    conn = sqlite3.connect(db_path)
    conn.execute("UPDATE pairs SET split = 'test'")
    conn.commit()
    conn.close()
    with pytest.raises(ValueError, match="the data's 10 pairs are all in split test"):
        train(_config(tmp_path, "model"))


def test_query_with_an_empty_text_is_refused(world, checkpoint, capsys):
    """`query --text ""` ranked by the image alone without a word; the Retrieve tab refuses it."""
    root, db_path = world
    index_dir = root / "index"
    assert main(["index", "--db", str(db_path), "--checkpoint", str(checkpoint), "--out", str(index_dir),
                 "--quiet", "--workers", "0", "--cache-dir", str(root / "cache")]) == 0
    image = next((root / "images").glob("*.png"))
    for text in ("", "   "):
        with pytest.raises(ValueError, match="--text is empty"):
            main(["query", "--index", str(index_dir), "--image", str(image), "--text", text])
    with pytest.raises(FileNotFoundError, match="is a folder, not an image file"):  # not 'does not exist'
        main(["query", "--index", str(index_dir), "--image", str(root / "images"), "--text", "make it red"])
    capsys.readouterr()
    assert main(["query", "--index", str(index_dir), "--image", str(image), "--text", "make it red",
                 "-k", "2", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["results"]) == 2


def test_eval_of_a_tiny_split_warns_that_its_numbers_mean_little(world, checkpoint, capsys):
    """A split of a handful of queries, ranked in a gallery no bigger than the largest K,
    reported Recall@50 100 (and medR near 1) without a word."""
    root, db_path = world
    args = ["eval", "--db", str(db_path), "--checkpoint", str(checkpoint), "--split", "test",
            "--cache-dir", str(root / "cache")]
    capsys.readouterr()
    assert main([*args, "--json"]) == 0
    out = capsys.readouterr()
    result = json.loads(out.out)  # stdout stays one JSON document
    assert result["queries"] < 20 and result["gallery"] <= 51 and result["recall"]["50"] == 100
    assert {"recall", "recall_subset", "median_rank", "baselines", "queries", "gallery"} <= set(result)
    warning = result["warning"]
    assert f"only {result['queries']} queries" in warning and f"gallery of {result['gallery']}" in warning
    assert "not meaningful" in warning and f"warning: {warning}" in out.err
    assert main(args) == 0
    assert f"warning: {warning}" in capsys.readouterr().err

    from retrieval.evaluate import small_split_warning

    assert small_split_warning(200, 1200) is None
    assert "only 19 queries" in small_split_warning(19, 1200)
    assert "gallery of 51 images" in small_split_warning(200, 51) and "queries" not in small_split_warning(200, 51)


def test_eval_table_shows_circo_map(tmp_path, checkpoint, capsys):
    """Queries with several ground truths (CIRCO): `eval --json` had "map", the table
    printed without --json left CIRCO's own measure out."""
    fixture = Path(__file__).parent / "fixtures" / "circo"
    db_path = tmp_path / "circo.db"
    assert main(["import", "--db", str(db_path), "--format", "circo", str(fixture)]) == 0
    args = ["eval", "--db", str(db_path), "--checkpoint", str(checkpoint), "--split", "val",
            "--cache-dir", str(tmp_path / "cache")]
    capsys.readouterr()
    assert main([*args, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert main(args) == 0
    table = capsys.readouterr().out
    header = next(line for line in table.splitlines() if "mAP@5" in line)
    assert header.split() == ["mAP@5", "mAP@10", "mAP@25", "mAP@50"]
    model_row = table.splitlines()[table.splitlines().index(header) + 1].split()
    assert model_row[0] == "model" and float(model_row[1]) == pytest.approx(result["map"]["5"], abs=0.051)
    assert any(line.split()[:2] == ["baseline", "text"] for line in table.splitlines()[table.splitlines().index(header):])


def test_a_pair_whose_target_is_its_reference_is_left_out_of_ranking(tmp_path):
    """A pair naming one image (or two identical files) as reference and target cannot be
    ranked under the CIRR protocol; it stopped training's validation and `eval` with
    'query 0: the target <hash> is the reference image'. It is left out, by name."""
    db_path = make_world_store(tmp_path, pairs=40)
    conn = sqlite3.connect(db_path)
    for split in ("val", "test"):
        conn.execute("UPDATE pairs SET target_id = reference_id WHERE id = "
                     "(SELECT id FROM pairs WHERE split = ? ORDER BY id LIMIT 1)", [split])
    counts = dict(conn.execute("SELECT split, COUNT(*) FROM pairs GROUP BY split"))
    conn.commit()
    conn.close()
    result = train(_config(tmp_path, "model"))
    assert result.history["epochs"][0]["val"]["recall"]
    metrics = evaluate_checkpoint(tmp_path / "model", dbs=[db_path], split="test",
                                  cache_dir=tmp_path / "cache", progress=False)
    assert metrics["pairs"] == counts["test"] - 1


@pytest.mark.parametrize("command, option, value", [
    ("train", "--batch-size", "0"),  # ZeroDivisionError traceback
    ("train", "--batch-size", "-4"),  # "__len__() should return >= 0"
    ("train", "--set-negatives", "-1"),  # "Sample larger than population or is negative"
    ("train", "--rerank-top-k", "0"),  # trained a re-ranker over no candidates
    ("index", "--batch-size", "0"),  # "range() arg 3 must not be zero"
    ("query", "-k", "0"),
])
def test_counts_below_their_minimum_are_refused_by_name(command, option, value, capsys):
    required = {"train": ["--db", "x.db", "--out", "out"],
                "index": ["--db", "x.db", "--checkpoint", "ck", "--out", "out"],
                "query": ["--index", "idx", "--image", "a.png", "--text", "t"]}[command]
    with pytest.raises(SystemExit) as exit_info:
        main([command, *required, option, value])
    assert exit_info.value.code == 2
    assert f"argument {option}: must be at least" in capsys.readouterr().err


def test_epoch_line_leaves_out_recall_subset_without_image_sets():
    """Data without image sets (the authors' dataset.json) printed 'Rsubset@1 nan' each epoch."""
    from retrieval.train import val_brief

    recall = {"1": 12.5, "5": 50.0, "10": 75.0, "50": 100.0}
    assert val_brief({"recall": recall}) == ", val R@1 12.5 R@5 50.0"
    assert val_brief({"recall": recall, "recall_subset": {"1": 40.0}}).endswith(" Rsubset@1 40.0")
    assert val_brief({}) == ""


def test_retrieve_tab_names_a_pair_whose_reference_has_no_local_file(world):
    """A pair imported by URL has no reference file; the tab said 'choose a dataset pair
    or upload a reference image' to someone who had chosen one."""
    import sqlite_utils

    from ui.retrieve_logic import DatasetQuery, RetrieveError, RetrieveService

    root, db_path = world
    pair = DatasetQuery("p1", "cirr-7 · test · make it red", "ref", None, "tgt", "t.png", "make it red")
    service = RetrieveService(str(db_path), str(root / "no-index-needed"))
    with pytest.raises(RetrieveError, match="reference image of pair cirr-7 is not a local file"):
        service.query(sqlite_utils.Database(db_path), pair=pair, upload=None, text=pair.text, k=5)


def test_generated_source_says_when_captions_only_wait_for_review(annotated):
    """A freshly annotated store trained with --source generated failed on 'no caption for
    --source generated' for pairs that hold generated captions, none approved yet."""
    data = load_store_triplets(annotated, source="generated")
    problems = {p.split(":")[0]: p for p in data.problems}
    assert "not approved yet" in problems["pair 1"] and "--include-unreviewed" in problems["pair 1"]
    assert "not approved yet" not in problems["pair 2"]  # rejected, not waiting
    assert "not approved yet" not in problems["pair 3"]  # no annotation at all


def test_a_cache_dir_that_cannot_be_written_is_named_before_decoding(world, checkpoint, tmp_path):
    """--cache-dir (or $GOOD4CIR_CACHE) naming a file: train and eval decoded every image,
    then stopped on a NotADirectoryError traceback."""
    root, db_path = world
    a_file = tmp_path / "cache-file"
    a_file.write_text("")
    with pytest.raises(ValueError, match=f"cannot write the cache in {a_file}/pixels/.*: {a_file} is a file"):
        train(_config(root, "uncached", cache_dir=str(a_file)))
    with pytest.raises(ValueError, match="pass --cache-dir DIR"):
        main(["eval", "--db", str(db_path), "--checkpoint", str(checkpoint), "--cache-dir", str(a_file)])


def test_query_names_the_index_s_checkpoint_when_it_has_moved(world, checkpoint, tmp_path):
    """It said '<dir> is not a good4cir checkpoint directory ... train one', of a folder
    the user never typed (the index's meta names it)."""
    import shutil

    root, db_path = world
    moved = tmp_path / "model"
    shutil.copytree(checkpoint, moved)
    index_dir = tmp_path / "index"
    assert main(["index", "--db", str(db_path), "--checkpoint", str(moved), "--out", str(index_dir),
                 "--quiet", "--workers", "0", "--cache-dir", str(root / "cache")]) == 0
    shutil.rmtree(moved)
    image = next((root / "images").glob("*.png"))
    with pytest.raises(FileNotFoundError, match=f"built with the checkpoint {moved}, which is no longer there"):
        main(["query", "--index", str(index_dir), "--image", str(image), "--text", "make it red"])
    assert main(["query", "--index", str(index_dir), "--checkpoint", str(checkpoint), "--image", str(image),
                 "--text", "make it red", "-k", "1"]) == 0
    # The app takes no --checkpoint: its Retrieve tab told the user to pass one.
    import sqlite_utils

    from ui.retrieve_logic import RetrieveError, RetrieveService, dataset_queries

    db = sqlite_utils.Database(db_path)
    pair = dataset_queries(db)[0]
    with pytest.raises(RetrieveError, match=f"built with the checkpoint {moved}, which is no longer there: put the "
                                            "checkpoint back there, or rebuild the index") as refused:
        RetrieveService(str(db_path), str(index_dir)).search_html(db, pair=pair, upload=None, text="make it red", k=3)
    assert "--checkpoint" not in str(refused.value)


def test_an_unknown_pretrained_tag_is_named_with_the_model_s_tags():
    """--pretrained with a tag open_clip does not know for that model was open_clip's
    RuntimeError traceback ('Pretrained value ... is not a known tag or valid file path');
    `train --pretrained openai` with the default tiny model is the easy way to meet it.
    Checked before anything is downloaded."""
    from retrieval.encoders import create_encoder

    with pytest.raises(ValueError, match="no pretrained weights 'openai' for model 'tiny'; it has none"):
        create_encoder("tiny", pretrained="openai")
    with pytest.raises(ValueError, match="no pretrained weights 'nosuchtag' for model 'RN50'; its tags: openai, "):
        create_encoder("RN50", pretrained="nosuchtag")


def test_circo_eval_ranks_against_the_gallery_folder_or_says_it_does_not(tmp_path, checkpoint, capsys):
    """Plain `eval` on CIRCO data ranked only the images the store holds (CIRCO ranks all
    of COCO unlabeled) without a word, and refused --gallery-images without --submission."""
    fixture = Path(__file__).parent / "fixtures" / "circo"
    db_path = tmp_path / "circo.db"
    assert main(["import", "--db", str(db_path), "--format", "circo", str(fixture)]) == 0
    args = ["eval", "--db", str(db_path), "--checkpoint", str(checkpoint), "--split", "val",
            "--cache-dir", str(tmp_path / "cache"), "--json"]
    capsys.readouterr()
    assert main(args) == 0
    out = capsys.readouterr()
    alone = json.loads(out.out)
    assert "pass --gallery-images" in out.err and alone["notes"]
    folder = fixture / "COCO2017_unlabeled" / "unlabeled2017"
    assert main([*args, "--gallery-images", str(folder)]) == 0
    out = capsys.readouterr()
    full = json.loads(out.out)
    assert full["gallery"] == len(list(folder.glob("*.jpg"))) > alone["gallery"]
    assert not any("gallery-images" in note for note in full.get("notes", []))
    assert "gallery-images" not in out.err
    assert full["recall_subset"] is None  # CIRCO has no image sets, and a note says so


@pytest.mark.parametrize("source", ["original", "generated", "both", "auto"])
@pytest.mark.parametrize("captions", ["individual", "compound", "both"])
def test_an_exported_jsonl_file_honours_source_and_captions_as_its_store_does(annotated, source, captions):
    """`train --data export.jsonl --source original` trained on the generated captions (the
    file's "captions"), and --captions was ignored: the CIRR-vs-CIRRR comparison from an
    exported file compared a run with itself. The JSONL export carries the imported
    captions and each caption's kind (provenance); the file now gives what the store gives."""
    from retrieval.data import load_file_triplets

    out = annotated.parent / "export.jsonl"
    if not out.exists():
        assert main(["export", "--db", str(annotated), "--format", "jsonl", "--out", str(out),
                     "--include-unreviewed"]) == 0
    from_file = load_file_triplets(out, source=source, captions=captions)
    from_store = load_store_triplets(annotated, source=source, captions=captions, include_unreviewed=True)
    external = {t.pair_id: t for t in from_file.triplets}
    by_pair = {json.loads(line)["pair_id"]: json.loads(line)["id"] for line in out.read_text().splitlines()}
    compared = 0
    for t in from_store.triplets:
        if t.pair_id not in by_pair:  # p0002: its annotation was rejected, so export leaves it out
            continue
        got = external.get(by_pair[t.pair_id])
        assert got is not None and (got.captions, got.caption_kinds) == (t.captions, t.caption_kinds), t.pair_id
        compared += 1
    assert compared == len(from_file.triplets) and compared >= 2


def test_resume_in_the_other_encoder_mode_is_named(world):
    """--resume with --freeze-encoders toggled was 'loaded state dict has a different
    number of parameter groups' (the optimiser's); it names the option now."""
    root, _ = world
    train(_config(root, "mode"))
    with pytest.raises(ValueError, match="trained without --freeze-encoders; resume it without it too"):
        train(_config(root, "mode", resume=True, epochs=2, freeze_encoders=True))
    train(_config(root, "frozen", freeze_encoders=True))
    with pytest.raises(ValueError, match="trained with --freeze-encoders; resume it with it too"):
        train(_config(root, "frozen", resume=True, epochs=2))


def test_a_damaged_checkpoint_folder_is_named(checkpoint, tmp_path):
    """eval on a checkpoint whose best.pt was cut short was an OSError traceback
    ('Invalid argument'); a damaged config.json a bare JSON message naming no file."""
    import shutil

    from retrieval.model import load_model
    from retrieval.rerank import load_pair_scorer

    damaged = tmp_path / "model"
    shutil.copytree(checkpoint, damaged)
    (damaged / "best.pt").write_bytes((checkpoint / "best.pt").read_bytes()[:5000])
    with pytest.raises(ValueError, match=f"{damaged / 'best.pt'} cannot be read as model weights .*--which last"):
        load_model(damaged)
    load_model(damaged, which="last")
    (damaged / "config.json").write_text("{")
    with pytest.raises(ValueError, match=f"{damaged / 'config.json'} is not valid JSON"):
        load_model(damaged, which="last")
    shutil.rmtree(damaged)
    shutil.copytree(checkpoint, damaged)
    (damaged / "rerank.pt").write_bytes((checkpoint / "best.pt").read_bytes()[:5000])
    with pytest.raises(ValueError, match="rerank.pt cannot be read as a re-ranker .*--no-rerank"):
        load_pair_scorer(damaged, load_model(damaged)[0].encoder)
    (damaged / "last.pt").write_bytes((checkpoint / "last.pt").read_bytes()[:5000])
    with pytest.raises(ValueError, match="cannot resume .*last.pt cannot be read"):
        train(_config(tmp_path, "model", resume=True, epochs=2, cache_dir=str(tmp_path / "cache"),
                      dbs=[str(checkpoint.parent / "world.db")]))


def test_a_damaged_index_folder_is_named(world, checkpoint, tmp_path):
    """query on an index whose index.faiss was cut short was FAISS's RuntimeError traceback;
    a damaged meta.json a bare JSON message naming no file."""
    import shutil

    from retrieval.index import build_gallery_index, load_index

    root, db_path = world
    built = tmp_path / "index"
    build_gallery_index(db_path, checkpoint, built, progress=False, cache_dir=root / "cache", num_workers=0)
    damaged = tmp_path / "damaged"
    shutil.copytree(built, damaged)
    (damaged / "index.faiss").write_bytes((built / "index.faiss").read_bytes()[:3000])
    with pytest.raises(ValueError, match="index.faiss cannot be read by FAISS .*rebuild the index"):
        load_index(damaged)
    shutil.copy(built / "index.faiss", damaged / "index.faiss")
    (damaged / "meta.json").write_text("{")
    with pytest.raises(ValueError, match="meta.json is not valid JSON"):
        load_index(damaged)


def test_eval_of_a_split_that_withholds_its_targets_points_to_submission(tmp_path, checkpoint):
    """eval --split test on CIRCO (or CIRR test1) said 'no pairs in split test (splits
    present: val)' of a split the store holds."""
    fixture = Path(__file__).parent / "fixtures" / "circo"
    db_path = tmp_path / "circo.db"
    assert main(["import", "--db", str(db_path), "--format", "circo", str(fixture)]) == 0
    with pytest.raises(ValueError, match=r"split 'test' withholds its targets \(1 pairs\).*--submission DIR"):
        main(["eval", "--db", str(db_path), "--checkpoint", str(checkpoint), "--split", "test",
              "--cache-dir", str(tmp_path / "cache")])


def test_query_leaves_out_a_copy_of_the_reference_image(world, checkpoint, tmp_path):
    """`query` removes the reference image from the results (the CIRR protocol), but only
    matched it by path: a copy of a gallery image passed as --image came back at rank 1."""
    import shutil

    from retrieval.index import QueryEngine, build_gallery_index

    root, db_path = world
    build_gallery_index(db_path, checkpoint, tmp_path / "index", progress=False,
                        cache_dir=root / "cache", num_workers=0)
    engine = QueryEngine(tmp_path / "index")
    original = Path(engine.index.entries[0].path)
    copy = tmp_path / "copy.png"
    shutil.copy(original, copy)
    everything = len(engine.index.entries)
    for image in (original, copy):
        names = [hit.name for hit in engine.query(image, "make the square red", k=everything)]
        assert engine.index.entries[0].name not in names and len(names) == everything - 1, image
    kept = engine.query(copy, "make the square red", k=everything, exclude_reference=False)
    assert len(kept) == everything


def _replace_images_with_lfs_pointers(db_path) -> None:
    """Every image file of the store becomes a Git LFS pointer: there, but not an image."""
    conn = sqlite3.connect(db_path)
    paths = [path for (path,) in conn.execute("SELECT path FROM images")]
    conn.close()
    for path in paths:
        Path(path).write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n")


def test_training_whose_images_all_fail_to_decode_says_so(tmp_path):
    """Every image replaced by a Git LFS pointer after import (files there, none an image):
    training stopped on a ZeroDivisionError traceback (a batch of size 0)."""
    db_path = make_world_store(tmp_path, pairs=12)
    _replace_images_with_lfs_pointers(db_path)
    with pytest.raises(ValueError, match=r"none of the \d+ training pairs has a reference and a target image "
                                         r"that can be read \(\d+ images failed; first: .*png"):
        train(_config(tmp_path, "model"))


def test_eval_whose_images_all_fail_to_decode_says_so(tmp_path, checkpoint):
    """The same for `eval`: a KeyError 'query' traceback."""
    db_path = make_world_store(tmp_path, pairs=12)
    _replace_images_with_lfs_pointers(db_path)
    with pytest.raises(ValueError, match=r"none of the \d+ pairs of split 'test' can be scored: \d+ of its "
                                         r"\d+ images could not be read \(first: .*png"):
        main(["eval", "--db", str(db_path), "--checkpoint", str(checkpoint), "--cache-dir", str(tmp_path / "cache")])


def test_retrieve_tab_leaves_an_uploaded_gallery_image_out_of_its_results(world, checkpoint, tmp_path, monkeypatch):
    """A dataset pair's reference is left out of its results (the CIRR protocol); the same
    image uploaded came back at rank 1, since only its decoded pixels reached the engine."""
    import sqlite_utils

    from retrieval.index import QueryEngine, build_gallery_index
    from ui.retrieve_logic import RetrieveService

    root, db_path = world
    build_gallery_index(db_path, checkpoint, tmp_path / "index", progress=False,
                        cache_dir=root / "cache", num_workers=0)
    everything = len(QueryEngine(tmp_path / "index").index.entries)
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "uploads"))  # where Gradio keeps uploads
    original = Path(QueryEngine(tmp_path / "index").index.entries[0].path)
    upload = tmp_path / "uploads" / "abc123" / "my photo.png"
    upload.parent.mkdir(parents=True)
    upload.write_bytes(original.read_bytes())
    db = sqlite_utils.Database(db_path)
    service = RetrieveService(str(db_path), str(tmp_path / "index"))
    hits = service.query(db, pair=None, upload={"path": str(upload), "orig_name": "my photo.png"},
                         text="make the square red", k=everything)
    names = [hit["name"] for hit in hits]
    assert original.name not in names and len(names) == everything - 1


def test_default_source_says_when_captions_only_wait_for_review(annotated):
    """Own images have no imported captions: `train` right after `annotate` (the default
    --source auto) failed on 'no caption for --source auto', with no word of review."""
    db = sqlite3.connect(annotated)
    db.execute("UPDATE pairs SET original_captions = '[]'")
    db.commit()
    db.close()
    problems = {p.split(":")[0]: p for p in load_store_triplets(annotated).problems}
    assert "not approved yet" in problems["pair 1"] and "--include-unreviewed" in problems["pair 1"]
    assert "not approved yet" not in problems["pair 2"]  # rejected, not waiting
    assert "not approved yet" not in problems["pair 3"]  # no annotation at all
    assert "pair 0" not in problems  # approved: trained on


def test_retrieve_tab_says_when_a_pairs_target_is_not_in_the_index(tmp_path, checkpoint):
    """An index of the test split (`good4cir index --split test`) and a train pair chosen in
    the Retrieve tab: the page said 'True target ... is not in the top 10', as if the model
    had missed it, at any k, though the index never held that image."""
    import sqlite_utils

    from retrieval.index import build_gallery_index
    from ui.retrieve_logic import RetrieveService, dataset_queries

    db_path = make_world_store(tmp_path, pairs=20)
    build_gallery_index(db_path, checkpoint, tmp_path / "index", split="test", progress=False,
                        cache_dir=tmp_path / "cache", num_workers=0)
    db = sqlite_utils.Database(db_path)
    service = RetrieveService(str(db_path), str(tmp_path / "index"))
    indexed = {row[0] for row in db.execute(
        "SELECT reference_id FROM pairs WHERE split = 'test' UNION SELECT target_id FROM pairs WHERE split = 'test'")}
    outside = next(q for q in dataset_queries(db) if q.target_id not in indexed)
    html = service.search_html(db, pair=outside, upload=None, text=outside.text, k=50)
    assert "not in the index" in html and "not in the top" not in html, html
    inside = next(q for q in dataset_queries(db) if q.target_id in indexed)
    html = service.search_html(db, pair=inside, upload=None, text=inside.text, k=50)
    assert "not in the index" not in html and re.search(r"True target .*: rank \d+", html), html


def test_eval_says_how_many_queries_are_generated_captions(annotated, checkpoint, capsys):
    """`eval` with the default --source auto queries an approved test pair with its
    generated captions, not the benchmark's own: a CIRR-vs-CIRRR comparison evaluated
    both models on the generated captions, and nothing in the output said so."""
    db = sqlite3.connect(annotated)
    db.execute("UPDATE pairs SET split = 'test' WHERE id IN ('p0000', 'p0001')")  # p0000 approved
    db.commit()
    db.close()
    common = ["eval", "--db", str(annotated), "--checkpoint", str(checkpoint), "--split", "test",
              "--cache-dir", str(checkpoint.parent / "cache"), "--no-rerank"]
    assert main(common + ["--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    kinds = result["query_captions"]
    assert kinds["individual"] == 3 and kinds["compound"] == 1 and kinds["original"] > 0
    assert sum(kinds.values()) == result["queries"]
    assert any("4 of the" in note and "--source original" in note for note in result["notes"]), result.get("notes")
    assert main(common) == 0
    assert "--source original" in capsys.readouterr().err
    assert main(common + ["--json", "--source", "original"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["query_captions"]) == {"original"}
    assert not any("--source original" in note for note in result.get("notes", []))


def test_resume_on_other_validation_pairs_picks_best_afresh(world, tmp_path, capsys):
    """`train --resume` with another --db (or --source, or reviews since) validated the new
    epochs on other pairs and still compared them with the saved best score, measured on
    the old ones: best.pt stayed the old run's model, and config.json named only the new
    store. A changed validation set now starts the choice of best.pt afresh, with a word."""
    root, _ = world
    out = tmp_path / "resumed"
    train(_config(root, str(out)))
    state = torch.load(out / "last.pt", map_location="cpu", weights_only=False)
    state["best"]["score"] = 100.5  # a score the old validation pairs gave: none can beat it
    torch.save(state, out / "last.pt")
    other = make_world_store(tmp_path / "other", pairs=40, seed=5)
    capsys.readouterr()
    result = train(_config(root, str(out), dbs=[str(other)], resume=True, epochs=2))
    assert result.best["epoch"] == 2
    assert torch.load(out / "best.pt", map_location="cpu", weights_only=False)["epoch"] == 2
    assert "validation pairs differ from the saved run's" in capsys.readouterr().err
    resumes = result.history["resumes"]
    assert resumes[-1]["dbs"] == [str(other)] and resumes[-1]["validation_changed"] is True
    # the same data again: the saved best stands
    state = torch.load(out / "last.pt", map_location="cpu", weights_only=False)
    state["best"]["score"] = 100.5
    torch.save(state, out / "last.pt")
    result = train(_config(root, str(out), dbs=[str(other)], resume=True, epochs=3))
    assert result.best["score"] == 100.5 and result.history["resumes"][-1]["validation_changed"] is False


def test_resume_that_changes_how_best_is_picked_picks_it_afresh(world, tmp_path, capsys):
    """A run with a re-ranker picks best.pt by recall at the re-ranker's depth (R@50);
    resumed with --no-rerank it picks by R@1, and no R@1 beat the saved R@50 score, so
    best.pt stayed the first run's epoch, whatever the resumed epochs reached."""
    root, _ = world
    out = tmp_path / "depth"
    train(_config(root, str(out), rerank=True))
    capsys.readouterr()
    result = train(_config(root, str(out), resume=True, epochs=2))  # rerank=False
    assert result.best["epoch"] == 2
    assert "best.pt is picked afresh" in capsys.readouterr().err
    assert result.history["resumes"][-1]["selection_changed"] is True


def test_curves_show_what_picks_best_pt_and_the_re_rankers_loss(world, tmp_path):
    """curves.png drew R@1, R@5 and Rsubset@1 per epoch, while best.pt (with a re-ranker)
    is picked by R@50, drawn nowhere, and the chosen epoch was not marked; the re-ranker,
    three quarters of the budget, showed no loss at all."""
    from retrieval.train import draw_history

    root, _ = world
    result = train(_config(root, str(tmp_path / "curves"), epochs=2, rerank=True))
    history = json.loads((tmp_path / "curves" / "history.json").read_text())
    fig = draw_history(history)
    ax_val, ax_rerank = fig.axes[1], fig.axes[2]
    labels = [line.get_label() for line in ax_val.get_lines()] + [c.get_label() for c in ax_val.collections]
    assert "R@50 (picks best.pt)" in labels, labels
    best_epoch = result.best.get("first_stage", result.best)["epoch"]
    assert f"best.pt: epoch {best_epoch}" in labels, labels
    loss_axes = [ax for ax in fig.axes if ax.get_ylabel() == "re-ranker loss"]
    assert len(loss_axes) == 1
    assert list(loss_axes[0].get_lines()[0].get_ydata()) == [e["loss"] for e in history["rerank"]["epochs"]]
    for ax in (ax_val, ax_rerank):
        assert all(float(tick).is_integer() for tick in ax.get_xticks()), ax.get_xticks()


def test_retrieve_tab_names_the_store_an_index_of_another_store_was_built_from(tmp_path, checkpoint):
    """`good4cir app --db w2.db --index INDEX_OF_W1`: every hit was a 'not in the store'
    box and the pair's target 'not in the top k', with no word of the index being another
    store's; and an index of one split did not say which."""
    import sqlite_utils

    from retrieval.index import build_gallery_index
    from ui.retrieve_logic import RetrieveService, dataset_queries

    built_from = make_world_store(tmp_path / "first", pairs=20, seed=1)
    build_gallery_index(built_from, checkpoint, tmp_path / "index", progress=False,
                        cache_dir=tmp_path / "cache", num_workers=0)
    shown = make_world_store(tmp_path / "second", pairs=20, seed=7)
    db = sqlite_utils.Database(shown)
    service = RetrieveService(str(shown), str(tmp_path / "index"))
    pair = dataset_queries(db)[0]
    html = service.search_html(db, pair=pair, upload=None, text=pair.text, k=5)
    if "not in the store" in html:  # the two worlds may share a few renders
        assert f"built from the store {built_from.resolve()}" in html, html
    test_index = tmp_path / "test-index"
    build_gallery_index(shown, checkpoint, test_index, split="test", progress=False,
                        cache_dir=tmp_path / "cache", num_workers=0)
    service = RetrieveService(str(shown), str(test_index))
    train_pair = next(q for q in dataset_queries(db) if q.label.split(" · ")[1] == "train")
    html = service.search_html(db, pair=train_pair, upload=None, text=train_pair.text, k=5)
    assert "not in the index (built from split test of this store)" in html, html


def test_eval_on_a_file_without_splits_says_it_has_none(annotated, checkpoint):
    """eval --data dataset.json (the authors' format names no split) said "no pairs in
    split 'test' (splits present: None)"."""
    out = annotated.parent / "dataset.json"
    assert main(["export", "--db", str(annotated), "--format", "good4cir", "--out", str(out),
                 "--include-unreviewed"]) == 0
    with pytest.raises(ValueError, match=r"no pairs in split 'test': the data names no split .*dataset\.json.*--format jsonl"):
        main(["eval", "--data", str(out), "--checkpoint", str(checkpoint), "--cache-dir", str(checkpoint.parent / "cache")])


def test_a_training_that_fails_before_writing_leaves_no_empty_out_folder(world):
    root, _ = world
    with pytest.raises(ValueError, match="no training triplets"):
        train(_config(root, "never/made", source="generated"))  # nothing is annotated
    assert not (root / "never" / "made").exists()
    (root / "kept").mkdir()
    with pytest.raises(ValueError, match="no training triplets"):
        train(_config(root, "kept", source="generated"))
    assert (root / "kept").is_dir()  # a folder the user made stays


def _circo_with_lost_ground_truths(tmp_path) -> Path:
    """A CIRCO val split whose query 0 names four ground truths: 12 and 14 are there, 99
    has no file at import, and 22's file is damaged after import (unreadable at eval)."""
    import shutil

    fixture = Path(__file__).parent / "fixtures" / "circo" / "COCO2017_unlabeled" / "unlabeled2017"
    images = tmp_path / "circo" / "COCO2017_unlabeled" / "unlabeled2017"
    shutil.copytree(fixture, images)
    (tmp_path / "circo" / "annotations").mkdir()
    queries = [
        {"id": 0, "reference_img_id": 11, "target_img_id": 12, "gt_img_ids": [12, 14, 22, 99],
         "relative_caption": "is on a red plate", "shared_concept": "a slice of cake"},
        {"id": 1, "reference_img_id": 13, "target_img_id": 14, "gt_img_ids": [14, 12],
         "relative_caption": "has a person riding it", "shared_concept": "a bicycle"},
    ]
    (tmp_path / "circo" / "annotations" / "val.json").write_text(json.dumps(queries))
    db_path = tmp_path / "circo.db"
    assert main(["import", "--db", str(db_path), "--format", "circo", str(tmp_path / "circo"),
                 "--split", "val"]) == 3  # 99: no file, named as a problem
    (images / "000000000022.jpg").write_bytes(b"\xff\xd8 not a jpeg any more")
    return db_path


def test_circo_map_counts_ground_truths_without_an_image_as_the_official_one(tmp_path):
    """A CIRCO ground truth missing at import or unreadable now was dropped from mAP's
    n_gt, so the score came out above CIRCO's own (which divides by min(k, len(gt_img_ids)))."""
    from retrieval.data import load_triplets
    from retrieval.evaluate import build_queries, rankable_triplets, score_matrix

    db_path = _circo_with_lost_ground_truths(tmp_path)
    key = {name: image_id for image_id, name in sqlite3.connect(db_path).execute("SELECT id, name FROM images")}
    triplets = sorted(load_triplets([db_path], source="original").split("val"), key=lambda t: t.extra["circo_id"])
    gallery = [key["11"], key["12"], key["13"], key["14"]]  # 22 failed to decode, 99 was never there
    queries = build_queries(rankable_triplets(triplets, {k: i for i, k in enumerate(gallery)}))
    # Query 0 (reference 11 left out): 12, 13, 14; ground truths found at ranks 1 and 3,
    # of four named: AP@k = (1/1 + 2/3) / min(k, 4). Query 1 (reference 13 left out):
    # 12, 14, 11; both of its ground truths at ranks 1 and 2: AP = 1.
    scores = np.array([[0.9, 0.8, 0.7, 0.1], [0.5, 0.9, 1.0, 0.8]])
    result = score_matrix(scores, gallery, queries)
    assert result["map"]["5"] == pytest.approx(100 * ((1 + 2 / 3) / 4 + 1) / 2, abs=0.01)  # 70.83, not 91.67
    assert result["map"]["50"] == result["map"]["5"]


def test_circo_eval_says_which_ground_truths_it_counts_without_an_image(tmp_path, checkpoint, capsys):
    db_path = _circo_with_lost_ground_truths(tmp_path)
    capsys.readouterr()
    assert main(["eval", "--db", str(db_path), "--checkpoint", str(checkpoint), "--split", "val",
                 "--cache-dir", str(tmp_path / "cache"), "--json"]) == 0
    out = capsys.readouterr()
    result = json.loads(out.out)
    said = "2 ground truths of 1 query named by the dataset have no image here (missing or unreadable)"
    assert any(said in note for note in result["notes"]), result["notes"]
    assert said in out.err and set(result["map"]) == {"5", "10", "25", "50"}


def test_an_exported_circo_pair_keeps_a_ground_truth_whose_file_is_gone(tmp_path):
    """eval --data on a JSONL export: a ground truth's file gone (gt_images) left the
    whole query out ('image ... not found'); it is a ground truth never found, as in a store."""
    from retrieval.data import load_triplets

    db_path = _circo_with_lost_ground_truths(tmp_path)
    out = tmp_path / "circo.jsonl"
    assert main(["export", "--db", str(db_path), "--format", "jsonl", "--out", str(out),
                 "--include-unreviewed"]) == 0
    (tmp_path / "circo" / "COCO2017_unlabeled" / "unlabeled2017" / "000000000022.jpg").unlink()
    data = load_triplets(files=[out], source="original")
    by_id = {t.extra["circo_id"]: t for t in data.split("val")}
    assert set(by_id) == {0, 1}, data.problems
    assert len(by_id[0].extra["gt_image_ids"]) == 2 and by_id[0].ground_truths_named == 4
    assert by_id[1].ground_truths_named == 2


def test_retrieve_tab_says_what_query_warns_of(tmp_path, checkpoint):
    """A text past the model's 77 tokens and an index of another version of the model:
    `query` warns of both; the Retrieve tab answered without a word (the warning went to
    the server's log)."""
    import sqlite_utils

    from retrieval.index import META_FILE, build_gallery_index
    from ui.retrieve_logic import RetrieveService, dataset_queries

    db_path = make_world_store(tmp_path, pairs=20)
    index_dir = tmp_path / "index"
    build_gallery_index(db_path, checkpoint, index_dir, progress=False, cache_dir=tmp_path / "cache", num_workers=0)
    db = sqlite_utils.Database(db_path)
    pair = dataset_queries(db)[0]
    service = RetrieveService(str(db_path), str(index_dir))
    html = service.search_html(db, pair=pair, upload=None, text=pair.text, k=5)
    assert "g4c-warn" not in html, html
    with pytest.warns(UserWarning, match="CLIP tokens"):  # the server's log has it too
        html = service.search_html(db, pair=pair, upload=None, text=" ".join([pair.text] * 40), k=5)
    assert re.search(r"The modification text is \d+ CLIP tokens, over the 77 the model reads", html), html
    assert html.count("g4c-result") >= 5  # still answered
    meta = json.loads((index_dir / META_FILE).read_text())
    (index_dir / META_FILE).write_text(json.dumps({**meta, "checkpoint_fingerprint": "0000"}))
    service = RetrieveService(str(db_path), str(index_dir))
    with pytest.warns(UserWarning, match="another version of the model"):
        html = service.search_html(db, pair=pair, upload=None, text=pair.text, k=5)
    assert f"The index {index_dir} was built with another version of the model" in html, html


def test_training_without_validation_pairs_writes_best_pt_and_says_so(tmp_path, caplog):
    """A store of train and test pairs only: an epoch then scores minus its loss (InfoNCE,
    above 1), below the starting best of -1, so best.pt was never written, and the
    re-ranker (on by default) stopped on 'No such file or directory: best.pt'."""
    db_path = make_world_store(tmp_path, pairs=40)
    conn = sqlite3.connect(db_path)
    conn.execute("UPDATE pairs SET split = 'test' WHERE split = 'val'")
    conn.commit()
    conn.close()
    caplog.set_level("WARNING")
    result = train(_config(tmp_path, "model", rerank=True))
    assert (tmp_path / "model" / "best.pt").is_file() and (tmp_path / "model" / "rerank.pt").is_file()
    assert result.best["epoch"] == 1
    assert any("no validation pairs" in r.getMessage() and "best.pt is the epoch with the lowest training loss"
               in r.getMessage() for r in caplog.records)


def test_a_minutes_budget_spent_before_training_still_makes_a_model(world, capsys, caplog):
    """--minutes too small for the data's preparation (a large dataset's decoding takes
    longer than the fusion model's quarter of the budget): zero epochs, no best.pt, the
    re-ranker stopped on its absence; with --no-rerank 'checkpoints in DIR' named a folder
    with none."""
    root, _ = world
    caplog.set_level("WARNING")
    capsys.readouterr()
    assert main(["train", "--db", str(root / "world.db"), "--out", str(root / "hurried"), "--minutes", "0.0001",
                 "--image-size", "32", "--batch-size", "16", "--cache-dir", str(root / "cache")]) == 0
    out = capsys.readouterr().out
    assert (root / "hurried" / "best.pt").is_file() and (root / "hurried" / "last.pt").is_file()
    assert "trained 1 epoch (1 steps" in out
    assert "the re-ranker had no time left in --minutes: not trained" in out
    assert any("the --minutes budget was spent before training began" in r.getMessage() for r in caplog.records)


def test_retrieve_tab_says_a_gallery_file_deleted_since_indexing_is_gone(tmp_path, checkpoint):
    """A hit whose file was moved or deleted after `good4cir index` showed as a broken
    picture (the image route answers 404)."""
    import sqlite_utils

    from retrieval.index import build_gallery_index, load_index
    from ui.retrieve_logic import RetrieveService, dataset_queries

    db_path = make_world_store(tmp_path, pairs=20)
    build_gallery_index(db_path, checkpoint, tmp_path / "index", progress=False, cache_dir=tmp_path / "cache",
                        num_workers=0)
    db = sqlite_utils.Database(db_path)
    pair = dataset_queries(db)[0]
    gone = next(e for e in load_index(tmp_path / "index").entries if e.image_id not in (pair.reference_id,))
    Path(gone.path).unlink()
    html = RetrieveService(str(db_path), str(tmp_path / "index")).search_html(
        db, pair=pair, upload=None, text=pair.text, k=1000)  # the whole gallery
    card = re.search(rf"<div class='g4c-result[^']*'>((?:(?!g4c-result).)*?{re.escape(gone.name)}</div></div>)", html)
    assert card and "file not found (moved or deleted since indexing)" in card.group(1), html
    assert f"alt='{gone.name}'" not in html and html.count("file not found") == 1


@pytest.mark.parametrize("command", ["train", "eval"])
def test_captions_with_source_original_is_said_to_have_no_effect(tmp_path, capsys, command):
    # `--source original --captions individual` trained on every original caption without
    # a word: the dataset's own captions have no individual/compound kind.
    db_path = make_world_store(tmp_path, pairs=10)
    conn = sqlite3.connect(db_path)
    conn.execute("UPDATE pairs SET split = 'test'")  # train stops at once, after the note
    conn.commit()
    conn.close()
    where = ["--out", str(tmp_path / "model")] if command == "train" else ["--checkpoint", str(tmp_path / "none")]
    with pytest.raises((ValueError, FileNotFoundError)):
        main([command, "--db", str(db_path), *where, "--source", "original", "--captions", "individual"])
    err = capsys.readouterr().err
    assert "--captions individual" in err and "no effect" in err, err


def test_pretrained_weights_that_cannot_be_fetched_are_reported_once(tmp_path):
    """`train --model ViT-B-32 --pretrained openai` offline printed two errors for one
    failure: open_clip's own logged 'error: Failed to download weights ...' and then ours,
    which quotes it and says what to do. Offline here: HF_HUB_OFFLINE=1 and an empty
    Hugging Face cache, in a subprocess as huggingface_hub reads its environment on import."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "HF_HUB_CACHE": str(tmp_path / "hf" / "hub")}
    code = """
from good4cir.cli import configure_logging
from retrieval.encoders import create_encoder
configure_logging()
try:
    create_encoder("ViT-B-32", pretrained="openai")
except ValueError as exc:
    print(exc)
"""
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert "could not load the pretrained weights 'openai' of 'ViT-B-32'" in done.stdout, done.stderr[-2000:]
    assert "Failed to download weights" not in done.stderr, done.stderr[-2000:]
