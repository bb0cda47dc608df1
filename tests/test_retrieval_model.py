"""The fusion heads, the encoders, open_clip weight files, and checkpoints."""

from __future__ import annotations

import logging

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from retrieval.encoders import create_encoder
from retrieval.fusion import CrossAttentionFusion, create_fusion
from retrieval.loss import info_nce
from retrieval.model import build_model, load_retriever, save_weights, split_preprocess, write_config

torch.set_num_threads(2)
SMALL = {"model": "tiny", "image_size": 32}


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return create_encoder("tiny", image_size=32)


def test_encoder_tokens_and_trimmed_text_match_open_clip(encoder):
    pixels = torch.randn(3, 3, 32, 32)
    image = encoder.encode_image_tokens(pixels)
    assert image.pooled.shape == (3, encoder.embed_dim)
    assert image.tokens.shape == (3, (32 // 8) ** 2, encoder.vision_width)
    ids = encoder.tokenize(["make the lamp red", "remove the two green plants on the left", "x"])
    text = encoder.encode_text_ids(ids)
    assert text.tokens.shape[1] == int((ids != 0).sum(1).max())  # trimmed to the longest
    assert text.padding_mask[2].sum() > 0 and not text.padding_mask[1].any()
    # Trimming must not change what open_clip itself computes on the full context.
    encoder.clip.visual.output_tokens = False
    try:
        reference = encoder.clip.encode_text(ids)
        reference_image = encoder.clip.encode_image(pixels)
    finally:
        encoder.clip.visual.output_tokens = True
    torch.testing.assert_close(text.pooled, reference, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(image.pooled, reference_image, atol=1e-5, rtol=1e-4)


def test_resnet_encoder_gives_feature_map_tokens_and_open_clips_embedding(tmp_path):
    # CLIP's ResNets (RN50, RN50x4 as CLIP4Cir uses) work too: the last feature map's
    # cells are the tokens, and the pooled embedding is open_clip's own.
    config = {"embed_dim": 32, "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8},
              "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (tmp_path / "g4c-test-rn.json").write_text(__import__("json").dumps(config))
    open_clip.add_model_config(tmp_path)
    torch.manual_seed(0)
    encoder = create_encoder("g4c-test-rn")
    encoder.eval()
    pixels = torch.randn(2, 3, 64, 64)
    image = encoder.encode_image_tokens(pixels)
    assert image.tokens.shape == (2, 4, encoder.vision_width) and encoder.vision_width == 8 * 32
    torch.testing.assert_close(image.pooled, encoder.clip.encode_image(pixels), atol=1e-5, rtol=1e-4)
    fusion = create_fusion("residual", encoder.vision_width, encoder.text_width, encoder.embed_dim,
                           width=32, heads=2, layers=1)
    text = encoder.encode_text_ids(encoder.tokenize(["make the lamp red", "remove the rug"]))
    assert fusion(image, text).shape == (2, 32)


@pytest.mark.parametrize("variant", ["paper", "residual", "sum"])
def test_fusion_shapes_and_gradients(encoder, variant):
    torch.manual_seed(1)
    fusion = create_fusion(variant, encoder.vision_width, encoder.text_width, encoder.embed_dim,
                           width=64, heads=4)
    pixels = torch.randn(4, 3, 32, 32)
    ids = encoder.tokenize(["add a chair", "make the wall navy and remove the lamp", "a", "b c"])
    image = encoder.encode_image_tokens(pixels)
    text = encoder.encode_text_ids(ids)
    out = fusion(image, text)
    assert out.shape == (4, encoder.embed_dim)
    assert torch.isfinite(out).all()
    loss = info_nce(torch.nn.functional.normalize(out, dim=-1),
                    torch.nn.functional.normalize(image.pooled, dim=-1))
    encoder.zero_grad()
    fusion.zero_grad()
    loss.backward()
    # Gradients reach every fusion weight and both towers.
    for name, param in fusion.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert encoder.clip.visual.conv1.weight.grad.abs().sum() > 0
    assert encoder.text_tower()["token_embedding"].weight.grad.abs().sum() > 0
    # The caption changes the query (composition, not image retrieval).
    other = encoder.encode_text_ids(encoder.tokenize(["remove the bed"] * 4))
    assert not torch.allclose(fusion(image, other), out)


def test_paper_variant_has_no_norms_or_residuals():
    paper = CrossAttentionFusion(32, 32, 16, width=32, heads=4, variant="paper")
    residual = CrossAttentionFusion(32, 32, 16, width=32, heads=4, variant="residual")
    norms = lambda m: [n for n, mod in m.cross.named_modules() if isinstance(mod, torch.nn.LayerNorm)]
    assert norms(paper) == [] and len(norms(residual)) == 12
    assert len(paper.cross.layers) == len(residual.cross.layers) == 4


@pytest.mark.parametrize("variant", ["paper", "residual"])
def test_padding_is_ignored_by_cross_attention(encoder, variant):
    from retrieval.encoders import TextTokens

    fusion = create_fusion(variant, encoder.vision_width, encoder.text_width, encoder.embed_dim,
                           width=64, heads=4).eval()
    with torch.no_grad():
        image = encoder.encode_image_tokens(torch.randn(2, 3, 32, 32))
        text = encoder.encode_text_ids(encoder.tokenize(["add a chair", "make the wall navy and remove the lamp"]))
        assert text.padding_mask[0].any()
        noisy = text.tokens.clone()
        noisy[text.padding_mask] = torch.randn(int(text.padding_mask.sum()), noisy.shape[-1]) * 50
        before = fusion(image, text)
        after = fusion(image, TextTokens(text.pooled, noisy, text.padding_mask))
    torch.testing.assert_close(before, after, atol=1e-5, rtol=1e-4)


def test_open_clip_weight_file_loads(tmp_path):
    torch.manual_seed(3)
    name = "g4c-tiny"
    clip = open_clip.create_model(name, force_image_size=32)
    path = tmp_path / "weights.pt"
    torch.save(clip.state_dict(), path)
    encoder = create_encoder("tiny", checkpoint=path, image_size=32)
    for key, value in clip.state_dict().items():
        assert torch.equal(encoder.clip.state_dict()[key], value), key
    # the {'state_dict': ...} layout open_clip's trainer writes, with a DDP prefix
    torch.save({"state_dict": {f"module.{k}": v for k, v in clip.state_dict().items()}},
               tmp_path / "epoch_1.pt")
    wrapped = create_encoder("tiny", checkpoint=tmp_path / "epoch_1.pt", image_size=32)
    assert torch.equal(wrapped.clip.visual.conv1.weight, clip.visual.conv1.weight)
    # a file for another architecture is refused with a clear message
    torch.save({"visual.conv1.weight": torch.zeros(1)}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="do not fit"):
        create_encoder("tiny", checkpoint=tmp_path / "bad.pt", image_size=32)
    with pytest.raises(FileNotFoundError):
        create_encoder("tiny", checkpoint=tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="unknown model"):
        create_encoder("no-such-model")


def test_loading_a_trained_model_does_not_say_it_is_initialised_randomly(tmp_path, caplog):
    # open_clip logs "No pretrained weights loaded ... Model initialized randomly" for the
    # bare architecture; eval, index and query printed it before every use of trained weights.
    config = {**SMALL, "fusion": "residual"}
    with caplog.at_level(logging.WARNING):
        model = build_model(config)
    assert "initialized randomly" in caplog.text  # building from scratch: it is true
    write_config(tmp_path, config)
    save_weights(tmp_path / "best.pt", model, {"epoch": 1})
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        load_retriever(tmp_path)
    assert "initialized randomly" not in caplog.text
    with caplog.at_level(logging.WARNING):
        build_model(config)
    assert "initialized randomly" in caplog.text  # the filter does not outlive the load


def test_training_from_a_weights_file_does_not_say_it_is_initialised_randomly(tmp_path, caplog):
    # `train --checkpoint clip.pt` printed open_clip's "No pretrained weights loaded ...
    # Model initialized randomly" and nothing else about the file: a user read it as their
    # weights being ignored. The file's weights replace the random ones, so it is not true.
    path = tmp_path / "clip.pt"
    torch.save(open_clip.create_model("g4c-tiny", force_image_size=32).state_dict(), path)
    caplog.clear()  # open_clip said it for the model saved above: true there
    with caplog.at_level(logging.WARNING):
        create_encoder("tiny", checkpoint=path, image_size=32)
    assert "initialized randomly" not in caplog.text
    # a file that does not load says so, and nothing about a random model either
    (tmp_path / "not_weights.pt").write_text("not torch")
    caplog.clear()
    with caplog.at_level(logging.WARNING), pytest.raises(ValueError, match="not a file of open_clip weights"):
        create_encoder("tiny", checkpoint=tmp_path / "not_weights.pt", image_size=32)
    assert "initialized randomly" not in caplog.text


def test_checkpoint_reload_gives_identical_scores(tmp_path):
    torch.manual_seed(4)
    config = {**SMALL, "fusion": "residual"}
    model = build_model(config).eval()
    write_config(tmp_path, config)
    save_weights(tmp_path / "best.pt", model, {"epoch": 1})
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)) for _ in range(5)]
    texts = ["make it red", "add two plants", "remove the lamp", "move the bed left", "x"]

    first = load_retriever(tmp_path)
    second = load_retriever(tmp_path)
    scores_1 = first.encode_queries(images, texts) @ first.encode_images(images).T
    scores_2 = second.encode_queries(images, texts) @ second.encode_images(images).T
    np.testing.assert_array_equal(scores_1, scores_2)
    # ...and the same as the model that was saved
    with torch.no_grad():
        pixels = torch.stack([first.image_transform(im) for im in images])
        direct = model.query_embedding(pixels, model.encoder.tokenize(texts)) @ \
            model.target_embedding(pixels).T
    np.testing.assert_allclose(scores_1, direct.numpy(), atol=1e-5)
    gallery = first.encode_images(images)
    assert gallery.dtype == np.float32 and gallery.shape == (5, first.embed_dim)
    np.testing.assert_allclose(np.linalg.norm(gallery, axis=1), 1.0, atol=1e-5)
    assert first.model_info["fusion"] == "residual" and first.model_info["epoch"] == 1


def test_uint8_cache_path_equals_open_clip_preprocessing():
    model = build_model({**SMALL, "fusion": "sum"})
    pil_part, _, _ = split_preprocess(model.encoder.preprocess)
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (70, 90, 3), dtype=np.uint8))
    cached = torch.from_numpy(np.asarray(pil_part(image)).transpose(2, 0, 1).copy())
    torch.testing.assert_close(model.normalize_pixels(cached[None])[0],
                               model.encoder.preprocess(image), atol=1e-6, rtol=0)


def test_info_nce_masks_repeated_targets():
    q = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    t = q.clone()
    t[1] = t[0]
    plain = info_nce(q, t)
    masked = info_nce(q, t, target_ids=torch.tensor([7, 7, 8, 9]))
    assert masked < plain


@torch.no_grad()
def test_feature_cache_holds_what_the_encoder_computes(tmp_path, encoder):
    from retrieval.features import FeatureCache, PixelCache, trim_text_features

    texts = ["a", "make the lamp red and remove the two green plants", "a"]
    first = FeatureCache(tmp_path, encoder).text_features(texts, progress=False)
    again = FeatureCache(tmp_path, encoder).text_features([texts[1], "new text"], progress=False)
    fresh = encoder.encode_text_ids(encoder.tokenize(texts))
    tokens, mask = trim_text_features(first["tokens"], first["padding_mask"])
    assert torch.equal(mask, fresh.padding_mask)
    torch.testing.assert_close(tokens.float()[~mask], fresh.tokens[~mask], atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(again["pooled"][0], first["pooled"][1])
    # images: keyed by content hash, computed from the uint8 pixel cache
    paths = {}
    for i in range(3):
        path = tmp_path / f"im{i}.png"
        Image.fromarray(np.full((40, 40, 3), 60 * i, dtype=np.uint8)).save(path)
        paths[f"key{i}"] = str(path)
    pil, _, _ = split_preprocess(encoder.preprocess)
    pixels, row_of, failures = PixelCache(tmp_path, pil).load({**paths, "bad": str(tmp_path / "no.png")},
                                                             progress=False)
    assert set(row_of) == set(paths) and "bad" in failures
    model = build_model({**SMALL, "fusion": "sum"})
    model.encoder = encoder
    cached = FeatureCache(tmp_path, encoder).image_features(
        list(paths), lambda keys: model.normalize_pixels(pixels[[row_of[k] for k in keys]]), progress=False)
    direct = encoder.encode_image_tokens(model.normalize_pixels(pixels))
    torch.testing.assert_close(cached["pooled"].float(), direct.pooled, atol=2e-2, rtol=1e-2)


def test_references_as_negatives_punish_a_query_that_ignores_its_text():
    torch.manual_seed(0)
    targets = torch.nn.functional.normalize(torch.randn(6, 16), dim=-1)
    references = torch.nn.functional.normalize(targets + 0.8 * torch.randn(6, 16), dim=-1)
    ids = torch.arange(6)
    lazy = torch.nn.functional.normalize(references + 0.5 * targets, dim=-1)  # close to its reference
    plain = info_nce(lazy, targets, target_ids=ids)
    hard = info_nce(lazy, targets, target_ids=ids, extra_negatives=references, extra_ids=ids + 100)
    assert hard > plain
    # a reference that is also a query's own target is not a negative for it
    one = targets[:1]
    masked = info_nce(one, one, target_ids=ids[:1], extra_negatives=one, extra_ids=ids[:1])
    unmasked = info_nce(one, one, target_ids=ids[:1], extra_negatives=one, extra_ids=ids[:1] + 1)
    assert float(masked) == pytest.approx(0.0, abs=1e-6)
    assert float(unmasked) == pytest.approx(0.5 * np.log(2), rel=1e-4)


def test_cli_fusion_choices_match_the_model_without_importing_torch():
    import subprocess
    import sys

    from good4cir.cli_retrieval import FUSIONS as cli_fusions
    from retrieval.fusion import FUSIONS

    assert cli_fusions == FUSIONS
    # Registering the train/eval subcommands must not pull torch in (`good4cir --help`).
    code = ("import sys, argparse; from good4cir import cli_retrieval; "
            "cli_retrieval.register(argparse.ArgumentParser().add_subparsers()); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


HUB_REVISION = "0123456789abcdef0123456789abcdef01234567"


def _hub_cache(cache_dir, repo: str, weights: bool = True):
    """A Hugging Face cache as huggingface_hub lays it out (refs/main -> snapshots/REV/)
    holding an open_clip repository of our tiny config; returns its weights."""
    import json

    from retrieval.encoders import MODEL_CONFIG_DIR

    root = cache_dir / f"models--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / HUB_REVISION
    snapshot.mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(HUB_REVISION)
    config = json.loads((MODEL_CONFIG_DIR / "g4c-tiny.json").read_text())
    (snapshot / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": config, "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}))
    torch.manual_seed(7)
    state = open_clip.create_model("g4c-tiny").state_dict()
    if weights:
        torch.save(state, snapshot / "open_clip_pytorch_model.bin")
    return state


def test_hf_hub_models_load_from_the_hugging_face_cache_offline(tmp_path):
    # `--model hf-hub:ORG/REPO` (open_clip's form for a Hub repository) was refused as an
    # unknown model. Here the Hub is a local cache read with HF_HUB_OFFLINE=1; run in
    # subprocesses, as huggingface_hub reads its environment once, on import.
    import json
    import os
    import subprocess
    import sys

    from test_retrieval_world import make_world_store

    world_db = make_world_store(tmp_path / "world", pairs=40)
    cache = tmp_path / "hf" / "hub"
    state = _hub_cache(cache, "g4c-test/tiny-clip")
    _hub_cache(cache, "g4c-test/config-only", weights=False)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "hf")}
    torch.save(state, tmp_path / "expected.pt")

    def run(*args):
        return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=300)

    checks = f"""
import sys, torch
from retrieval.encoders import create_encoder
expected = torch.load({str(tmp_path / "expected.pt")!r})
encoder = create_encoder("hf-hub:g4c-test/tiny-clip")
got = encoder.clip.state_dict()
assert all(torch.equal(got[k], v) for k, v in expected.items()), "not the repository's weights"
assert list(encoder.preprocess.transforms[-1].mean) == [0.5, 0.5, 0.5]  # its preprocess_cfg
assert encoder.tokenize(["add a lamp"]).shape == (1, 77)
for model, kwargs, message in [
        ("hf-hub:g4c-test/config-only", {{}}, "could not load 'hf-hub:g4c-test/config-only'"),
        ("hf-hub:g4c-test/absent", {{}}, "could not load 'hf-hub:g4c-test/absent'"),
        ("hf-hub:g4c-test/tiny-clip", {{"pretrained": "openai"}}, "--pretrained does not apply"),
        ("hf-hub:tiny-clip", {{}}, "hf-hub:ORG/REPO")]:
    try:
        create_encoder(model, **kwargs)
    except ValueError as exc:
        assert message in str(exc), (model, str(exc))
    else:
        raise AssertionError(model + " loaded")
print("ok")
"""
    done = run("-c", checks)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]

    # train starts from the repository's weights (frozen here, so they are still in
    # best.pt), records its init, and eval rebuilds the model from the cache.
    out = tmp_path / "model"
    common = ["--db", str(world_db), "--cache-dir", str(tmp_path / "cache")]
    done = run("-m", "good4cir", "train", *common, "--out", str(out), "--model", "hf-hub:g4c-test/tiny-clip",
               "--image-size", "64", "--batch-size", "16", "--epochs", "1", "--freeze-encoders",
               "--fusion", "paper", "--no-rerank", "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    config = json.loads((out / "config.json").read_text())
    assert config["model"] == "hf-hub:g4c-test/tiny-clip" and config["init"] == "hf-hub"
    trained = torch.load(str(out / "best.pt"), weights_only=False)["model"]
    assert all(torch.equal(trained["encoder.clip." + k], v) for k, v in state.items())
    done = run("-m", "good4cir", "eval", *common, "--checkpoint", str(out), "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["model"]["model"] == "hf-hub:g4c-test/tiny-clip"


def test_hf_hub_checkpoints_load_without_the_hub(tmp_path):
    # eval, index, query and load_retriever rebuilt an hf-hub: model through the Hub's
    # open_clip_config.json (and open_clip fetched its weights too), which the checkpoint's
    # weights then replaced: a checkpoint copied to a machine without that Hugging Face
    # cache needed the network, and failed offline. The checkpoint now holds the config.
    import json
    import os
    import shutil
    import subprocess
    import sys

    from test_retrieval_world import make_world_store

    world_db = make_world_store(tmp_path / "world", pairs=40)
    repo = "g4c-test/tiny-clip"
    state = _hub_cache(tmp_path / "hf" / "hub", repo)
    out = tmp_path / "model"
    common = ["--db", str(world_db), "--cache-dir", str(tmp_path / "cache")]

    def run(hf_home, *args):
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(hf_home), "HF_HUB_CACHE": str(hf_home / "hub")}
        return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=300)

    train = ["-m", "good4cir", "train", *common, "--out", str(out), "--model", f"hf-hub:{repo}",
             "--image-size", "64", "--batch-size", "16", "--freeze-encoders", "--fusion", "paper",
             "--no-rerank", "--json"]
    done = run(tmp_path / "hf", *train, "--epochs", "1")
    assert done.returncode == 0, done.stderr[-2000:]

    # The checkpoint goes to a machine whose Hugging Face cache is empty, offline.
    shutil.rmtree(tmp_path / "hf")
    bare = tmp_path / "bare-hf"
    (bare / "hub").mkdir(parents=True)
    done = run(bare, *train, "--epochs", "2", "--resume")
    assert done.returncode == 0, done.stderr[-2000:]
    done = run(bare, "-m", "good4cir", "eval", *common, "--checkpoint", str(out), "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["model"]["model"] == f"hf-hub:{repo}"
    index = tmp_path / "index"
    done = run(bare, "-m", "good4cir", "index", "--db", str(world_db), "--checkpoint", str(out),
               "--out", str(index), "--workers", "0", "--quiet")
    assert done.returncode == 0, done.stderr[-2000:]
    reference = sorted((tmp_path / "world" / "images").iterdir())[0]
    done = run(bare, "-m", "good4cir", "query", "--index", str(index), "--image", str(reference),
               "--text", "make the square red", "-k", "3", "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(json.loads(done.stdout)["results"]) == 3
    # load_retriever (the app's Retrieve tab) gives the trained weights, with the
    # repository's preprocessing (its mean and std, not open_clip's defaults) and input size.
    torch.save(state, tmp_path / "hub_weights.pt")
    check = f"""
import torch
from retrieval.model import load_retriever
retriever = load_retriever({str(out)!r})
encoder = retriever.model.encoder
trained = torch.load({str(out / "best.pt")!r}, weights_only=False)["model"]
got = encoder.clip.state_dict()
assert all(torch.equal(got[k], trained["encoder.clip." + k]) for k in got)
assert list(encoder.preprocess.transforms[-1].mean) == [0.5, 0.5, 0.5]
assert list(encoder.preprocess.transforms[-1].std) == [0.25, 0.25, 0.25]
assert encoder.image_size == 64 and encoder.model_name == "hf-hub:{repo}"
from PIL import Image
image = Image.open({str(reference)!r})
assert retriever.encode_queries([image], ["make the square red"]).shape == (1, encoder.embed_dim)
print("ok")
"""
    done = run(bare, "-c", check)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
    assert not any((bare / "hub").iterdir())  # nothing was fetched into it

    # A checkpoint from before the stored config still loads the old way: through the cache.
    (out / "open_clip_config.json").unlink()
    done = run(bare, "-c", check)
    assert done.returncode != 0 and "could not load 'hf-hub:g4c-test/tiny-clip'" in done.stderr
    _hub_cache(tmp_path / "hf" / "hub", repo)
    done = run(tmp_path / "hf", "-c", check)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
