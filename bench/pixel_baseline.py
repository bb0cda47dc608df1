"""A trained checkpoint against raw-pixel similarity to the reference, on one split.

The pixel baseline ranks the gallery by the squared L2 distance between the reference's
pixels and each gallery image's, at the model's input resolution: no learning, no text.
On the demo world every query's image set holds near-duplicates of its target, so the
image closest to the reference is often the target itself; a model that composes the
text with the image should beat this by a wide margin. The ratio printed is the model's
R@1 (and Rsubset@1), re-ranked where the checkpoint has a re-ranker, over the pixel
baseline's, both measured in this run.

    .venv/bin/python bench/pixel_baseline.py --db demo/good4cir.db --checkpoint demo/model \
        [--split test] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retrieval.data import load_triplets  # noqa: E402
from retrieval.evaluate import (build_queries, embed, evaluate_embeddings,  # noqa: E402
                                 load_split_pixels, score_matrix)
from retrieval.model import load_model  # noqa: E402
from retrieval.rerank import load_pair_scorer, rerank_matrix  # noqa: E402


def pixel_vectors(pixels, row_of: dict[str, int], keys: Sequence[str]) -> np.ndarray:
    rows = [row_of[k] for k in keys]
    return pixels[rows].reshape(len(rows), -1).float().div(255.0).numpy()


def pixel_scores(query_vectors: np.ndarray, gallery_vectors: np.ndarray) -> np.ndarray:
    """Negative squared L2 distance, (queries, gallery): higher is closer."""
    q2 = (query_vectors ** 2).sum(1, keepdims=True)
    g2 = (gallery_vectors ** 2).sum(1)
    return -(q2 - 2.0 * query_vectors @ gallery_vectors.T + g2[None, :])


def compare(checkpoint: str, dbs: Sequence[str], split: str, cache_dir: str | None) -> dict[str, Any]:
    model, _info = load_model(checkpoint)
    data = load_triplets(dbs, [], source="original")
    triplets, gallery, pixels, row_of, _failures = load_split_pixels(model, data, split, cache_dir, False)
    queries = build_queries(triplets)

    emb = embed(model, pixels, row_of, gallery, queries)
    first = emb["query"] @ emb["gallery"].T
    second = load_pair_scorer(checkpoint, model.encoder)
    final = first
    if second is not None:  # the model as `good4cir eval` scores it: re-ranked
        scorer, info = second
        final = rerank_matrix(scorer, first, queries.reference_keys, queries.texts, gallery, pixels, row_of,
                              top_k=int(info["top_k"]))
    learned = evaluate_embeddings(emb, gallery, queries, model_scores=final)

    gallery_vectors = pixel_vectors(pixels, row_of, gallery)
    index_of = {k: i for i, k in enumerate(gallery)}
    query_vectors = gallery_vectors[[index_of[k] for k in queries.reference_keys]]
    pixels_only = score_matrix(pixel_scores(query_vectors, gallery_vectors), gallery, queries)
    keep = ("recall", "recall_subset")
    result = {
        "split": split, "queries": len(queries), "gallery": len(gallery),
        "model": {k: learned[k] for k in keep if k in learned},
        "image_baseline": {k: learned["baselines"]["image"][k]
                           for k in keep if k in learned["baselines"]["image"]},
        "pixels": {k: pixels_only[k] for k in keep if k in pixels_only},
    }
    if second is not None:
        alone = score_matrix(first, gallery, queries)
        result["fusion_alone"] = {k: alone[k] for k in keep if k in alone}
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", action="append", required=True)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--split", default="test")
    parser.add_argument("--cache-dir")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = compare(args.checkpoint, args.db, args.split, args.cache_dir)
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(f"{args.split}: {result['queries']} queries, gallery of {result['gallery']} images")
    for name, label in (("model", "trained model"), ("fusion_alone", "its fusion model alone"),
                        ("image_baseline", "its image-only baseline"), ("pixels", "raw pixels, image only")):
        if name not in result:
            continue
        r, s = result[name]["recall"], result[name].get("recall_subset", {})
        print(f"  {label:26s} R@1 {r['1']:5.1f}  R@5 {r['5']:5.1f}  R@10 {r['10']:5.1f}"
              f"  Rsubset@1 {s.get('1', float('nan')):5.1f}")
    for key, label in (("recall", "R@1"), ("recall_subset", "Rsubset@1")):
        base = result["pixels"].get(key, {}).get("1")
        mine = result["model"].get(key, {}).get("1")
        if base and mine is not None:
            print(f"  model / pixels, {label}: {mine / base:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
