"""Test-server submission files for CIRR and CIRCO.

CIRR (github Cuberick-Orion/CIRR, Test-split_server.md): two JSON files, each a dict
pair_id -> ranked image names plus two special entries, "version" ("rc2") and "metric":
"recall" holds the top 50 of the whole gallery (reference removed), "recall_subset" the
top 3 of the query's image set (its img_set members without the reference).

CIRCO (github miccunifi/CIRCO, README "Submission Format"): one JSON dict
query_id -> the top 50 COCO image ids (integers). The query text is the shared concept
joined with the relative caption (`circo_query_text`); left out, others measured about
half the mAP.

Rankings come from a similarity matrix through `metrics.top_k_indices`: descending
score, ties by gallery order.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Hashable, Sequence
from pathlib import Path

import numpy as np

from .metrics import top_k_indices

CIRR_VERSION = "rc2"
CIRR_RECALL_K = 50
CIRR_SUBSET_K = 3
CIRCO_K = 50


def cirr_submissions(
    scores,
    gallery_names: Sequence[str],
    reference_names: Sequence[str],
    pair_ids: Sequence[Hashable],
    group_members: Sequence[Sequence[str]],
    *,
    version: str = CIRR_VERSION,
    top_k: int = CIRR_RECALL_K,
    subset_k: int = CIRR_SUBSET_K,
) -> tuple[dict, dict]:
    """Both CIRR submissions: ({"version", "metric": "recall", pair_id: top 50},
    {"version", "metric": "recall_subset", pair_id: top 3 of the set})."""
    scores = np.asarray(scores)
    num_queries = scores.shape[0]
    for what, values in (("reference names", reference_names), ("pair ids", pair_ids), ("group members", group_members)):
        if len(values) != num_queries:
            raise ValueError(f"{len(values)} {what} for {num_queries} queries")
    keys = _unique_keys(pair_ids, "pair id")
    top = top_k_indices(scores, gallery_names, reference_names, top_k)
    recall = {"version": version, "metric": "recall"}
    for key, row in zip(keys, top):
        recall[key] = [gallery_names[i] for i in row]

    position = {name: col for col, name in enumerate(gallery_names)}
    subset = {"version": version, "metric": "recall_subset"}
    for q, (key, members) in enumerate(zip(keys, group_members)):
        cols = []
        for name in dict.fromkeys(members):
            if name == reference_names[q]:
                continue
            col = position.get(name)
            if col is None:
                raise ValueError(f"pair {key}: image-set member {name!r} is not in the gallery")
            cols.append(col)
        cols.sort()  # gallery order, so that ties break as in the recall file
        order = np.argsort(-scores[q, cols], kind="stable")[:subset_k]
        subset[key] = [gallery_names[cols[i]] for i in order]
    return recall, subset


def write_cirr_submissions(out_dir: str | Path, name: str, *args, **kwargs) -> tuple[Path, Path]:
    """Write recall_submission_<name>.json and recall_subset_submission_<name>.json."""
    recall, subset = cirr_submissions(*args, **kwargs)
    out_dir = Path(out_dir)
    return (
        write_submission(out_dir / f"recall_submission_{name}.json", recall),
        write_submission(out_dir / f"recall_subset_submission_{name}.json", subset),
    )


def circo_query_text(shared_concept: str | None, relative_caption: str) -> str:
    """CIRCO's query text: the shared concept followed by the relative caption
    ("a teddy bear" + "is held by a little girl" -> "a teddy bear is held by a little girl")."""
    caption = (relative_caption or "").strip()
    concept = (shared_concept or "").strip()
    if not caption:
        raise ValueError("CIRCO query has an empty relative caption")
    return f"{concept} {caption}" if concept else caption


def circo_image_id(name: str | int) -> int:
    """COCO image id from a name or file name: '000000243611.jpg' -> 243611."""
    if isinstance(name, (int, np.integer)):
        return int(name)
    stem = Path(str(name)).stem
    if not re.fullmatch(r"\d+", stem):
        raise ValueError(f"CIRCO image {name!r}: the server needs numeric COCO image ids")
    return int(stem)


def circo_submission(
    scores,
    gallery_names: Sequence[str | int],
    query_ids: Sequence[Hashable],
    *,
    reference_names: Sequence[str | int] | None = None,
    top_k: int = CIRCO_K,
) -> dict:
    """{query_id: top 50 COCO image ids}. The CIRCO gallery does not hold the references,
    so nothing is removed unless `reference_names` is given."""
    scores = np.asarray(scores)
    if len(query_ids) != scores.shape[0]:
        raise ValueError(f"{len(query_ids)} query ids for {scores.shape[0]} queries")
    keys = _unique_keys(query_ids, "query id")
    image_ids = [circo_image_id(name) for name in gallery_names]
    top = top_k_indices(scores, gallery_names, reference_names, top_k)
    return {key: [image_ids[i] for i in row] for key, row in zip(keys, top)}


def missing_circo_query_ids(query_ids: Sequence[Hashable]) -> list[int]:
    """The query ids from 0 up to the largest that `query_ids` lack. CIRCO numbers a split's
    queries 0..N-1 and its server refuses a file without every one of them; a query whose
    image was missing at import is not in the store. Ids that are not numbers: none known."""
    numbers = set()
    for query_id in query_ids:
        text = str(query_id)
        if not text.isdigit():
            return []
        numbers.add(int(text))
    return [n for n in range(max(numbers, default=-1) + 1) if n not in numbers]


def write_submission(path: str | Path, submission: dict) -> Path:
    """Write compact JSON atomically (the CIRR server takes at most 5 MB)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(submission, separators=(",", ":")))
    os.replace(tmp, path)
    return path


def _unique_keys(ids: Sequence[Hashable], what: str) -> list[str]:
    keys = [str(i) for i in ids]
    seen: set[str] = set()
    for key in keys:
        if key in seen:
            raise ValueError(f"{what} {key!r} appears twice")
        if key in ("version", "metric"):
            raise ValueError(f"{what} {key!r} collides with a reserved submission key")
        seen.add(key)
    return keys
