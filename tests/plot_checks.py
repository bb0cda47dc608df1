"""What a reader sees on a figure, read from its artists after a draw: which data a legend
hides. Shared by the tests of every plot we write (score --plot, the Stats tab, eval --plot)."""

from __future__ import annotations

import numpy as np


def _legends(fig) -> list:
    found = list(getattr(fig, "legends", []))
    for sub in getattr(fig, "subfigs", []):
        found += _legends(sub)
    found += [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    return found


def hidden_by_legends(fig) -> list[str]:
    """Labels of the bars and lines (points along them, 20 per segment) that lie under a legend.

    An empty list: every legend sits where no data is drawn."""
    if hasattr(fig, "draw_without_rendering"):
        fig.draw_without_rendering()
    boxes = [legend.get_window_extent() for legend in _legends(fig)]
    hidden = []
    for ax in fig.axes:
        label_of = {id(p): c.get_label() for c in ax.containers for p in getattr(c, "patches", ())}
        for patch in ax.patches:
            extent = patch.get_window_extent()
            if extent.width > 0.5 and extent.height > 0.5 and any(extent.overlaps(b) for b in boxes):
                hidden.append(f"bar of {label_of.get(id(patch), '?')}")
        for line in ax.get_lines():
            xy = np.asarray(line.get_xydata(), dtype=float)
            if len(xy) == 0:
                continue
            if len(xy) > 1:  # the segments between the points, not the points alone
                t = np.linspace(0, 1, 20)[:, None, None]
                xy = (xy[:-1][None] * (1 - t) + xy[1:][None] * t).reshape(-1, 2)
            points = line.get_transform().transform(xy)
            if any(b.contains(x, y) for b in boxes for x, y in points):
                hidden.append(f"line {line.get_label()}")
    return hidden


def overlapping_tick_labels(fig) -> list[tuple[str, str]]:
    """Pairs of neighbouring x tick labels of one axes whose drawn text overlaps."""
    if hasattr(fig, "draw_without_rendering"):
        fig.draw_without_rendering()
    found = []
    for ax in fig.axes:
        labels = [t for t in ax.get_xticklabels() if t.get_visible() and t.get_text()]
        extents = [t.get_window_extent() for t in labels]
        for (a, ea), (b, eb) in zip(zip(labels, extents), zip(labels[1:], extents[1:])):
            if ea.overlaps(eb):
                found.append((a.get_text(), b.get_text()))
    return found
