"""Plots of hallucination scores (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

# (part of a score dict, key, label) for each group of bars.
PLOT_METRICS = (
    ("stage1", "object_rate", "stage 1\ninvented objects"),
    ("stage1", "attribute_rate", "stage 1\nwrong attributes"),
    ("stage2", "object_rate", "stage 2\ninvented objects"),
    ("stage2", "attribute_rate", "stage 2\nwrong attributes"),
    ("captions", "missed_rate", "captions\nmissed changes"),
    ("captions", "invented_rate", "captions\ninvented changes"),
)


def run_label(score: dict, settings: str = "") -> str:
    """'run 2 e0.15: gpt-4o (staged), detail high, 30 pairs': how many pairs a rate rests on
    belongs on a figure that may be published (3 pairs and 300 read alike otherwise), and so
    do `settings`, those in which the compared runs differ (scoring.differing_settings)."""
    name = f" {score['name']}" if score.get("name") else ""
    pairs = score.get("pairs_scored")
    count = f", {pairs} pair{'s' if pairs != 1 else ''}" if pairs is not None else ""
    said = f", {settings}" if settings else ""
    return f"run {score['run_id']}{name}: {score['model']} ({score['method']}){said}{count}"


def plot_scores(scores: list[dict], path: str | Path, title: Optional[str] = None) -> Path:
    """Write draw_scores' figure to a PNG."""
    import matplotlib.pyplot as plt

    path = Path(path)
    fig = draw_scores(scores, title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def draw_scores(scores: list[dict], title: Optional[str] = None):
    """Grouped bars, one colour per run, of the hallucination rates from score_run.

    A rate a run does not have (stage 1/2 of a single-stage run) is left out, not drawn as 0.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not scores:
        raise ValueError("no runs to plot")
    from .scoring import differing_settings

    differing = differing_settings(scores)
    width = 0.8 / len(scores)
    # The legend goes under the axes ('outside' needs the constrained layout): inside, it
    # covered the bars of a run whose rates reach its corner.
    fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(PLOT_METRICS)), 4.8 + 0.2 * ((len(scores) + 1) // 2)),
                           layout="constrained")
    for i, score in enumerate(scores):
        xs, heights = [], []
        for m, (part, key, _) in enumerate(PLOT_METRICS):
            value = (score.get(part) or {}).get(key)
            if value is not None:
                xs.append(m - 0.4 + width * (i + 0.5))
                heights.append(100 * value)
        bars = ax.bar(xs, heights, width=width * 0.95, label=run_label(score, differing.get(score["run_id"], "")))
        ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=1)
    ax.set_xticks(range(len(PLOT_METRICS)), [label for _, _, label in PLOT_METRICS], fontsize=8)
    ax.set_ylabel("% of items (lower is better)")
    ax.set_title(title or "Hallucinations against the demo world's ground truth")
    fig.legend(fontsize=8, loc="outside lower center", ncols=min(2, len(scores)))
    ax.grid(axis="y", alpha=0.3)
    return fig
