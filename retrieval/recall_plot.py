"""Recall@K curves of one evaluation: the model against its baselines, and per subset.

Four numbers per method (R@1/5/10/50) hide where the methods part; a curve over every K
shows it: the demo world's baselines catch up with the model by K=50, while the held-out
subsets trail the seen pairs at K=1 only. `good4cir eval --plot FILE` writes it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from . import metrics

MAX_K = 50


def recall_curve(scores: np.ndarray, gallery_keys: Sequence[str], reference_keys: Sequence[str],
                 target_keys: Sequence[str], max_k: int = MAX_K) -> list[float]:
    """Recall@K in percent for K = 1..max_k, the reference removed from the ranking."""
    if not len(target_keys):
        return []
    ranks = metrics.target_ranks(scores, gallery_keys, reference_keys, target_keys)
    ks = np.arange(1, max_k + 1)
    return [round(float(v), 2) for v in (ranks[None, :] <= ks[:, None]).mean(axis=1) * 100.0]


def subset_curve(scores: np.ndarray, gallery_keys: Sequence[str], reference_keys: Sequence[str],
                 target_keys: Sequence[str], img_sets: Sequence[Optional[Sequence[str]]]) -> list[float]:
    """Recall_subset@K in percent for K = 1..(largest set minus the reference); [] without sets."""
    rows = [i for i, members in enumerate(img_sets) if members]
    if not rows:
        return []
    ranks = metrics.subset_ranks(scores[rows], gallery_keys, [reference_keys[i] for i in rows],
                                 [target_keys[i] for i in rows], [img_sets[i] for i in rows])
    ks = np.arange(1, int(ranks.max()) + 1)
    return [round(float(v), 2) for v in (ranks[None, :] <= ks[:, None]).mean(axis=1) * 100.0]


def write_recall_plot(path: str | Path, curves: dict[str, Any], title: str = "") -> Path:
    """Write draw_recall_plot's figure to a PNG."""
    import matplotlib.pyplot as plt

    fig = draw_recall_plot(curves, title)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def draw_recall_plot(curves: dict[str, Any], title: str = ""):
    """Draw `curves` ({"recall": {name: [...]}, "subsets": {name: [...]},
    "recall_subset": {name: [...]}, "subsets_overlap": queries in several subsets}):
    Recall@K by method, Recall@K of the model by subset, and Recall_subset@K by method
    where the data has image sets."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("recall", "Recall@K by method", "K"), ("subsets", "Recall@K of the model by subset", "K"),
              ("recall_subset", "Recall_subset@K (within the image set)", "K")]
    panels = [p for p in panels if any(curves.get(p[0], {}).values())]
    if not panels:
        raise ValueError("nothing to plot: no query has a rankable target")
    # Each panel's legend goes under it, in a row of its own: inside (lower right) it covered
    # the text baseline's curve, which runs along the bottom. One row keeps the panels level.
    entries = max(len(curves[key]) for key, _, _ in panels)
    legend_height = 0.2 + 0.17 * entries
    fig, grid = plt.subplots(2, len(panels), figsize=(5.2 * len(panels), 4.0 + legend_height), squeeze=False,
                             height_ratios=[3.6, legend_height], layout="constrained")
    for ax, legend_ax, (key, heading, xlabel) in zip(grid[0], grid[1], panels):
        for name, values in curves[key].items():
            if not values:
                continue
            ks = np.arange(1, len(values) + 1)
            style = {"linewidth": 2.4} if name.startswith("model") else {"linewidth": 1.4}
            ax.plot(ks, values, marker="o" if len(values) <= 10 else None, markersize=4,
                    label=f"{name} (@1 {values[0]:.1f})", **style)
        if key != "recall_subset":
            ax.set_xscale("log")
            ticks = [k for k in (1, 2, 5, 10, 20, 50) if k <= MAX_K]
            ax.set_xticks(ticks, [str(k) for k in ticks])
        else:
            longest = max(len(v) for v in curves[key].values())
            ax.set_xticks(range(1, longest + 1))
        ax.set_ylim(0, 100)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("percent")
        overlap = curves.get("subsets_overlap") if key == "subsets" else 0
        if overlap:
            heading += (f"\n({overlap} quer{'y is' if overlap == 1 else 'ies are'} in more than one subset, "
                        "counted in each)")
        ax.set_title(heading, fontsize=10)
        ax.grid(alpha=0.3)
        legend_ax.set_axis_off()
        legend_ax.legend(*ax.get_legend_handles_labels(), loc="upper center", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    return fig
