"""Mirrored training and test-time views: the image flipped left to right, the caption
with "left" and "right" swapped, so the pair still matches its caption."""

from __future__ import annotations

import re

_SIDES = re.compile(r"\b(left|right|Left|Right|LEFT|RIGHT)\b")
_OTHER_SIDE = {"left": "right", "right": "left", "Left": "Right", "Right": "Left",
               "LEFT": "RIGHT", "RIGHT": "LEFT"}


def mirror_text(text: str) -> str:
    """The caption of the mirrored pair: left and right swapped."""
    return _SIDES.sub(lambda m: _OTHER_SIDE[m.group(1)], text)
