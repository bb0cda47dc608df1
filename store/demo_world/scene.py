"""Scene graphs of the demo world, random scenes, edits and near-duplicates.

A scene graph (JSON, as written to scenes.jsonl)::

    {"wall": "cream",                 # one of vocab.WALL_COLOURS
     "floor": "wooden",               # one of vocab.FLOORS
     "objects": [                     # at most one entry per kind, in vocab.KINDS order
        {"kind": "chair",             # vocab.KINDS
         "colour": "red",             # vocab.COLOURS
         "pattern": "striped",        # vocab.PATTERNS ("plain" for unpatterned kinds)
         "size": "large",             # vocab.SIZES
         "position": "left",          # vocab.POSITIONS; unique within the kind's layer
         "count": 2},                 # 1..vocab.MAX_COUNT[kind] copies side by side
        ...]}

An edit (JSON, a pair's "edits" list holds 1-3 of them, each on a different kind)::

    {"op": "add",    "kind": "lamp", "object": {...the added object...}}
    {"op": "remove", "kind": "rug",  "object": {...the removed object...}}
    {"op": "recolour"|"pattern"|"move"|"count"|"resize",
     "kind": "chair", "attribute": "colour"|"pattern"|"position"|"count"|"size",
     "from": "red", "to": "blue",     # counts are ints
     "object": {...the object before the edit...}}
    {"op": "wall"|"floor", "attribute": "wall"|"floor", "from": "cream", "to": "navy"}

Edits apply in order; because each touches a different kind (or the wall or floor once),
an edit's "object" is also the object as it is in the reference scene.
"""

from __future__ import annotations

import copy
import json
import random
from typing import Any, Iterable

from .vocab import (
    COLOURS,
    FLOORS,
    KINDS,
    LAYER,
    MAX_COUNT,
    NUMBER_WORDS,
    OP_ATTRIBUTE,
    PATTERNED_KINDS,
    PATTERNS,
    POSITION_PHRASES,
    POSITIONS,
    SIZES,
    WALL_COLOURS,
)

Scene = dict[str, Any]
Edit = dict[str, Any]
Combo = tuple[str, str, str]

OBJECT_ATTRIBUTES: tuple[str, ...] = ("colour", "pattern", "size", "position", "count")

# How much of the picture one copy of a large object covers (rough pixel area at 256 px);
# orders scene_objects from most to least prominent.
_AREA: dict[str, int] = {
    "bed": 3600, "rug": 2600, "curtains": 2800, "window": 2400, "tv": 1800, "painting": 1700,
    "chair": 1500, "plant": 1300, "nightstand": 1100, "mirror": 1300, "lamp": 900, "clock": 800,
}

# Relative odds of each edit operation.
_OP_WEIGHTS: dict[str, float] = {
    "add": 2.0, "remove": 1.5, "recolour": 3.0, "pattern": 2.0, "move": 1.5,
    "count": 1.5, "resize": 1.5, "wall": 1.0, "floor": 0.7,
}


def scene_key(scene: Scene) -> str:
    """A canonical string; two scenes render the same image iff their keys are equal."""
    return json.dumps(scene, sort_keys=True, separators=(",", ":"))


def canonical(scene: Scene) -> Scene:
    """The scene with its objects in vocab.KINDS order (a new dict)."""
    objects = sorted((dict(o) for o in scene["objects"]), key=lambda o: KINDS.index(o["kind"]))
    return {"wall": scene["wall"], "floor": scene["floor"], "objects": objects}


def find_object(scene: Scene, kind: str) -> dict[str, Any] | None:
    for obj in scene["objects"]:
        if obj["kind"] == kind:
            return obj
    return None


def free_positions(scene: Scene, kind: str) -> list[str]:
    """Positions in the kind's layer that no other kind occupies."""
    taken = {o["position"] for o in scene["objects"] if LAYER[o["kind"]] == LAYER[kind] and o["kind"] != kind}
    return [p for p in POSITIONS if p not in taken]


def has_combo(obj: dict[str, Any], combos: Iterable[Combo]) -> bool:
    """Whether the object shows one of the kind x attribute combinations."""
    return any(obj["kind"] == k and obj.get(a) == v for k, a, v in combos)


def scene_has_combo(scene: Scene, combos: Iterable[Combo]) -> bool:
    combos = tuple(combos)
    return any(has_combo(o, combos) for o in scene["objects"])


def validate_scene(scene: Scene) -> None:
    """Raise ValueError naming the first thing wrong with a scene graph."""
    if scene.get("wall") not in WALL_COLOURS:
        raise ValueError(f"unknown wall colour {scene.get('wall')!r}")
    if scene.get("floor") not in FLOORS:
        raise ValueError(f"unknown floor {scene.get('floor')!r}")
    seen_kinds: set[str] = set()
    slots: set[tuple[str, str]] = set()
    for obj in scene.get("objects", []):
        kind = obj.get("kind")
        if kind not in KINDS:
            raise ValueError(f"unknown object kind {kind!r}")
        if kind in seen_kinds:
            raise ValueError(f"two entries for kind {kind!r}")
        seen_kinds.add(kind)
        if obj.get("colour") not in COLOURS:
            raise ValueError(f"{kind}: unknown colour {obj.get('colour')!r}")
        if obj.get("pattern") not in PATTERNS or (kind not in PATTERNED_KINDS and obj["pattern"] != "plain"):
            raise ValueError(f"{kind}: invalid pattern {obj.get('pattern')!r}")
        if obj.get("size") not in SIZES:
            raise ValueError(f"{kind}: unknown size {obj.get('size')!r}")
        if obj.get("position") not in POSITIONS:
            raise ValueError(f"{kind}: unknown position {obj.get('position')!r}")
        if not isinstance(obj.get("count"), int) or not 1 <= obj["count"] <= MAX_COUNT[kind]:
            raise ValueError(f"{kind}: count {obj.get('count')!r} outside 1..{MAX_COUNT[kind]}")
        slot = (LAYER[kind], obj["position"])
        if slot in slots:
            raise ValueError(f"{kind}: position {obj['position']!r} already taken in the {LAYER[kind]} layer")
        slots.add(slot)


# ---------------------------------------------------------------- random scenes


def random_object(rng: random.Random, kind: str, position: str, forbid: tuple[Combo, ...] = ()) -> dict[str, Any]:
    """A random object of one kind at a position, avoiding the forbidden combinations."""
    while True:
        pattern = "plain"
        if kind in PATTERNED_KINDS and rng.random() < 0.5:
            pattern = rng.choice(PATTERNS[1:])
        max_count = MAX_COUNT[kind]
        count = rng.choices(range(1, max_count + 1), weights=(6, 3, 2)[:max_count])[0]
        obj = {
            "kind": kind,
            "colour": rng.choice(COLOURS),
            "pattern": pattern,
            "size": rng.choice(SIZES),
            "position": position,
            "count": count,
        }
        if not has_combo(obj, forbid):
            return obj


def random_scene(rng: random.Random, forbid: tuple[Combo, ...] = ()) -> Scene:
    """A random room with 3-7 objects; most rooms have a bed, as hotel rooms do."""
    scene: Scene = {"wall": rng.choice(WALL_COLOURS), "floor": rng.choice(FLOORS), "objects": []}
    wanted = rng.randint(3, 7)
    kinds = list(KINDS)
    rng.shuffle(kinds)
    if rng.random() < 0.7:  # put the bed first so it usually gets a slot
        kinds.remove("bed")
        kinds.insert(0, "bed")
    for kind in kinds:
        if len(scene["objects"]) >= wanted:
            break
        free = free_positions(scene, kind)
        if free:
            scene["objects"].append(random_object(rng, kind, rng.choice(free), forbid))
    return canonical(scene)


# ---------------------------------------------------------------- edits


def apply_edit(scene: Scene, edit: Edit) -> Scene:
    """The scene after one edit (a new dict); raises ValueError if the edit does not fit."""
    out = copy.deepcopy(scene)
    op = edit["op"]
    if op in ("wall", "floor"):
        if out[op] != edit["from"]:
            raise ValueError(f"{op} edit expects {edit['from']!r}, scene has {out[op]!r}")
        out[op] = edit["to"]
        return out
    kind = edit["kind"]
    current = find_object(out, kind)
    if op == "add":
        if current is not None:
            raise ValueError(f"cannot add a {kind}: the scene has one")
        if edit["object"]["position"] not in free_positions(out, kind):
            raise ValueError(f"cannot add a {kind}: position {edit['object']['position']!r} is taken")
        out["objects"].append(dict(edit["object"]))
        return canonical(out)
    if current is None:
        raise ValueError(f"{op} edit on a {kind} the scene does not have")
    if op == "remove":
        out["objects"] = [o for o in out["objects"] if o["kind"] != kind]
        return out
    attribute = OP_ATTRIBUTE[op]
    if current[attribute] != edit["from"]:
        raise ValueError(f"{op} edit expects {kind} {attribute} {edit['from']!r}, scene has {current[attribute]!r}")
    if op == "move" and edit["to"] not in free_positions(out, kind):
        raise ValueError(f"cannot move the {kind} to {edit['to']!r}: taken")
    current[attribute] = edit["to"]
    return out


def apply_edits(scene: Scene, edits: Iterable[Edit]) -> Scene:
    for edit in edits:
        scene = apply_edit(scene, edit)
    return scene


def _attribute_choices(obj: dict[str, Any], attribute: str, scene: Scene) -> list[Any]:
    """Values the attribute could change to, other than the current one."""
    kind = obj["kind"]
    if attribute == "colour":
        values: list[Any] = list(COLOURS)
    elif attribute == "pattern":
        values = list(PATTERNS) if kind in PATTERNED_KINDS else []
    elif attribute == "size":
        values = list(SIZES)
    elif attribute == "position":
        values = free_positions(scene, kind)
    elif attribute == "count":
        values = list(range(1, MAX_COUNT[kind] + 1))
    else:
        raise ValueError(f"unknown attribute {attribute!r}")
    return [v for v in values if v != obj[attribute]]


def _random_edit(
    rng: random.Random, scene: Scene, op: str, touched: set[str], forbid: tuple[Combo, ...]
) -> Edit | None:
    """One random edit of the given operation on an untouched kind, or None if none fits."""
    if op in ("wall", "floor"):
        if op in touched:
            return None
        values = [v for v in (WALL_COLOURS if op == "wall" else FLOORS) if v != scene[op]]
        return {"op": op, "attribute": op, "from": scene[op], "to": rng.choice(values)}
    present = [o for o in scene["objects"] if o["kind"] not in touched]
    if op == "add":
        absent = [k for k in KINDS if k not in touched and find_object(scene, k) is None and free_positions(scene, k)]
        if not absent:
            return None
        kind = rng.choice(absent)
        obj = random_object(rng, kind, rng.choice(free_positions(scene, kind)), forbid)
        return {"op": "add", "kind": kind, "object": obj}
    if op == "remove":
        if len(scene["objects"]) < 3 or not present:
            return None  # keep rooms from emptying out
        obj = rng.choice(present)
        return {"op": "remove", "kind": obj["kind"], "object": dict(obj)}
    attribute = OP_ATTRIBUTE[op]
    candidates = []
    for obj in present:
        values = [v for v in _attribute_choices(obj, attribute, scene) if not has_combo({**obj, attribute: v}, forbid)]
        if values:
            candidates.append((obj, values))
    if not candidates:
        return None
    obj, values = rng.choice(candidates)
    return {"op": op, "kind": obj["kind"], "attribute": attribute, "from": obj[attribute],
            "to": rng.choice(values), "object": dict(obj)}


def edit_for_combo(rng: random.Random, scene: Scene, combo: Combo) -> Edit | None:
    """An edit whose result shows the combination (add or change that kind), or None."""
    kind, attribute, value = combo
    obj = find_object(scene, kind)
    if obj is None:
        free = free_positions(scene, kind)
        if not free:
            return None
        new = random_object(rng, kind, rng.choice(free))
        new[attribute] = value
        return {"op": "add", "kind": kind, "object": new}
    if obj[attribute] == value:
        return None
    op = {"colour": "recolour", "pattern": "pattern"}[attribute]
    return {"op": op, "kind": kind, "attribute": attribute, "from": obj[attribute], "to": value, "object": dict(obj)}


def _touched(edit: Edit) -> str:
    return edit.get("kind") or edit["op"]


def random_edits(
    rng: random.Random,
    scene: Scene,
    n_edits: int,
    forbid: tuple[Combo, ...] = (),
    first: Edit | None = None,
) -> tuple[list[Edit], Scene]:
    """1-3 edits on different kinds (``first`` leads if given) and the edited scene."""
    edits: list[Edit] = []
    touched: set[str] = set()
    current = scene
    if first is not None:
        current = apply_edit(current, first)
        edits.append(first)
        touched.add(_touched(first))
    ops = list(_OP_WEIGHTS)
    weights = [_OP_WEIGHTS[o] for o in ops]
    attempts = 0
    while len(edits) < n_edits and attempts < 50:
        attempts += 1
        op = rng.choices(ops, weights=weights)[0]
        edit = _random_edit(rng, current, op, touched, forbid)
        if edit is None:
            continue
        current = apply_edit(current, edit)
        edits.append(edit)
        touched.add(_touched(edit))
    return edits, canonical(current)


def single_changes(scene: Scene) -> list[tuple[str, str, Any]]:
    """Every (kind or 'wall'/'floor', attribute, new value) that changes one attribute."""
    changes: list[tuple[str, str, Any]] = []
    for obj in scene["objects"]:
        for attribute in OBJECT_ATTRIBUTES:
            for value in _attribute_choices(obj, attribute, scene):
                changes.append((obj["kind"], attribute, value))
    changes += [("wall", "wall", v) for v in WALL_COLOURS if v != scene["wall"]]
    changes += [("floor", "floor", v) for v in FLOORS if v != scene["floor"]]
    return changes


def change_scene(scene: Scene, change: tuple[str, str, Any]) -> Scene:
    """The scene with one attribute changed (a new dict)."""
    target, attribute, value = change
    out = copy.deepcopy(scene)
    if target in ("wall", "floor"):
        out[target] = value
    else:
        find_object(out, target)[attribute] = value
    return out


def near_duplicates(
    rng: random.Random,
    target: Scene,
    edits: list[Edit],
    n: int,
    avoid_keys: set[str],
    forbid: tuple[Combo, ...] = (),
) -> list[tuple[Scene, tuple[str, str, Any]]]:
    """``n`` scenes that each differ from ``target`` in exactly one attribute.

    Half of them, where possible, vary what the edits changed (the edited kind or the
    wall/floor), which makes them the hardest negatives: the caption must be read.
    None has a key in ``avoid_keys`` (add the reference there) and all are distinct.
    """
    edited = {_touched(e) for e in edits}
    changes = single_changes(target)
    focus = [c for c in changes if c[0] in edited]
    rest = [c for c in changes if c[0] not in edited]
    rng.shuffle(focus)
    rng.shuffle(rest)
    n_focus = (n + 1) // 2
    ordered = focus[:n_focus] + rest + focus[n_focus:]
    out: list[tuple[Scene, tuple[str, str, Any]]] = []
    seen = set(avoid_keys)
    for change in ordered:
        if len(out) == n:
            break
        if change[0] not in ("wall", "floor"):
            obj = {**find_object(target, change[0]), change[1]: change[2]}
            if has_combo(obj, forbid):
                continue
        scene = change_scene(target, change)
        key = scene_key(scene)
        if key in seen:
            continue
        seen.add(key)
        out.append((scene, change))
    return out


# ---------------------------------------------------------------- canonical descriptors


def prominence(obj: dict[str, Any]) -> float:
    """Rough picture area the object covers; larger means more prominent."""
    scale = 1.0 if obj["size"] == "large" else 0.5
    return _AREA[obj["kind"]] * scale * (1 + 0.5 * (obj["count"] - 1))


def object_descriptors(obj: dict[str, Any]) -> list[str]:
    """Canonical descriptors: colour, pattern (unless plain), size, position, count."""
    descriptors = [obj["colour"]]
    if obj["pattern"] != "plain":
        descriptors.append(obj["pattern"])
    descriptors += [obj["size"], POSITION_PHRASES[obj["position"]], NUMBER_WORDS[obj["count"]]]
    return descriptors


def scene_objects(scene: Scene) -> list[dict[str, Any]]:
    """The scene as stage 1 should describe it: objects most prominent first, then wall, floor.

    Each entry is {"name": kind, "descriptors": [...]}, descriptors as object_descriptors.
    """
    objects = sorted(scene["objects"], key=lambda o: (-prominence(o), KINDS.index(o["kind"])))
    out = [{"name": o["kind"], "descriptors": object_descriptors(o)} for o in objects]
    out.append({"name": "wall", "descriptors": [scene["wall"]]})
    out.append({"name": "floor", "descriptors": [scene["floor"]]})
    return out


def edit_shows_combo(edit: Edit, combos: Iterable[Combo]) -> bool:
    """Whether the edit adds or changes an object into one of the combinations."""
    combos = tuple(combos)
    if edit["op"] == "add":
        return has_combo(edit["object"], combos)
    if edit["op"] in ("remove", "wall", "floor"):
        return False
    return has_combo({**edit["object"], edit["attribute"]: edit["to"]}, combos)

