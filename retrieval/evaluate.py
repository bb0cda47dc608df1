"""Evaluation on a split, the CIRR way, with the baselines from the same encoders.

Gallery: every image of the split (references, targets and every image-set member), so
each query meets its near-duplicate hard negatives. Queries: one per (pair, caption).
Recall@{1,5,10,50} with the reference removed, Recall_subset@{1,2,3} within the pair's
image set, median rank, CIRCO mAP where pairs have several ground truths. Baselines:
reference image only, text only, and the normalised sum of the two embeddings.
Queries tagged by the data (the demo world's held-out phrasings and kind x attribute
combinations) are also reported on their own.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import metrics
from .data import Triplet
from .submission import circo_query_text

log = logging.getLogger(__name__)

RECALL_KS = (1, 5, 10, 50)
SUBSET_KS = (1, 2, 3)
MAP_KS = (5, 10, 25, 50)


@dataclass
class Queries:
    pair_ids: list[str] = field(default_factory=list)
    reference_keys: list[str] = field(default_factory=list)
    target_keys: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    img_sets: list[Optional[list[str]]] = field(default_factory=list)
    ground_truths: list[list[str]] = field(default_factory=list)
    tags: list[set[str]] = field(default_factory=list)
    # Per query, how many ground truths the dataset names (mAP's n_gt), those without an
    # image in the gallery too; empty: just those in `ground_truths`.
    ground_truth_counts: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, rows: Sequence[int]) -> "Queries":
        out = Queries()
        for name in ("pair_ids", "reference_keys", "target_keys", "texts", "img_sets",
                     "ground_truths", "tags", "ground_truth_counts"):
            values = getattr(self, name)
            if not values and name == "ground_truth_counts":
                continue
            setattr(out, name, [values[i] for i in rows])
        return out


def caption_tags(triplet: Triplet, caption_index: int) -> set[str]:
    """Subsets a query belongs to, from the pair's `extra["heldout"]`: the demo world
    marks test pairs whose captions use phrasings never seen in training ("phrasing")
    and whose edits hold a kind x attribute combination never seen in training ("combo")."""
    heldout = (triplet.extra or {}).get("heldout") or []
    # A phrasing is a mark of the dataset's own captions; a generated one has the VLM's.
    kinds = triplet.caption_kinds or []
    own = caption_index >= len(kinds) or kinds[caption_index] == "original"
    tags: set[str] = set()
    if isinstance(heldout, (list, tuple)):  # the demo world: ["phrasing", "combo"] per pair
        tags.update(f"heldout_{name}" for name in heldout if name != "phrasing" or own)
    elif isinstance(heldout, dict):  # per-caption marks: {"phrasing_captions": [indexes]}
        if own and caption_index in (heldout.get("phrasing_captions") or []):
            tags.add("heldout_phrasing")
        if heldout.get("combo"):
            tags.add("heldout_combo")
    return tags


def build_queries(triplets: Sequence[Triplet], all_captions: bool = True,
                  max_queries: Optional[int] = None) -> Queries:
    queries = Queries()
    for t in triplets:
        indexes = range(len(t.captions)) if all_captions else range(min(1, len(t.captions)))
        for i in indexes:
            queries.pair_ids.append(t.pair_id)
            queries.reference_keys.append(t.reference)
            queries.target_keys.append(t.target)
            extra = t.extra or {}
            # CIRCO: the query text joins the shared concept with the caption, as for
            # the test server; several ground truths, kept as store image ids.
            concept = extra.get("shared_concept")
            queries.texts.append(circo_query_text(concept, t.captions[i]) if concept else t.captions[i])
            queries.img_sets.append(t.img_set)
            gts = extra.get("gt_image_ids")
            queries.ground_truths.append(list(dict.fromkeys([t.target, *gts])) if gts else [t.target])
            queries.ground_truth_counts.append(max(len(queries.ground_truths[-1]), t.ground_truths_named))
            queries.tags.append(caption_tags(t, i))
    if max_queries is not None and len(queries) > max_queries:
        rows = np.linspace(0, len(queries) - 1, max_queries).round().astype(int)
        queries = queries.subset(sorted(set(rows.tolist())))
    return queries


@torch.no_grad()
def embed(model, pixels: torch.Tensor, row_of: dict[str, int], gallery_keys: Sequence[str],
          queries: Queries, batch_size: int = 128, baselines: bool = True) -> dict[str, np.ndarray]:
    """Gallery and query embeddings (and the baselines' queries) as float32 arrays."""
    model.eval()
    encoder = model.encoder

    def images(keys):
        rows = torch.tensor([row_of[k] for k in keys], dtype=torch.long)
        return model.normalize_pixels(pixels[rows])

    gallery = [model.target_embedding(images(gallery_keys[s:s + batch_size]))
               for s in range(0, len(gallery_keys), batch_size)]
    out: dict[str, list[torch.Tensor]] = {"query": [], "image": [], "text": [], "sum": []}
    for s in range(0, len(queries), batch_size):
        image_tokens = encoder.encode_image_tokens(images(queries.reference_keys[s:s + batch_size]))
        text_tokens = encoder.encode_text_ids(encoder.tokenize(queries.texts[s:s + batch_size]))
        out["query"].append(model.query_from_features(image_tokens, text_tokens))
        if baselines:
            image_emb = F.normalize(image_tokens.pooled, dim=-1)
            text_emb = F.normalize(text_tokens.pooled, dim=-1)
            out["image"].append(image_emb)
            out["text"].append(text_emb)
            out["sum"].append(F.normalize(image_emb + text_emb, dim=-1))
    result = {"gallery": _stack(gallery)}
    result.update({name: _stack(parts) for name, parts in out.items() if parts})
    return result


def _stack(parts: list[torch.Tensor]) -> np.ndarray:
    if not parts:
        return np.zeros((0, 1), dtype=np.float32)
    return torch.cat(parts).float().cpu().numpy()


def score(query_emb: np.ndarray, gallery_emb: np.ndarray, gallery_keys: Sequence[str],
          queries: Queries) -> dict[str, Any]:
    """The metrics of one set of query embeddings, in the `eval --json` shape."""
    return score_matrix(query_emb @ gallery_emb.T, gallery_keys, queries)


def score_matrix(scores: np.ndarray, gallery_keys: Sequence[str], queries: Queries) -> dict[str, Any]:
    """The metrics of a (queries, gallery) score matrix, in the `eval --json` shape."""
    result: dict[str, Any] = {
        "queries": len(queries),
        "recall": _str_keys(metrics.recall_at_k(
            scores, gallery_keys, queries.reference_keys, queries.target_keys, RECALL_KS)),
        "median_rank": metrics.median_rank(
            scores, gallery_keys, queries.reference_keys, queries.target_keys),
    }
    with_set = [i for i, members in enumerate(queries.img_sets) if members]
    if with_set:
        result["recall_subset"] = _str_keys(metrics.recall_subset_at_k(
            scores[with_set], gallery_keys, [queries.reference_keys[i] for i in with_set],
            [queries.target_keys[i] for i in with_set], [queries.img_sets[i] for i in with_set],
            SUBSET_KS))
    counts = queries.ground_truth_counts or [len(g) for g in queries.ground_truths]
    if any(n > 1 for n in counts):
        result["map"] = _str_keys(metrics.map_at_k(
            scores, gallery_keys, queries.reference_keys, queries.ground_truths, MAP_KS,
            ground_truth_counts=counts))
    return result


def missing_ground_truths_note(queries: Queries) -> Optional[str]:
    """The `eval` note for ground truths the dataset names that have no image in the
    gallery (missing at import, or unreadable now), or None: mAP counts them, unfound."""
    missing = [n - len(g) for g, n in zip(queries.ground_truths, queries.ground_truth_counts)]
    total, hit = sum(missing), sum(1 for m in missing if m > 0)
    if not total:
        return None
    return (f"{total} ground truth{'' if total == 1 else 's'} of {hit} quer{'y' if hit == 1 else 'ies'} "
            "named by the dataset have no image here (missing or unreadable): mAP counts them as never "
            "retrieved, as CIRCO's official mAP does; restore their files to score them")


def bootstrap_groups(queries: Queries) -> list:
    """What `intervals` resamples whole: a query's pair, as its reference and target images.
    Not the pair id: in a mix, two datasets name different pairs alike (two demo worlds),
    or hold one pair twice (CIRR and CIRRR: one dataset, its own and generated captions)."""
    return list(zip(queries.reference_keys, queries.target_keys))


def intervals(scores: np.ndarray, gallery_keys: Sequence[str], queries: Queries,
              level: float = 0.95) -> dict[str, Any]:
    """Bootstrap intervals (`metrics.bootstrap_interval`, pairs resampled) of each recall
    and recall_subset, in the `eval --json` shape: {"recall": {"1": [low, high], ...}}.

    Runs of one configuration differ by a few points on a small test split; an interval
    says whether a difference between two runs is more than the split's own noise."""
    groups = bootstrap_groups(queries)
    ranks = metrics.target_ranks(scores, gallery_keys, queries.reference_keys, queries.target_keys)
    out: dict[str, Any] = {"level": level, "recall": {
        str(k): [round(v, 2) for v in metrics.bootstrap_interval(ranks <= k, groups, level)]
        for k in RECALL_KS}}
    with_set = [i for i, members in enumerate(queries.img_sets) if members]
    if with_set:
        ranks = metrics.subset_ranks(
            scores[with_set], gallery_keys, [queries.reference_keys[i] for i in with_set],
            [queries.target_keys[i] for i in with_set], [queries.img_sets[i] for i in with_set])
        out["recall_subset"] = {
            str(k): [round(v, 2) for v in metrics.bootstrap_interval(
                ranks <= k, [groups[i] for i in with_set], level)]
            for k in SUBSET_KS}
    return out


def _str_keys(values: dict) -> dict[str, float]:
    return {str(k): round(float(v), 2) for k, v in values.items()}


def evaluate_embeddings(emb: dict[str, np.ndarray], gallery_keys: Sequence[str],
                        queries: Queries, model_scores: Optional[np.ndarray] = None) -> dict[str, Any]:
    """Model metrics, baselines, and the same per tagged subset (held-out, seen).

    `model_scores` replaces the model's query x gallery scores (the re-ranked ones)."""
    if model_scores is None:
        model_scores = emb["query"] @ emb["gallery"].T
    result = score_matrix(model_scores, gallery_keys, queries)
    result["interval"] = intervals(model_scores, gallery_keys, queries)
    baselines = {name: score(emb[name], emb["gallery"], gallery_keys, queries)
                 for name in ("image", "text", "sum") if name in emb}
    for values in baselines.values():
        values.pop("queries", None)
    result["baselines"] = baselines
    subsets: dict[str, Any] = {}
    for name, rows in subset_rows(queries).items():
        if rows:
            sub = queries.subset(rows)
            entry = score_matrix(model_scores[rows], gallery_keys, sub)
            entry["interval"] = intervals(model_scores[rows], gallery_keys, sub)
            entry["baselines"] = {
                b: {k: v for k, v in score(emb[b][rows], emb["gallery"], gallery_keys, sub).items()
                    if k != "queries"}
                for b in ("image", "text", "sum") if b in emb
            }
            subsets[name] = entry
    if subsets:
        result["subsets"] = subsets
    return result


def subset_rows(queries: Queries) -> dict[str, list[int]]:
    """Query rows of each tagged subset (held-out phrasings, combinations) and of the
    untagged rest ("seen"); empty where the data tags nothing."""
    tags = sorted({tag for t in queries.tags for tag in t})
    if not tags:
        return {}
    groups = {tag: [i for i, t in enumerate(queries.tags) if tag in t] for tag in tags}
    groups["seen"] = [i for i, t in enumerate(queries.tags) if not t]
    return groups


def recall_curves(emb: dict[str, np.ndarray], model_scores: np.ndarray, first: Optional[np.ndarray],
                  gallery_keys: Sequence[str], queries: Queries) -> dict[str, Any]:
    """The curves `recall_plot.write_recall_plot` draws, from the scores `evaluate_checkpoint` has."""
    from .recall_plot import recall_curve, subset_curve

    named = {"model": model_scores}
    if first is not None:
        named["fusion model alone"] = first
    named.update({f"{b} baseline": emb[b] @ emb["gallery"].T for b in ("image", "text", "sum") if b in emb})
    refs, targets = queries.reference_keys, queries.target_keys
    curves: dict[str, Any] = {
        "recall": {name: recall_curve(s, gallery_keys, refs, targets) for name, s in named.items()},
        "recall_subset": {name: subset_curve(s, gallery_keys, refs, targets, queries.img_sets)
                          for name, s in named.items()},
        "subsets": {},
    }
    for name, rows in subset_rows(queries).items():
        if rows:
            curves["subsets"][f"{name} ({len(rows)} queries)"] = recall_curve(
                model_scores[rows], gallery_keys, [refs[i] for i in rows], [targets[i] for i in rows])
    # A query held out in two ways is in both subsets: their counts add up to more than the queries
    curves["subsets_overlap"] = sum(1 for t in queries.tags if len(t) > 1)
    return curves


def fill_absent_measures(result: dict[str, Any], queries: Queries, split: str) -> list[str]:
    """Give every block of an `eval --json` result (the model, first_stage, baselines,
    subsets, intervals) a `recall_subset` key, null where none of its queries has an
    image set to rank within, and return notes that say why: scripts index the
    documented keys, and an absent measure must be neither a KeyError nor a number."""
    blocks = [result, result.get("first_stage"), *(result.get("baselines") or {}).values()]
    for entry in (result.get("subsets") or {}).values():
        blocks += [entry, *(entry.get("baselines") or {}).values()]
    blocks += [block.get("interval") for block in list(blocks) if block]
    for block in blocks:
        if block is not None:
            block.setdefault("recall_subset", None)
    with_set = sum(1 for members in queries.img_sets if members)
    if not with_set:
        return [f"recall_subset is null: no pair of split {split} has an image set (CIRR's img_set, "
                "the demo world's near-duplicates) to rank its target within"]
    if with_set < len(queries):
        return [f"recall_subset covers the {with_set} of {len(queries)} queries whose pair has an "
                "image set"]
    return []


# Below these a split's recalls say little: with a handful of queries one query moves
# R@1 by whole tens of points, and a gallery of at most max(RECALL_KS) + 1 images (the
# reference is left out of the ranking) puts every candidate in the top 50.
MIN_QUERIES = 20


def small_split_warning(queries: int, gallery: int) -> Optional[str]:
    """The `eval` warning for a split too small to measure anything, or None."""
    top_k = max(RECALL_KS)
    small_gallery = gallery - 1 <= top_k
    gallery_says = (f"a gallery of {gallery} images leaves at most {max(gallery - 1, 0)} candidates "
                    f"per query once its reference is left out, so Recall@{top_k} is 100 whatever "
                    "the model")
    if queries < MIN_QUERIES:
        return (f"only {queries} quer{'y' if queries == 1 else 'ies'} (fewer than {MIN_QUERIES}: "
                f"one query moves Recall@K by {100 / max(queries, 1):.0f} points)"
                + (f", and {gallery_says}" if small_gallery else "")
                + ": these numbers are not meaningful; evaluate on a split with more pairs")
    if small_gallery:
        return (f"{gallery_says}: the recalls at large K are not meaningful; evaluate on a split "
                "with a bigger gallery")
    return None


def metrics_without_targets(queries: int, split: str, with_map: bool) -> tuple[dict[str, Any], list[str]]:
    """The `eval --json` measures of a split that withholds every target (CIRR test1,
    CIRCO test), for `eval --submission`: each documented key present and null (`map`
    too where the data is CIRCO's), and the note that says why. As with
    `fill_absent_measures`, a script indexing them gets neither a KeyError nor a number."""
    measures = ["recall", "recall_subset", "median_rank"] + (["map"] if with_map else [])
    metrics: dict[str, Any] = {"queries": 0, **{key: None for key in measures},
                               "interval": None, "baselines": None}
    return metrics, [f"{', '.join(measures)}, interval and baselines are null: split {split} withholds "
                     f"the target of all its {queries} queries (the test server scores them)"]


def drop_unreadable_members(triplets: Sequence[Triplet], row_of: dict[str, int]) -> list[Triplet]:
    """The triplets with image-set members and extra ground truths that could not be
    decoded (not in `row_of`) left out of them, so that one corrupt near-duplicate costs
    its own place in the gallery, not the whole evaluation (recall_subset would find a
    member missing from the gallery). The reference and target are the caller's to check."""
    out = []
    for t in triplets:
        extra = t.extra or {}
        truths = extra.get("gt_image_ids")
        # The reference is out of every ranking, so it cannot be a ground truth either.
        if truths and any(k not in row_of or k == t.reference for k in truths):
            extra = {**extra, "gt_image_ids": [k for k in truths if k in row_of and k != t.reference]}
        img_set = t.img_set
        if img_set and any(k not in row_of for k in img_set):
            img_set = [k for k in img_set if k in row_of] or None
        out.append(t if (img_set is t.img_set and extra is t.extra) else
                   replace(t, img_set=img_set, extra=extra))
    return out


def rankable_triplets(triplets: Sequence[Triplet], row_of: dict[str, int]) -> list[Triplet]:
    """The triplets a CIRR-style ranking can score: reference and target decoded, the
    target not the reference image itself (a pair naming one file twice, or two identical
    files: the protocol removes the reference, so its target could never be found; left
    out with a warning naming the pair), members per `drop_unreadable_members`."""
    kept = []
    for t in triplets:
        if t.reference not in row_of or t.target not in row_of:
            continue
        if t.target == t.reference:
            log.warning("pair %s left out of the ranking: its target is its reference image", t.pair_id)
            continue
        kept.append(t)
    return drop_unreadable_members(kept, row_of)


def load_split_pixels(model, data, split: str, cache_dir: Optional[str | Path] = None,
                      progress: bool = True, gallery_dirs: Sequence[str | Path] = ()):
    """One split's triplets and gallery, pixels decoded through the pixel cache at the
    model's preprocessing: (triplets, gallery_keys, pixels, row_of, failures). Images
    that fail to decode leave the gallery, and triplets that need them are left out.
    Every image of each folder of `gallery_dirs` joins the gallery (CIRCO's protocol
    ranks against all of COCO 2017 unlabeled, of which a store holds only its pairs')."""
    from .features import PixelCache, default_cache_dir
    from .model import split_preprocess
    from .submit import add_gallery_folder

    triplets = data.split(split)
    if not triplets:
        withheld = sum(problem.endswith(f"(split {split} withholds it)") for problem in data.problems)
        if withheld:  # CIRR test1, CIRCO test: only the test server knows the targets
            raise ValueError(f"split {split!r} withholds its targets ({withheld} pairs), so it cannot be "
                             "scored here: rank it for the test server with --submission DIR")
        found = sorted({str(t.split) for t in data.triplets if t.split is not None})
        if data.triplets and not found:
            raise ValueError(f"no pairs in split {split!r}: the data names no split (the authors' dataset.json "
                             "has none); evaluate on its store (--db), or on a JSONL export (good4cir export "
                             "--format jsonl), which keeps each pair's split")
        raise ValueError(f"no pairs in split {split!r} (splits present: {', '.join(found) or 'none'})")
    pil_transform, _, _ = split_preprocess(model.encoder.preprocess)
    cache = PixelCache(Path(cache_dir) if cache_dir else default_cache_dir(), pil_transform)
    gallery_keys = data.gallery_keys(triplets)
    for folder in gallery_dirs:
        gallery_keys += add_gallery_folder(data, folder, set(gallery_keys), progress)
    pixels, row_of, failures = cache.load({k: data.image_paths[k] for k in gallery_keys}, progress)
    for reason in failures.values():
        log.warning("image left out: %s", reason)
    gallery_keys = [k for k in gallery_keys if k in row_of]
    rankable = rankable_triplets(triplets, row_of)
    if not rankable:
        raise ValueError(f"none of the {len(triplets)} pairs of split {split!r} can be scored: "
                         f"{len(failures)} of its {len(failures) + len(gallery_keys)} images could not be "
                         f"read (first: {next(iter(failures.values()), 'none')})")
    return rankable, gallery_keys, pixels, row_of, failures


def evaluate_checkpoint(
    checkpoint_dir: str | Path,
    dbs: Sequence[str | Path] = (),
    files: Sequence[str | Path] = (),
    split: str = "test",
    source: str = "auto",
    captions: str = "both",
    include_unreviewed: bool = False,
    cache_dir: Optional[str | Path] = None,
    which: str = "best",
    progress: bool = True,
    rerank: bool = True,
    gallery_dirs: Sequence[str | Path] = (),
    plot: Optional[str | Path] = None,
    device: Optional[str] = None,
) -> dict[str, Any]:
    """`good4cir eval`: the trained model and the three baselines on one split.

    Where the checkpoint has a pair scorer (and `rerank`), the model's scores are the
    re-ranked ones and `first_stage` holds the fusion model's alone. With `plot`, the
    Recall@K curves of all of them go to that PNG (`recall_plot`)."""
    from .data import load_triplets
    from .model import load_model
    from .rerank import load_pair_scorer, rerank_matrix

    model, info = load_model(checkpoint_dir, which=which, device=device)
    data = load_triplets(dbs, files, source=source, captions=captions,
                         include_unreviewed=include_unreviewed)
    triplets, gallery_keys, pixels, row_of, failures = load_split_pixels(
        model, data, split, cache_dir, progress, gallery_dirs)
    queries = build_queries(triplets)
    emb = embed(model, pixels, row_of, gallery_keys, queries)
    second = load_pair_scorer(checkpoint_dir, model.encoder) if rerank else None
    first = emb["query"] @ emb["gallery"].T
    final = first
    if second is None:
        result = evaluate_embeddings(emb, gallery_keys, queries)
    else:
        scorer, rerank_info = second
        final = rerank_matrix(scorer, first, queries.reference_keys, queries.texts, gallery_keys, pixels, row_of,
                              top_k=int(rerank_info["top_k"]), progress=progress)
        result = evaluate_embeddings(emb, gallery_keys, queries, model_scores=final)
        result["first_stage"] = score_matrix(first, gallery_keys, queries)
        result["rerank"] = {"top_k": rerank_info["top_k"], "epoch": rerank_info.get("epoch"),
                            "val": rerank_info.get("val")}
    result.update({
        "split": split, "gallery": len(gallery_keys), "pairs": len(triplets),
        "model": {k: info.get(k) for k in ("model", "fusion", "weights", "epoch", "val")},
    })
    if failures:
        result["images_failed"] = len(failures)
    if plot is not None:
        from .recall_plot import write_recall_plot

        curves = recall_curves(emb, final, first if second is not None else None, gallery_keys, queries)
        name = result["model"].get("model") or "model"
        result["plot"] = str(write_recall_plot(plot, curves, title=f"{name}, split {split}: "
                                               f"{len(queries)} queries, gallery of {len(gallery_keys)}"))
    if not gallery_dirs and any("shared_concept" in (t.extra or {}) for t in triplets):
        result["notes"] = [
            f"the gallery is the {len(gallery_keys)} images the data holds for split {split}; CIRCO "
            "ranks against all of COCO 2017 unlabeled (about 120k images), so these numbers are far "
            "above the official ones: pass --gallery-images unlabeled2017/"]
    absent = fill_absent_measures(result, queries, split)
    if absent:
        result.setdefault("notes", []).extend(absent)
    missing = missing_ground_truths_note(queries)
    if missing:
        result.setdefault("notes", []).append(missing)
    # Every caption of a pair is a query (build_queries), in the pair's order of kinds.
    kinds = Counter(kind for t in triplets for kind in t.caption_kinds)
    result["query_captions"] = dict(kinds)
    generated = kinds["individual"] + kinds["compound"]
    if source == "auto" and generated:
        # Benchmarks score the dataset's own captions; auto prefers a pair's approved
        # generated ones, so two models compared on it were silently not on the benchmark.
        result.setdefault("notes", []).append(
            f"{generated} of the {len(queries)} queries are generated captions (--source auto takes a "
            "pair's approved generated captions before its own); to score the dataset's own captions, "
            "as its benchmark does, pass --source original")
    warning = small_split_warning(len(queries), len(gallery_keys))
    if warning:
        result["warning"] = warning
    return result

