"""Hallucination scoring against the demo world's ground truth.

Any run's stage 1/2 descriptor lists are compared with the scene graphs of the images
they describe, and its captions with the pair's edit list:

- a hallucinated object is a listed object the scene does not have (or a name the world
  does not know); a part or fixture the renderer draws ("pillows", "headboard", "ceiling")
  is right when its whole is in the scene and is counted apart (part_objects), with its
  descriptors unchecked; a hallucinated attribute is a descriptor that names a value (colour,
  pattern, size, position, count, wall colour, floor) the scene contradicts. Descriptors
  naming no value of the world's vocabulary ("soft light") cannot be checked and are
  counted apart, never as hallucinations.
- a caption is matched to a ground-truth change when it names the changed object (or
  wall/floor) and states the change's new value with the right kind of change; a caption
  that matches no change is an invented change, a change no caption matches is missed.

Text is read with the demo world's vocabulary (store.demo_world.vocab) plus common
synonyms, so a real VLM's free text is scored too; the reading is a heuristic and a
caption that names nothing the world knows is reported as `unparsed` (it also counts as
invented: it matches no real change).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Callable, Iterable, Iterator, Optional

import sqlite_utils

from store.annotations import get_run, list_runs
from store.demo_world.vocab import (
    COLOURS,
    FLOORS,
    KINDS,
    NOUNS,
    NUMBER_WORDS,
    OP_ATTRIBUTE,
    PATTERNS,
    POSITIONS,
    WALL_COLOURS,
)
from store.errors import NotFoundError
from store.models import PIPELINE_REVIEWER, RUN_SETTINGS_SHOWN, DescriptionRecord, ImageRecord, PairRecord
from store.review import list_captions_of, list_flags

OBJECT_ATTRIBUTES = ("colour", "pattern", "size", "position", "count")

# ---------------------------------------------------------------- reading text


def tokens(text: str) -> list[str]:
    """Lower-case words; hyphens and punctuation split words ('light-blue' -> light blue)."""
    return re.findall(r"[a-z]+|\d+", text.lower())


class PhraseTable:
    """Maps word sequences to canonical values; finds them longest first, left to right."""

    # Answers kept per word sequence: a caption is read by a dozen tables once per change
    # of its pair (and templated captions recur across pairs); bounded, as free text is not.
    MEMO_SIZE = 20_000

    def __init__(self, phrases: dict[str, Any]):
        self.phrases = {tuple(tokens(k)): v for k, v in phrases.items()}
        self.longest = max(len(k) for k in self.phrases)
        self._found: dict[tuple[str, ...], tuple[tuple[int, Any], ...]] = {}

    def find(self, words: list[str]) -> tuple[tuple[int, Any], ...]:
        """(word index, value) of every phrase found, without overlaps."""
        key = tuple(words)
        found = self._found.get(key)
        if found is None:
            if len(self._found) >= self.MEMO_SIZE:
                self._found.clear()
            found = self._found[key] = tuple(self._find(key))
        return found

    def _find(self, words: tuple[str, ...]) -> list[tuple[int, Any]]:
        out = []
        i = 0
        while i < len(words):
            for n in range(min(self.longest, len(words) - i), 0, -1):
                value = self.phrases.get(tuple(words[i:i + n]))
                if value is not None:
                    out.append((i, value))
                    i += n
                    break
            else:
                i += 1
        return out

    def values(self, words: list[str]) -> list[Any]:
        return [v for _, v in self.find(words)]

    def spans(self, words: list[str]) -> list[tuple[int, int, Any]]:
        """(word index, phrase length, value) of every phrase found, as find()."""
        out = []
        for i, value in self.find(words):
            n = next(n for n in range(min(self.longest, len(words) - i), 0, -1)
                     if self.phrases.get(tuple(words[i:i + n])) == value)
            out.append((i, n, value))
        return out


def _kind_phrases() -> dict[str, str]:
    phrases = {}
    for kind in KINDS:
        singular, plural = NOUNS[kind]
        phrases[singular] = phrases[plural] = kind
    phrases.update({
        "curtain": "curtains", "drapes": "curtains", "television": "tv", "televisions": "tv",
        "tv set": "tv", "bedside table": "nightstand", "bedside tables": "nightstand",
        "night stand": "nightstand", "night stands": "nightstand", "nightstand table": "nightstand",
        "armchair": "chair", "armchairs": "chair", "houseplant": "plant", "houseplants": "plant",
        "potted plant": "plant", "picture": "painting", "pictures": "painting", "artwork": "painting",
        "artworks": "painting", "wall clock": "clock", "floor lamp": "lamp", "table lamp": "lamp",
        "area rug": "rug", "wall mirror": "mirror",
        "wall": "wall", "walls": "wall", "floor": "floor", "floors": "floor", "flooring": "floor",
    })
    return phrases


KIND_TABLE = PhraseTable(_kind_phrases())
COLOUR_TABLE = PhraseTable({**{c: c for c in COLOURS}, "gray": "grey"})
WALL_TABLE = PhraseTable({**{c: c for c in WALL_COLOURS}, **{c: c for c in COLOURS},
                          "gray": "grey", "light grey": "grey", "beige": "cream", "off white": "cream",
                          "light gray": "grey", "sage": "sage green", "pale blue": "light blue",
                          "baby blue": "light blue", "dark blue": "navy", "navy blue": "navy",
                          "light yellow": "pale yellow", "lilac": "lavender"})
FLOOR_TABLE = PhraseTable({**{f: f for f in FLOORS}, "wood": "wooden", "hardwood": "wooden",
                           "parquet": "wooden", "carpet": "carpeted", "carpeting": "carpeted",
                           "tile": "tiled", "tiles": "tiled", "tiling": "tiled"})
PATTERN_TABLE = PhraseTable({**{p: p for p in PATTERNS}, "stripes": "striped", "stripe": "striped",
                             "dots": "dotted", "polka dot": "dotted", "polka dots": "dotted",
                             "spotted": "dotted", "spots": "dotted", "checkered": "checked",
                             "chequered": "checked", "checks": "checked", "plaid": "checked",
                             "checkerboard": "checked", "solid": "plain", "no pattern": "plain",
                             "unpatterned": "plain"})
SIZE_TABLE = PhraseTable({"small": "small", "large": "large", "big": "large", "tiny": "small",
                          "little": "small", "huge": "large"})
# Words that state a size change ("make it larger", "shrink the lamp"); they say the new
# size even where the referring expression names the old one ("shrink the large lamp").
RESIZE_TABLE = PhraseTable({"larger": "large", "bigger": "large", "enlarge": "large",
                            "scale up": "large", "grow": "large", "smaller": "small",
                            "shrink": "small", "scale down": "small", "reduce": "small"})
POSITION_TABLE = PhraseTable({p: p for p in POSITIONS} | {"center": "centre", "middle": "centre"})
NUMBER_TABLE = PhraseTable({**{w: n for n, w in NUMBER_WORDS.items()}, "1": 1, "2": 2, "3": 3,
                            "4": 4, "four": 4, "5": 5, "five": 5, "single": 1, "pair of": 2,
                            "a pair of": 2})

_TABLES = {"colour": COLOUR_TABLE, "pattern": PATTERN_TABLE, "size": SIZE_TABLE,
           "position": POSITION_TABLE, "count": NUMBER_TABLE}


# Parts of an object, and fixtures of the room, that the renderer draws but the world has
# no kind for: a VLM that lists "pillows" or "the ceiling" describes what is in the
# picture. Such an entry is right when its whole is in the scene (the room always is),
# an invented object when it is not; its descriptors are not checked. Each part names the
# kinds it can belong to; ROOM parts belong to the room (wall and floor).
ROOM = ("wall", "floor")
_PART_OF: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(("pillow", "pillows", "headboard", "headboards", "mattress", "mattresses",
                     "sheet", "sheets", "bedsheet", "bedsheets", "blanket", "blankets", "duvet",
                     "duvets", "bedding", "bedspread", "bedspreads", "comforter", "linen", "linens"),
                    ("bed",)),
    **dict.fromkeys(("cushion", "cushions", "seat", "backrest"), ("chair", "bed")),
    **dict.fromkeys(("leg", "legs"), ("chair", "bed", "nightstand", "lamp")),
    **dict.fromkeys(("drawer", "drawers", "knob", "knobs", "handle", "handles"), ("nightstand",)),
    **dict.fromkeys(("pot", "pots", "plant pot", "planter", "planters", "vase", "leaf", "leaves",
                     "foliage"), ("plant",)),
    **dict.fromkeys(("lampshade", "lampshades", "lamp shade", "shade", "shades", "bulb", "lamp base"),
                    ("lamp",)),
    **dict.fromkeys(("frame", "frames", "picture frame"), ("painting", "mirror", "window", "bed")),
    **dict.fromkeys(("pane", "panes", "window pane", "glass", "sky", "hills", "view", "outdoor view"),
                    ("window",)),
    **dict.fromkeys(("landscape", "canvas"), ("painting",)),
    **dict.fromkeys(("reflection", "reflective surface"), ("mirror",)),
    **dict.fromkeys(("screen", "display"), ("tv",)),
    **dict.fromkeys(("clock face", "dial", "hands", "clock hands"), ("clock",)),
    **dict.fromkeys(("curtain rod", "rod", "folds"), ("curtains",)),
    **dict.fromkeys(("ceiling", "skirting", "skirting board", "skirting boards", "baseboard",
                     "baseboards", "room", "corner", "back wall", "side wall", "side walls"), ROOM),
}
PART_TABLE = PhraseTable({phrase: phrase for phrase in _PART_OF})


@lru_cache(maxsize=4096)
def resolve_part(name: str) -> Optional[tuple[str, tuple[str, ...]]]:
    """(part, kinds it may belong to) when the name is a part or fixture ("pillows on the
    bed" -> ('pillows', ('bed',)), "ceiling" -> ('ceiling', ('wall', 'floor'))), else None.
    A name that names a kind as the whole ("nightstand with drawers") or a kind the part
    cannot belong to ("cushion on the rug") is not a part: resolve_name reads it."""
    words = tokens(name)
    parts = PART_TABLE.values(words)
    if not parts:
        return None
    part, parents = parts[0], _PART_OF[parts[0]]
    kinds = [k for k in KIND_TABLE.values(words) if k not in ROOM]
    if kinds:
        # "bed pillows" is a part of the bed; "nightstand with drawers" is the nightstand.
        if kinds[0] not in parents or _names_the_whole(words, kinds[0], part):
            return None
        return part, (kinds[0],)
    return part, parents


def _names_the_whole(words: list[str], kind: str, part: str) -> bool:
    """Whether the kind comes first and the part only qualifies it ("nightstand with
    drawers", "lamp with a white shade"), as opposed to "bed pillows", "pillows on the bed"."""
    kind_at = next(i for i, k in KIND_TABLE.find(words) if k == kind)
    part_at = next(i for i, p in PART_TABLE.find(words) if p == part)
    return kind_at < part_at and any(w in ("with", "and", "has", "having") for w in words[kind_at:part_at])


@lru_cache(maxsize=4096)
def resolve_name(name: str) -> Optional[str]:
    """The world's kind (or 'wall'/'floor') an object name refers to, else None."""
    found = KIND_TABLE.values(tokens(name))
    kinds = [k for k in found if k not in ("wall", "floor")]
    if kinds:
        return kinds[0]  # "lamp on the nightstand" is a lamp; "wall clock" is one phrase
    return found[0] if found else None


@lru_cache(maxsize=65536)  # descriptors repeat a lot (stage 2 copies stage 1's)
def descriptor_values(subject: str, descriptor: str) -> dict[str, list[Any]]:
    """The world values one descriptor names, by attribute (a shared dict: do not modify).

    subject: an object kind, or 'wall' / 'floor'.
    """
    words = tokens(descriptor)
    if subject == "wall":
        found = WALL_TABLE.values(words)
        return {"wall": found} if found else {}
    if subject == "floor":
        found = FLOOR_TABLE.values(words)
        return {"floor": found} if found else {}
    out = {}
    for attribute, table in _TABLES.items():
        found = table.values(words)
        if found:
            out[attribute] = found
    return out


def object_from_descriptors(name: str, descriptors: Iterable[str]) -> dict[str, Any]:
    """An object dict (scene-graph keys) from a descriptor list; unnamed attributes left out.

    For 'wall'/'floor' the result is {'kind': 'wall', 'wall': value}.
    """
    kind = resolve_name(name) or name
    obj: dict[str, Any] = {"kind": kind}
    for descriptor in descriptors:
        for attribute, values in descriptor_values(kind, descriptor).items():
            obj.setdefault(attribute, values[0])
    return obj


def _wall_colour_agrees(said: str, truth: str) -> bool:
    # "blue" for a light blue wall is vague, not wrong.
    return said == truth or said in truth.split()


# ---------------------------------------------------------------- descriptor lists


@dataclass
class DescriptorCheck:
    """A descriptor list against a scene graph."""

    objects: int = 0
    hallucinated_objects: int = 0
    descriptors: int = 0               # descriptors of objects the scene has
    checked_descriptors: int = 0       # of those, the ones naming a world value
    hallucinated_descriptors: int = 0
    missed_objects: int = 0            # scene objects the list leaves out (not hallucinations)
    part_objects: int = 0              # listed parts/fixtures whose whole is there (unchecked)
    # (object index, descriptor index or None for the whole object, reason)
    items: list[tuple[int, Optional[int], str]] = field(default_factory=list)
    descriptor_counts: list[int] = field(default_factory=list)  # descriptors per listed object

    def hallucinated_keys(self) -> set[tuple[int, int]]:
        """(object, descriptor) of every hallucinated descriptor (all of an invented object's)."""
        keys = set()
        for obj, desc, _ in self.items:
            if desc is None:
                keys.update((obj, d) for d in range(self.descriptor_counts[obj]))
            else:
                keys.add((obj, desc))
        return keys


def _scene_truth(scene: dict) -> dict[str, dict[str, Any]]:
    truth = {o["kind"]: o for o in scene.get("objects", [])}
    truth["wall"] = {"kind": "wall", "wall": scene.get("wall")}
    truth["floor"] = {"kind": "floor", "floor": scene.get("floor")}
    return truth


def check_descriptors(objects: list[dict], scene: dict) -> DescriptorCheck:
    """Score one descriptor list ([{"name", "descriptors"}]) against a scene graph."""
    truth = _scene_truth(scene)
    check = DescriptorCheck()
    seen: set[str] = set()
    for i, obj in enumerate(objects):
        descriptors = list(obj.get("descriptors") or [])
        check.objects += 1
        check.descriptor_counts.append(len(descriptors))
        part = resolve_part(obj.get("name", ""))
        if part is not None:
            if any(whole in truth for whole in part[1]):
                check.part_objects += 1
            else:
                check.hallucinated_objects += 1
                check.items.append((i, None, f"object not there: {part[0]} (part of a {' / '.join(part[1])})"))
            continue
        kind = resolve_name(obj.get("name", ""))
        if kind is None or kind not in truth:
            check.hallucinated_objects += 1
            what = obj.get("name") if kind is None else kind
            check.items.append((i, None, f"object not there: {what}"))
            continue
        seen.add(kind)
        real = truth[kind]
        for j, descriptor in enumerate(descriptors):
            check.descriptors += 1
            values = descriptor_values(kind, descriptor)
            if not values:
                continue
            check.checked_descriptors += 1
            # "red and white stripes" on a red striped bed is right: an attribute is
            # contradicted when none of the values the descriptor names for it agree.
            wrong = [
                f"{attribute} {' / '.join(map(str, said_values))!r} (is {real.get(attribute)!r})"
                for attribute, said_values in values.items()
                if not any(_agrees(attribute, said, real) for said in said_values)
            ]
            if wrong:
                check.hallucinated_descriptors += 1
                check.items.append((i, j, "wrong attribute: " + ", ".join(wrong)))
    check.missed_objects = len(set(truth) - seen)
    return check


def _agrees(attribute: str, said: Any, real: dict) -> bool:
    value = real.get(attribute)
    if attribute == "wall":
        return _wall_colour_agrees(said, value)
    if attribute == "count" and said == 1 and value is not None:
        return value == 1
    return said == value


# ---------------------------------------------------------------- captions

_ADD_CUES = PhraseTable({w: True for w in (
    "add", "adding", "added", "put", "place", "placing", "include", "including", "bring in",
    "introduce", "insert", "there should also be", "new", "appears", "appear", "also be",
    "set up", "hang", "install")})
_REMOVE_CUES = PhraseTable({w: True for w in (
    "remove", "removed", "removing", "take away", "take out", "get rid of", "gone", "clear away",
    "leave out", "without", "no longer", "delete", "missing", "eliminate", "disappear",
    "disappears", "drop")})
_COUNT_CUES = PhraseTable({w: True for w in (
    "more", "fewer", "less", "number of", "in total", "another", "extra", "second", "third",
    "additional", "copies", "end up with", "one of the", "two of the", "three of the")})
_INDEFINITE = {"a", "an", "another", "some", "new"}
_NUMBERS = {"one", "two", "three", "four", "five", "1", "2", "3", "4", "5"}
_REVERSERS = (("instead", "of"), ("rather", "than"))


def _has(table: PhraseTable, words: list[str]) -> bool:
    return bool(table.find(words))


def _new_value(words: list[str], table: PhraseTable) -> Any:
    """The value a caption gives as the new one: the one before 'instead of' / 'rather
    than' when those are used ("the lamp should be red instead of blue"), else the last."""
    found = table.find(words)
    if not found:
        return None
    for i in range(len(words) - 1):
        if (words[i], words[i + 1]) in _REVERSERS:
            before = [v for pos, v in found if pos < i]
            if before:
                return before[-1]
    return found[-1][1]


_DEFINITE = {"the", "this", "that", "these", "those", "it", "its", "their"}
_INTRODUCERS = {"add", "put", "place", "include", "insert", "introduce", "in", "be", "new", "install"}


def _is_add_phrase(words: list[str], kind: str) -> bool:
    """An add cue, and the kind introduced as new: with an indefinite article or a
    number ("add a red lamp"), or bare after the verb ("add lamps"), not "the lamp"."""
    if not _has(_ADD_CUES, words):
        return False
    for pos, found in KIND_TABLE.find(words):
        if found != kind:
            continue
        numbered = False
        for j in range(pos - 1, max(-1, pos - 7), -1):  # back over adjectives and a number
            if words[j] in _NUMBERS:
                numbered = True  # "the two lamps" is definite, "add two lamps" is not
                continue
            if words[j] in _INDEFINITE or words[j] in _INTRODUCERS:
                return True
            if words[j] in _DEFINITE:
                break
        else:
            if numbered:
                return True
    return False


def _count_change(words: list[str], before: int) -> Optional[int]:
    """The number of objects a caption asks for, given the count before the edit."""
    numbers = NUMBER_TABLE.find(words)
    for i, word in enumerate(words):
        if word == "more":
            delta = [v for pos, v in numbers if i - 4 <= pos < i]
            return before + (delta[-1] if delta else 1)
        if word in ("fewer", "less"):
            delta = [v for pos, v in numbers if i - 4 <= pos < i]
            return before - (delta[-1] if delta else 1)
        if word == "another" or (word in ("second", "third") and "a" in words[max(0, i - 2):i]):
            return before + 1
        if word == "of" and i + 1 < len(words) and words[i + 1] == "the" and _has(_REMOVE_CUES, words):
            delta = [v for pos, v in numbers if pos == i - 1]
            if delta:
                return before - delta[0]
    value = _new_value(words, NUMBER_TABLE)
    return value


def _grammatical_number_agrees(words: list[str], obj: dict) -> bool:
    """The noun's number agrees with the object's count: "add a lamp" does not state
    adding two lamps, "remove the chairs" does not state removing one chair. Only when
    every mention of the kind says the same number ("curtains" is always plural)."""
    kind = obj.get("kind")
    if kind == "curtains" or not isinstance(obj.get("count"), int):
        return True
    # A kind's plural nouns are the only ones ending in "s" (beds, TVs, bedside tables).
    plural = {words[i + n - 1].endswith("s") for i, n, value in KIND_TABLE.spans(words) if value == kind}
    if plural == {True}:
        return obj["count"] > 1
    if plural == {False}:
        return obj["count"] == 1
    return True


def _consistent_with(words: list[str], obj: dict) -> bool:
    """No attribute value in the caption contradicts the object (add and remove captions),
    nor its count, said as a number or by the noun's number."""
    for attribute in ("colour", "pattern", "size", "position"):
        for said in _TABLES[attribute].values(words):
            if said != obj.get(attribute):
                return False
    numbers = [n for n in NUMBER_TABLE.values(words) if n != 1]
    return all(n == obj.get("count") for n in numbers) and _grammatical_number_agrees(words, obj)


def caption_matches_edit(caption: str, edit: dict) -> bool:
    """Whether the caption states this ground-truth change (see the module docstring)."""
    words = tokens(caption)
    op = edit["op"]
    subjects = set(KIND_TABLE.values(words))
    if op in ("wall", "floor"):
        mentioned = KIND_TABLE.values(words)
        if not mentioned or mentioned[0] != op:
            return False  # "the painting on the left wall" is about the painting
        if op == "wall":
            said = _new_value(words, WALL_TABLE)
            return said is not None and _wall_colour_agrees(said, edit["to"])
        return _new_value(words, FLOOR_TABLE) == edit["to"]
    kind = edit["kind"]
    if kind not in subjects:
        return False
    counting = _has(_COUNT_CUES, words)
    if op == "add":
        return _is_add_phrase(words, kind) and not counting and _consistent_with(words, edit["object"])
    removing = _has(_REMOVE_CUES, words)
    pattern_removed = _removed_pattern(words) if removing else None
    if op == "remove":
        return removing and pattern_removed is None and not counting and _consistent_with(words, edit["object"])
    if op == "count":
        return _count_change(words, edit["from"]) == edit["to"]
    if op == "pattern" and pattern_removed is not None:
        # "remove the stripes from the chairs": the pattern goes, the chairs stay plain
        return edit["to"] == "plain" and pattern_removed in (edit["from"], "any")
    if removing or _is_add_phrase(words, kind):
        return False
    attribute = OP_ATTRIBUTE[op]
    if attribute == "size":
        return _new_size(words) == edit["to"]
    return _new_value(words, _TABLES[attribute]) == edit["to"]


# Nouns that name a pattern itself, not an object that has one ("the stripes" vs "the
# striped chair"): removing one of them makes the object plain.
_PATTERN_NOUNS = {"stripes": "striped", "stripe": "striped", "dots": "dotted", "spots": "dotted",
                  "checks": "checked", "pattern": "any"}


def _removed_pattern(words: list[str]) -> Optional[str]:
    """The pattern a remove caption takes away ('any' for "the pattern"), else None."""
    for word in words:
        if word in _PATTERN_NOUNS:
            return _PATTERN_NOUNS[word]
    return None


def _new_size(words: list[str]) -> Optional[str]:
    if "scale" in words:
        after = words[words.index("scale"):]
        if "up" in after:
            return "large"
        if "down" in after:
            return "small"
    return _new_value(words, RESIZE_TABLE) or _new_value(words, SIZE_TABLE)


@dataclass
class CaptionCheck:
    """One pair's captions against its edit list."""

    captions: int = 0
    changes: int = 0
    matched: list[list[int]] = field(default_factory=list)   # per caption: edits it states
    missed: list[int] = field(default_factory=list)          # edits no caption states
    invented: list[int] = field(default_factory=list)        # captions stating no edit
    unparsed: list[int] = field(default_factory=list)        # captions naming no known object


def check_captions(captions: list[str], edits: list[dict]) -> CaptionCheck:
    check = CaptionCheck(captions=len(captions), changes=len(edits))
    covered: set[int] = set()
    for i, caption in enumerate(captions):
        hits = [k for k, edit in enumerate(edits) if caption_matches_edit(caption, edit)]
        check.matched.append(hits)
        covered.update(hits)
        if not hits:
            check.invented.append(i)
            if not KIND_TABLE.find(tokens(caption)):
                check.unparsed.append(i)
    check.missed = [k for k in range(len(edits)) if k not in covered]
    return check


# ---------------------------------------------------------------- runs


def _row(db, sql: str, params: list) -> Optional[dict]:
    cursor = db.execute(sql, params)
    row = cursor.fetchone()
    return None if row is None else dict(zip([d[0] for d in cursor.description], row))


# Rows read per query when scoring many pairs: one query per chunk, not a few per pair.
_CHUNK = 500


def _rows_by_id(db, table: str, ids: Iterable[str]) -> dict[str, dict]:
    ids = list(ids)
    out = {}
    for start in range(0, len(ids), _CHUNK):
        chunk = ids[start:start + _CHUNK]
        cursor = db.execute(f"SELECT * FROM {table} WHERE id IN ({', '.join('?' * len(chunk))})", chunk)
        names = [d[0] for d in cursor.description]
        for row in cursor.fetchall():
            record = dict(zip(names, row))
            out[record["id"]] = record
    return out


class _Truth:
    """Scenes, edit lists and descriptor checks read once per scoring call: a stage 1 list
    is shared by every pair with its reference image, so it is checked once, not per pair."""

    def __init__(self, db: sqlite_utils.Database):
        self.db = db
        self._scenes: dict[str, Optional[dict]] = {}
        self._pairs: dict[str, Optional[PairRecord]] = {}
        self._checks: dict[str, Optional[DescriptorCheck]] = {}

    def load(self, pair_ids: Iterable[str], description_ids: Iterable[str]) -> None:
        """Read the pairs, descriptions and their images' scenes not read yet, in bulk."""
        wanted = [p for p in set(pair_ids) if p not in self._pairs]
        rows = _rows_by_id(self.db, "pairs", wanted)
        for pair_id in wanted:
            row = rows.get(pair_id)
            self._pairs[pair_id] = PairRecord.from_row(row) if row else None
        wanted = [d for d in set(description_ids) if d and d not in self._checks]
        descriptions = {d: DescriptionRecord.from_row(row)
                        for d, row in _rows_by_id(self.db, "descriptions", wanted).items()}
        images = [d.image_id for d in descriptions.values() if d.image_id not in self._scenes]
        rows = _rows_by_id(self.db, "images", images)
        for image_id in images:
            row = rows.get(image_id)
            self._scenes[image_id] = ImageRecord.from_row(row).scene_json if row else None
        for description_id in wanted:
            self._checks[description_id] = self._check(descriptions.get(description_id))

    def _check(self, description: Optional[DescriptionRecord]) -> Optional[DescriptorCheck]:
        scene = self.scene(description.image_id) if description else None
        if scene is None:
            return None
        return check_descriptors([o.model_dump() for o in description.objects], scene)

    def check(self, description_id: str) -> Optional[DescriptorCheck]:
        """The description's list against its image's scene (None without a scene); shared,
        do not modify."""
        if description_id not in self._checks:
            self.load((), [description_id])
        return self._checks[description_id]

    def scene(self, image_id: str) -> Optional[dict]:
        if image_id not in self._scenes:
            row = _row(self.db, "SELECT * FROM images WHERE id = ?", [image_id])
            self._scenes[image_id] = ImageRecord.from_row(row).scene_json if row else None
        return self._scenes[image_id]

    def pair(self, pair_id: str) -> Optional[PairRecord]:
        if pair_id not in self._pairs:
            self.load([pair_id], ())
        return self._pairs[pair_id]

    def edits(self, pair_id: str) -> Optional[list[dict]]:
        pair = self.pair(pair_id)
        if pair is None or not isinstance(pair.ground_truth, list):
            return None
        return pair.ground_truth


@dataclass
class AnnotationScore:
    annotation_id: str
    pair_id: str
    stage1_id: Optional[str] = None
    stage2_id: Optional[str] = None
    stage1: Optional[DescriptorCheck] = None
    stage2: Optional[DescriptorCheck] = None
    captions: Optional[CaptionCheck] = None
    caption_ids: list[str] = field(default_factory=list)
    caption_texts: list[str] = field(default_factory=list)
    # compound caption id -> ids of the individual captions it joins
    compound_sources: dict[str, list[str]] = field(default_factory=dict)

    def hallucinated_caption_ids(self) -> set[str]:
        """Individual captions that state no real change, and compounds that contain one."""
        if self.captions is None:
            return set()
        bad = {self.caption_ids[i] for i in self.captions.invented}
        bad |= {cid for cid, sources in self.compound_sources.items() if set(sources) & bad}
        return bad

    def hallucinated_descriptor_keys(self) -> set[tuple[str, int, int]]:
        keys = set()
        for description_id, check in ((self.stage1_id, self.stage1), (self.stage2_id, self.stage2)):
            if check is not None:
                keys |= {(description_id, o, d) for o, d in check.hallucinated_keys()}
        return keys


def score_annotation(db: sqlite_utils.Database, annotation_id: str, *, text: str = "original",
                     truth: Optional[_Truth] = None) -> AnnotationScore:
    """One annotated pair against ground truth. text: 'original' (the VLM's) or 'current'
    (after human edits). Parts without ground truth are left as None."""
    return next(score_annotations(db, [annotation_id], text=text, truth=truth))


def score_annotations(db: sqlite_utils.Database, annotation_ids: Iterable[str], *, text: str = "original",
                      truth: Optional[_Truth] = None) -> Iterator[AnnotationScore]:
    """score_annotation of each id, in the order given, reading the store a chunk of
    pairs per query (a few queries per pair made scoring 20,000 pairs wait on SQLite)."""
    truth = truth or _Truth(db)
    ids = list(annotation_ids)
    for start in range(0, len(ids), _CHUNK):
        chunk = ids[start:start + _CHUNK]
        rows = _rows_by_id(db, "annotations", chunk)
        truth.load([r["pair_id"] for r in rows.values()],
                   [r[k] for r in rows.values() for k in ("stage1_id", "stage2_id") if r[k]])
        captions_of = list_captions_of(db, [a for a in chunk if a in rows])
        for annotation_id in chunk:
            row = rows.get(annotation_id)
            if row is None:
                raise NotFoundError(f"annotation {annotation_id!r} does not exist")
            yield _score(row, captions_of[annotation_id], truth, text)


def _score(row: dict, captions: list, truth: _Truth, text: str) -> AnnotationScore:
    score = AnnotationScore(row["id"], row["pair_id"], row["stage1_id"], row["stage2_id"])
    pair = truth.pair(row["pair_id"])
    for stage, description_id in ((1, row["stage1_id"]), (2, row["stage2_id"])):
        if description_id:
            check = truth.check(description_id)
            if check is not None:
                setattr(score, f"stage{stage}", check)
    individual = [c for c in captions if c.kind == "individual"]
    score.caption_ids = [c.id for c in individual]
    score.caption_texts = [c.text if text == "original" else (c.current_text or c.text) for c in individual]
    score.compound_sources = {c.id: list(c.sources or []) for c in captions if c.kind == "compound"}
    edits = truth.edits(row["pair_id"]) if pair is not None else None
    if edits is not None and individual:
        score.captions = check_captions(score.caption_texts, edits)
    return score


def _rate(part: float, whole: float) -> Optional[float]:
    return round(part / whole, 4) if whole else None


def _descriptor_summary(checks: list[DescriptorCheck]) -> dict:
    objects = sum(c.objects for c in checks)
    bad_objects = sum(c.hallucinated_objects for c in checks)
    descriptors = sum(c.descriptors for c in checks)
    bad_descriptors = sum(c.hallucinated_descriptors for c in checks)
    bad_lists = sum(1 for c in checks if c.hallucinated_objects or c.hallucinated_descriptors)
    missed = sum(c.missed_objects for c in checks)
    parts = sum(c.part_objects for c in checks)
    truth_objects = objects - bad_objects - parts + missed
    return {
        "lists": len(checks),
        "objects": objects,
        "hallucinated_objects": bad_objects,
        "object_rate": _rate(bad_objects, objects),
        "descriptors": descriptors,
        "checked_descriptors": sum(c.checked_descriptors for c in checks),
        "hallucinated_attributes": bad_descriptors,
        "attribute_rate": _rate(bad_descriptors, descriptors),
        "lists_with_hallucination": bad_lists,
        "list_rate": _rate(bad_lists, len(checks)),
        "hallucinations_per_list": _rate(bad_objects + bad_descriptors, len(checks)),
        "missed_objects": missed,
        "part_objects": parts,
        "missed_object_rate": _rate(missed, truth_objects),
    }


def _caption_summary(checks: list[CaptionCheck]) -> dict:
    captions = sum(c.captions for c in checks)
    changes = sum(c.changes for c in checks)
    missed = sum(len(c.missed) for c in checks)
    invented = sum(len(c.invented) for c in checks)
    return {
        "pairs": len(checks),
        "captions": captions,
        "changes": changes,
        "missed_changes": missed,
        "missed_rate": _rate(missed, changes),
        "invented_captions": invented,
        "invented_rate": _rate(invented, captions),
        "unparsed_captions": sum(len(c.unparsed) for c in checks),
        "pairs_with_missed": sum(1 for c in checks if c.missed),
        "pairs_with_invented": sum(1 for c in checks if c.invented),
        "pair_error_rate": _rate(sum(1 for c in checks if c.missed or c.invented), len(checks)),
    }


def _annotation_ids(db, run_id: int) -> list[str]:
    return [r[0] for r in db.execute(
        "SELECT id FROM annotations WHERE run_id = ? AND status = 'done' ORDER BY seq", [run_id])]


def score_run(db: sqlite_utils.Database, run_id: int, *, text: str = "original",
              detail: bool = False, progress: bool = False) -> dict:
    """A run's hallucination scores per stage against the demo world's ground truth.

    Returns {"run_id", "name", "backend", "model", "method", "prompt_versions", "pairs",
    "pairs_scored", "pairs_without_ground_truth", "stage1", "stage2", "captions"} where
    stage1/stage2 are descriptor summaries (None for a single-stage run) and captions a
    caption summary; with detail=True also "annotations": per-pair findings.
    """
    if text not in ("original", "current"):
        raise ValueError("text must be 'original' or 'current'")
    run = get_run(db, run_id)
    ids = _annotation_ids(db, run_id)
    scores: Iterable[AnnotationScore] = score_annotations(db, ids, text=text)
    if progress:
        from tqdm import tqdm

        scores = tqdm(scores, total=len(ids), desc=f"scoring run {run_id}", unit="pair", leave=False)
    return summarize_run(run, scores, text=text, detail=detail)


def summarize_run(run, scores: Iterable[AnnotationScore], *, text: str = "original", detail: bool = False) -> dict:
    """score_run's answer from the run's record and its done pairs' scores (in queue
    order), for a caller that keeps scores between calls (the app's Stats tab)."""
    stage1: dict[str, DescriptorCheck] = {}     # shared by pairs with one reference: once each
    stage2: list[DescriptorCheck] = []
    captions: list[CaptionCheck] = []
    details = []
    pairs = without_truth = 0
    for score in scores:
        pairs += 1
        if score.stage1 is not None:
            stage1.setdefault(score.stage1_id, score.stage1)
        if score.stage2 is not None:
            stage2.append(score.stage2)
        if score.captions is not None:
            captions.append(score.captions)
        else:
            without_truth += 1
        if detail:
            details.append(_score_detail(score))
    staged = run.method != "single"
    result = {
        "run_id": run.id, "name": run.name, "backend": run.backend, "model": run.model,
        "method": run.method, "prompt_versions": run.prompt_versions, "settings": run.settings, "text": text,
        "pairs": pairs, "pairs_scored": len(captions), "pairs_without_ground_truth": without_truth,
        "stage1": _descriptor_summary(list(stage1.values())) if staged else None,
        "stage2": _descriptor_summary(stage2) if staged else None,
        "captions": _caption_summary(captions),
    }
    if detail:
        result["annotations"] = details
    return result


def _score_detail(score: AnnotationScore) -> dict:
    def descriptor_part(check: Optional[DescriptorCheck]) -> Optional[dict]:
        if check is None:
            return None
        return {"objects": check.objects, "hallucinated_objects": check.hallucinated_objects,
                "hallucinated_attributes": check.hallucinated_descriptors,
                "items": [{"object": o, "descriptor": d, "reason": r} for o, d, r in check.items]}

    out = {"annotation_id": score.annotation_id, "pair_id": score.pair_id,
           "stage1": descriptor_part(score.stage1), "stage2": descriptor_part(score.stage2),
           "captions": None}
    if score.captions is not None:
        c = score.captions
        out["captions"] = {
            "missed_changes": c.missed,
            "invented": [score.caption_ids[i] for i in c.invented],
            "matched": {score.caption_ids[i]: hits for i, hits in enumerate(c.matched)},
        }
    return out


def score_runs(db: sqlite_utils.Database, run_ids: Iterable[int], **kwargs) -> list[dict]:
    """score_run for each of run_ids, in the order given. Every id is checked first: a
    typo in the last one must not cost the minutes of scoring those before it."""
    run_ids = list(run_ids)
    known = [run.id for run in list_runs(db)]
    missing = [run_id for run_id in run_ids if run_id not in known]
    if missing:
        names = ", ".join(str(run_id) for run_id in missing)
        said = f"run {names} does not exist" if len(missing) == 1 else f"runs {names} do not exist"
        there = (f"this store's runs: {', '.join(map(str, known))}" if known
                 else "this store has no runs yet; start one with `good4cir annotate`")
        raise NotFoundError(f"{said} ({there})")
    return [score_run(db, run_id, **kwargs) for run_id in run_ids]


# ---------------------------------------------------------------- the table

TABLE_COLUMNS = (
    ("stage1", "object_rate", "s1 obj"),
    ("stage1", "attribute_rate", "s1 attr"),
    ("stage2", "object_rate", "s2 obj"),
    ("stage2", "attribute_rate", "s2 attr"),
    ("captions", "missed_rate", "missed"),
    ("captions", "invented_rate", "invented"),
    ("captions", "pair_error_rate", "pairs w/ err"),
)


def _fmt(value: Optional[float]) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def differing_settings(scores: list[dict]) -> dict[int, str]:
    """run id -> the settings (store.models.RUN_SETTINGS_SHOWN, but the method, shown apart)
    in which it differs from the compared runs of its backend and model, as 'error_rate 0.1':
    two simulator runs at two error rates read alike otherwise."""
    groups: dict[tuple, list[dict]] = {}
    for s in scores:
        groups.setdefault((s.get("backend"), s.get("model")), []).append(s.get("settings") or {})
    out = {}
    for s in scores:
        siblings = groups[(s.get("backend"), s.get("model"))]
        mine = s.get("settings") or {}
        keys = [key for key in RUN_SETTINGS_SHOWN
                if key != "method" and len({json.dumps(v.get(key), sort_keys=True) for v in siblings}) > 1]
        out[s["run_id"]] = ", ".join(f"{key} {'none' if mine.get(key) is None else mine[key]}" for key in keys)
    return out


def format_table(scores: list[dict]) -> str:
    """A plain-text table: one row per run, hallucination rates per stage."""
    header = ["run", "backend", "model", "method", "pairs"] + [label for _, _, label in TABLE_COLUMNS]
    rows = [header]
    differing = differing_settings(scores)
    for s in scores:
        said = ", ".join(part for part in (s.get("name"), differing.get(s["run_id"])) if part)
        row = [str(s["run_id"]) + (f" ({said})" if said else ""), s["backend"],
               s["model"], s["method"], str(s["pairs_scored"])]
        for part, key, _ in TABLE_COLUMNS:
            row.append(_fmt((s.get(part) or {}).get(key)))
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    notes = ("s1/s2 obj: listed objects not in the scene; attr: descriptors contradicting the "
             "scene; missed: ground-truth changes no caption states; invented: captions "
             "stating no real change")
    return "\n".join(lines) + "\n" + notes


# ---------------------------------------------------------------- human flags vs truth


def parse_descriptor_target(target_id: str) -> tuple[str, int, Optional[int]]:
    """'<description id>/<object index>/<descriptor index>' (descriptor part optional:
    a flag on the whole object) -> (description id, object, descriptor or None)."""
    parts = target_id.rsplit("/", 2)
    try:
        if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
            return parts[0], int(parts[1]), int(parts[2])
        head, obj = target_id.rsplit("/", 1)
        return head, int(obj), None
    except ValueError:
        raise ValueError(f"descriptor flag target {target_id!r} is not '<description>/<object>/<descriptor>'")


def _prf(truth: set, flagged: set) -> dict:
    caught = truth & flagged
    return {
        "hallucinated": len(truth), "flagged": len(flagged), "caught": len(caught),
        "precision": _rate(len(caught), len(flagged)), "recall": _rate(len(caught), len(truth)),
        "missed": sorted(map(str, truth - flagged)), "false_flags": sorted(map(str, flagged - truth)),
    }


def flag_sets(score: AnnotationScore, flags: Iterable[tuple[str, str, str]]) -> Optional[tuple[set, set, set, set]]:
    """One scored pair's (truly hallucinated descriptors, truly hallucinated captions,
    flagged descriptors, flagged captions), given its active flags as (reviewer,
    target_kind, target_id); None when the pair has no ground truth. Items as score_flags
    names them; the pipeline's own flags are left out."""
    if score.captions is None and score.stage1 is None and score.stage2 is None:
        return None
    true_desc = {f"{d}/{o}/{k}" for d, o, k in score.hallucinated_descriptor_keys()}
    true_caps = score.hallucinated_caption_ids() if score.captions is not None else set()
    counts = {}
    for description_id, check in ((score.stage1_id, score.stage1), (score.stage2_id, score.stage2)):
        if check is not None:
            counts[description_id] = check.descriptor_counts
    flag_desc: set[str] = set()
    flag_caps: set[str] = set()
    for reviewer, target_kind, target_id in flags:
        if reviewer == PIPELINE_REVIEWER:
            continue  # a repair the pipeline could not get, not a human's hallucination call
        if target_kind == "caption":
            flag_caps.add(target_id)
            continue
        description_id, obj, desc = parse_descriptor_target(target_id)
        if desc is not None:
            flag_desc.add(f"{description_id}/{obj}/{desc}")
        else:
            n = counts.get(description_id, [])
            flag_desc |= {f"{description_id}/{obj}/{k}" for k in range(n[obj] if obj < len(n) else 0)}
    return true_desc, true_caps, flag_desc, flag_caps


def score_flags(db: sqlite_utils.Database, annotation_id: Optional[str] = None, *,
                run_id: Optional[int] = None, annotation_ids: Optional[list[str]] = None) -> dict:
    """How many of the truly hallucinated captions and descriptors the human flags caught.

    Give one annotation id, a list of them, or run_id for every done pair of a run.
    Returns {"annotations", "hallucinated", "flagged", "caught", "precision", "recall",
    "descriptors": {...}, "captions": {...}, "all": {...}}: the top-level counts are the
    "all" part's; each part has hallucinated, flagged, caught, precision, recall, missed
    and false_flags (item lists). Descriptor items are '<description id>/<object>/
    <descriptor>' (a flag on a whole object counts for each of its descriptors); caption
    items are caption ids (a compound is hallucinated when one of its sources is).
    Pairs without ground truth are skipped; rates with nothing to divide are None.
    """
    given = [x is not None for x in (annotation_id, run_id, annotation_ids)]
    if sum(given) != 1:
        raise ValueError("give one of: an annotation id, a list of annotation ids, a run id")
    if annotation_id is not None:
        ids = [annotation_id]
    elif annotation_ids is not None:
        ids = list(annotation_ids)
    else:
        ids = _annotation_ids(db, run_id)
    true_desc: set[str] = set()
    true_caps: set[str] = set()
    flag_desc: set[str] = set()
    flag_caps: set[str] = set()
    scored = 0
    for score in score_annotations(db, ids):
        flags = [(f.reviewer, f.target_kind, f.target_id) for f in list_flags(db, score.annotation_id)]
        found = flag_sets(score, flags)
        if found is None:
            continue
        scored += 1
        for into, part in zip((true_desc, true_caps, flag_desc, flag_caps), found):
            into |= part
    every = _prf({f"descriptor {x}" for x in true_desc} | {f"caption {x}" for x in true_caps},
                 {f"descriptor {x}" for x in flag_desc} | {f"caption {x}" for x in flag_caps})
    return {
        "annotations": scored,
        **{k: every[k] for k in ("hallucinated", "flagged", "caught", "precision", "recall")},
        "descriptors": _prf(true_desc, flag_desc),
        "captions": _prf(true_caps, flag_caps),
        "all": every,
    }


__all__ = [
    "AnnotationScore", "CaptionCheck", "DescriptorCheck", "caption_matches_edit", "check_captions",
    "check_descriptors", "descriptor_values", "flag_sets", "format_table", "object_from_descriptors",
    "parse_descriptor_target", "resolve_name", "score_annotation", "score_annotations", "score_flags",
    "score_run", "score_runs", "summarize_run", "tokens",
]
