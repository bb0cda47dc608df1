"""The `simulator` backend: an offline stand-in VLM for the demo world only.

It answers from the ground truth in the store (images.scene_json, pairs.ground_truth)
with a configurable error rate, so that demos, tests and the review app have
real-looking output with real mistakes to audit. It is named as a simulator everywhere
(model "simulator-v1") and says nothing about real VLMs.

How it errs. One simulated model, with one error rate r, behind every answer:

- perceiving an image (stage 1, stage 2): each object (wall and floor included) gets one
  attribute wrong with probability r, and with probability r the list gains an invented
  object of a kind the scene does not have;
- writing captions from two descriptions (stage 3): each difference is left out with
  probability r, stated with a wrong new value with probability r, and with probability
  r an invented change is added.

Stage 2 behaves as the prompt asks: an object unchanged since the reference that it sees
correctly is copied word for word from the stage 1 list in the request (stage 1's
mistakes included), objects stage 1 invented are carried over, everything else is
described afresh. Stage 3 reads only the two lists in the request text, so stage 1 and 2
mistakes propagate into captions exactly as they would with a real model.

The single-stage baseline runs the same three steps (perceive the reference, perceive
the target, write captions) inside its one call, with the same r. The two methods
therefore make mistakes at the same rates by construction: the simulator can neither
confirm nor refute the paper's finding that staged prompting hallucinates less (any
difference it shows is sampling noise). Measure that claim with a real VLM.

Mistakes compound as they would in a real model: a misperceived unchanged object becomes
a caption about a change that did not happen. Measured by pipeline.scoring on 600 random
demo-world pairs (staged; single within noise of it):

    r      wrong descriptors  invented objects  changes missed  captions inventing a change
    0.05   1.5%               0.8%              9%              22%
    0.10   2.9%               1.4%              22%             42%
    0.15   4.4%               2.4%              31%             51%
    0.30   8.7%               3.9%              52%             72%

Answers are deterministic per (seed, request).
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from math import ceil
from typing import Any, ClassVar, Optional

from .base import PermanentError, VLMRequest, VLMResponse

# What a demo-world scene graph holds (store.demo_world), all the simulator reads.
SCENE_KEYS = ("wall", "floor", "objects")

MODEL_NAME = "simulator-v1"
# Input tokens a 256 px image costs at OpenAI's 'low' detail: what --dry-run estimates use.
IMAGE_TOKENS = 85

Objects = list[dict[str, Any]]


class SimulatorBackend:
    name: ClassVar[str] = "simulator"
    supports_images: ClassVar[bool] = True
    supports_json_schema: ClassVar[bool] = True
    is_batch: ClassVar[bool] = False

    def __init__(self, db_path: str, error_rate: float = 0.15, seed: int = 0):
        if not 0.0 <= error_rate <= 1.0:
            raise ValueError(f"error rate must be between 0 and 1, not {error_rate}")
        self.db_path = str(db_path)
        self.error_rate = float(error_rate)
        self.seed = seed
        self.model = MODEL_NAME  # always this: a simulator must never pass for a real model
        self._db = None
        self._scenes: dict[str, tuple[str, Optional[dict]]] = {}
        self._pairs: dict[str, Optional[dict]] = {}

    @property
    def cache_params(self) -> dict:
        return {"error_rate": self.error_rate, "seed": self.seed}

    # -- ground truth from the store

    def _conn(self):
        if self._db is None:
            from store.db import open_db

            self._db = open_db(self.db_path)
        return self._db

    def _scene(self, image_id: str) -> dict:
        if image_id not in self._scenes:
            row = self._conn().execute("SELECT name, scene_json FROM images WHERE id = ?", [image_id]).fetchone()
            if row is None:
                self._scenes[image_id] = (image_id, None)
            else:
                self._scenes[image_id] = (row[0], json.loads(row[1]) if row[1] else None)
        name, scene = self._scenes[image_id]
        if scene is None:
            raise PermanentError(
                f"simulator needs demo-world ground truth: image {name} has no scene graph "
                "(use --backend openai for your own images)")
        # A scenes.jsonl of another shape beside a user's pairs.jsonl is stored as given:
        # answering from it failed each pair as 'internal error: KeyError' with a traceback.
        missing = [key for key in SCENE_KEYS if key not in scene] if isinstance(scene, dict) else list(SCENE_KEYS)
        if missing:
            raise PermanentError(
                f"simulator needs demo-world ground truth: the scene graph of image {name} is not the "
                f"demo world's (no {', '.join(map(repr, missing))}; use --backend openai for your own images)")
        return scene

    def _pair(self, pair_id: str) -> dict:
        if pair_id not in self._pairs:
            row = self._conn().execute(
                "SELECT reference_id, target_id, external_id FROM pairs WHERE id = ?", [pair_id]).fetchone()
            self._pairs[pair_id] = None if row is None else {
                "reference_id": row[0], "target_id": row[1], "external_id": row[2]}
        pair = self._pairs[pair_id]
        if pair is None:
            raise PermanentError(f"simulator needs demo-world ground truth: pair {pair_id} is not in the store")
        return pair

    # -- the one method

    async def complete(self, request: VLMRequest) -> VLMResponse:
        started = time.perf_counter()
        rng = self._rng(request)
        r = self.error_rate
        if request.stage == "stage1":
            image_id = request.image_ids[0] if request.image_ids else request.subject_id
            answer: dict = {"objects": perceive(self._scene(image_id), rng, r)}
        elif request.stage == "stage2":
            pair = self._pair(request.subject_id)
            target_id = request.image_ids[0] if request.image_ids else pair["target_id"]
            reference = self._scene(pair["reference_id"])
            target = self._scene(target_id)
            stage1 = _objects_in_text(request.text, 1)[0]
            answer = {"objects": describe_target(reference, target, stage1, rng, r)}
        elif request.stage == "stage3":
            lists = _objects_in_text(request.text, 2)
            answer = {"captions": write_captions(lists[0], lists[1], rng, r)}
        elif request.stage == "single":
            pair = self._pair(request.subject_id)
            ids = request.image_ids or [pair["reference_id"], pair["target_id"]]
            reference, target = self._scene(ids[0]), self._scene(ids[1])
            answer = {"captions": single_stage(reference, target, rng, r)}
        else:
            raise PermanentError(f"simulator: unknown stage {request.stage!r}")
        text = json.dumps(answer, ensure_ascii=False)
        prompt_chars = len(request.system) + len(request.text) + sum(len(t["content"]) for t in request.history)
        return VLMResponse(
            text=text,
            tokens_in=ceil(prompt_chars / 4) + IMAGE_TOKENS * len(request.image_ids),
            tokens_out=ceil(len(text) / 4),
            finish_reason="stop",
            model=self.model,
            latency_ms=(time.perf_counter() - started) * 1000,
        )

    def _rng(self, request: VLMRequest) -> random.Random:
        # The repair history is left out: a repeated question gets the same answer.
        key = json.dumps([self.seed, self.error_rate, request.stage, request.subject_id,
                          request.image_ids, request.system, request.text])
        return random.Random(int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big"))

    async def aclose(self) -> None:
        if self._db is not None:
            self._db.conn.close()
            self._db = None


def _objects_in_text(text: str, n: int) -> list[Objects]:
    """The first n {"objects": [...]} JSON values in a prompt, in order."""
    decoder = json.JSONDecoder()
    found: list[Objects] = []
    i = text.find("{")
    while i != -1 and len(found) < n:
        try:
            value, end = decoder.raw_decode(text, i)
        except ValueError:
            i = text.find("{", i + 1)
            continue
        if isinstance(value, dict) and isinstance(value.get("objects"), list) and not _is_example(value["objects"]):
            found.append(value["objects"])
            i = text.find("{", end)
        else:
            i = text.find("{", i + 1)
    if len(found) < n:
        raise PermanentError(f"simulator: expected {n} descriptor list(s) as JSON in the request text, found {len(found)}")
    return found


def _is_example(objects: list) -> bool:
    """The prompt's answer-format example ({"name": "...", ...}), not a real list."""
    return all(isinstance(o, dict) and str(o.get("name", "")).strip(". ") == "" for o in objects)


# ---------------------------------------------------------------- perceiving an image


def _alternatives(attribute: str, current: Any, kind: str, *also_not: Any) -> list[Any]:
    """Values the attribute could wrongly take: valid for the kind, not current."""
    from store.demo_world.vocab import (
        COLOURS, FLOORS, MAX_COUNT, PATTERNED_KINDS, PATTERNS, POSITIONS, SIZES, WALL_COLOURS)

    choices = {
        "colour": COLOURS, "pattern": PATTERNS if kind in PATTERNED_KINDS else (),
        "size": SIZES, "position": POSITIONS, "count": tuple(range(1, MAX_COUNT.get(kind, 1) + 1)),
        "wall": WALL_COLOURS, "floor": FLOORS,
    }[attribute]
    return [v for v in choices if v != current and v not in also_not]


def _misperceive(rng: random.Random, obj: dict) -> dict:
    """The object with one attribute wrong (a new dict)."""
    out = dict(obj)
    kind = obj["kind"]
    attributes = [a for a in ("colour", "pattern", "size", "position", "count")
                  if _alternatives(a, obj[a], kind)]
    attribute = rng.choice(attributes)
    out[attribute] = rng.choice(_alternatives(attribute, obj[attribute], kind))
    return out


def _invented_object(rng: random.Random, present: set[str]) -> Optional[dict]:
    from store.demo_world.scene import random_object
    from store.demo_world.vocab import KINDS, POSITIONS

    absent = [k for k in KINDS if k not in present]
    if not absent:
        return None
    return random_object(rng, rng.choice(absent), rng.choice(POSITIONS))


def _as_entry(obj: dict) -> dict:
    from store.demo_world.scene import object_descriptors

    return {"name": obj["kind"], "descriptors": object_descriptors(obj)}


def _room_entries(wall: str, floor: str) -> Objects:
    return [{"name": "wall", "descriptors": [wall]}, {"name": "floor", "descriptors": [floor]}]


def perceive_scene(scene: dict, rng: random.Random, r: float) -> tuple[list[dict], str, str, list[bool]]:
    """What the simulated model sees: (objects in prominence order, wall, floor, which
    objects it got wrong), with errors drawn at rate r; an invented object is last-but-some."""
    from store.demo_world.scene import prominence
    from store.demo_world.vocab import KINDS

    objects = sorted(scene["objects"], key=lambda o: (-prominence(o), KINDS.index(o["kind"])))
    seen, wrong = [], []
    for obj in objects:
        if rng.random() < r:
            seen.append(_misperceive(rng, obj))
            wrong.append(True)
        else:
            seen.append(dict(obj))
            wrong.append(False)
    wall, floor = scene["wall"], scene["floor"]
    if rng.random() < r:
        wall = rng.choice(_alternatives("wall", wall, "wall"))
    if rng.random() < r:
        floor = rng.choice(_alternatives("floor", floor, "floor"))
    if rng.random() < r:
        invented = _invented_object(rng, {o["kind"] for o in objects})
        if invented is not None:
            at = rng.randint(min(1, len(seen)), len(seen))  # rarely the most prominent
            seen.insert(at, invented)
            wrong.insert(at, True)
    return seen, wall, floor, wrong


def perceive(scene: dict, rng: random.Random, r: float) -> Objects:
    """Stage 1: the scene as a descriptor list, most prominent first, then wall and floor."""
    seen, wall, floor, _ = perceive_scene(scene, rng, r)
    return [_as_entry(o) for o in seen] + _room_entries(wall, floor)


def describe_target(reference: dict, target: dict, stage1: Objects, rng: random.Random, r: float) -> Objects:
    """Stage 2: the target as a descriptor list, reusing stage 1's entries for unchanged
    objects the model perceives correctly (see the module docstring)."""
    from store.demo_world.scene import find_object

    seen, wall, floor, wrong = perceive_scene(target, rng, r)
    by_name = {}
    for entry in stage1:
        by_name.setdefault(str(entry.get("name", "")).lower(), entry)
    true_kinds = {o["kind"] for o in reference["objects"]} | {o["kind"] for o in target["objects"]}
    out: Objects = []
    for obj, mistaken in zip(seen, wrong):
        before = find_object(reference, obj["kind"])
        after = find_object(target, obj["kind"])
        if not mistaken and before is not None and before == after and obj["kind"] in by_name:
            out.append(_copy(by_name[obj["kind"]]))
        else:
            out.append(_as_entry(obj))
    # Objects stage 1 invented: the model believes in them, so it copies them on.
    for name, entry in by_name.items():
        if name not in true_kinds and name not in ("wall", "floor") and name not in {e["name"] for e in out}:
            out.append(_copy(entry))
    for name, value in (("wall", wall), ("floor", floor)):
        same_room = reference[name] == target[name] and value == target[name]
        out.append(_copy(by_name[name]) if same_room and name in by_name else {"name": name, "descriptors": [value]})
    return out


def _copy(entry: dict) -> dict:
    return {"name": entry["name"], "descriptors": list(entry["descriptors"])}


# ---------------------------------------------------------------- writing captions


def _read_list(objects: Objects) -> tuple[dict[str, dict], dict[str, Any]]:
    """({kind: object dict}, {'wall': value, 'floor': value}) from a descriptor list."""
    from pipeline.scoring import object_from_descriptors

    things: dict[str, dict] = {}
    room: dict[str, Any] = {}
    for entry in objects:
        obj = object_from_descriptors(str(entry.get("name", "")), entry.get("descriptors") or [])
        kind = obj["kind"]
        if kind in ("wall", "floor"):
            if kind in obj:
                room.setdefault(kind, obj[kind])
            continue
        obj.setdefault("colour", "white")
        obj.setdefault("pattern", "plain")
        obj.setdefault("size", "small")
        obj.setdefault("position", "centre")
        obj.setdefault("count", 1)
        things.setdefault(kind, obj)
    return things, room


def differences(reference: Objects, target: Objects) -> list[dict]:
    """The edits (demo-world edit format) that turn one descriptor list into the other."""
    from store.demo_world.vocab import KINDS, NOUNS, OP_ATTRIBUTE

    ref, ref_room = _read_list(reference)
    tgt, tgt_room = _read_list(target)
    op_for = {attribute: op for op, attribute in OP_ATTRIBUTE.items()}
    edits: list[dict] = []
    for kind in sorted(set(ref) | set(tgt), key=lambda k: KINDS.index(k) if k in KINDS else len(KINDS)):
        if kind not in NOUNS:
            continue  # a name the world has no words for: nothing sensible to write
        if kind not in tgt:
            edits.append({"op": "remove", "kind": kind, "object": ref[kind]})
        elif kind not in ref:
            edits.append({"op": "add", "kind": kind, "object": tgt[kind]})
        else:
            for attribute in ("colour", "pattern", "size", "position", "count"):
                if ref[kind][attribute] != tgt[kind][attribute]:
                    edits.append({"op": op_for[attribute], "kind": kind, "attribute": attribute,
                                  "from": ref[kind][attribute], "to": tgt[kind][attribute],
                                  "object": ref[kind]})
    for name in ("wall", "floor"):
        if name in ref_room and name in tgt_room and ref_room[name] != tgt_room[name]:
            edits.append({"op": name, "attribute": name, "from": ref_room[name], "to": tgt_room[name]})
    return edits


def _wrong_edit(rng: random.Random, edit: dict) -> dict:
    """The same change stated with a wrong new value (or a wrong added object)."""
    out = json.loads(json.dumps(edit))
    if edit["op"] in ("add", "remove"):
        out["object"] = _misperceive(rng, edit["object"])
        return out
    others = _alternatives(edit["attribute"], edit["to"], edit.get("kind", edit["op"]), edit["from"])
    if others:
        out["to"] = rng.choice(others)
    return out


def _invented_edit(rng: random.Random, reference: Objects, target: Objects) -> Optional[dict]:
    """A change that is not in the lists: an unchanged object altered, or an absent kind added."""
    ref, ref_room = _read_list(reference)
    tgt, _ = _read_list(target)
    from store.demo_world.vocab import NOUNS, OP_ATTRIBUTE

    unchanged = [k for k in ref if k in tgt and ref[k] == tgt[k] and k in NOUNS]
    if unchanged and rng.random() < 0.7:
        kind = rng.choice(sorted(unchanged))
        obj = ref[kind]
        attribute = rng.choice([a for a in ("colour", "pattern", "size", "count")
                                if _alternatives(a, obj[a], kind)])
        op = {a: o for o, a in OP_ATTRIBUTE.items()}[attribute]
        return {"op": op, "kind": kind, "attribute": attribute, "from": obj[attribute],
                "to": rng.choice(_alternatives(attribute, obj[attribute], kind)), "object": obj}
    invented = _invented_object(rng, set(ref) | set(tgt))
    if invented is not None:
        return {"op": "add", "kind": invented["kind"], "object": invented}
    if "wall" in ref_room:
        return {"op": "wall", "attribute": "wall", "from": ref_room["wall"],
                "to": rng.choice(_alternatives("wall", ref_room["wall"], "wall"))}
    return None


def _phrase(rng: random.Random, edit: dict, used: set[str]) -> Optional[str]:
    from store.demo_world.captions import phrase_edit, template_ids

    # Held-out phrasings stay out: they measure generalisation on the test split.
    templates = template_ids(edit["op"], heldout=False)
    rng.shuffle(templates)
    for template in templates:
        text = phrase_edit(edit, template, rng)
        caption = text[0].upper() + text[1:] + "."
        if caption not in used:
            return caption
    return None


def write_captions(reference: Objects, target: Objects, rng: random.Random, r: float) -> list[str]:
    """Stage 3: 3-8 captions, one difference each, from two descriptor lists only."""
    edits = differences(reference, target)
    rng.shuffle(edits)
    stated = []
    for edit in edits:
        if rng.random() < r:
            continue  # missed
        stated.append(_wrong_edit(rng, edit) if rng.random() < r else edit)
    if rng.random() < r or not stated:
        # Nothing to say still gets captions from a model asked for 3 (the paper's
        # "hallucinated differences in highly similar pairs").
        invented = _invented_edit(rng, reference, target)
        if invented is not None:
            stated.insert(rng.randint(0, len(stated)), invented)
    if not stated:  # a room with every kind in it and no wall: nothing left to invent
        return ["Keep the room as it is.", "Leave the room unchanged.", "Change nothing in the room."]
    stated = stated[:8]
    wanted = min(8, max(3, len(stated) + rng.randint(0, 2)))
    captions: list[str] = []
    used: set[str] = set()
    attempts = 0
    while len(captions) < wanted and attempts < 40:
        edit = stated[attempts % len(stated)]  # one per change first, then paraphrases
        attempts += 1
        caption = _phrase(rng, edit, used)
        if caption is not None:
            captions.append(caption)
            used.add(caption)
    while len(captions) < 3:  # phrasings used up (never with the world's templates)
        captions.append(f"{captions[len(captions) % len(captions)][:-1]}, please.")
    return captions


def single_stage(reference: dict, target: dict, rng: random.Random, r: float) -> list[str]:
    """The single-stage baseline: the same perceive-perceive-write steps in one call."""
    stage1 = perceive(reference, random.Random(rng.getrandbits(64)), r)
    stage2 = describe_target(reference, target, stage1, random.Random(rng.getrandbits(64)), r)
    return write_captions(stage1, stage2, random.Random(rng.getrandbits(64)), r)
