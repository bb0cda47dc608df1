"""A gallery of images as a FAISS index, and `QueryEngine` for (image, text) -> top k.

An index directory (`good4cir index --out INDEX`) holds:

    index.faiss      the FAISS index over L2-normalised embeddings (inner product)
    ids.jsonl        the id map: row i of the index -> {"name", "path", "image_id"}
    meta.json        factory, search parameters, dimension, count, checkpoint, skipped images
    embeddings/      the gallery embeddings in chunks: a killed run resumes from here, and
                     another factory can be built without re-encoding (safe to delete)

Encoding runs the image decoding and preprocessing in DataLoader workers, overlapped
with the model's forward pass, so loading is not the bottleneck.
Index types are FAISS index-factory strings ("Flat", "HNSW32", "IVF1024,PQ32"); search
parameters ("efSearch=128", "nprobe=16") go through `faiss.ParameterSpace`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import threading
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Optional, Sequence

import numpy as np

INDEX_FILE = "index.faiss"
IDS_FILE = "ids.jsonl"
META_FILE = "meta.json"
EMBEDDINGS_DIR = "embeddings"
MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 1

DEFAULT_FACTORY = "Flat"
DEFAULT_BATCH_SIZE = 64
DEFAULT_CHUNK_SIZE = 1024
# Chosen with bench/faiss_bench.py on 1M 512-d embedding-like vectors, one thread, a
# shared 2-core machine: HNSW32 efSearch=128 gave recall@10 0.954 at p50 1.38 ms,
# efSearch=160 0.972 at 1.69 ms, 192 0.982 at 1.98 ms; 160 keeps both targets
# (recall >= 0.95, p50 < 2 ms) with a margin on recall.
DEFAULT_HNSW_EF_CONSTRUCTION = 80
DEFAULT_HNSW_EF_SEARCH = 160
DEFAULT_IVF_NPROBE = 16
# Enough for k-means to be stable (FAISS asks for 39 points per centroid) without
# training on a whole large gallery.
MAX_TRAINING_VECTORS = 262_144


@dataclass(frozen=True)
class GalleryEntry:
    """One gallery image: its dataset name, file path and store id (sha256)."""

    name: str
    path: str
    image_id: Optional[str] = None


# Which stage ordered a hit, and so which scale its `score` is on.
FIRST_STAGE = "first_stage"  # the fusion model: cosine of query and gallery embeddings
RERANK_STAGE = "rerank"  # the pair scorer: its own scale, not comparable with the cosine


class Hit(NamedTuple):
    """A gallery image found for a query. `score` is the score of the stage that ordered
    it (`stage`); re-ranked hits always come first. `first_stage_score` is the cosine for
    every hit, the one score comparable across all of them (to threshold on)."""

    name: str
    path: str
    score: float
    stage: str = FIRST_STAGE
    first_stage_score: Optional[float] = None
    image_id: Optional[str] = None  # the store's id (content hash); None for a gallery of plain paths


@dataclass
class IndexReport:
    out_dir: str
    count: int
    factory: str
    search_params: str
    dim: int
    encoded: int  # images encoded in this run (the rest came from the chunk cache)
    skipped: list[dict] = field(default_factory=list)  # [{"name", "path", "error"}]
    encode_seconds: float = 0.0
    build_seconds: float = 0.0


# ------------------------------------------------------------------------ the gallery


def gallery_from_db(db_path: str | Path, split: Optional[str] = None) -> list[GalleryEntry]:
    """Images of a store, optionally of one split: images whose split is S plus every
    image a pair of split S uses (reference, target, image-set members), so that the
    gallery holds each query's near-duplicates (the CIRR protocol)."""
    from store import open_db
    from store.annotations import require_split

    db_path = Path(db_path)
    if not db_path.is_file():
        raise FileNotFoundError(f"no store at {db_path}; create one with `good4cir import`")
    db = open_db(db_path)
    try:
        if split is None:
            rows = db.execute("SELECT id, name, path, root FROM images").fetchall()
        else:
            ids = {r[0] for r in db.execute("SELECT id FROM images WHERE split = ?", [split])}
            for ref, target, img_set in db.execute(
                "SELECT reference_id, target_id, img_set FROM pairs WHERE split = ?", [split]
            ):
                ids.update(i for i in (ref, target) if i)  # CIRR test pairs have no target
                if img_set:
                    ids.update(i for i in json.loads(img_set) if i)
            rows = []
            id_list = sorted(ids)
            for start in range(0, len(id_list), 500):  # SQLite's parameter limit
                part = id_list[start : start + 500]
                rows += db.execute(
                    f"SELECT id, name, path, root FROM images WHERE id IN ({','.join('?' * len(part))})", part
                ).fetchall()
        if not rows and split is not None:
            require_split(db, split)  # a mistyped split: the message other commands give
    finally:
        db.conn.close()
    if not rows:
        where = f" in split {split!r}" if split else ""
        raise ValueError(f"the store {db_path} has no images{where}")
    entries = []
    for image_id, name, path, root in rows:
        if path and not os.path.isabs(path) and root:
            path = os.path.join(root, path)
        entries.append(GalleryEntry(name=name or image_id, path=path or "", image_id=image_id))
    entries.sort(key=lambda e: (e.name, e.image_id or ""))
    return entries


def gallery_from_paths(paths: Sequence[str | Path]) -> list[GalleryEntry]:
    """A gallery of image files; the name is the file name without its extension."""
    return [GalleryEntry(name=Path(p).stem, path=str(p)) for p in paths]


# ------------------------------------------------------------------------ encoding


class _GalleryImages:
    """Dataset over gallery positions: decode + preprocess in the worker; a bad image
    becomes an error string instead of an exception, so one file never stops a run.
    Positions in `cached` (position -> uint8 pixels, already resized and cropped) skip
    the decode and only get `normalize`."""

    def __init__(self, entries: Sequence[GalleryEntry], transform, as_tensor: bool,
                 cached: Optional[dict] = None, normalize=None):
        self.entries = entries
        self.transform = transform
        self.as_tensor = as_tensor
        self.cached = cached or {}
        self.normalize = normalize

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, position: int):
        from store.images import load_image_rgb

        pixels = self.cached.get(position)
        if pixels is not None:
            return position, self.normalize(pixels[None])[0], None
        entry = self.entries[position]
        try:
            if not entry.path:
                raise FileNotFoundError("the store has no local path for this image")
            image = load_image_rgb(entry.path)  # the store's decoding: EXIF, alpha, 16-bit
            return position, (self.transform(image) if self.as_tensor else image), None
        except Exception as exc:  # reported per image, never fatal
            return position, None, f"{type(exc).__name__}: {exc}"


def _cpu_normalizer(retriever):
    model = getattr(retriever, "model", None)
    return model.cpu_normalizer() if model is not None else None


def _collate(items):
    import torch

    good = [(p, x) for p, x, err in items if err is None]
    bad = [(p, err) for p, _, err in items if err is not None]
    positions = [p for p, _ in good]
    data = [x for _, x in good]
    if data and isinstance(data[0], torch.Tensor):
        data = torch.stack(data)
    return positions, data, bad


def default_num_workers() -> int:
    # One core stays with the model's forward pass.
    return max(1, min(4, (os.cpu_count() or 2) - 1))


def checkpoint_fingerprint(model_info: dict[str, Any]) -> str:
    """Content hash of the checkpoint's weights file and its config.json: cached
    embeddings and an index are valid only for the exact model that made them, wherever
    the checkpoint directory is (paths are not part of the hash)."""
    digest = hashlib.sha256()
    weights = model_info.get("weights")
    if weights and Path(weights).is_file():
        config = Path(weights).parent / "config.json"
        if config.is_file():
            digest.update(config.read_bytes())
        with open(weights, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                digest.update(block)
    else:  # no file to read: the model's description is all there is
        public = {k: v for k, v in sorted(model_info.items()) if k != "weights" and _jsonable(v)}
        digest.update(json.dumps(public, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


def _gallery_fingerprint(entries: Sequence[GalleryEntry]) -> str:
    digest = hashlib.sha256()
    for e in entries:
        digest.update(f"{e.name}\0{e.path}\0{e.image_id}\n".encode())
    return digest.hexdigest()[:16]


@dataclass
class EncodedGallery:
    embeddings: np.ndarray  # (N, D) float32, one row per entry
    entries: list[GalleryEntry]  # the images that were read, in gallery order
    skipped: list[dict]  # [{"name", "path", "image_id", "error"}] images that could not be read
    encoded: int  # images encoded by this call (the rest came from the chunk cache)


def encode_gallery(
    retriever,
    entries: Sequence[GalleryEntry],
    cache_dir: str | Path,
    *,
    model_fingerprint: Optional[str] = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    num_workers: Optional[int] = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    progress: bool = True,
    fresh: bool = False,
    pixel_cache=None,
) -> EncodedGallery:
    """Encode every gallery image, resumably: finished chunks of `chunk_size` images are
    saved under cache_dir and skipped by a later call with the same model and gallery.

    `pixel_cache` (a features.PixelCache for this model's preprocessing): images that
    training or `eval` already decoded are taken from it instead of their files. A
    PNG decode costs several times a small model's forward pass, so without it a tiny
    model waits on the loader."""
    import torch
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    if not entries:
        raise ValueError("the gallery is empty")
    cache_dir = Path(cache_dir)
    manifest = {
        "format": FORMAT_VERSION,
        "model": model_fingerprint or checkpoint_fingerprint(getattr(retriever, "model_info", {})),
        "gallery": _gallery_fingerprint(entries),
        "count": len(entries),
        "chunk_size": chunk_size,
    }
    _prepare_cache(cache_dir, manifest, fresh)

    num_chunks = (len(entries) + chunk_size - 1) // chunk_size
    missing = [c for c in range(num_chunks) if not _chunk_readable(cache_dir / _chunk_name(c))]
    # Each chunk's positions to encode now: all of a missing chunk; of a finished one, the
    # images it could not read (a file put back or repaired since is read on the rerun).
    todo = {c: list(range(c * chunk_size, min((c + 1) * chunk_size, len(entries)))) for c in missing}
    for c in range(num_chunks):
        if c not in todo:
            with np.load(cache_dir / _chunk_name(c), allow_pickle=False) as data:
                if len(data["error_positions"]):
                    todo[c] = sorted(int(p) for p in data["error_positions"])
    batches = []
    for c in sorted(todo):
        batches += [todo[c][start : start + batch_size] for start in range(0, len(todo[c]), batch_size)]

    use_pixels = hasattr(retriever, "encode_pixels")
    done_before = len(entries) - sum(len(b) for b in batches)
    encoded = 0
    cached: dict[int, Any] = {}
    if batches and use_pixels and pixel_cache is not None:
        ids = {p: entries[p].image_id for b in batches for p in b if entries[p].image_id}
        pixels, row_of = pixel_cache.lookup(ids.values())
        cached = {p: pixels[row_of[key]] for p, key in ids.items() if key in row_of}
    if batches:
        workers = default_num_workers() if num_workers is None else num_workers
        if len(cached) == sum(len(b) for b in batches):
            workers = 0  # nothing to decode: worker processes would only add copying
        loader = DataLoader(
            _GalleryImages(entries, retriever.image_transform, as_tensor=use_pixels, cached=cached,
                           normalize=_cpu_normalizer(retriever)),
            batch_sampler=batches,
            num_workers=workers,
            collate_fn=_collate,
            prefetch_factor=4 if workers > 0 else None,
            persistent_workers=False,
        )
        pending: dict[int, dict] = {}  # chunk -> accumulated positions/embeddings/errors
        bar = tqdm(total=len(entries), initial=done_before, unit="img", desc="encoding gallery",
                   disable=not progress, file=sys.stderr)
        with torch.inference_mode():
            for batch_positions, data, bad in loader:
                all_positions = sorted(batch_positions + [p for p, _ in bad])
                chunk = all_positions[0] // chunk_size
                acc = pending.setdefault(chunk, {"positions": [], "embeddings": [], "errors": []})
                if batch_positions:
                    vectors = retriever.encode_pixels(data) if use_pixels else retriever.encode_images(data)
                    acc["positions"].extend(batch_positions)
                    acc["embeddings"].append(np.asarray(vectors, dtype=np.float32))
                # Not printed here: the caller lists the skipped images once, at the end
                acc["errors"].extend(bad)
                encoded += len(batch_positions)
                bar.update(len(all_positions))
                if all_positions[-1] == todo[chunk][-1]:
                    path = cache_dir / _chunk_name(chunk)
                    if chunk not in missing:  # retried images: the rest of the chunk stands
                        _add_finished_part(path, pending[chunk])
                    _save_chunk(path, pending.pop(chunk))
        bar.close()

    positions, vectors, skipped = [], [], []
    for c in range(num_chunks):
        with np.load(cache_dir / _chunk_name(c), allow_pickle=False) as data:
            positions.append(data["positions"])
            vectors.append(data["embeddings"])
            for position, error in zip(data["error_positions"], data["errors"]):
                e = entries[int(position)]
                skipped.append({"name": e.name, "path": e.path, "image_id": e.image_id, "error": str(error)})
    positions = np.concatenate(positions)
    embeddings = np.concatenate([v for v in vectors if v.size] or [np.zeros((0, 0), np.float32)])
    kept = [entries[int(p)] for p in positions]
    if not kept:
        raise ValueError(f"no gallery image could be read ({len(skipped)} failed; first: {skipped[0]['error']})")
    return EncodedGallery(np.ascontiguousarray(embeddings, dtype=np.float32), kept, skipped, encoded)


def _add_finished_part(path: Path, acc: dict) -> None:
    """Add to `acc` (the retried images of a chunk) the chunk's images read before."""
    with np.load(path, allow_pickle=False) as data:
        if len(data["positions"]):
            acc["positions"][:0] = [int(p) for p in data["positions"]]
            acc["embeddings"].insert(0, data["embeddings"])


def _chunk_name(chunk: int) -> str:
    return f"chunk_{chunk:06d}.npz"


def _chunk_readable(path: Path) -> bool:
    """A chunk counts as done only if it loads (a damaged file is encoded again)."""
    if not path.is_file():
        return False
    try:
        with np.load(path, allow_pickle=False) as data:
            return {"positions", "embeddings", "error_positions", "errors"} <= set(data.files)
    except Exception:
        path.unlink()
        return False


def _prepare_cache(cache_dir: Path, manifest: dict, fresh: bool) -> None:
    manifest_path = cache_dir / MANIFEST_FILE
    if cache_dir.exists() and not fresh and manifest_path.is_file():
        try:
            old = json.loads(manifest_path.read_text())
        except json.JSONDecodeError:
            old = None
        if old == manifest:
            return  # resume
        print(f"embedding cache {cache_dir} is for another model or gallery: starting over",
              file=sys.stderr)
    if cache_dir.exists():
        # --out may name a folder of the user's own with an embeddings/ of theirs in it:
        # delete only a folder that holds nothing but this cache's files.
        foreign = (sorted(p.name for p in cache_dir.iterdir() if not _CACHE_NAMES.fullmatch(p.name))
                   if cache_dir.is_dir() else [])
        if foreign or not cache_dir.is_dir():
            what = f"holds {', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''}" if foreign else "is a file"
            raise ValueError(f"{cache_dir} {what}, which is not good4cir's embedding cache: index into a "
                             "new or empty --out folder, or move those files")
        shutil.rmtree(cache_dir)
    cache_dir.mkdir(parents=True)
    _write_atomic(manifest_path, json.dumps(manifest, indent=2))


# What encode_gallery writes into the cache folder (a .tmp file is one a kill cut short).
_CACHE_NAMES = re.compile(rf"(chunk_\d+\.npz|chunk_\d+\.npz\.tmp\.npz|{re.escape(MANIFEST_FILE)}(\.tmp)?)")


def _save_chunk(path: Path, acc: dict) -> None:
    order = np.argsort(acc["positions"], kind="stable")
    embeddings = np.concatenate(acc["embeddings"]) if acc["embeddings"] else np.zeros((0, 0), np.float32)
    errors = sorted(acc["errors"])
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(
        tmp,
        positions=np.asarray(acc["positions"], dtype=np.int64)[order],
        embeddings=embeddings[order] if len(embeddings) else embeddings,
        error_positions=np.asarray([p for p, _ in errors], dtype=np.int64),
        errors=np.asarray([e for _, e in errors], dtype=str),
    )
    os.replace(tmp, path)  # a killed run never leaves a half-written chunk


# ------------------------------------------------------------------------ FAISS


def build_faiss_index(
    embeddings: np.ndarray,
    factory: str = DEFAULT_FACTORY,
    *,
    search_params: Optional[str] = None,
    ef_construction: Optional[int] = None,
    seed: int = 0,
    progress: bool = False,
):
    """An inner-product FAISS index over the embeddings (one row per gallery image, in
    order), trained first when the factory needs it (IVF, PQ)."""
    import faiss

    embeddings = _as_matrix(embeddings)
    n, dim = embeddings.shape
    index = new_faiss_index(dim, factory)
    hnsw = _hnsw_of(index)
    if hnsw is not None:
        hnsw.efConstruction = ef_construction or DEFAULT_HNSW_EF_CONSTRUCTION
    if not index.is_trained:
        sample = embeddings
        if n > MAX_TRAINING_VECTORS:
            rows = np.random.default_rng(seed).choice(n, MAX_TRAINING_VECTORS, replace=False)
            sample = embeddings[np.sort(rows)]
        try:
            index.train(sample)
        except RuntimeError as exc:
            raise ValueError(
                f"index factory {factory!r} could not be trained on {n} gallery vectors: "
                f"{_faiss_message(exc)}; use 'Flat' or fewer clusters for a gallery this small"
            ) from None
    step = 65_536
    try:
        if progress and n > step:
            from tqdm import tqdm

            for start in tqdm(range(0, n, step), desc=f"adding to {factory}", unit="chunk", file=sys.stderr):
                index.add(embeddings[start : start + step])
        else:
            index.add(embeddings)
    except RuntimeError as exc:  # IDMap wants ids of its own; NSG a graph of 100 vectors or more
        hint = ("leave IDMap out: the index keeps its own id map (ids.jsonl)" if "IDMap" in factory
                else "use 'Flat' or 'HNSW32'")
        raise ValueError(f"index factory {factory!r} cannot hold the {n} gallery vectors: "
                         f"{_faiss_message(exc)}; {hint}") from None
    set_search_params(index, search_params if search_params is not None else default_search_params(index))
    return index


def new_faiss_index(dim: int, factory: str):
    """An empty inner-product index of the factory string, or ValueError naming what is
    wrong with the string (cheap: `index` checks it before encoding a gallery)."""
    import faiss

    # FAISS builds these, then kills the process: HNSW1 in add (a segfault), HNSW0 on an
    # assertion; IVF0 has no list to search.
    for kind, number, least in [(m[1], int(m[2]), 2 if m[1] == "HNSW" else 1)
                                for m in re.finditer(r"(HNSW|IVF)(\d+)", factory)]:
        if number < least:
            raise ValueError(f"index factory {factory!r}: {kind}{number} is too small, {kind} needs at least "
                             f"{least} {'neighbours per node' if kind == 'HNSW' else 'list'} (HNSW32 and "
                             "IVF1024,Flat are usual)")
    try:
        return faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise ValueError(f"FAISS cannot build index factory {factory!r}: {_faiss_message(exc)}") from None


def default_search_params(index) -> str:
    """Search parameters that reach recall@10 >= 0.95 in bench/faiss_bench.py."""
    import faiss

    if _hnsw_of(index) is not None:
        return f"efSearch={DEFAULT_HNSW_EF_SEARCH}"
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        return ""
    return f"nprobe={min(DEFAULT_IVF_NPROBE, ivf.nlist)}"


def set_search_params(index, params: Optional[str]) -> None:
    """Apply "name=value,name=value" through faiss.ParameterSpace."""
    import faiss

    if not params:
        return
    for item in params.split(","):
        name, _, value = item.partition("=")
        # FAISS takes these below 1 without a word: efSearch 0 answers one hit whatever
        # k is, nprobe 0 fails inside the search.
        if name.strip().endswith(("efSearch", "nprobe")) and not (value.strip().isdigit() and int(value) >= 1):
            raise ValueError(f"search parameters {params!r}: {name.strip()} must be a whole number of at "
                             f"least 1, got {value.strip()!r}")
    try:
        faiss.ParameterSpace().set_index_parameters(index, params)
    except RuntimeError as exc:
        raise ValueError(f"search parameters {params!r} do not apply to this index: {_faiss_message(exc)}") from None


def search(index, query_vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top k by inner product: (scores (Q, k) float32, rows (Q, k) int64, -1 where the
    index had fewer than k answers). `index` is a FAISS index or a GalleryIndex."""
    index = getattr(index, "index", index)
    queries = _as_matrix(query_vectors)
    if queries.shape[1] != index.d:
        raise ValueError(f"query vectors have dimension {queries.shape[1]}, the index {index.d}")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    scores, rows = index.search(queries, min(k, max(index.ntotal, 1)))
    return scores, rows


@dataclass
class GalleryIndex:
    """A loaded index directory: the FAISS index, its id map and metadata."""

    index: Any
    entries: list[GalleryEntry]
    meta: dict[str, Any]
    path: Optional[Path] = None

    @property
    def dim(self) -> int:
        return self.index.d

    def __len__(self) -> int:
        return self.index.ntotal

    def set_search_params(self, params: Optional[str]) -> None:
        set_search_params(self.index, params)

    def search(self, query_vectors: np.ndarray, k: int = 10,
               exclude: Optional[Sequence[set[str]]] = None) -> list[list[Hit]]:
        """Top k hits per query; `exclude[q]` holds paths, names or image ids (content
        hashes) left out for query q (the query's own reference image, as in the CIRR protocol)."""
        extra = max((len(e) for e in exclude), default=0) if exclude else 0
        scores, rows = search(self.index, query_vectors, k + extra)
        results = []
        for q in range(len(rows)):
            skip = exclude[q] if exclude else ()
            hits = []
            for score, row in zip(scores[q], rows[q]):
                if row < 0:
                    continue
                entry = self.entries[row]
                if entry.path in skip or entry.name in skip or (entry.image_id and entry.image_id in skip):
                    continue
                hits.append(Hit(entry.name, entry.path, float(score), FIRST_STAGE, float(score), entry.image_id))
                if len(hits) == k:
                    break
            results.append(hits)
        return results


def save_index(out_dir: str | Path, index, entries: Sequence[GalleryEntry], meta: dict[str, Any]) -> Path:
    """Write index.faiss, ids.jsonl and meta.json (each atomically) into out_dir."""
    import faiss

    if index.ntotal != len(entries):
        raise ValueError(f"the index holds {index.ntotal} vectors but the id map {len(entries)} entries")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / (INDEX_FILE + ".tmp")
    faiss.write_index(index, str(tmp))
    os.replace(tmp, out_dir / INDEX_FILE)
    _write_atomic(out_dir / IDS_FILE, "".join(json.dumps(asdict(e)) + "\n" for e in entries))
    meta = {"format": FORMAT_VERSION, "dim": index.d, "count": index.ntotal, **meta}
    _write_atomic(out_dir / META_FILE, json.dumps(meta, indent=2, default=str))
    return out_dir


def load_index(path: str | Path, search_params: Optional[str] = None) -> GalleryIndex:
    """Load an index directory written by `save_index` / `good4cir index`."""
    import faiss

    path = Path(path)
    if path.is_file() and path.name == INDEX_FILE:
        path = path.parent
    for name in (INDEX_FILE, IDS_FILE, META_FILE):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path} is not a good4cir index (no {name}); build one with `good4cir index`")
    try:
        meta = json.loads((path / META_FILE).read_text())
    except ValueError as exc:
        raise ValueError(f"{path / META_FILE} is not valid JSON ({exc}); rebuild the index with "
                         "`good4cir index`") from None
    entries = []
    with open(path / IDS_FILE) as fh:
        for line_no, line in enumerate(fh, 1):
            if line.strip():
                try:
                    entries.append(GalleryEntry(**json.loads(line)))
                except (json.JSONDecodeError, TypeError) as exc:
                    raise ValueError(f"{path / IDS_FILE} line {line_no}: {exc}") from None
    try:
        index = faiss.read_index(str(path / INDEX_FILE))
    except RuntimeError as exc:  # cut short, or not a FAISS file
        raise ValueError(f"{path / INDEX_FILE} cannot be read by FAISS ({_faiss_message(exc)}); "
                         "rebuild the index with `good4cir index` (its embeddings are reused)") from None
    if index.ntotal != len(entries):
        raise ValueError(
            f"{path}: the index holds {index.ntotal} vectors but {IDS_FILE} has {len(entries)} entries; rebuild it"
        )
    set_search_params(index, search_params if search_params is not None else meta.get("search_params"))
    return GalleryIndex(index=index, entries=entries, meta=meta, path=path)


# ------------------------------------------------------------------------ the whole job


def build_gallery_index(
    db_path: str | Path,
    checkpoint_dir: str | Path,
    out_dir: str | Path,
    *,
    factory: str = DEFAULT_FACTORY,
    split: Optional[str] = None,
    search_params: Optional[str] = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    num_workers: Optional[int] = None,
    fresh: bool = False,
    progress: bool = True,
    retriever=None,
    cache_dir: Optional[str | Path] = None,
    device: Optional[str] = None,
) -> IndexReport:
    """`good4cir index`: encode a store's gallery with a checkpoint and save the index.
    Images already decoded by `train` or `eval` come from the pixel cache in `cache_dir`
    (default: theirs); nothing is added to it here, so a large gallery never fills it."""
    import time

    from .features import PixelCache, default_cache_dir
    from .model import load_retriever, split_preprocess

    entries = gallery_from_db(db_path, split=split)
    out_dir = Path(out_dir)
    try:  # before any encoding: a file where the folder should be, or no permission
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"cannot write the index to {out_dir}: "
                         + ("it is a file, not a folder" if out_dir.is_file() else exc.strerror or str(exc))) from None
    if retriever is None:
        retriever = load_retriever(checkpoint_dir, device=device)
    # A mistyped factory or search parameter is found now, not after encoding the gallery.
    dim = getattr(retriever, "embed_dim", None)
    if dim:
        set_search_params(new_faiss_index(dim, factory), search_params)
    fingerprint = checkpoint_fingerprint(retriever.model_info)
    started = time.perf_counter()
    model = getattr(retriever, "model", None)
    pixel_cache = None
    if model is not None:
        pil_transform, _, _ = split_preprocess(model.encoder.preprocess)
        pixel_cache = PixelCache(Path(cache_dir) if cache_dir else default_cache_dir(), pil_transform)
    encoded = encode_gallery(
        retriever, entries, out_dir / EMBEDDINGS_DIR, model_fingerprint=fingerprint,
        batch_size=batch_size, num_workers=num_workers, fresh=fresh, progress=progress,
        pixel_cache=pixel_cache,
    )
    encoded_at = time.perf_counter()
    index = build_faiss_index(encoded.embeddings, factory, search_params=search_params, progress=progress)
    built_at = time.perf_counter()
    applied = search_params if search_params is not None else default_search_params(index)
    save_index(out_dir, index, encoded.entries, {
        "factory": factory,
        "metric": "inner_product",
        "search_params": applied,
        "checkpoint": str(Path(checkpoint_dir).resolve()),
        "checkpoint_fingerprint": fingerprint,
        "model": {k: v for k, v in retriever.model_info.items() if _jsonable(v)},
        "db": str(Path(db_path).resolve()),
        "split": split,
        "skipped": encoded.skipped,
    })
    return IndexReport(
        out_dir=str(out_dir), count=len(encoded.entries), factory=factory, search_params=applied,
        dim=int(encoded.embeddings.shape[1]), encoded=encoded.encoded, skipped=encoded.skipped,
        encode_seconds=encoded_at - started, build_seconds=built_at - encoded_at,
    )


class CheckpointGoneError(FileNotFoundError):
    """The checkpoint an index names is no longer where it was (`checkpoint_dir`)."""

    def __init__(self, message: str, checkpoint_dir: str):
        super().__init__(message)
        self.checkpoint_dir = checkpoint_dir


class QueryEngine:
    """Loads a retriever and an index once; answers (image, text) -> top k hits.

    The review app's retrieve tab keeps one engine per index. Safe to share between
    threads: encoding is serialised (one model), FAISS searches are read-only.
    """

    def __init__(self, index_path: str | Path, checkpoint_dir: Optional[str | Path] = None,
                 search_params: Optional[str] = None, retriever=None, device: Optional[str] = None):
        from .model import load_retriever

        self.index = load_index(index_path, search_params=search_params)
        named = checkpoint_dir is None
        checkpoint_dir = checkpoint_dir or self.index.meta.get("checkpoint")
        if retriever is None:
            if not checkpoint_dir:
                raise ValueError(f"{index_path} does not name its checkpoint; pass the checkpoint directory")
            if named and not Path(checkpoint_dir).is_dir():
                raise CheckpointGoneError(
                    f"the index {index_path} was built with the checkpoint {checkpoint_dir}, which is "
                    "no longer there: pass --checkpoint DIR (the same model, moved) or rebuild the index",
                    checkpoint_dir)
            retriever = load_retriever(checkpoint_dir, device=device)
        self.retriever = retriever
        self.checkpoint_dir = checkpoint_dir
        expected = self.index.meta.get("checkpoint_fingerprint")
        self.model_note = ""  # kept for the app, which shows it with every answer
        if expected and checkpoint_fingerprint(retriever.model_info) != expected:
            self.model_note = (f"the index {index_path} was built with another version of the model in "
                               f"{checkpoint_dir}; rebuild it with `good4cir index` for meaningful results")
            warnings.warn(self.model_note, stacklevel=2)
        if getattr(retriever, "embed_dim", self.index.dim) != self.index.dim:
            raise ValueError(
                f"the model embeds in {retriever.embed_dim} dimensions but the index holds {self.index.dim}"
            )
        self._lock = threading.Lock()

    def query(self, image, text: str, k: int = 10, exclude_reference: bool = True,
              exclude: Sequence[str] = ()) -> list[Hit]:
        """Top-k gallery images for a reference image (PIL image or path) and a
        modification text. A reference given as a path that is in the gallery is left
        out of the results (the CIRR protocol); `exclude` adds paths, names or content
        hashes to leave out (a PIL image's own file, which only the caller knows)."""
        from PIL import Image

        from store.images import hash_file, load_image_rgb

        if k < 1:  # hits[:k] would quietly drop the last -k hits instead
            raise ValueError(f"k must be at least 1, got {k}")
        exclude = set(exclude)
        if isinstance(image, (str, Path)):
            path = Path(image)
            if not path.is_file():
                raise FileNotFoundError(f"query image {path} "
                                        + ("is a folder, not an image file" if path.is_dir() else "does not exist"))
            if exclude_reference:
                # By content too: a copy of a gallery image elsewhere is that image (the
                # store's image ids are content hashes), and came back first.
                exclude |= {str(path), str(path.resolve()), hash_file(path)}
            image = load_image_rgb(path)
        elif not isinstance(image, Image.Image):
            raise TypeError(f"query image must be a PIL image or a path, got {type(image).__name__}")
        note = self.text_note(text)
        if note:
            warnings.warn(note, stacklevel=2)
        top_k = getattr(self.retriever, "rerank_top_k", 0)
        with self._lock:
            vector = self.retriever.encode_queries([image], [text or ""])
        hits = self.index.search(vector, max(k, top_k), exclude=[exclude])[0]
        if top_k:
            hits = self._rerank(image, text, hits, top_k)
        return hits[:k]

    def text_note(self, text: str) -> str:
        """What the model will not read of a modification text: the words past its text
        encoder's context (77 CLIP tokens), which tokenizing cuts off without a word; ""
        when it reads all of it."""
        encoder = getattr(getattr(self.retriever, "model", None), "encoder", None)
        if encoder is None or not text:
            return ""
        tokens, context = encoder.count_tokens(text), encoder.context_length
        if tokens <= context:
            return ""
        return (f"the modification text is {tokens} CLIP tokens, over the {context} the model reads: "
                f"the query uses only its start; shorten it to what should change")

    def _rerank(self, image, text: str, hits: list[Hit], top_k: int) -> list[Hit]:
        """The first `top_k` hits in the pair scorer's order (their score becomes its
        score, stage RERANK_STAGE), then the rest in the index's order. A candidate whose
        file cannot be read keeps its place after the re-ranked ones."""
        from store.images import ImageError

        readable, unreadable = [], []
        with self._lock:
            for hit in hits[:top_k]:
                try:
                    self.retriever.uint8_pixels([hit.path])
                    readable.append(hit)
                except ImageError as exc:
                    warnings.warn(f"re-ranking left out a candidate: {exc}", stacklevel=3)
                    unreadable.append(hit)
            scores = self.retriever.rerank_scores(image, text, [hit.path for hit in readable])
        order = np.argsort(-scores, kind="stable")
        reranked = [readable[i]._replace(score=float(scores[i]), stage=RERANK_STAGE) for i in order]
        return reranked + unreadable + hits[top_k:]


# ------------------------------------------------------------------------ helpers


def _as_matrix(vectors) -> np.ndarray:
    array = np.ascontiguousarray(np.asarray(vectors, dtype=np.float32))
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2 or array.shape[1] == 0:
        raise ValueError(f"expected (N, D) vectors, got shape {array.shape}")
    return array


def _hnsw_of(index):
    import faiss

    index = faiss.downcast_index(index)
    return getattr(index, "hnsw", None)


def _faiss_message(exc: Exception) -> str:
    # FAISS prefixes its messages with the C++ location; keep the last, human part.
    return str(exc).strip().splitlines()[-1].split(": ", 1)[-1] if str(exc).strip() else repr(exc)


def _jsonable(value) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
