"""What calls cost: a price table per model (USD per million tokens), overridable.

Prices change; the table is a starting point, and `--prices FILE` (JSON
`{"model": {"input": usd_per_1m, "output": usd_per_1m}}`) replaces or adds entries.
A model with no known price costs 0 and the run says so once. The Batch API is half
price.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

# USD per 1M tokens (input, output), list prices for chat completions.
DEFAULT_PRICES: dict[str, tuple[float, float]] = {
    "gpt-4o": (2.50, 10.00),
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4.1": (2.00, 8.00),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1-nano": (0.10, 0.40),
    "gpt-5": (1.25, 10.00),
    "gpt-5-mini": (0.25, 2.00),
    "gpt-5-nano": (0.05, 0.40),
    "o4-mini": (1.10, 4.40),
    "simulator-v1": (0.0, 0.0),
}
BATCH_DISCOUNT = 0.5

# Rough token counts for --dry-run estimates (OpenAI's image accounting for 'low' detail
# is a flat 85 tokens; 'high' at 512 px is 85 + 170 per 512-px tile).
EST_IMAGE_TOKENS = {"low": 85, "high": 255, "auto": 255}
# How OpenAI bills an image, per model family (for the estimates). Tile models: a base,
# plus per 512-px tile at 'high'/'auto' (the short side scaled to 768 px at most); 'low' is
# the base alone. gpt-4o-mini bills about 33x gpt-4o's tokens for an image, so that an
# image costs the same dollars on both. Patch models: one token per 32-px patch (at most
# 1536) times a multiplier, whatever the detail.
IMAGE_TILE_TOKENS: dict[str, tuple[int, int]] = {
    "gpt-4o": (85, 170), "gpt-4o-mini": (2833, 5667), "gpt-4.1": (85, 170), "gpt-5": (70, 140),
}
IMAGE_PATCH_MULTIPLIER: dict[str, float] = {
    "gpt-4.1-mini": 1.62, "gpt-4.1-nano": 2.46, "o4-mini": 1.72, "gpt-5-mini": 1.62, "gpt-5-nano": 2.46,
}


def _family(model: str, names) -> Optional[str]:
    """The entry of `names` a model belongs to: itself, or its longest prefix (snapshots)."""
    if model in names:
        return model
    return max((k for k in names if model.startswith(k + "-")), key=len, default=None)


def image_tokens(model: str, detail: str, max_side: int) -> int:
    """Input tokens one image of at most max_side px is billed for (an estimate)."""
    family = _family(model, set(IMAGE_TILE_TOKENS) | set(IMAGE_PATCH_MULTIPLIER))
    if family in IMAGE_PATCH_MULTIPLIER:
        patches = min(1536, math.ceil(max_side / 32) ** 2)
        return round(patches * IMAGE_PATCH_MULTIPLIER[family])
    if family is None:  # not an OpenAI model: the usual accounting, a guess
        return EST_IMAGE_TOKENS.get(detail, 255)
    base, tile = IMAGE_TILE_TOKENS[family]
    if detail == "low":
        return base
    return base + tile * math.ceil(min(max_side, 768) / 512) ** 2
EST_TOKENS_OUT = {"stage1": 350, "stage2": 350, "stage3": 180, "single": 180}
EST_TEXT_TOKENS_IN = {"stage1": 250, "stage2": 650, "stage3": 900, "single": 300}


@dataclass(frozen=True)
class Price:
    input_per_1m: float
    output_per_1m: float


class PriceTable:
    def __init__(self, prices: Optional[dict[str, tuple[float, float]]] = None):
        self.prices = {k: Price(*v) for k, v in (prices or DEFAULT_PRICES).items()}
        self.unknown: set[str] = set()

    @classmethod
    def load(cls, override_path: Optional[str | Path] = None) -> "PriceTable":
        table = cls()
        if override_path:
            path = Path(override_path)
            try:
                data = json.loads(path.read_text())
                for model, entry in data.items():
                    table.prices[model] = Price(float(entry["input"]), float(entry["output"]))
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                raise ValueError(
                    f"price file {path}: expected {{\"model\": {{\"input\": usd_per_1m, "
                    f"\"output\": usd_per_1m}}}} ({exc})"
                ) from None
        return table

    def price_for(self, model: str) -> Optional[Price]:
        if model in self.prices:
            return self.prices[model]
        # Dated snapshots ("gpt-4o-2024-08-06") cost what their family costs.
        best = max((k for k in self.prices if model.startswith(k + "-")), key=len, default=None)
        return self.prices[best] if best else None

    def cost(self, model: str, tokens_in: int, tokens_out: int, *, batch: bool = False) -> float:
        price = self.price_for(model)
        if price is None:
            self.unknown.add(model)
            return 0.0
        usd = (tokens_in * price.input_per_1m + tokens_out * price.output_per_1m) / 1_000_000
        return usd * (BATCH_DISCOUNT if batch else 1.0)

    def estimate(self, model: str, calls_by_stage: dict[str, int], *, detail: str = "low",
                 batch: bool = False, image_max_side: int = 512) -> float:
        """Estimated USD for the given number of calls per stage (for --dry-run)."""
        images = {"stage1": 1, "stage2": 1, "stage3": 0, "single": 2}
        per_image = image_tokens(model, detail, image_max_side)
        total = 0.0
        for stage, n in calls_by_stage.items():
            tokens_in = EST_TEXT_TOKENS_IN[stage] + images[stage] * per_image
            total += n * self.cost(model, tokens_in, EST_TOKENS_OUT[stage], batch=batch)
        return total
