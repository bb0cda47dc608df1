"""Symmetric InfoNCE with in-batch negatives (query -> target and target -> query)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

TEMPERATURE = 0.07


def info_nce(queries: torch.Tensor, targets: torch.Tensor, temperature: float = TEMPERATURE,
             target_ids: Optional[torch.Tensor] = None,
             extra_negatives: Optional[torch.Tensor] = None,
             extra_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean of the two cross-entropies over a (B, B) cosine-similarity matrix / temperature.

    queries, targets: (B, D), L2-normalised, row i of each forming the positive pair.
    target_ids: optional (B,) image ids of the targets; where two rows share a target,
    the other row's copy is not counted as a negative (it is the same image).
    extra_negatives: optional (M, D) more candidate images for the query -> target
    direction (training passes the batch's reference images: the hardest negatives,
    since a query that ignores its text lands on its own reference); extra_ids (M,)
    masks any of them that is a query's own target.
    """
    if queries.shape != targets.shape:
        raise ValueError(f"queries {tuple(queries.shape)} and targets {tuple(targets.shape)} differ")
    logits = queries @ targets.T / temperature
    # Row ids index the CPU pixel cache; the embeddings may be on a GPU.
    if target_ids is not None:
        target_ids = target_ids.to(queries.device)
    if extra_ids is not None:
        extra_ids = extra_ids.to(queries.device)
    if target_ids is not None:
        same = target_ids.view(-1, 1) == target_ids.view(1, -1)
        same.fill_diagonal_(False)
        logits = logits.masked_fill(same, float("-inf"))
    labels = torch.arange(len(queries), device=queries.device)
    text_to_image = logits
    if extra_negatives is not None:
        extra = queries @ extra_negatives.T / temperature
        if extra_ids is not None and target_ids is not None:
            extra = extra.masked_fill(target_ids.view(-1, 1) == extra_ids.view(1, -1), float("-inf"))
        text_to_image = torch.cat([logits, extra], dim=1)
    return 0.5 * (F.cross_entropy(text_to_image, labels) + F.cross_entropy(logits.T, labels))
