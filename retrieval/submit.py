"""`good4cir eval --submission DIR`: rank a split with a trained model and write the
files a test server wants (`submission.py` holds the formats).

The split, gallery, queries and embeddings are those of `evaluate.py` (same loaders,
`build_queries`, `embed`), with two differences a server needs: pairs whose target is
withheld (CIRR test1, CIRCO test) are kept and ranked, and each pair gives exactly one
query, from its first caption (the dataset's own with the default --source), because a
server keys its answers by pair. Metrics are computed over the queries that have a
target; the others are only ranked.

- CIRR-style data (pairs with an image set): recall_submission_<split>.json and
  recall_subset_submission_<split>.json, keyed by CIRR's pairid, listing CIRR image names.
- CIRCO data (pairs with a shared concept): circo_submission_<split>.json, query id ->
  the top 50 COCO image ids.

A store holds only the images its pairs name; CIRCO's server ranks against all of COCO
2017 unlabeled, so `gallery_dirs` adds every image of a folder to the gallery (named by
file stem, keyed by content hash like the store, so an image is never there twice).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from tqdm import tqdm

from .data import Triplet, TripletSet
from .submission import circo_submission, cirr_submissions, missing_circo_query_ids, write_submission


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


@dataclass
class SubmissionResult:
    kind: str  # "cirr" or "circo"
    split: str
    files: list[Path]
    queries: int
    without_target: int
    gallery: int
    # evaluate's shape, over the queries with a target; its keys null where none has one
    metrics: Optional[dict[str, Any]] = None
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # what a server will refuse or score wrong


def is_circo(triplet: Triplet) -> bool:
    extra = triplet.extra or {}
    return "circo_id" in extra or "shared_concept" in extra


def submission_kind(triplets: Sequence[Triplet], split: str) -> str:
    """'circo' or 'cirr' for a split; a split holding both, or neither, has no format."""
    circo = [t for t in triplets if is_circo(t)]
    if circo and len(circo) < len(triplets):
        raise ValueError(f"split {split!r} mixes CIRCO queries with other pairs "
                         f"(e.g. pair {next(t for t in triplets if not is_circo(t)).pair_id}); "
                         "evaluate one dataset at a time for a submission")
    if circo:
        return "circo"
    no_set = [t for t in triplets if not t.img_set]
    if no_set:
        raise ValueError(f"pair {no_set[0].pair_id} of split {split!r} has neither a CIRR image "
                         "set nor a CIRCO shared concept: no test-server format fits "
                         f"({len(no_set)} such pairs)")
    return "cirr"


def cirr_pair_id(triplet: Triplet) -> int | str:
    pairid = (triplet.extra or {}).get("pairid")
    if pairid is None:
        raise ValueError(f"pair {triplet.pair_id}: no CIRR pairid (extra.pairid); the CIRR "
                         "server keys answers by it: import the data with --format cirr")
    return pairid


def circo_query_id(triplet: Triplet) -> int | str:
    query_id = (triplet.extra or {}).get("circo_id")
    if query_id is None:
        raise ValueError(f"pair {triplet.pair_id}: no CIRCO query id (extra.circo_id); the "
                         "CIRCO server keys answers by it: import the data with --format circo")
    return query_id


def cirr_names(data: TripletSet, triplets: Sequence[Triplet]) -> dict[str, list[str]]:
    """Image id -> every CIRR name the split's pairs give it. The store keeps byte-identical
    images once, under the first name it saw; CIRR's server knows each name, so a
    submission lists them all (one score), or a target named by the other could only miss."""
    names_of: dict[str, dict[str, None]] = {}
    # A name belongs to one image: the one stored under it, else the first pair's; a
    # pair whose names no longer match its images (edited since import) adds none.
    owner = {name: key for key, name in data.image_names.items() if name}
    for t in triplets:
        for name, key in _named_images(t):
            if owner.setdefault(name, key) == key:
                names_of.setdefault(key, {data.image_names.get(key) or name: None})[name] = None
    return {key: list(names) for key, names in names_of.items()}


def _named_images(t: Triplet) -> list[tuple[str, str]]:
    """(CIRR name, image id) of a pair's reference, target and image-set members, from the
    names the CIRR importer keeps; members only where none was left out (else the two
    lists do not line up)."""
    names = (t.extra or {}).get("names") or {}
    pairs = [(names.get("reference"), t.reference), (names.get("target_hard"), t.target)]
    listed = names.get("members")
    if isinstance(listed, list) and t.img_set and len(listed) == len(t.img_set):
        pairs += zip(listed, t.img_set)
    return [(name, key) for name, key in pairs if isinstance(name, str) and key]


def _own_name(t: Triplet, key: str, role: str, names_of: dict[str, list[str]]) -> Optional[str]:
    """The pair's own CIRR name for its `role` image ('reference'), where it names `key`."""
    name = ((t.extra or {}).get("names") or {}).get(role)
    return name if name in names_of.get(key, ()) else None


def _member_names(data: TripletSet, t: Triplet, row_of: dict[str, int],
                  names_of: dict[str, list[str]]) -> Optional[list[str]]:
    """The pair's image-set members by their own CIRR names (all names of one image), or None."""
    listed = ((t.extra or {}).get("names") or {}).get("members")
    if not (isinstance(listed, list) and t.img_set and len(listed) == len(t.img_set)):
        return None
    return [name if name in names_of.get(key, ()) else image_name(data, key, t)
            for name, key in zip(listed, t.img_set) if key in row_of]


def image_name(data: TripletSet, key: str, triplet: Optional[Triplet] = None) -> str:
    name = data.image_names.get(key)
    if not name:
        where = f" (pair {triplet.pair_id})" if triplet else ""
        raise ValueError(f"image {key[:12]}{where} has no dataset name to submit")
    return name


def write_checkpoint_submission(
    checkpoint_dir: str | Path,
    out_dir: str | Path,
    dbs: Sequence[str | Path] = (),
    files: Sequence[str | Path] = (),
    split: str = "test1",
    source: str = "original",
    captions: str = "both",
    include_unreviewed: bool = False,
    cache_dir: Optional[str | Path] = None,
    which: str = "best",
    progress: bool = True,
    gallery_dirs: Sequence[str | Path] = (),
    rerank: bool = True,
    device: Optional[str] = None,
) -> SubmissionResult:
    """Rank every query of `split` against its gallery and write the submission files;
    with the checkpoint's re-ranker where it has one (and `rerank`)."""
    from .data import load_triplets
    from .evaluate import (build_queries, drop_unreadable_members, embed, evaluate_embeddings,
                           fill_absent_measures, metrics_without_targets, missing_ground_truths_note,
                           small_split_warning)
    from .features import PixelCache, default_cache_dir
    from .model import load_model, split_preprocess
    from .rerank import load_pair_scorer, rerank_matrix

    out_dir = Path(out_dir)
    # Before any ranking, and without creating it yet (a refused split leaves nothing):
    # a file where the folder, or one of its parents, should be.
    existing = out_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"cannot write the submission files to {out_dir}: "
                         + ("it is a file, not a folder" if existing == out_dir else f"{existing} is a file"))
    model, _ = load_model(checkpoint_dir, which=which, device=device)
    data = load_triplets(dbs, files, source=source, captions=captions,
                         include_unreviewed=include_unreviewed, keep_targetless=True)
    triplets = data.split(split)
    if not triplets:
        found = sorted({str(t.split) for t in data.triplets})
        raise ValueError(f"no pairs in split {split!r} (splits present: {', '.join(found) or 'none'})")
    kind = submission_kind(triplets, split)
    # Ids first: a pair the server cannot key fails the command before any image work.
    ids = [cirr_pair_id(t) if kind == "cirr" else circo_query_id(t) for t in triplets]
    notes, warnings = [], []
    if data.problems:
        notes.append(f"{len(data.problems)} pairs left out while loading (any split), first: "
                     f"{data.problems[0]}")

    pil_transform, _, _ = split_preprocess(model.encoder.preprocess)
    cache = PixelCache(Path(cache_dir) if cache_dir else default_cache_dir(), pil_transform)
    gallery_keys = data.gallery_keys(triplets)
    for folder in gallery_dirs:
        gallery_keys += add_gallery_folder(data, folder, set(gallery_keys), progress)
    pixels, row_of, failures = cache.load({k: data.image_paths[k] for k in gallery_keys}, progress)
    gallery_keys = [k for k in gallery_keys if k in row_of]
    for t in triplets:
        # A server scores every query: a missing one would be counted as a miss, silently.
        if t.reference not in row_of:
            raise ValueError(f"pair {t.pair_id}: reference image could not be read "
                             f"({failures.get(t.reference, 'not in the gallery')})")
    notes += [f"gallery image left out: {reason}" for reason in failures.values()]
    triplets = drop_unreadable_members(triplets, row_of)

    queries = build_queries(triplets, all_captions=False)  # one query per pair
    # Metrics only where the target can be ranked: it exists, decoded, and is not the reference.
    with_target = [i for i, key in enumerate(queries.target_keys)
                   if key is not None and key in row_of and key != queries.reference_keys[i]]
    emb = embed(model, pixels, row_of, gallery_keys, queries, baselines=bool(with_target))
    scores = emb["query"] @ emb["gallery"].T
    second = load_pair_scorer(checkpoint_dir, model.encoder) if rerank else None
    if second is not None:
        scorer, rerank_info = second
        scores = rerank_matrix(scorer, scores, queries.reference_keys, queries.texts, gallery_keys, pixels, row_of,
                               top_k=int(rerank_info["top_k"]), progress=progress)
    metrics = None
    if with_target:
        emb_scored = {name: values[with_target] for name, values in emb.items() if name != "gallery"}
        emb_scored["gallery"] = emb["gallery"]
        metrics = evaluate_embeddings(emb_scored, gallery_keys, queries.subset(with_target),
                                      model_scores=scores[with_target])
        notes += fill_absent_measures(metrics, queries.subset(with_target), split)
        missing = missing_ground_truths_note(queries.subset(with_target))
        if missing:
            notes.append(missing)
        warning = small_split_warning(len(with_target), len(gallery_keys))
        if warning:  # as eval's: these metrics are printed too
            metrics["warning"] = warning
    else:
        metrics, withheld = metrics_without_targets(len(queries), split, with_map=kind == "circo")
        notes += withheld

    if kind == "cirr":
        names_of = cirr_names(data, triplets)
        columns = [(col, name) for col, key in enumerate(gallery_keys)
                   for name in names_of.get(key) or [image_name(data, key)]]
        gallery_names = [name for _, name in columns]
        references = [_own_name(t, t.reference, "reference", names_of) or image_name(data, t.reference, t)
                      for t in triplets]
        members = [_member_names(data, t, row_of, names_of) or [image_name(data, k, t) for k in t.img_set if k in row_of]
                   for t in triplets]
        recall, subset = cirr_submissions(np.asarray(scores)[:, [col for col, _ in columns]], gallery_names,
                                          references, ids, members)
        written = [write_submission(out_dir / f"recall_submission_{split}.json", recall),
                   write_submission(out_dir / f"recall_subset_submission_{split}.json", subset)]
    else:
        gallery_names = [image_name(data, k) for k in gallery_keys]
        # The reference is never a CIRCO ground truth: removed, as eval's mAP does.
        references = [image_name(data, t.reference, t) for t in triplets]
        submission = circo_submission(scores, gallery_names, ids, reference_names=references)
        written = [write_submission(out_dir / f"circo_submission_{split}.json", submission)]
        missing = missing_circo_query_ids(ids)
        if missing:
            shown = ", ".join(str(n) for n in missing[:10]) + (", ..." if len(missing) > 10 else "")
            warnings.append(f"split {split} has no query {shown} ({len(missing)} of the ids 0-"
                            f"{max(map(int, ids))}): the CIRCO server refuses a file without every "
                            "query of the split; a query "
                            "whose image was missing at import is not in the store (import named it): "
                            "add its image, import again and write the file again")
        if not gallery_dirs:
            notes.append(f"the gallery is the {len(gallery_keys)} images the data holds for "
                         f"split {split}; CIRCO's server ranks against all of COCO 2017 "
                         "unlabeled (about 120k images): pass --gallery-images "
                         "unlabeled2017/ to rank those")
    return SubmissionResult(kind=kind, split=split, files=written, queries=len(queries),
                            without_target=len(queries) - len(with_target),
                            gallery=len(gallery_keys), metrics=metrics, notes=notes, warnings=warnings)


def add_gallery_folder(data: TripletSet, folder: str | Path, known: set[str],
                       progress: bool = True) -> list[str]:
    """Keys of the images of `folder` not yet in `known`, registered in `data` (path and
    name = file stem). Hashing makes an image the store already holds the same key."""
    from store.images import hash_file

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"gallery folder {folder} does not exist")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"gallery folder {folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    added = []
    for path in tqdm(files, desc=f"hashing {folder.name}", unit="img", disable=not progress):
        key = hash_file(path)
        if key in known:
            continue
        known.add(key)
        data.image_paths[key] = str(path.resolve())
        data.image_names.setdefault(key, path.stem)
        added.append(key)
    return added
