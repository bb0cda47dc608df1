"""The demo world's vocabulary: every word a scene graph, an edit or a caption may use.

The simulator and the scorer compare free text against these lists, so they are the one
place where the world's kinds and attribute values are spelled.
"""

from __future__ import annotations

# Object kinds, in the canonical order objects are listed in a scene graph.
KINDS: tuple[str, ...] = (
    "bed", "nightstand", "chair", "plant", "lamp", "rug",
    "window", "curtains", "painting", "mirror", "clock", "tv",
)

# Object colours with the RGB used to render them.
COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (196, 52, 48),
    "orange": (232, 128, 40),
    "yellow": (236, 196, 52),
    "green": (64, 150, 72),
    "blue": (52, 96, 196),
    "purple": (128, 64, 160),
    "pink": (232, 120, 168),
    "white": (240, 238, 232),
    "black": (40, 40, 44),
    "grey": (128, 130, 134),
    "brown": (120, 76, 44),
}
COLOURS: tuple[str, ...] = tuple(COLOUR_RGB)

PATTERNS: tuple[str, ...] = ("plain", "striped", "dotted", "checked")
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = ("left", "centre", "right")
COUNTS: tuple[int, ...] = (1, 2, 3)

# Descriptor phrases (scene_objects and captions use these spellings).
POSITION_PHRASES: dict[str, str] = {"left": "on the left", "centre": "in the centre", "right": "on the right"}
NUMBER_WORDS: dict[int, str] = {1: "one", 2: "two", 3: "three"}

WALL_RGB: dict[str, tuple[int, int, int]] = {
    "white": (236, 232, 224),
    "cream": (240, 226, 196),
    "grey": (176, 178, 180),
    "light blue": (170, 198, 222),
    "sage green": (172, 192, 160),
    "pale yellow": (240, 224, 160),
    "pink": (232, 188, 192),
    "lavender": (196, 182, 220),
    "terracotta": (200, 120, 92),
    "navy": (52, 66, 104),
}
WALL_COLOURS: tuple[str, ...] = tuple(WALL_RGB)

FLOORS: tuple[str, ...] = ("wooden", "carpeted", "tiled", "marble")

# Where a kind stands: wall-hung kinds share the three wall slots, floor kinds the three
# floor slots, the rug lies on the floor under them. One object entry per slot.
LAYER: dict[str, str] = {
    "bed": "floor", "nightstand": "floor", "chair": "floor", "plant": "floor", "lamp": "floor",
    "rug": "rug",
    "window": "wall", "curtains": "wall", "painting": "wall", "mirror": "wall", "clock": "wall",
    "tv": "wall",
}

# Most copies of a kind that fit one slot and still look like a hotel room.
MAX_COUNT: dict[str, int] = {
    "bed": 2, "nightstand": 2, "chair": 3, "plant": 3, "lamp": 2, "rug": 1,
    "window": 2, "curtains": 1, "painting": 3, "mirror": 2, "clock": 3, "tv": 1,
}

# Kinds whose surface carries a pattern; the others are always "plain".
PATTERNED_KINDS: frozenset[str] = frozenset({"bed", "chair", "plant", "lamp", "rug", "curtains", "painting"})

# Nouns for captions: (singular, plural). "curtains" is plural already and never counted.
NOUNS: dict[str, tuple[str, str]] = {
    "bed": ("bed", "beds"), "nightstand": ("nightstand", "nightstands"), "chair": ("chair", "chairs"),
    "plant": ("plant", "plants"), "lamp": ("lamp", "lamps"), "rug": ("rug", "rugs"),
    "window": ("window", "windows"), "curtains": ("curtains", "curtains"),
    "painting": ("painting", "paintings"), "mirror": ("mirror", "mirrors"), "clock": ("clock", "clocks"),
    "tv": ("TV", "TVs"),
}

# Edit operations and the object attribute each one changes.
EDIT_OPS: tuple[str, ...] = ("add", "remove", "recolour", "pattern", "move", "count", "resize", "wall", "floor")
OP_ATTRIBUTE: dict[str, str] = {
    "recolour": "colour", "pattern": "pattern", "move": "position", "count": "count", "resize": "size",
    "wall": "wall", "floor": "floor",
}

# Kind x attribute combinations that never appear in a train or val image; the test split
# uses them to measure generalisation to unseen compositions.
HELDOUT_COMBOS: tuple[tuple[str, str, str], ...] = (
    ("chair", "pattern", "striped"),
    ("lamp", "colour", "green"),
    ("bed", "colour", "purple"),
    ("rug", "pattern", "dotted"),
    ("clock", "colour", "red"),
    ("painting", "pattern", "checked"),
)


def combo_phrase(kind: str, attribute: str, value: str) -> str:
    """'striped chair' for ('chair', 'pattern', 'striped')."""
    return f"{value} {NOUNS[kind][0]}"
