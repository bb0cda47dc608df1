"""The second stage: pair scorer shapes and gradients, the re-ranking of a score matrix,
training, save/reload, and the same re-ranking through eval, the query engine and the CLI."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from test_retrieval_world import make_world_store

from good4cir.cli import main
from retrieval.data import load_triplets, train_val_split
from retrieval.features import PixelCache
from retrieval.model import build_model, load_model, save_weights, split_preprocess, write_config
from retrieval.rerank import (DEFAULT_TOP_K, RERANK_FILE, build_pair_scorer, load_pair_scorer, merge_reranked,
                              rerank_matrix, save_pair_scorer, top_candidates)

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return build_model({"model": "tiny", "fusion": "residual"}).encoder


def _random_pixels(n, size=64, seed=0):
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.integers(0, 255, size=(n, 3, size, size), dtype=np.uint8))


def test_pair_scorer_shapes_gradients_and_its_own_text_tower(encoder):
    scorer = build_pair_scorer(encoder)
    refs, cands = _random_pixels(4), _random_pixels(4, seed=1)
    pairs = scorer.encode_pairs(refs, cands)
    texts = scorer.encode_texts(encoder.tokenize(["add a plant", "make the bed red", "x", ""]))
    assert pairs.shape == texts.shape == (4, encoder.embed_dim)
    assert torch.allclose(pairs.norm(dim=-1), torch.ones(4), atol=1e-5)
    # Other input sizes are resized to the CNN's 64 px.
    assert scorer.encode_pairs(_random_pixels(2, 32), _random_pixels(2, 32, seed=3)).shape == (2, encoder.embed_dim)
    (pairs * texts).sum().backward()
    assert scorer.blocks[0][0].weight.grad.abs().sum() > 0
    assert scorer.text.token_embedding.weight.grad.abs().sum() > 0
    # The text tower starts as a copy: training it leaves the first stage's alone.
    before = encoder.text_tower()["token_embedding"].weight.clone()
    with torch.no_grad():
        scorer.text.token_embedding.weight.add_(1.0)
    assert torch.equal(encoder.text_tower()["token_embedding"].weight, before)
    # A candidate equal to the reference differs from a changed one.
    same = scorer.eval().encode_pairs(refs[:1], refs[:1])
    assert not torch.allclose(same, scorer.encode_pairs(refs[:1], cands[:1]))


def test_word_bag_takes_part_and_old_scorers_load_without_it(encoder, tmp_path):
    torch.manual_seed(3)
    scorer = build_pair_scorer(encoder)
    assert scorer.word_bag
    ids = encoder.tokenize(["make the bed red", "red the bed make", "make the bed blue", ""])
    texts = scorer.encode_texts(ids)
    pairs = scorer.encode_pairs(_random_pixels(4), _random_pixels(4, seed=1))
    (pairs * texts).sum().backward()
    assert scorer.words.weight.grad.abs().sum() > 0 and scorer.words_head.weight.grad.abs().sum() > 0
    # Only the caption's own words enter the bag: not the start, end or padding tokens.
    red, blue = ids[0, 4].item(), ids[2, 4].item()
    used = scorer.words.weight.grad.abs().sum(dim=1).nonzero().flatten().tolist()
    assert red in used and blue in used and 0 not in used and ids[0, 0].item() not in used
    # The bag ignores word order; the tower does not, so the sum still does.
    words = [sorted(ids[row, 1:ids[row].argmax()].tolist()) for row in (0, 1)]
    assert words[0] == words[1] and not torch.allclose(texts[0], texts[1])

    # A scorer saved before the word bag existed has no key for it in its payload.
    old = build_pair_scorer(encoder, word_bag=False)
    assert not hasattr(old, "words")
    save_pair_scorer(tmp_path / RERANK_FILE, old, {"enabled": True})
    payload = torch.load(str(tmp_path / RERANK_FILE), weights_only=False)
    del payload["word_bag"]
    torch.save(payload, str(tmp_path / RERANK_FILE))
    loaded, _ = load_pair_scorer(tmp_path, encoder)
    assert not loaded.word_bag
    refs, cands = _random_pixels(3, seed=4), _random_pixels(3, seed=5)
    with torch.no_grad():
        assert torch.equal(loaded.encode_pairs(refs, cands), old.eval().encode_pairs(refs, cands))


def test_weight_average_and_batch_norm_recalibration(encoder, world):
    from retrieval.train_rerank import _average, _Candidates, _recalibrate_batch_norm

    torch.manual_seed(5)
    a, b = build_pair_scorer(encoder), build_pair_scorer(encoder)
    a.blocks[0][1].num_batches_tracked.fill_(3)
    b.blocks[0][1].num_batches_tracked.fill_(7)
    mean = _average([a.state_dict(), b.state_dict()])
    conv = "blocks.0.0.weight"
    assert torch.allclose(mean[conv], (a.state_dict()[conv] + b.state_dict()[conv]) / 2)
    assert mean["blocks.0.1.num_batches_tracked"].item() == 7  # counters are not averaged
    scorer = build_pair_scorer(encoder)
    scorer.load_state_dict(mean)

    root, _ = world
    model = build_model({"model": "tiny", "image_size": 32, "fusion": "residual"})
    data, train_set, _, pixels, row_of = _world_pixels(root, model)
    norm = scorer.blocks[0][1]
    _recalibrate_batch_norm(scorer, pixels, _Candidates(train_set, row_of), random.Random(0), 0.5, batches=2)
    # The statistics are now those of the training pairs' first-layer activations, not the
    # initial zeros and ones, and the scorer is left ready to score.
    assert not scorer.training and norm.momentum == 0.1
    assert norm.running_mean.abs().sum() > 0 and not torch.allclose(norm.running_var, torch.ones_like(norm.running_var))
    assert torch.isfinite(norm.running_var).all()


def test_top_candidates_leave_out_the_reference_and_merge_keeps_the_rest_in_order():
    first = np.array([[0.9, 0.1, 0.5, 0.7, 0.3],
                      [0.2, 0.8, 0.6, 0.4, 0.0]], dtype=np.float32)
    candidates = top_candidates(first, [0, None], top_k=3)
    assert candidates.tolist() == [[3, 2, 4], [1, 2, 3]]
    second = np.array([[0.1, 0.9, 0.5], [-0.2, 0.3, 0.1]], dtype=np.float32)
    final = merge_reranked(first, candidates, second)
    assert np.argsort(-final[0], kind="stable").tolist()[:3] == [2, 4, 3]
    assert np.argsort(-final[1], kind="stable").tolist() == [2, 3, 1, 0, 4]
    # Outside the candidates the first-stage scores stay as they were.
    assert final[0, 1] == first[0, 1] and final[1, 4] == first[1, 4]
    # Ties in the first stage: the lower column first, as the metrics break them.
    assert top_candidates(np.zeros((1, 4), np.float32), [None], 2).tolist() == [[0, 1]]


@pytest.mark.parametrize("mirror", [False, True])
def test_rerank_matrix_scores_each_top_candidate_with_its_own_pair(encoder, mirror):
    torch.manual_seed(1)
    scorer = build_pair_scorer(encoder).eval()
    scorer.mirror = mirror
    pixels = _random_pixels(12, seed=4)
    keys = [f"img{i}" for i in range(12)]
    row_of = {k: i for i, k in enumerate(keys)}
    rng = np.random.default_rng(5)
    first = rng.normal(size=(3, 12)).astype(np.float32)
    references = ["img0", "img0", "img5"]
    texts = ["make it red", "move the lamp to the left", "remove the rug on the right"]
    final = rerank_matrix(scorer, first, references, texts, keys, pixels, row_of, top_k=4, batch_size=3)
    candidates = top_candidates(first, [0, 0, 5], 4)
    with torch.no_grad():
        for q, ref in enumerate(references):
            cands = candidates[q]
            refs = pixels[[row_of[ref]] * 4]
            direct = scorer.score(scorer.encode_pairs(refs, pixels[cands]),
                                  scorer.encode_texts(encoder.tokenize(texts[q:q + 1]))[0]).numpy()
            if mirror:
                # The mirrored view: images flipped, "left" and "right" swapped; averaged.
                swapped = texts[q].replace("left", "LEFT").replace("right", "left").replace("LEFT", "right")
                flipped = scorer.score(scorer.encode_pairs(refs.flip(-1), pixels[cands].flip(-1)),
                                       scorer.encode_texts(encoder.tokenize([swapped]))[0]).numpy()
                direct = (direct + flipped) / 2
            expected = cands[np.argsort(-direct, kind="stable")].tolist()
            assert np.argsort(-final[q], kind="stable")[:4].tolist() == expected
            assert np.allclose(np.sort(final[q, cands])[::-1] - final[q, cands].max(),
                               np.sort(direct)[::-1] - direct.max(), atol=1e-5)
            rest = [c for c in range(12) if c not in cands]
            assert np.allclose(final[q, rest], first[q, rest])


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("rerank-world")
    return root, make_world_store(root, pairs=80)


def _world_pixels(root, model):
    data = load_triplets([root / "world.db"])
    train_set, val_set = train_val_split(data)
    pil, _, _ = split_preprocess(model.encoder.preprocess)
    pixels, row_of, _ = PixelCache(root / "cache", pil).load(data.image_paths, progress=False)
    return data, train_set, val_set, pixels, row_of


@torch.no_grad()
def _candidate_loss(scorer, samples, pixels, token_ids, caption_rows) -> float:
    """Mean softmax loss of each pair's target against its fixed candidate list."""
    scorer.eval()
    total = 0.0
    for (ref, _, _, _), rows, caps in zip(samples, _fixed_candidates(samples), caption_rows):
        emb = scorer.encode_pairs(pixels[[ref] * len(rows)], pixels[rows])
        logits = scorer.logit_scale.exp() * scorer.score(emb, scorer.encode_texts(token_ids[caps[:1]])[0])
        total += float(torch.nn.functional.cross_entropy(logits[None], torch.zeros(1, dtype=torch.long)))
    return total / len(samples)


def _fixed_candidates(samples):
    targets = [s[1] for s in samples]
    return [[t] + [r for r in dict.fromkeys(own + sib[:4] + targets[i + 1:i + 5]) if r not in (t, ref)]
            for i, (ref, t, own, sib) in enumerate(samples)]


def test_training_lowers_the_loss_and_the_saved_scorer_reloads_identically(world, tmp_path):
    from retrieval.train_rerank import _Candidates, train_pair_scorer

    root, _ = world
    torch.manual_seed(0)
    model = build_model({"model": "tiny", "image_size": 32, "fusion": "residual"})
    data, train_set, val_set, pixels, row_of = _world_pixels(root, model)
    val_gallery = data.gallery_keys(val_set)
    texts = list(dict.fromkeys(c for t in train_set for c in t.captions))
    token_ids = model.encoder.tokenize(texts)
    caption_rows = [[texts.index(c) for c in t.captions] for t in train_set]
    samples = _Candidates(train_set, row_of).samples
    torch.manual_seed(0)
    before = _candidate_loss(build_pair_scorer(model.encoder), samples, pixels, token_ids, caption_rows)

    outcome = train_pair_scorer(model, pixels, row_of, train_set, val_set, val_gallery, tmp_path,
                                epochs=12, progress=False)
    assert len(outcome.history["epochs"]) == 12
    assert "recall" in outcome.first_stage_val and "recall" in outcome.best["val"]
    saved = torch.load(str(tmp_path / RERANK_FILE), weights_only=False)
    assert saved["epoch"] == outcome.best["epoch"] == 12 and saved["top_k"] == DEFAULT_TOP_K
    # The saved scorer averages the last epochs; the best single one stays in the history.
    assert saved["averaged_epochs"] == outcome.best["averaged_epochs"] == [8, 9, 10, 11, 12]
    assert outcome.history["best_epoch"]["epoch"] in range(1, 13)
    assert saved["enabled"] == (outcome.best["score"] > outcome.first_stage_val["recall"]["1"])
    assert saved["mirror"] is True  # trained on mirrored steps, so scored in both views

    saved["enabled"] = True  # load whatever came out, to compare scores
    torch.save(saved, str(tmp_path / RERANK_FILE))
    scorer, info = load_pair_scorer(tmp_path, model.encoder)
    assert scorer.mirror
    after = _candidate_loss(scorer, samples, pixels, token_ids, caption_rows)
    # 12 epochs of 3 steps: measured 1.66 -> 0.08
    assert after < 0.9 * before, (before, after)
    again, _ = load_pair_scorer(tmp_path, model.encoder)
    refs, cands = pixels[:5], pixels[5:10]
    with torch.no_grad():
        assert torch.equal(scorer.encode_pairs(refs, cands), again.encode_pairs(refs, cands))
    assert info["val"] == outcome.best["val"]

    saved["enabled"] = False
    torch.save(saved, str(tmp_path / RERANK_FILE))
    assert load_pair_scorer(tmp_path, model.encoder) is None


@pytest.fixture(scope="module")
def checkpoint_with_scorer(world, tmp_path_factory):
    """A random first stage and a random pair scorer, saved as `good4cir train` would."""
    root, _ = world
    out = tmp_path_factory.mktemp("ckpt-rerank")
    torch.manual_seed(2)
    config = {"model": "tiny", "fusion": "residual", "image_size": 32}
    model = build_model(config)
    write_config(out, config)
    save_weights(out / "best.pt", model, {"epoch": 1})
    save_pair_scorer(out / RERANK_FILE, build_pair_scorer(model.encoder),
                     {"epoch": 1, "val": {}, "top_k": 6, "enabled": True})
    return out


def test_eval_reranks_and_reports_the_first_stage(world, checkpoint_with_scorer, capsys):
    root, db_path = world
    cache = str(root / "cache")
    common = ["eval", "--db", str(db_path), "--checkpoint", str(checkpoint_with_scorer),
              "--cache-dir", cache, "--json"]
    assert main(common) == 0
    reranked = json.loads(capsys.readouterr().out)
    assert main(common + ["--no-rerank"]) == 0
    alone = json.loads(capsys.readouterr().out)
    assert reranked["rerank"]["top_k"] == 6 and "first_stage" not in alone
    assert reranked["first_stage"]["recall"] == alone["recall"]
    # Only the top 6 move: R@50 cannot change, and the baselines are the encoders' own.
    assert reranked["recall"]["50"] == alone["recall"]["50"]
    assert reranked["baselines"] == alone["baselines"]
    assert main(common[:-1]) == 0
    assert "fusion model alone" in capsys.readouterr().out


def test_eval_plots_recall_curves_that_agree_with_its_numbers(world, checkpoint_with_scorer, tmp_path, capsys):
    from PIL import Image

    from retrieval import metrics
    from retrieval.recall_plot import recall_curve, subset_curve

    root, db_path = world
    plot = tmp_path / "plots" / "recall.png"
    args = ["eval", "--db", str(db_path), "--checkpoint", str(checkpoint_with_scorer),
            "--cache-dir", str(root / "cache"), "--plot", str(plot)]
    assert main(args + ["--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["plot"] == str(plot)
    with Image.open(plot) as image:
        assert image.format == "PNG" and image.width > 800
    assert main(args) == 0
    assert f"recall curves: {plot}" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--plot"):
        main(args + ["--submission", str(tmp_path / "sub")])

    # The curves are the metrics at every K: checked against metrics.py on a random matrix.
    rng = np.random.default_rng(0)
    gallery = [f"g{i}" for i in range(40)]
    scores = rng.normal(size=(25, 40))
    refs = [gallery[i] for i in rng.integers(0, 40, 25)]
    targets = [gallery[(gallery.index(r) + 1 + int(j)) % 40] for r, j in zip(refs, rng.integers(0, 38, 25))]
    sets = [sorted({r, t, *rng.choice(gallery, 3, replace=False)}) for r, t in zip(refs, targets)]
    curve = recall_curve(scores, gallery, refs, targets)
    expected = metrics.recall_at_k(scores, gallery, refs, targets, [1, 5, 10, 39])
    assert [curve[k - 1] for k in (1, 5, 10, 39)] == pytest.approx([expected[k] for k in (1, 5, 10, 39)], abs=0.01)
    assert curve[39:] == [100.0] * 11 and curve == sorted(curve)
    subset = subset_curve(scores, gallery, refs, targets, sets)
    expected = metrics.recall_subset_at_k(scores, gallery, refs, targets, sets, [1, 2, 3])
    assert subset[:3] == pytest.approx([expected[k] for k in (1, 2, 3)], abs=0.01)
    assert subset[-1] == 100.0


def test_query_engine_reranks_like_eval(world, checkpoint_with_scorer, tmp_path):
    from retrieval.index import QueryEngine, build_gallery_index
    from retrieval.model import load_retriever

    _, db_path = world
    build_gallery_index(db_path, checkpoint_with_scorer, tmp_path / "index", split="test",
                        num_workers=0, progress=False)
    engine = QueryEngine(tmp_path / "index")
    assert engine.retriever.rerank_top_k == 6
    paths = [e.path for e in engine.index.entries]
    text = "make the square red"
    hits = engine.query(paths[0], text, k=10)
    # By hand: the first stage's top 6 (reference left out), in the pair scorer's order.
    plain = load_retriever(checkpoint_with_scorer, rerank=False)
    assert plain.pair_scorer is None
    query = plain.encode_queries([paths[0]], [text])[0]
    first = plain.encode_images(paths) @ query
    first[0] = -np.inf
    order = np.argsort(-first, kind="stable")
    top = [paths[i] for i in order[:6]]
    scores = engine.retriever.rerank_scores(paths[0], text, top)
    expected = [top[i] for i in np.argsort(-scores, kind="stable")] + [paths[i] for i in order[6:10]]
    assert [h.path for h in hits] == expected
    assert hits[0].score == pytest.approx(float(scores.max()), abs=1e-5)

    # A gallery file that went bad after indexing: named, and placed after the re-ranked.
    from retrieval.index import GalleryEntry

    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    entry = engine.index.entries[order[0]]
    engine.index.entries[order[0]] = GalleryEntry(name=entry.name, path=str(broken), image_id=entry.image_id)
    with pytest.warns(UserWarning, match="re-ranking left out a candidate: .*broken.png"):
        hits = engine.query(paths[0], text, k=10)
    readable = [i for i in range(6) if i != 0]
    scores = engine.retriever.rerank_scores(paths[0], text, [top[i] for i in readable])
    assert [h.path for h in hits[:6]] == [top[readable[i]] for i in np.argsort(-scores, kind="stable")] + [str(broken)]
    # Decoded candidates are kept: asking again decodes nothing new.
    decoded = dict(engine.retriever._decoded)
    with pytest.warns(UserWarning, match="broken.png"):
        engine.query(paths[0], text, k=10)
    assert engine.retriever._decoded.keys() == decoded.keys()


def test_training_replaces_an_old_scorer(world, checkpoint_with_scorer, tmp_path):
    import shutil

    from retrieval.train import TrainConfig, train

    root, _ = world
    out = tmp_path / "model"
    shutil.copytree(checkpoint_with_scorer, out)
    train(TrainConfig(out=str(out), dbs=[str(root / "world.db")], image_size=32, batch_size=16,
                      epochs=1, cache_dir=str(root / "cache"), progress=False, rerank=False))
    assert not (out / RERANK_FILE).exists()
    model, _ = load_model(out)
    assert load_pair_scorer(out, model.encoder) is None


def test_too_few_pairs_for_the_re_ranker_skip_it_with_a_warning(world, tmp_path, monkeypatch, caplog):
    import retrieval.train_rerank as train_rerank
    from retrieval.train import TrainConfig, train

    root, _ = world
    monkeypatch.setattr(train_rerank, "QUERIES_PER_STEP", 10_000)
    with caplog.at_level("WARNING"):
        result = train(TrainConfig(out=str(tmp_path / "model"), dbs=[str(root / "world.db")], image_size=32,
                                   batch_size=16, epochs=1, cache_dir=str(root / "cache"), progress=False))
    assert "re-ranker skipped" in caplog.text
    assert "rerank" not in result.history and not (tmp_path / "model" / RERANK_FILE).exists()
    assert (tmp_path / "model" / "best.pt").is_file()


def test_bf16_convolutions_score_like_fp32(encoder, monkeypatch):
    """Where the CPU has bf16 units the scorer's convolutions run in bf16 (faster); its
    scores must stay close to fp32's. The bf16 path is forced here whatever the CPU."""
    torch.manual_seed(2)
    scorer = build_pair_scorer(encoder).eval()
    refs, cands = _random_pixels(6, seed=6), _random_pixels(6, seed=7)
    text = scorer.encode_texts(encoder.tokenize(["make the chair red"]))[0]
    scorer.low_precision = False
    exact = scorer.encode_pairs(refs, cands)
    scorer.low_precision = True
    low = scorer.encode_pairs(refs, cands)
    assert low.dtype == torch.float32
    assert torch.allclose(low.norm(dim=-1), torch.ones(6), atol=1e-5)
    assert (low - exact).abs().max() < 0.05
    assert (scorer.score(low, text) - scorer.score(exact, text)).abs().max() < 0.02
    monkeypatch.setenv("GOOD4CIR_BF16", "0")
    assert build_pair_scorer(encoder).low_precision is False


def test_mirrored_captions_swap_left_and_right_only():
    from retrieval.mirror import mirror_text
    assert mirror_text("Move the Left chair to the right; the lamp on the left stays.") == \
        "Move the Right chair to the left; the lamp on the right stays."
    assert mirror_text("brighten the leftover lamp") == "brighten the leftover lamp"


def test_query_engine_scores_a_mirroring_scorer_in_both_views(world, checkpoint_with_scorer):
    from retrieval.model import load_retriever

    retriever = load_retriever(checkpoint_with_scorer)
    scorer = retriever.pair_scorer
    scorer.mirror = True
    paths = [str(p) for p in sorted((world[0] / "images").glob("*.png"))[:5]]
    text = "move the chair to the left"
    scores = retriever.rerank_scores(paths[0], text, paths[1:])
    ref, cands = retriever.uint8_pixels(paths[:1]).expand(4, -1, -1, -1), retriever.uint8_pixels(paths[1:])
    with torch.no_grad():
        plain = scorer.score(scorer.encode_pairs(ref, cands), scorer.encode_texts(scorer.tokenize([text]))[0])
        flipped = scorer.score(scorer.encode_pairs(ref.flip(-1), cands.flip(-1)),
                               scorer.encode_texts(scorer.tokenize(["move the chair to the right"]))[0])
    assert np.allclose(scores, ((plain + flipped) / 2).numpy(), atol=1e-5)
    assert not np.allclose(scores, plain.numpy(), atol=1e-4)


def test_hits_past_the_re_ranker_s_depth_say_which_stage_scored_them(world, checkpoint_with_scorer, tmp_path,
                                                                     capsys):
    # Past the re-ranker's top_k, hits kept the fusion model's cosine (about 0.9 here)
    # while the re-ranked ones above them had the pair scorer's (about 0.1): sorting or
    # thresholding `query --json`'s "score" (or the Retrieve tab's) put rank 7 first.
    import sqlite_utils

    from retrieval.index import FIRST_STAGE, RERANK_STAGE, QueryEngine, build_gallery_index
    from retrieval.model import load_retriever
    from ui.retrieve_logic import DatasetQuery, RetrieveService, render_results_html

    _, db_path = world
    index_dir = tmp_path / "index"
    build_gallery_index(db_path, checkpoint_with_scorer, index_dir, split="test", num_workers=0, progress=False)
    engine = QueryEngine(index_dir)
    paths = [e.path for e in engine.index.entries]
    text = "make the square red"
    hits = engine.query(paths[0], text, k=12)  # the re-ranker's depth is 6
    assert [h.stage for h in hits] == [RERANK_STAGE] * 6 + [FIRST_STAGE] * 6
    plain = load_retriever(checkpoint_with_scorer, rerank=False)
    cosine = dict(zip(paths, plain.encode_images(paths) @ plain.encode_queries([paths[0]], [text])[0]))
    assert [h.first_stage_score for h in hits] == pytest.approx([float(cosine[h.path]) for h in hits], abs=1e-5)
    assert all(h.score == h.first_stage_score for h in hits[6:])
    assert engine.retriever.rerank_scores(paths[0], text, [hits[0].path])[0] == pytest.approx(hits[0].score, abs=1e-5)

    args = ["query", "--index", str(index_dir), "--image", paths[0], "--text", text, "-k", "12"]
    capsys.readouterr()
    assert main(args + ["--json"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert result["reranked"] == 6
    assert [r["stage"] for r in result["results"]] == ["rerank"] * 6 + ["first_stage"] * 6
    assert [r["first_stage_score"] for r in result["results"]] == pytest.approx(
        [h.first_stage_score for h in hits], abs=1e-5)
    assert "note: hits 1-6 are in the re-ranker's order" in captured.err
    assert main(args[:-2] + ["-k", "5"]) == 0  # all re-ranked: nothing to say
    assert "note:" not in capsys.readouterr().err

    # The Retrieve tab: each hit dict carries its stage, and the page says where the scales change.
    db = sqlite_utils.Database(db_path)
    target_id, target_name = db.execute("SELECT id, name FROM images LIMIT 1").fetchone()
    pair = DatasetQuery("p", "p · test", "r", paths[0], target_id, target_name, text)
    found = RetrieveService(str(db_path), str(index_dir)).query(db, pair=pair, upload=None, text=text, k=12)
    assert [h["stage"] for h in found] == [RERANK_STAGE] * 6 + [FIRST_STAGE] * 6
    assert [h["first_stage_score"] for h in found] == pytest.approx([h.first_stage_score for h in hits], abs=1e-5)
    html = render_results_html(found, pair, uploaded=False)
    assert "#1-#6 in the re-ranker's order" in html and html.count("(first stage)") == 6
    assert "(first stage)" not in render_results_html(found[:6], pair, uploaded=False)
