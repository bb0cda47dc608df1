"""Symmetric InfoNCE with in-batch negatives (query -> target and target -> query)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

TEMPERATURE = 0.07


def info_nce(queries: torch.Tensor, targets: torch.Tensor, temperature: float = TEMPERATURE,
             target_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of the two cross-entropies over a (B, B) cosine-similarity matrix / temperature.

    queries, targets: (B, D), L2-normalised, row i of each forming the positive pair.
    target_ids: optional (B,) ids of the target images; where two rows share a target,
    the other row's target is not counted as a negative (it is the same image).
    """
    if queries.shape != targets.shape:
        raise ValueError(f"queries {tuple(queries.shape)} and targets {tuple(targets.shape)} differ")
    logits = queries @ targets.T / temperature
    if target_ids is not None:
        same = target_ids.view(-1, 1) == target_ids.view(1, -1)
        same.fill_diagonal_(False)
        logits = logits.masked_fill(same, float("-inf"))
    labels = torch.arange(len(queries), device=queries.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
