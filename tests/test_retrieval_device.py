"""`--device`: where training and inference run.

The CPU tests run everywhere (CI has no GPU). The CUDA tests run where torch sees a GPU:
a model trained there matches what the CPU computes from the same weights, and its
checkpoint, index and queries work on either device.
"""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from test_retrieval_world import make_world_store

from good4cir.cli import main
from retrieval.device import device_of, resolve_device
from retrieval.model import load_model, load_retriever

torch.set_num_threads(2)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no CUDA GPU")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("device-world")
    return root, make_world_store(root, pairs=60)


def _train(root, db, out, device, *extra):
    args = ["train", "--db", str(db), "--out", str(root / out), "--epochs", "2", "--image-size", "32",
            "--batch-size", "16", "--cache-dir", str(root / "cache"), "--device", device, "--json", *extra]
    assert main(args) == 0


def test_auto_is_the_gpu_where_there_is_one_and_bad_names_are_refused():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device(None) == resolve_device("auto")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match=r"--device 'tpu' is not a device: use auto, cpu, cuda or cuda:N"):
        resolve_device("tpu")
    with pytest.raises(ValueError, match=r"--device 'meta': only auto, cpu, cuda or cuda:N are supported"):
        resolve_device("meta")
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        with pytest.raises(ValueError, match=rf"has {count} CUDA GPU\(s\)"):
            resolve_device(f"cuda:{count}")
    else:
        with pytest.raises(ValueError, match=r"--device 'cuda': torch sees no CUDA GPU .*use --device cpu"):
            resolve_device("cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a GPU")
def test_train_on_a_missing_gpu_fails_before_writing_anything(world):
    root, db = world
    with pytest.raises(ValueError, match="torch sees no CUDA GPU"):
        _train(root, db, "no-gpu", "cuda")
    assert not (root / "no-gpu").exists()


def test_history_names_the_device_and_the_loader_normaliser_stays_on_the_cpu(world, capsys):
    root, db = world
    _train(root, db, "on-cpu", "cpu", "--no-rerank")
    assert json.loads(capsys.readouterr().out)["device"] == "cpu"
    history = json.loads((root / "on-cpu" / "history.json").read_text())
    assert history["summary"]["device"] == "cpu"
    model, _ = load_model(root / "on-cpu")
    assert device_of(model).type == "cpu"
    # `good4cir index`'s loader workers get this; it must pickle and never touch a GPU.
    normalise = pickle.loads(pickle.dumps(model.cpu_normalizer()))
    pixels = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    out = normalise(pixels)
    assert out.device.type == "cpu"
    assert torch.equal(out, model.normalize_pixels(pixels))


@needs_cuda
def test_a_model_trained_on_the_gpu_scores_as_the_cpu_does(world, capsys):
    root, db = world
    _train(root, db, "on-gpu", "cuda")
    summary = json.loads(capsys.readouterr().out)
    assert summary["device"].startswith("cuda")
    assert (root / "on-gpu" / "rerank.pt").is_file()
    # The checkpoint loads on either device; the same weights give the same scores.
    results = {}
    for device in ("cpu", "cuda"):
        assert main(["eval", "--db", str(db), "--checkpoint", str(root / "on-gpu"), "--split", "test",
                     "--cache-dir", str(root / "cache"), "--device", device, "--json"]) == 0
        results[device] = json.loads(capsys.readouterr().out)
    for key in ("recall", "recall_subset"):
        for k, value in results["cpu"][key].items():
            assert abs(value - results["cuda"][key][k]) <= 5.0, (key, k, results)
    cpu = load_retriever(root / "on-gpu", device="cpu")
    gpu = load_retriever(root / "on-gpu", device="cuda")
    assert device_of(gpu.model).type == "cuda" and device_of(gpu.pair_scorer).type == "cuda"
    from PIL import Image

    images = [Image.new("RGB", (40, 40), colour) for colour in ("red", "navy", "olive")]
    texts = ["make it blue", "add a lamp", "remove the plant"]
    np.testing.assert_allclose(cpu.encode_queries(images, texts), gpu.encode_queries(images, texts), atol=2e-3)
    np.testing.assert_allclose(cpu.encode_images(images), gpu.encode_images(images), atol=2e-3)
    np.testing.assert_allclose(cpu.rerank_scores(images[0], texts[0], images[1:]),
                               gpu.rerank_scores(images[0], texts[0], images[1:]), atol=2e-3)


@needs_cuda
def test_frozen_encoders_train_on_the_gpu(world, capsys):
    root, db = world
    _train(root, db, "frozen-gpu", "cuda", "--freeze-encoders", "--no-rerank")
    summary = json.loads(capsys.readouterr().out)
    assert summary["device"].startswith("cuda") and summary["steps"] > 0
    history = json.loads((root / "frozen-gpu" / "history.json").read_text())
    losses = [loss for _, loss in history["loss"]]
    assert np.isfinite(losses).all()


@needs_cuda
def test_index_and_query_on_the_gpu_match_the_cpu(world, capsys):
    root, db = world
    if not (root / "on-gpu" / "best.pt").is_file():
        _train(root, db, "on-gpu", "cuda")
        capsys.readouterr()
    hits = {}
    for device in ("cpu", "cuda"):
        index = root / f"index-{device}"
        assert main(["index", "--db", str(db), "--checkpoint", str(root / "on-gpu"), "--out", str(index),
                     "--device", device, "--quiet", "--workers", "1"]) == 0
        capsys.readouterr()
        reference = sorted((root / "images").glob("*.png"))[0]
        assert main(["query", "--index", str(index), "--image", str(reference), "--text", "make it red",
                     "-k", "5", "--device", device, "--json"]) == 0
        hits[device] = [hit["name"] for hit in json.loads(capsys.readouterr().out)["results"]]
    assert hits["cpu"] == hits["cuda"]
