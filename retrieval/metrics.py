"""Composed-retrieval metrics on a similarity matrix: CIRR recall, recall_subset, CIRCO mAP.

Every function takes `scores`, a (num_queries, num_gallery) similarity matrix (higher is
more similar), and the gallery's names in column order. Names are plain strings (or any
hashable ids) so that the functions can be checked against the official definitions
without a model.

Protocol (CIRR): the query's reference image is removed from the ranking, so a model is
never rewarded or punished for retrieving the image it was given. A reference that is not
in the gallery (CIRCO: the references are not in the COCO unlabeled gallery) has nothing
to remove.

Ties (explicit, because a constant or quantised score matrix would otherwise be scored
by gallery order): a relevant item that shares its score with irrelevant items is ranked
AFTER all of them. The metrics are therefore pessimistic: no model gains from ties or
from the order of the gallery, and a constant score matrix gets the worst result the
gallery allows. Among relevant items with equal scores the order does not change any
metric. Rankings written for output (submissions, `top_k_indices`), where the ground
truth is unknown, break ties by gallery order instead (a stable sort).

Results are percentages, `{k: value}`, averaged over queries.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np

# Bounded memory: (chunk, num_gallery) boolean temporaries instead of (Q, G) at once.
_QUERY_CHUNK = 512


def recall_at_k(
    scores,
    gallery_names: Sequence[Hashable],
    reference_names: Sequence[Hashable] | None,
    target_names: Sequence[Hashable],
    ks: Sequence[int] = (1, 5, 10, 50),
) -> dict[int, float]:
    """CIRR Recall@k: percent of queries whose target ranks in the top k (reference removed)."""
    ranks = target_ranks(scores, gallery_names, reference_names, target_names)
    return {int(k): _percent(ranks <= k) for k in _check_ks(ks)}


def median_rank(
    scores,
    gallery_names: Sequence[Hashable],
    reference_names: Sequence[Hashable] | None,
    target_names: Sequence[Hashable],
) -> float:
    """Median 1-based rank of the target over queries (reference removed, pessimistic ties)."""
    ranks = target_ranks(scores, gallery_names, reference_names, target_names)
    return float(np.median(ranks))


def target_ranks(
    scores,
    gallery_names: Sequence[Hashable],
    reference_names: Sequence[Hashable] | None,
    target_names: Sequence[Hashable],
) -> np.ndarray:
    """1-based rank of each query's target among the gallery minus the reference.

    rank = 1 + (items scoring higher) + (other items scoring the same), over the gallery
    without the query's reference image.
    """
    scores = _check_scores(scores, gallery_names)
    num_queries = scores.shape[0]
    position = _gallery_positions(gallery_names)
    target_cols = _columns(target_names, position, num_queries, "target")
    reference_cols = _reference_columns(reference_names, position, num_queries)
    same = np.flatnonzero((reference_cols == target_cols) & (reference_cols >= 0))
    if same.size:
        q = int(same[0])
        raise ValueError(
            f"query {q}: the target {target_names[q]!r} is the reference image; "
            "the CIRR protocol removes the reference from the ranking, so it can never be found"
        )
    ranks = np.empty(num_queries, dtype=np.int64)
    for start in range(0, num_queries, _QUERY_CHUNK):
        stop = min(start + _QUERY_CHUNK, num_queries)
        block = scores[start:stop]
        rows = np.arange(stop - start)
        target_scores = block[rows, target_cols[start:stop]][:, None]
        ahead = (block > target_scores).sum(axis=1) + (block == target_scores).sum(axis=1) - 1
        # The reference, if it is in the gallery, is out of the ranking: undo its count.
        ref = reference_cols[start:stop]
        has_ref = ref >= 0
        ref_scores = block[rows[has_ref], ref[has_ref]]
        ahead[has_ref] -= ref_scores >= target_scores[has_ref, 0]
        ranks[start:stop] = 1 + ahead
    return ranks


def recall_subset_at_k(
    scores,
    gallery_names: Sequence[Hashable],
    reference_names: Sequence[Hashable] | None,
    target_names: Sequence[Hashable],
    group_members: Sequence[Sequence[Hashable]],
    ks: Sequence[int] = (1, 2, 3),
) -> dict[int, float]:
    """CIRR Recall_subset@k: the ranking is restricted to the query's image set
    (`group_members[q]`, CIRR's img_set) without the reference image."""
    ks = _check_ks(ks)
    ranks = subset_ranks(scores, gallery_names, reference_names, target_names, group_members)
    return {int(k): _percent(ranks <= k) for k in ks}


def subset_ranks(
    scores,
    gallery_names: Sequence[Hashable],
    reference_names: Sequence[Hashable] | None,
    target_names: Sequence[Hashable],
    group_members: Sequence[Sequence[Hashable]],
) -> np.ndarray:
    """1-based rank of each query's target within its image set minus the reference."""
    scores = _check_scores(scores, gallery_names)
    num_queries = scores.shape[0]
    position = _gallery_positions(gallery_names)
    target_cols = _columns(target_names, position, num_queries, "target")
    reference_cols = _reference_columns(reference_names, position, num_queries)
    if len(group_members) != num_queries:
        raise ValueError(f"group_members has {len(group_members)} entries for {num_queries} queries")
    ranks = np.empty(num_queries, dtype=np.int64)
    for q, members in enumerate(group_members):
        cols = []
        for name in dict.fromkeys(members):  # de-duplicated, order kept
            col = position.get(name)
            if col is None:
                raise ValueError(f"query {q}: image-set member {name!r} is not in the gallery")
            if col != reference_cols[q]:
                cols.append(col)
        target = target_cols[q]
        if target not in cols:
            raise ValueError(
                f"query {q}: the target {target_names[q]!r} is not in its image set "
                "(after removing the reference)"
            )
        member_scores = scores[q, cols]
        target_score = scores[q, target]
        ranks[q] = (member_scores > target_score).sum() + (member_scores == target_score).sum()
    return ranks


def bootstrap_interval(hits, groups: Sequence[Hashable], level: float = 0.95, resamples: int = 2000,
                       seed: int = 0) -> tuple[float, float]:
    """A percentile bootstrap interval, in percent, for the mean of per-query `hits`.

    Queries that share a group (the captions of one pair ask for the same target from
    the same reference) succeed or fail together, so whole groups are resampled; resampling
    queries alone would give too narrow an interval."""
    hits = np.asarray(hits, dtype=np.float64)
    if hits.ndim != 1 or len(groups) != len(hits):
        raise ValueError(f"hits and groups must be two equal-length lists, got {hits.shape} and {len(groups)}")
    if not len(hits):
        raise ValueError("no queries to resample")
    if not 0 < level < 1:
        raise ValueError(f"level must be between 0 and 1, got {level}")
    index: dict[Hashable, int] = {}
    group_of = np.array([index.setdefault(g, len(index)) for g in groups])
    sums = np.bincount(group_of, weights=hits)
    counts = np.bincount(group_of).astype(np.float64)
    picks = np.random.default_rng(seed).integers(0, len(index), size=(resamples, len(index)))
    means = sums[picks].sum(axis=1) / counts[picks].sum(axis=1)
    tail = 100.0 * (1 - level) / 2
    low, high = np.percentile(100.0 * means, [tail, 100.0 - tail])
    return float(low), float(high)


def map_at_k(
    scores,
    gallery_names: Sequence[Hashable],
    reference_names: Sequence[Hashable] | None,
    ground_truths: Sequence[Sequence[Hashable]],
    ks: Sequence[int] = (5, 10, 25, 50),
    ground_truth_counts: Sequence[int] | None = None,
) -> dict[int, float]:
    """CIRCO mAP@k with several ground truths per query (the official definition):

    AP@k = (1 / min(k, n_gt)) * sum over ranks i <= k of precision@i * rel(i),

    where rel(i) is 1 when the item at rank i is a ground truth. Pass
    `reference_names=None` to rank the whole gallery as CIRCO's server does (its
    references are not in the gallery); with names, each reference is removed first.

    n_gt is every ground truth the dataset names, as on CIRCO's server:
    `ground_truth_counts[q]` says how many that is where some are not in the gallery
    (an image missing or unreadable here). They are never retrieved, and leaving them out
    of n_gt would raise the score above the official one.
    """
    scores = _check_scores(scores, gallery_names)
    num_queries = scores.shape[0]
    position = _gallery_positions(gallery_names)
    reference_cols = _reference_columns(reference_names, position, num_queries)
    if len(ground_truths) != num_queries:
        raise ValueError(f"ground_truths has {len(ground_truths)} entries for {num_queries} queries")
    if ground_truth_counts is not None and len(ground_truth_counts) != num_queries:
        raise ValueError(f"ground_truth_counts has {len(ground_truth_counts)} entries for {num_queries} queries")
    ks = _check_ks(ks)
    valid = np.ones(scores.shape[1], dtype=bool)
    ap_sums = {k: 0.0 for k in ks}
    for q, truths in enumerate(ground_truths):
        truth_names = list(dict.fromkeys(truths))
        if not truth_names:
            raise ValueError(f"query {q}: no ground-truth images")
        cols = []
        for name in truth_names:
            col = position.get(name)
            if col is None:
                raise ValueError(f"query {q}: ground truth {name!r} is not in the gallery")
            if col == reference_cols[q]:
                raise ValueError(f"query {q}: ground truth {name!r} is the reference image, which is removed")
            cols.append(col)
        row = scores[q]
        if reference_cols[q] >= 0:
            valid[reference_cols[q]] = False
        relevant = np.zeros(scores.shape[1], dtype=bool)
        relevant[cols] = True
        truth_scores = np.sort(row[cols])[::-1]
        # 1-based position of each ground truth in the pessimistic order: everything that
        # scores higher, every irrelevant item that ties, and the ground truths already
        # placed at the same score.
        higher = (row[None, valid] > truth_scores[:, None]).sum(axis=1)
        tied_irrelevant = (row[None, valid & ~relevant] == truth_scores[:, None]).sum(axis=1)
        positions = higher + tied_irrelevant + _tied_relevant_before(truth_scores) + 1
        hits = np.arange(1, len(positions) + 1)
        precision = hits / positions
        named = max(len(cols), int(ground_truth_counts[q])) if ground_truth_counts is not None else len(cols)
        for k in ks:
            ap_sums[k] += float(precision[positions <= k].sum()) / min(k, named)
        if reference_cols[q] >= 0:
            valid[reference_cols[q]] = True
    return {k: 100.0 * ap_sums[k] / num_queries for k in ks}


def top_k_indices(
    scores,
    gallery_names: Sequence[Hashable],
    reference_names: Sequence[Hashable] | None,
    k: int,
) -> np.ndarray:
    """Gallery column indices of each query's top k, reference removed, for output
    (submissions): descending score, ties by gallery order. Shape (Q, min(k, G - 1))."""
    scores = _check_scores(scores, gallery_names)
    num_queries, num_gallery = scores.shape
    position = _gallery_positions(gallery_names)
    reference_cols = _reference_columns(reference_names, position, num_queries)
    width = min(k, num_gallery - int((reference_cols >= 0).any()))
    out = np.empty((num_queries, max(width, 0)), dtype=np.int64)
    for q in range(num_queries):
        order = np.argsort(-scores[q], kind="stable")
        if reference_cols[q] >= 0:
            order = order[order != reference_cols[q]]
        out[q] = order[:width]
    return out


# ---------------------------------------------------------------------------- helpers


def _tied_relevant_before(sorted_desc: np.ndarray) -> np.ndarray:
    """For scores sorted descending: how many earlier entries have the same score."""
    counts = np.zeros(len(sorted_desc), dtype=np.int64)
    for i in range(1, len(sorted_desc)):
        if sorted_desc[i] == sorted_desc[i - 1]:
            counts[i] = counts[i - 1] + 1
    return counts


def _check_scores(scores, gallery_names) -> np.ndarray:
    array = np.asarray(scores)
    if array.ndim != 2:
        raise ValueError(f"scores must be a (num_queries, num_gallery) matrix, got shape {array.shape}")
    if array.shape[1] != len(gallery_names):
        raise ValueError(
            f"scores has {array.shape[1]} gallery columns but {len(gallery_names)} gallery names were given"
        )
    if array.shape[0] == 0:
        raise ValueError("no queries: scores has 0 rows")
    if np.issubdtype(array.dtype, np.floating) and np.isnan(array).any():
        q = int(np.argwhere(np.isnan(array))[0, 0])
        raise ValueError(f"query {q}: scores contain NaN")
    return array


def _gallery_positions(gallery_names) -> dict:
    position = {}
    for col, name in enumerate(gallery_names):
        if name in position:
            raise ValueError(f"gallery name {name!r} appears twice (columns {position[name]} and {col})")
        position[name] = col
    return position


def _columns(names, position, num_queries, what) -> np.ndarray:
    if len(names) != num_queries:
        raise ValueError(f"{len(names)} {what} names for {num_queries} queries")
    cols = np.empty(num_queries, dtype=np.int64)
    for q, name in enumerate(names):
        col = position.get(name)
        if col is None:
            raise ValueError(f"query {q}: {what} {name!r} is not in the gallery")
        cols[q] = col
    return cols


def _reference_columns(reference_names, position, num_queries) -> np.ndarray:
    """Column of each query's reference image, or -1 where there is none to remove."""
    if reference_names is None:
        return np.full(num_queries, -1, dtype=np.int64)
    if len(reference_names) != num_queries:
        raise ValueError(f"{len(reference_names)} reference names for {num_queries} queries")
    return np.array([position.get(name, -1) for name in reference_names], dtype=np.int64)


def _check_ks(ks) -> list[int]:
    ks = [int(k) for k in ks]
    if not ks or any(k < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {ks}")
    return ks


def _percent(hits: np.ndarray) -> float:
    return 100.0 * float(np.mean(hits))
