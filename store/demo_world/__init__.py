"""The demo world: procedural hotel rooms with exact ground truth (see DESIGN.md).

Scene graph and edit JSON shapes are documented in ``store.demo_world.scene``; the words
they use are in ``store.demo_world.vocab``. Public functions:

- ``generate_world(out_dir, pairs, seed)`` writes images, pairs.jsonl, scenes.jsonl, world.json.
- ``scene_objects(scene)`` -> [{"name", "descriptors"}], most prominent first (stage 1's truth).
- ``describe_edit(edit)`` -> one canonical caption clause; ``describe_edits(edits)`` a sentence.
- ``render_scene(scene)`` -> a 256 px PIL image.
"""

from .captions import HELDOUT_TEMPLATES, TEMPLATES, describe_edit, describe_edits, make_captions
from .render import render_png, render_scene
from .scene import (
    apply_edit,
    apply_edits,
    edit_shows_combo,
    object_descriptors,
    random_edits,
    random_scene,
    scene_key,
    scene_objects,
    validate_scene,
)
from .vocab import (
    COLOURS,
    COUNTS,
    EDIT_OPS,
    FLOORS,
    HELDOUT_COMBOS,
    KINDS,
    NUMBER_WORDS,
    PATTERNS,
    POSITION_PHRASES,
    POSITIONS,
    SIZES,
    WALL_COLOURS,
)
from .world import generate_world, plan_world

__all__ = [
    "generate_world", "plan_world", "scene_objects", "object_descriptors", "describe_edit", "describe_edits",
    "make_captions", "render_scene", "render_png", "random_scene", "random_edits", "apply_edit", "apply_edits",
    "edit_shows_combo", "scene_key", "validate_scene", "TEMPLATES", "HELDOUT_TEMPLATES",
    "KINDS", "COLOURS", "PATTERNS", "SIZES", "POSITIONS", "COUNTS", "WALL_COLOURS", "FLOORS", "EDIT_OPS",
    "HELDOUT_COMBOS", "NUMBER_WORDS", "POSITION_PHRASES",
]
