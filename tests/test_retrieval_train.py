"""Training lowers the loss; checkpoints, resume, frozen-feature cache; train/eval CLI."""

from __future__ import annotations

import json

import pytest
import torch
from test_retrieval_world import make_world_store

from good4cir.cli import main
from retrieval.data import load_triplets, train_val_split
from retrieval.features import PixelCache
from retrieval.loss import info_nce
from retrieval.model import build_model, load_model, split_preprocess
from retrieval.train import TrainConfig, lr_factor, selection_score, train

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    return root, make_world_store(root, pairs=60)


def _config(root, out, **overrides):
    values = dict(out=str(root / out), dbs=[str(root / "world.db")], image_size=32, batch_size=16,
                  epochs=3, cache_dir=str(root / "cache"), progress=False, lr=2e-3)
    values.update(overrides)
    return TrainConfig(**values)


@torch.no_grad()
def _train_set_loss(model, root) -> float:
    """InfoNCE over all training triplets at once (first caption), in eval mode."""
    data = load_triplets([root / "world.db"])
    train_set, _ = train_val_split(data)
    pil, _, _ = split_preprocess(model.encoder.preprocess)
    pixels, row_of, _ = PixelCache(root / "cache", pil).load(data.image_paths, progress=False)
    model.eval()
    ref = model.normalize_pixels(pixels[[row_of[t.reference] for t in train_set]])
    tgt = model.normalize_pixels(pixels[[row_of[t.target] for t in train_set]])
    ids = model.encoder.tokenize([t.captions[0] for t in train_set])
    targets = torch.tensor([row_of[t.target] for t in train_set])
    return float(info_nce(model.query_embedding(ref, ids), model.target_embedding(tgt), target_ids=targets))


@pytest.fixture(scope="module")
def trained(world):
    """One residual model trained 12 epochs, shared by the tests below; and its init."""
    root, _ = world
    cfg = _config(root, "residual", epochs=12)
    torch.manual_seed(cfg.seed)  # train() seeds the same way before building its model
    initial = build_model({"model": "tiny", "image_size": 32, "fusion": "residual"})
    return train(cfg), initial


def test_training_lowers_the_loss_and_writes_checkpoints(world, trained):
    root, _ = world
    result, initial = trained
    for name in ("config.json", "best.pt", "last.pt", "history.json", "curves.png"):
        assert (result.out / name).is_file(), name
    model, info = load_model(result.out, which="last")
    before, after = _train_set_loss(initial, root), _train_set_loss(model, root)
    # 36 steps: 3.03 -> 2.77 when measured (8 epochs: 2.998; the caption-delta loss and
    # the image-set negatives share the first steps)
    assert after < 0.92 * before, (before, after)
    history = json.loads((result.out / "history.json").read_text())
    assert len(history["epochs"]) == 12 and "recall" in history["epochs"][0]["val"]
    assert history["summary"]["triplets_per_second"] > 0
    assert info["epoch"] == 12
    # With a re-ranker after it, best.pt is the epoch with the best recall at its depth.
    depth = [e["val"]["recall"]["50"] + e["val"]["recall"]["1"] / 1000 for e in history["epochs"]]
    best_epoch = max(range(12), key=lambda i: (depth[i], -i)) + 1
    assert load_model(result.out)[1]["epoch"] == best_epoch
    # Then the re-ranker, as many epochs, measured against the fusion model alone.
    rerank = history["rerank"]
    assert len(rerank["epochs"]) == 12 and "recall" in rerank["first_stage_val"]
    saved = torch.load(str(result.out / "rerank.pt"), weights_only=False)
    assert saved["enabled"] == rerank["enabled"] == (rerank["best"]["score"] > rerank["first_stage_val"]["recall"]["1"])


def test_selection_score_is_recall_at_the_re_ranking_depth():
    val = {"recall": {"1": 20.0, "5": 60.0, "10": 80.0, "50": 93.5}}
    assert selection_score(val, 0, fallback=-1.0) == 20.0  # no re-ranker: Recall@1
    assert selection_score(val, 100, fallback=-1.0) == pytest.approx(93.52)  # deepest k <= 100
    assert selection_score(val, 10, fallback=-1.0) == pytest.approx(80.02)
    later = {"recall": {"1": 15.0, "5": 58.0, "10": 79.0, "50": 96.8}}
    assert selection_score(later, 100, fallback=-1.0) > selection_score(val, 100, fallback=-1.0)
    assert selection_score({}, 100, fallback=-2.5) == -2.5  # no validation set: minus the loss


def test_resume_continues_from_last(world, trained):
    import shutil

    root, _ = world
    result, _ = trained
    shutil.copytree(result.out, root / "resumed")
    resumed = train(_config(root, "resumed", epochs=13, resume=True))
    assert resumed.epochs == 13 and resumed.steps == 13 * (result.steps // 12)
    assert [e["epoch"] for e in resumed.history["epochs"]] == list(range(1, 14))
    with pytest.raises(ValueError, match="cannot resume"):
        train(_config(root, "resumed", epochs=7, resume=True, fusion="paper"))


def test_frozen_encoders_use_the_feature_cache(world, caplog):
    root, _ = world
    cfg = _config(root, "frozen", freeze_encoders=True, epochs=1, fusion="paper",
                  cache_dir=str(root / "frozen-cache"))
    torch.manual_seed(cfg.seed)
    initial = build_model({"model": "tiny", "image_size": 32, "fusion": "paper"})
    with caplog.at_level("WARNING", logger="retrieval.train"):
        train(cfg)
    # frozen random encoders train a model worse than none: the user is told so
    assert "--freeze-encoders on randomly initialised tiny encoders" in caplog.text
    shards = sorted(p.name for p in (root / "frozen-cache" / "features").rglob("shard-*.pt"))
    assert len(shards) == 2  # images and texts, computed once
    train(_config(root, "frozen2", freeze_encoders=True, epochs=1, fusion="paper",
                  cache_dir=str(root / "frozen-cache")))
    assert sorted(p.name for p in (root / "frozen-cache" / "features").rglob("shard-*.pt")) == shards
    trained, _ = load_model(root / "frozen")
    for key, value in initial.encoder.state_dict().items():
        assert torch.equal(trained.encoder.state_dict()[key], value), key
    with pytest.raises(ValueError, match="nothing to train"):
        train(_config(root, "frozen-sum", freeze_encoders=True, fusion="sum", cache_dir=str(root / "sum-cache")))
    # said before a single image is decoded or encoded: on a real dataset the features took
    # an hour, then this error
    assert not list((root / "sum-cache").rglob("shard-*.pt"))


def test_frozen_encoders_from_a_weights_file_are_not_warned_about(world, caplog):
    import open_clip

    root, _ = world
    weights = root / "tiny-weights.pt"  # a user's open_clip weights, stood in for
    torch.save(open_clip.create_model("g4c-tiny", force_image_size=32).state_dict(), weights)
    with caplog.at_level("WARNING", logger="retrieval.train"):
        train(_config(root, "frozen-from-file", freeze_encoders=True, epochs=1, fusion="paper",
                      checkpoint=str(weights), cache_dir=str(root / "file-cache")))
    assert "randomly initialised" not in caplog.text


def test_lr_schedule_warms_up_then_decays():
    values = [lr_factor(f / 100, 0.1, 0.02) for f in range(101)]
    assert values[0] < values[5] < values[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(values[10:], values[11:]))
    assert values[-1] == pytest.approx(0.02)


def test_cli_train_and_eval_json(world, capsys):
    root, db_path = world
    out = root / "cli-model"
    cache = str(root / "cache")
    assert main(["train", "--db", str(db_path), "--out", str(out), "--epochs", "1",
                 "--image-size", "32", "--batch-size", "16", "--fusion", "sum",
                 "--cache-dir", cache, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["epochs"] == 1 and summary["train_triplets"] > 0
    assert main(["eval", "--db", str(db_path), "--checkpoint", str(out), "--split", "test",
                 "--cache-dir", cache, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["recall"]) == {"1", "5", "10", "50"}
    assert set(result["recall_subset"]) == {"1", "2", "3"}
    interval = result["interval"]
    for metric, ks in (("recall", ("1", "5", "10", "50")), ("recall_subset", ("1", "2", "3"))):
        for k in ks:
            low, high = interval[metric][k]
            assert 0 <= low <= result[metric][k] <= high <= 100, (metric, k, low, high)
    assert set(result["subsets"]["seen"]["interval"]["recall"]) == {"1", "5", "10", "50"}
    assert isinstance(result["median_rank"], float)
    assert set(result["baselines"]) == {"image", "text", "sum"}
    for values in result["baselines"].values():
        assert set(values["recall"]) == {"1", "5", "10", "50"}
    assert "map" not in result  # one ground truth per query
    assert result["subsets"]["heldout_phrasing"]["queries"] + result["subsets"]["seen"]["queries"] \
        == result["queries"]
    # the text table
    assert main(["eval", "--db", str(db_path), "--checkpoint", str(out), "--cache-dir", cache]) == 0
    table = capsys.readouterr().out
    assert "baseline image" in table and "R@1" in table
    assert "95% bootstrap intervals over pairs: R@1 " in table
    with pytest.raises(ValueError, match="no pairs in split"):
        main(["eval", "--db", str(db_path), "--checkpoint", str(out), "--split", "nope",
              "--cache-dir", cache])


def test_batches_keep_pairs_of_one_reference_together():
    from retrieval.train import _Batches

    samples = [(ref, 100 + i, [i], []) for i, ref in enumerate([0, 0, 0, 1, 1, 2, 3, 3, 4, 5, 5, 5])]
    batches = _Batches(samples, batch_size=4, seed=0, group_by_reference=True)
    seen = []
    for refs, targets, texts, _negatives in batches.epoch(0):
        seen.extend(refs.tolist())
        assert torch.equal(targets - 100, texts)
    # each reference's pairs are consecutive (a group is split only at a batch edge)
    runs = [ref for i, ref in enumerate(seen) if i == 0 or seen[i - 1] != ref]
    assert len(runs) == len(set(runs))
    shuffled = [refs.tolist() for refs, _, _, _ in _Batches(samples, 4, seed=0).epoch(0)]
    assert len(shuffled) == len(list(batches.epoch(1))) == 3


def test_set_negatives_come_from_each_query_s_own_image_set():
    from retrieval.train import _Batches

    # sample i: target 100+i, its image set's other members 1000+10i .. 1000+10i+3
    samples = [(i // 2, 100 + i, [i], [1000 + 10 * i + j for j in range(4)]) for i in range(8)]
    drawn = set()
    for epoch in range(3):
        for _refs, targets, _texts, negatives in _Batches(samples, 4, seed=0, set_negatives=2).epoch(epoch):
            assert negatives.shape == (2 * len(targets),)
            for query, target in enumerate(targets.tolist()):
                own = negatives[2 * query:2 * query + 2].tolist()
                i = target - 100
                assert len(set(own)) == 2 and all(1000 + 10 * i <= n < 1000 + 10 * i + 4 for n in own)
                drawn.update(own)
    assert len(drawn) > 16  # not always the same two
    none = next(_Batches(samples, 4, seed=0, set_negatives=0).epoch(0))[3]
    assert none.shape == (0,)


def test_cli_train_will_not_write_over_a_trained_model_unless_told(world):
    # A train command rerun from the shell's history silently replaced the model in --out.
    root, db_path = world
    out = root / "kept-model"
    args = ["train", "--db", str(db_path), "--out", str(out), "--epochs", "1", "--image-size", "32",
            "--batch-size", "16", "--fusion", "sum", "--no-rerank", "--cache-dir", str(root / "cache")]
    assert main(args) == 0
    before = (out / "best.pt").read_bytes()
    with pytest.raises(ValueError, match=r"already holds a trained model \(best.pt, last.pt\): pass --resume"):
        main(args)  # under pytest main raises what it would print as 'error: ...'
    assert (out / "best.pt").read_bytes() == before
    assert main(args + ["--overwrite"]) == 0


def test_cli_resume_honours_an_explicit_lr_and_records_it(world, capsys):
    # `train --resume --lr X` trained on at the rate saved in last.pt: loading the
    # optimiser's state brought back its base rates, and history kept the old config.
    root, db_path = world
    out = root / "relearnt"
    args = ["train", "--db", str(db_path), "--out", str(out), "--image-size", "32", "--batch-size", "16",
            "--fusion", "sum", "--no-rerank", "--cache-dir", str(root / "cache")]
    assert main(args + ["--epochs", "1", "--lr", "1e-3"]) == 0

    def optimiser_rates():
        groups = torch.load(str(out / "last.pt"), weights_only=False)["optimizer"]["param_groups"]
        return [g["base_lr"] for g in groups], [g["lr"] for g in groups]

    assert optimiser_rates()[0] == [pytest.approx(2.5e-4)] * 2  # sum fusion: encoders only, at 1/4
    capsys.readouterr()
    assert main(args + ["--epochs", "2", "--lr", "1e-5", "--resume"]) == 0
    base, current = optimiser_rates()
    assert base == [pytest.approx(2.5e-6)] * 2
    assert "resume: --lr 1e-05 replaces the run's learning rate" in capsys.readouterr().err
    state = torch.load(str(out / "last.pt"), weights_only=False)
    steps_per_epoch = state["step"] // 2
    # The schedule goes on from where it was: the last step's rate is the new base at
    # the schedule's factor for that step (of 2 epochs' steps).
    factor = lr_factor((state["step"] - 1) / (2 * steps_per_epoch), 0.05, 0.02)
    assert current == [pytest.approx(2.5e-6 * factor)] * 2
    history = json.loads((out / "history.json").read_text())
    assert history["config"]["training"]["lr"] == 1e-5
    assert json.loads((out / "config.json").read_text())["training"]["lr"] == 1e-5
    assert history["resumes"] == [{"epoch": 1, "step": steps_per_epoch, "lr": 1e-5, "lr_from": "--lr",
                                   "previous_base_lrs": [pytest.approx(2.5e-4)] * 2,
                                   "base_lrs": [pytest.approx(2.5e-6)] * 2, "dbs": [str(db_path)], "files": [],
                                   "source": "auto", "captions": "both", "validation_changed": False,
                                   "selection_changed": False}]
    # Without --lr the run's own rate carries on, and the record keeps it.
    assert main(args + ["--epochs", "3", "--resume"]) == 0
    assert optimiser_rates()[0] == [pytest.approx(2.5e-6)] * 2
    assert json.loads((out / "config.json").read_text())["training"]["lr"] == 1e-5
    assert json.loads((out / "history.json").read_text())["resumes"][-1]["lr_from"] == "checkpoint"


def test_cli_eval_json_has_every_documented_key_without_image_sets(world, capsys):
    # Data without image sets had no recall_subset key at all (model, baselines, subsets,
    # intervals): scripts indexing eval --json's documented keys died on a KeyError.
    import shutil
    import sqlite3

    root, db_path = world
    out = root / "no-sets-model"
    cache = str(root / "cache")
    assert main(["train", "--db", str(db_path), "--out", str(out), "--epochs", "1", "--image-size", "32",
                 "--batch-size", "16", "--fusion", "sum", "--no-rerank", "--cache-dir", cache]) == 0
    no_sets = root / "no-sets.db"
    shutil.copy(db_path, no_sets)
    with sqlite3.connect(no_sets) as conn:
        test_pairs = [row[0] for row in conn.execute("SELECT id FROM pairs WHERE split = 'test' ORDER BY id")]
        conn.execute("UPDATE pairs SET img_set = NULL")
    capsys.readouterr()
    args = ["eval", "--db", str(no_sets), "--checkpoint", str(out), "--cache-dir", cache]
    assert main(args + ["--json"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert {"recall", "recall_subset", "median_rank", "baselines"} <= set(result)
    assert result["recall_subset"] is None and result["interval"]["recall_subset"] is None
    assert set(result["baselines"]) == {"image", "text", "sum"}
    assert all(values["recall_subset"] is None for values in result["baselines"].values())
    for entry in result["subsets"].values():
        assert entry["recall_subset"] is None and entry["interval"]["recall_subset"] is None
        assert all(values["recall_subset"] is None for values in entry["baselines"].values())
    reason = "recall_subset is null: no pair of split test has an image set"
    assert any(note.startswith(reason) for note in result["notes"])
    assert reason in captured.err
    assert main(args) == 0  # the table shows '-' and says why
    captured = capsys.readouterr()
    assert reason in captured.err
    model_row = next(line for line in captured.out.splitlines() if line.startswith("model "))
    assert model_row.split()[5:8] == ["-", "-", "-"]
    # Some pairs with an image set: the measure covers those, and says so.
    with sqlite3.connect(no_sets) as conn:
        conn.execute("UPDATE pairs SET img_set = json_array(reference_id, target_id) WHERE id = ?",
                     [test_pairs[0]])
    assert main(args + ["--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["recall_subset"]) == {"1", "2", "3"}
    assert result["baselines"]["sum"]["recall_subset"] is not None
    assert any(note.startswith("recall_subset covers the 2 of ") for note in result["notes"])


def test_a_skipped_re_ranker_leaves_the_whole_budget_to_the_fusion_model(tmp_path):
    # A small dataset (under 16 training pairs, too few for the re-ranker) trained with
    # --minutes 1 stopped after the fusion model's quarter of it: 16 s of the 60 asked.
    make_world_store(tmp_path, pairs=14)
    result = train(_config(tmp_path, "small", epochs=None, minutes=0.2))
    assert "rerank" not in result.history
    assert result.seconds >= 0.2 * 60 * 0.75, result.seconds
