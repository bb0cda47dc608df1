"""retrieval.index: FAISS against brute force, factory strings, the id map, resumable
encoding, and `good4cir index` / `good4cir query` end to end with a tiny random model."""

from __future__ import annotations

import json
import re
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch
from PIL import Image

from retrieval import index as ix


def _unit_vectors(n, dim, seed):
    vectors = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def _brute_force(gallery, queries, k):
    scores = queries @ gallery.T
    rows = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, rows, axis=1), rows


# ------------------------------------------------------------------------ FAISS


def test_flat_index_returns_the_brute_force_top_k():
    gallery, queries = _unit_vectors(3000, 64, 0), _unit_vectors(50, 64, 1)
    index = ix.build_faiss_index(gallery, "Flat")
    scores, rows = ix.search(index, queries, 10)
    expected_scores, expected_rows = _brute_force(gallery, queries, 10)
    assert rows.tolist() == expected_rows.tolist()
    np.testing.assert_allclose(scores, expected_scores, atol=1e-5)
    # One 1-d query works too.
    assert ix.search(index, queries[0], 3)[1].tolist() == [expected_rows[0, :3].tolist()]


@pytest.mark.parametrize(
    "factory, params, min_recall",
    [("HNSW32", "efSearch=64", 0.9), ("IVF16,Flat", "nprobe=16", 0.999), ("IVF16,PQ8x4", "nprobe=16", 0.15)],  # PQ is lossy; chance is 0.005
)
def test_factory_strings_build_train_and_search(factory, params, min_recall):
    gallery, queries = _unit_vectors(2000, 32, 2), _unit_vectors(40, 32, 3)
    index = ix.build_faiss_index(gallery, factory, search_params=params)
    assert index.ntotal == 2000 and index.is_trained
    _, rows = ix.search(index, queries, 10)
    _, exact = _brute_force(gallery, queries, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(rows.tolist(), exact.tolist())])
    assert recall >= min_recall, (factory, recall)


def test_search_params_go_through_parameter_space():
    gallery = _unit_vectors(500, 16, 4)
    hnsw = ix.build_faiss_index(gallery, "HNSW16", ef_construction=50)
    inner = faiss.downcast_index(hnsw)
    assert inner.hnsw.efConstruction == 50
    assert inner.hnsw.efSearch == ix.DEFAULT_HNSW_EF_SEARCH  # the default search params
    ix.set_search_params(hnsw, "efSearch=33")
    assert inner.hnsw.efSearch == 33
    ivf = ix.build_faiss_index(gallery, "IVF8,Flat")
    assert faiss.extract_index_ivf(ivf).nprobe == 8  # default nprobe capped at nlist
    with pytest.raises(ValueError, match="do not apply"):
        ix.set_search_params(ivf, "efSearch=10")


def test_bad_factory_and_untrainable_index_are_clear_errors():
    gallery = _unit_vectors(20, 16, 5)
    with pytest.raises(ValueError, match="cannot build index factory 'Bogus7'"):
        ix.build_faiss_index(gallery, "Bogus7")
    with pytest.raises(ValueError, match="could not be trained on 20 gallery vectors"):
        ix.build_faiss_index(gallery, "IVF64,Flat")
    index = ix.build_faiss_index(gallery)
    with pytest.raises(ValueError, match="dimension 8, the index 16"):
        ix.search(index, _unit_vectors(1, 8, 0), 3)


@pytest.mark.parametrize("factory, message", [
    ("IDMap,Flat", "'IDMap,Flat' cannot hold the 60 gallery vectors: .*leave IDMap out"),
    ("Flat,IDMap", "leave IDMap out"),
    ("NSG32", "'NSG32' cannot hold the 60 gallery vectors: .*smaller than 100"),
])
def test_a_factory_that_cannot_add_the_gallery_is_a_clear_error(factory, message):
    """FAISS builds these factories, then refuses index.add: its RuntimeError was a traceback."""
    with pytest.raises(ValueError, match=message):
        ix.build_faiss_index(_unit_vectors(60, 16, 6), factory)


@pytest.mark.parametrize("factory, message", [
    ("HNSW1", "HNSW1 is too small, HNSW needs at least 2 neighbours per node"),
    ("HNSW0", "HNSW0 is too small"), ("IVF4_HNSW1,Flat", "HNSW1 is too small"),
    ("IVF0,Flat", "IVF0 is too small, IVF needs at least 1 list"),
])
def test_a_factory_that_would_kill_the_process_is_refused(factory, message):
    """HNSW1 ended `good4cir index` with a segfault, HNSW0 with a FAISS assertion (abort),
    after the whole gallery was encoded; IVF0 was refused as 'nprobe=0'. Run in a child
    process: without the check the crash takes the test runner with it."""
    import subprocess
    import sys

    code = ("import numpy as np; from retrieval import index as ix\n"
            "g = np.random.default_rng(0).normal(size=(60, 16)).astype('float32')\n"
            f"try:\n    ix.build_faiss_index(g, {factory!r})\nexcept ValueError as exc:\n    print(exc)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 0 and message in done.stdout, (done.returncode, done.stdout, done.stderr[-500:])


@pytest.mark.parametrize("factory, params", [
    ("HNSW16", "efSearch=0"), ("HNSW16", "efSearch=-5"), ("IVF4,Flat", "nprobe=0"), ("IVF4,Flat", "nprobe=-1"),
])
def test_search_params_below_one_are_refused(factory, params):
    """FAISS took them: efSearch 0 answered one hit for k=10, nprobe 0 failed inside the
    search (a traceback from `query`, after `index` had saved it without a word)."""
    index = ix.build_faiss_index(_unit_vectors(300, 16, 7), factory)
    name = params.split("=")[0]
    with pytest.raises(ValueError, match=f"{name} must be a whole number of at least 1, got '{params.split('=')[1]}'"):
        ix.set_search_params(index, params)
    with pytest.raises(ValueError, match=f"{name} must be"):
        ix.build_faiss_index(_unit_vectors(300, 16, 7), factory, search_params=params)
    assert (ix.search(index, _unit_vectors(1, 16, 8), 10)[1] >= 0).sum() == 10  # the defaults stand


def test_id_map_round_trip(tmp_path):
    gallery, queries = _unit_vectors(300, 24, 6), _unit_vectors(5, 24, 7)
    entries = [ix.GalleryEntry(name=f"img{i}", path=f"/data/img{i}.png", image_id=f"sha{i}") for i in range(300)]
    index = ix.build_faiss_index(gallery, "HNSW16", search_params="efSearch=40")
    ix.save_index(tmp_path / "idx", index, entries, {"factory": "HNSW16", "search_params": "efSearch=40"})
    loaded = ix.load_index(tmp_path / "idx")
    assert loaded.entries == entries
    assert loaded.meta["count"] == 300 and loaded.meta["dim"] == 24
    assert faiss.downcast_index(loaded.index).hnsw.efSearch == 40  # saved params re-applied
    hits = loaded.search(queries, k=5)
    _, rows = ix.search(index, queries, 5)
    assert [[h.name for h in q] for q in hits] == [[f"img{r}" for r in row] for row in rows.tolist()]
    assert hits[0][0].path == f"/data/img{rows[0, 0]}.png"
    # Excluding a result (the query's reference) returns the next one instead.
    first = hits[0][0]
    assert [h.name for h in loaded.search(queries[:1], 5, exclude=[{first.path}])[0]] == [
        h.name for h in hits[0][1:]
    ] + [loaded.search(queries[:1], 6)[0][5].name]
    # A damaged id map is refused with the reason.
    (tmp_path / "idx" / ix.IDS_FILE).write_text("".join(json.dumps({"name": "x", "path": "y"}) + "\n" for _ in range(3)))
    with pytest.raises(ValueError, match="holds 300 vectors but ids.jsonl has 3"):
        ix.load_index(tmp_path / "idx")
    with pytest.raises(FileNotFoundError, match="not a good4cir index"):
        ix.load_index(tmp_path / "nothing")


# ------------------------------------------------------------------------ the model


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from retrieval.model import build_model, save_weights, write_config

    checkpoint_dir = tmp_path_factory.mktemp("ckpt")
    config = {"model": "tiny", "fusion": "residual"}
    model = build_model(config)
    write_config(checkpoint_dir, config)
    save_weights(checkpoint_dir / "best.pt", model)
    return checkpoint_dir


@pytest.fixture(scope="module")
def image_paths(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(40):
        path = folder / f"room{i:02d}.png"
        Image.fromarray(rng.integers(0, 255, size=(80, 80, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def test_encode_gallery_matches_the_model_skips_bad_images_and_resumes(tmp_path, tiny_checkpoint, image_paths):
    from retrieval.model import load_retriever

    retriever = load_retriever(tiny_checkpoint)
    bad = tmp_path / "broken.png"
    bad.write_text("not a png")
    entries = ix.gallery_from_paths(image_paths[:20] + [bad] + image_paths[20:])
    cache = tmp_path / "cache"
    first = ix.encode_gallery(retriever, entries, cache, chunk_size=8, batch_size=3, num_workers=1, progress=False)
    assert first.encoded == 40 and len(first.entries) == 40
    assert [s["name"] for s in first.skipped] == ["broken"] and "not an image file" in first.skipped[0]["error"]
    expected = retriever.encode_images([Image.open(p).convert("RGB") for p in image_paths])
    np.testing.assert_allclose(first.embeddings, expected, atol=1e-5)
    assert [e.name for e in first.entries] == [p.stem for p in image_paths]

    # Resume: only the missing chunk is encoded again, the result is the same.
    (cache / "chunk_000000.npz").unlink()
    resumed = ix.encode_gallery(retriever, entries, cache, chunk_size=8, batch_size=3, num_workers=0, progress=False)
    assert resumed.encoded == 8
    np.testing.assert_array_equal(resumed.embeddings, first.embeddings)
    # A damaged chunk (a disk filled up, a copy cut short) is encoded again, not trusted.
    (cache / "chunk_000001.npz").write_bytes(b"PK\x03\x04 truncated")
    repaired = ix.encode_gallery(retriever, entries, cache, chunk_size=8, batch_size=3, num_workers=0, progress=False)
    assert repaired.encoded == 8
    np.testing.assert_array_equal(repaired.embeddings, first.embeddings)
    # Another model (fingerprint) or gallery starts over.
    again = ix.encode_gallery(retriever, entries, cache, chunk_size=8, model_fingerprint="other", progress=False)
    assert again.encoded == 40


def test_a_rerun_reads_gallery_images_put_back_since_the_last_run(tmp_path, tiny_checkpoint, image_paths):
    """`index` said 'skipped 1 unreadable images: ... file not found' on every rerun after
    the file was put back ('0 encoded now'): the cached chunk kept its error; only --fresh,
    which encodes the whole gallery again, read it."""
    import shutil

    from retrieval.model import load_retriever

    retriever = load_retriever(tiny_checkpoint)
    late = tmp_path / "late.png"
    entries = ix.gallery_from_paths(image_paths[:10] + [late] + image_paths[10:20])
    cache = tmp_path / "cache"
    run = dict(chunk_size=8, batch_size=3, num_workers=0, progress=False)
    first = ix.encode_gallery(retriever, entries, cache, **run)
    assert [s["name"] for s in first.skipped] == ["late"] and len(first.entries) == 20
    again = ix.encode_gallery(retriever, entries, cache, **run)  # still missing: tried again, still skipped
    assert again.encoded == 0 and [s["name"] for s in again.skipped] == ["late"]
    np.testing.assert_array_equal(again.embeddings, first.embeddings)
    shutil.copy(image_paths[30], late)
    put_back = ix.encode_gallery(retriever, entries, cache, **run)
    assert put_back.encoded == 1 and put_back.skipped == []
    assert [e.name for e in put_back.entries] == [e.name for e in entries]
    fresh = ix.encode_gallery(retriever, entries, tmp_path / "fresh", **run)
    np.testing.assert_allclose(put_back.embeddings, fresh.embeddings, atol=1e-6)
    assert ix.encode_gallery(retriever, entries, cache, **run).encoded == 0  # and kept


def test_encode_gallery_takes_already_decoded_pixels_from_the_pixel_cache(tmp_path, tiny_checkpoint, image_paths):
    import shutil

    from retrieval.features import PixelCache
    from retrieval.model import load_retriever, split_preprocess

    retriever = load_retriever(tiny_checkpoint)
    copies = []
    for path in image_paths[:12]:
        copies.append(tmp_path / path.name)
        shutil.copy(path, copies[-1])
    expected = retriever.encode_images([Image.open(p).convert("RGB") for p in copies])
    entries = [ix.GalleryEntry(name=p.stem, path=str(p), image_id=f"key{i}") for i, p in enumerate(copies)]
    pil_transform, _, _ = split_preprocess(retriever.model.encoder.preprocess)
    pixel_cache = PixelCache(tmp_path / "pixels", pil_transform)
    pixel_cache.load({f"key{i}": str(p) for i, p in enumerate(copies[:8])}, progress=False)
    for path in copies[:8]:
        path.unlink()  # from now on only the cache has these eight

    encoded = ix.encode_gallery(retriever, entries, tmp_path / "emb", batch_size=5, num_workers=1,
                                progress=False, pixel_cache=pixel_cache)
    assert encoded.skipped == [] and [e.name for e in encoded.entries] == [p.stem for p in copies]
    np.testing.assert_allclose(encoded.embeddings, expected, atol=1e-5)
    # Without the cache the deleted files are reported, each by name.
    without = ix.encode_gallery(retriever, entries, tmp_path / "emb2", batch_size=5, num_workers=0, progress=False)
    assert sorted(s["name"] for s in without.skipped) == sorted(p.stem for p in copies[:8])


def _store_with_images(db_path, image_paths):
    from store import open_db, utc_now

    db = open_db(db_path)
    rows = []
    for i, path in enumerate(image_paths):
        rows.append({
            "id": f"sha{i:03d}", "name": path.stem, "path": str(path), "root": str(path.parent),
            "split": "test" if i < 30 else "train", "created_at": utc_now(),
        })
    rows.append({"id": "remote", "name": "remote-only", "url": "https://example.invalid/x.png",
                 "split": "test", "created_at": utc_now()})
    db["images"].insert_all(rows)
    db.conn.close()


def test_index_and_query_commands_end_to_end(tmp_path, tiny_checkpoint, image_paths, capsys):
    from good4cir.cli import main
    from retrieval.model import load_retriever

    db_path = tmp_path / "store.db"
    _store_with_images(db_path, image_paths)
    out = tmp_path / "index"
    assert main(["index", "--db", str(db_path), "--checkpoint", str(tiny_checkpoint), "--out", str(out),
                 "--split", "test", "--workers", "1", "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "indexed 30 images" in captured.out
    # no local file: skipped and named, once (it was printed as it happened and again in the summary)
    assert captured.err.count("remote-only") == 1, captured.err
    loaded = ix.load_index(out)
    assert len(loaded) == 30 and loaded.meta["factory"] == "Flat" and loaded.meta["split"] == "test"
    assert {e.name for e in loaded.entries} == {p.stem for p in image_paths[:30]}

    reference = image_paths[3]
    threads = torch.get_num_threads()
    try:  # --threads, as train and eval take it
        assert main(["query", "--index", str(out), "--image", str(reference), "--text", "add a red lamp",
                     "-k", "5", "--json", "--threads", "1"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    result = json.loads(capsys.readouterr().out)
    names = [r["name"] for r in result["results"]]

    # Brute force with the same model: query embedding against every test image but the reference.
    retriever = load_retriever(tiny_checkpoint)
    query = retriever.encode_queries([Image.open(reference).convert("RGB")], ["add a red lamp"])
    gallery_paths = [p for p in image_paths[:30] if p != reference]
    gallery = retriever.encode_images([Image.open(p).convert("RGB") for p in gallery_paths])
    order = np.argsort(-(query @ gallery.T)[0])[:5]
    assert names == [gallery_paths[i].stem for i in order]
    assert reference.stem not in names
    # each hit names its image as the store does (the store's image id), as the app's do
    assert [r["image_id"] for r in result["results"]] == [f"sha{int(n[4:]):03d}" for n in names]
    np.testing.assert_allclose([r["score"] for r in result["results"]], (query @ gallery.T)[0][order], atol=1e-4)

    # --keep-reference searches the whole gallery, the reference included.
    assert main(["query", "--index", str(out), "--image", str(reference), "--text", "add a red lamp",
                 "-k", "30", "--json", "--keep-reference"]) == 0
    assert reference.stem in [r["name"] for r in json.loads(capsys.readouterr().out)["results"]]

    # Another factory over the same gallery reuses the cached embeddings: nothing re-encoded.
    assert main(["index", "--db", str(db_path), "--checkpoint", str(tiny_checkpoint), "--out", str(out),
                 "--split", "test", "--factory", "HNSW8", "--quiet"]) == 0
    assert "(0 encoded now)" in capsys.readouterr().out
    assert ix.load_index(out).meta["factory"] == "HNSW8"


def test_query_engine_takes_pil_images_and_checks_the_model(tmp_path, tiny_checkpoint, image_paths):
    from retrieval.model import load_retriever

    retriever = load_retriever(tiny_checkpoint)
    entries = ix.gallery_from_paths(image_paths)
    encoded = ix.encode_gallery(retriever, entries, tmp_path / "cache", num_workers=0, progress=False)
    index = ix.build_faiss_index(encoded.embeddings)
    ix.save_index(tmp_path / "idx", index, encoded.entries,
                  {"checkpoint": str(tiny_checkpoint),
                   "checkpoint_fingerprint": ix.checkpoint_fingerprint(retriever.model_info)})
    engine = ix.QueryEngine(tmp_path / "idx")
    image = Image.open(image_paths[0]).convert("RGB")
    hits = engine.query(image, "remove the plant", k=4)
    assert len(hits) == 4 and all(isinstance(h, ix.Hit) for h in hits)
    assert hits == sorted(hits, key=lambda h: -h.score)
    # A PIL image carries no path, so the reference is not excluded; a path is.
    by_path = engine.query(image_paths[0], "remove the plant", k=4)
    assert image_paths[0].stem not in [h.name for h in by_path]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        engine.query(tmp_path / "missing.png", "x")
    # An index built by another model is flagged.
    meta_path = tmp_path / "idx" / ix.META_FILE
    meta = json.loads(meta_path.read_text())
    meta["checkpoint_fingerprint"] = "0000"
    meta_path.write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match="another version of the model"):
        ix.QueryEngine(tmp_path / "idx", retriever=retriever)


def test_checkpoint_fingerprint_follows_content_not_location(tmp_path, tiny_checkpoint):
    import shutil

    from retrieval.model import load_retriever

    copy = tmp_path / "moved"
    shutil.copytree(tiny_checkpoint, copy)
    original = ix.checkpoint_fingerprint(load_retriever(tiny_checkpoint).model_info)
    assert ix.checkpoint_fingerprint(load_retriever(copy).model_info) == original
    with open(copy / "best.pt", "ab") as fh:  # any change to the weights file
        fh.write(b"\0")
    assert ix.checkpoint_fingerprint({"weights": str(copy / "best.pt")}) != original


def test_a_mistyped_split_names_the_splits_present_as_other_commands_do(tmp_path):
    # index said "the store X has no images in split 'tset'", where train, eval and export
    # name the splits the store has.
    from store import open_db
    from store.importers import import_dataset

    db_path = tmp_path / "s.db"
    import_dataset(open_db(db_path), "pairs", Path(__file__).parent / "fixtures" / "pairs")
    with pytest.raises(ValueError, match=r"no pairs of split 'tset' \(splits present: test, train, val\)"):
        ix.gallery_from_db(db_path, split="tset")


def test_query_prints_its_warnings_as_lines_and_names_a_text_the_model_cuts(tmp_path, tiny_checkpoint, image_paths,
                                                                            capsys):
    """A text past the text encoder's 77 tokens was cut without a word; the engine's
    warnings came out in Python's format, with a source line of cli_index.py."""
    from good4cir.cli import main

    db_path = tmp_path / "store.db"
    _store_with_images(db_path, image_paths)
    out = tmp_path / "index"
    assert main(["index", "--db", str(db_path), "--checkpoint", str(tiny_checkpoint), "--out", str(out),
                 "--split", "test", "--workers", "1", "--quiet"]) == 0
    capsys.readouterr()
    query = ["query", "--index", str(out), "--image", str(image_paths[3]), "-k", "3", "--text"]
    assert main(query + ["add a red lamp"]) == 0
    assert capsys.readouterr().err == ""
    long_text = " ".join(["add a red lamp and"] * 30)
    assert main(query + [long_text]) == 0
    err = capsys.readouterr().err
    assert re.fullmatch(r"warning: the modification text is 1[0-9]{2} CLIP tokens, over the 77 the model reads: "
                        r"the query uses only its start; shorten it to what should change\n", err), err
    meta = json.loads((out / ix.META_FILE).read_text())
    (out / ix.META_FILE).write_text(json.dumps({**meta, "checkpoint_fingerprint": "0000"}))
    assert main(query + ["add a red lamp"]) == 0
    err = capsys.readouterr().err
    assert err.startswith(f"warning: the index {out} was built with another version of the model") and \
        "UserWarning" not in err and err.count("\n") == 1, err


@pytest.mark.parametrize("factory, params, message", [
    ("HNSW32,Bogus", None, "FAISS cannot build index factory 'HNSW32,Bogus'"),
    ("PQ7", None, "FAISS cannot build index factory 'PQ7'"),
    ("HNSW32", "nprobe=16", "do not apply to this index"),
    ("IVF4,Flat", "nprobe=0", "nprobe must be a whole number"),
])
def test_index_checks_its_factory_and_search_params_before_encoding(tmp_path, tiny_checkpoint, image_paths,
                                                                   factory, params, message):
    """A mistyped --factory or --search-params was found only after the whole gallery was
    encoded (hours for a large one on a CPU)."""
    db_path = tmp_path / "store.db"
    _store_with_images(db_path, image_paths)
    with pytest.raises(ValueError, match=message):
        ix.build_gallery_index(db_path, tiny_checkpoint, tmp_path / "index", factory=factory,
                               search_params=params, progress=False, num_workers=0, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "index" / ix.EMBEDDINGS_DIR).exists()  # nothing encoded


def test_index_never_deletes_files_of_the_users_own_in_its_out_folder(tmp_path, tiny_checkpoint, image_paths):
    """`index --out PROJECT` where PROJECT/embeddings/ held the user's files: the folder was
    deleted as a stale embedding cache, without a word."""
    db_path = tmp_path / "store.db"
    _store_with_images(db_path, image_paths)
    out = tmp_path / "project"
    (out / "embeddings").mkdir(parents=True)
    (out / "embeddings" / "my_vectors.npy").write_text("precious")
    with pytest.raises(ValueError, match=r"project/embeddings holds my_vectors.npy, which is not good4cir's "
                                         r"embedding cache: index into a new or empty --out folder"):
        ix.build_gallery_index(db_path, tiny_checkpoint, out, progress=False, num_workers=0,
                               cache_dir=tmp_path / "cache")
    assert (out / "embeddings" / "my_vectors.npy").read_text() == "precious"
    (out / "embeddings" / "my_vectors.npy").unlink()
    (out / "embeddings").rmdir()
    (out / "embeddings").write_text("a file of the user's")
    with pytest.raises(ValueError, match="project/embeddings is a file, which is not good4cir's"):
        ix.build_gallery_index(db_path, tiny_checkpoint, out, progress=False, num_workers=0,
                               cache_dir=tmp_path / "cache")
    (out / "embeddings").unlink()
    # Its own cache is still replaced when the model changes, and --fresh clears it.
    ix.build_gallery_index(db_path, tiny_checkpoint, out, progress=False, num_workers=0, cache_dir=tmp_path / "cache")
    (out / "embeddings" / "chunk_000000.npz.tmp.npz").write_bytes(b"cut short")
    report = ix.build_gallery_index(db_path, tiny_checkpoint, out, progress=False, num_workers=0, fresh=True,
                                    cache_dir=tmp_path / "cache")
    assert report.encoded == report.count and not list(out.glob("embeddings/*.tmp.npz"))


def test_index_draws_its_progress_bar_only_on_a_terminal(tmp_path, tiny_checkpoint, image_paths, capsys):
    """As train and eval do: in a log (make demo > log, CI) it wrote carriage-return bars."""
    from good4cir.cli import main

    db_path = tmp_path / "store.db"
    _store_with_images(db_path, image_paths)
    assert main(["index", "--db", str(db_path), "--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "i"),
                 "--workers", "0", "--cache-dir", str(tmp_path / "cache")]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err and "img/s" not in err and "remote-only" in err, err


def test_an_index_interrupted_before_any_chunk_finished_does_not_say_work_was_saved(tmp_path, tiny_checkpoint):
    # Ctrl-C while the first chunk (1024 images) was encoding said 'interrupted; everything
    # finished so far is saved': nothing was, and the rerun encodes it all again.
    import signal
    import subprocess
    import sys
    import time

    rng = np.random.default_rng(1)
    paths = []
    for i in range(600):
        path = tmp_path / "images" / f"img{i:03d}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, size=(24, 24, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    db_path = tmp_path / "store.db"
    _store_with_images(db_path, paths)
    out = tmp_path / "index"
    proc = subprocess.Popen(
        [sys.executable, "-m", "good4cir", "index", "--db", str(db_path), "--checkpoint", str(tiny_checkpoint),
         "--out", str(out), "--batch-size", "1", "--workers", "0", "--threads", "1",
         "--cache-dir", str(tmp_path / "cache")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (out / ix.EMBEDDINGS_DIR / ix.MANIFEST_FILE).exists() and time.monotonic() < deadline:
        time.sleep(0.02)  # the encoding has begun
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    err = err.decode()
    assert proc.returncode == 130, err
    assert not list((out / ix.EMBEDDINGS_DIR).glob("chunk_*.npz"))
    assert "everything finished so far is saved" not in err and "no chunk" in err, err
