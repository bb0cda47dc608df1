"""Templated ground-truth modification captions for demo-world edits.

Every operation has several phrasings. Those listed in HELDOUT_TEMPLATES are never used
for train or val captions; the test split uses them for its "phrasing" pairs, to measure
whether a retrieval model generalises to wordings it was not trained on. Captions never
refer to "image 1" or "the first image": they say what to change, fine-grained (colours,
patterns, counts, positions, sizes).
"""

from __future__ import annotations

import random
from typing import Any

from .scene import Edit
from .vocab import NOUNS, NUMBER_WORDS, POSITION_PHRASES

# Template ids are "<op>.<index>"; the texts are str.format strings over _fields().
TEMPLATES: dict[str, tuple[str, ...]] = {
    "add": (
        "add {np} {pos}",
        "put {np} {pos}",
        "place {np} {pos}",
        "include {np} {pos}",
        "there should also be {np} {pos}",
        "bring in {np} and set {it} {pos}",
    ),
    "remove": (
        "remove {ref}",
        "take away {ref}",
        "get rid of {ref}",
        "{ref} should be gone",
        "clear away {ref}",
        "leave out {ref}",
    ),
    "recolour": (
        "change the colour of {ref} from {from} to {to}",
        "make {ref} {to}",
        "recolour {ref} from {from} to {to}",
        "paint {ref} {to}",
        "{ref} should be {to} instead of {from}",
        "swap {ref} for {one_to}",
    ),
    "pattern": (
        "change the pattern of {ref} from {from} to {to}",
        "give {ref} a {to} pattern",
        "make {ref} {to}",
        "change {ref} to a {to} design",
        "{ref} should be {to} instead of {from}",
        "cover {ref} in a {to} print",
    ),
    "move": (
        "move {ref} from the {from} to the {to}",
        "move {ref} {to_dir}",
        "put {ref} {to_pos} instead",
        "relocate {ref} {to_dir}",
        "{ref} should be {to_pos} rather than {from_pos}",
        "slide {ref} over {to_dir}",
    ),
    "count": (
        "change the number of {adj}{nouns} from {from_w} to {to_w}",
        "make it {to_w} {adj}{noun_to} instead of {from_w}",
        "{count_delta}",
        "there should be {to_w} {adj}{noun_to}",
        "use {to_w} {adj}{noun_to} rather than {from_w}",
        "end up with {to_w} {adj}{noun_to} in total",
    ),
    "resize": (
        "make {ref} {comparative}",
        "replace {ref} with {one_to}",
        "change the size of {ref} to {to}",
        "{enlarge} {ref}",
        "{ref} should be {bigger}",
        "scale {ref} {updown}",
    ),
    "wall": (
        "change the wall colour from {from} to {to}",
        "paint the walls {to}",
        "make the walls {to}",
        "give the room {to} walls",
        "the walls should be {to} instead of {from}",
        "repaint the {from} walls {to}",
    ),
    "floor": (
        "change the floor from {from} to {to}",
        "replace the {from} floor with a {to} one",
        "make the floor {to}",
        "give the room a {to} floor",
        "the floor should be {to} instead of {from}",
        "lay a {to} floor instead of the {from} one",
    ),
}

# The last two phrasings of every operation are held out of train and val captions.
HELDOUT_TEMPLATES: frozenset[str] = frozenset(f"{op}.{i}" for op, ts in TEMPLATES.items() for i in (len(ts) - 2, len(ts) - 1))

# Joins between the clauses of a multi-edit caption. Each has a comma or semicolon and no
# template has one, so a caption splits back into its clauses unambiguously.
CONNECTIVES: tuple[str, ...] = (", and ", "; ", ", then ", ", and also ", ", plus ")

_DIRECTION = {"left": "to the left", "centre": "to the centre", "right": "to the right"}


def template_ids(op: str, heldout: bool) -> list[str]:
    """The ids of an operation's phrasings: the held-out ones or the others."""
    ids = [f"{op}.{i}" for i in range(len(TEMPLATES[op]))]
    return [t for t in ids if (t in HELDOUT_TEMPLATES) == heldout]


def _plural(obj: dict[str, Any], count: int | None = None) -> bool:
    count = obj["count"] if count is None else count
    return count > 1 or obj["kind"] == "curtains"


def _noun(kind: str, plural: bool) -> str:
    return NOUNS[kind][1 if plural else 0]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _adjectives(obj: dict[str, Any], keep: set[str]) -> list[str]:
    """Adjectives in English order: size, colour, pattern (plain patterns go unsaid)."""
    words = []
    if "size" in keep:
        words.append(obj["size"])
    if "colour" in keep:
        words.append(obj["colour"])
    if "pattern" in keep and obj["pattern"] != "plain":
        words.append(obj["pattern"])
    return words


def _choose_detail(rng: random.Random | None, exclude: str) -> set[str]:
    """Which attributes a referring expression mentions; None means all of them."""
    attributes = {"size", "colour", "pattern", "position", "count"} - {exclude}
    if rng is None:
        return attributes
    keep = {a for a in sorted(attributes) if rng.random() < 0.6}
    if not keep & {"size", "colour", "pattern", "position"}:
        keep.add(rng.choice(sorted(attributes & {"size", "colour", "position"})))
    return keep


def referring(obj: dict[str, Any], keep: set[str]) -> str:
    """'the two large red chairs on the left', mentioning only the attributes in keep."""
    plural = _plural(obj)
    words = ["the"]
    if "count" in keep and obj["count"] > 1:
        words.append(NUMBER_WORDS[obj["count"]])
    words += _adjectives(obj, keep)
    words.append(_noun(obj["kind"], plural))
    if "position" in keep:
        words.append(POSITION_PHRASES[obj["position"]])
    return " ".join(words)


def new_object_phrase(obj: dict[str, Any]) -> str:
    """'a large red striped chair', 'two small blue lamps', 'red curtains' (no position)."""
    adjectives = _adjectives(obj, {"size", "colour", "pattern"})
    plural = _plural(obj)
    head = " ".join(adjectives + [_noun(obj["kind"], plural)])
    if obj["count"] > 1:
        return f"{NUMBER_WORDS[obj['count']]} {head}"
    if plural:
        return head
    return f"{_article(head)} {head}"


def _fields(edit: Edit, rng: random.Random | None) -> dict[str, str]:
    """Values for the templates of one edit; rng picks the detail, None gives full detail."""
    op = edit["op"]
    if op in ("wall", "floor"):
        return {"from": edit["from"], "to": edit["to"]}
    obj = edit["object"]
    if op == "add":
        return {"np": new_object_phrase(obj), "pos": POSITION_PHRASES[obj["position"]],
                "it": "them" if _plural(obj) else "it"}
    if op == "remove":
        return {"ref": referring(obj, _choose_detail(rng, ""))}
    attribute = edit["attribute"]
    fields = {"from": str(edit["from"]), "to": str(edit["to"]),
              "ref": referring(obj, _choose_detail(rng, attribute))}
    after = {**obj, attribute: edit["to"]}
    if op in ("recolour", "resize"):
        value = edit["to"]
        fields["one_to"] = f"{value} ones" if _plural(obj) else f"{_article(value)} {value} one"
    if op == "move":
        fields.update(to_dir=_DIRECTION[edit["to"]], to_pos=POSITION_PHRASES[edit["to"]],
                      from_pos=POSITION_PHRASES[edit["from"]])
    if op == "resize":
        larger = edit["to"] == "large"
        fields.update(comparative="larger" if larger else "smaller", bigger="bigger" if larger else "smaller",
                      enlarge="enlarge" if larger else "shrink", updown="up" if larger else "down")
    if op == "count":
        keep = _choose_detail(rng, "count") - {"position"}
        adjectives = _adjectives(obj, keep)
        adj = " ".join(adjectives) + " " if adjectives else ""
        n_from, n_to = edit["from"], edit["to"]
        kind = obj["kind"]
        delta = abs(n_to - n_from)
        if n_to > n_from:
            count_delta = f"add {NUMBER_WORDS[delta]} more {adj}{_noun(kind, delta > 1)}"
        else:
            count_delta = f"remove {NUMBER_WORDS[delta]} of the {adj}{_noun(kind, True)}"
        fields.update(adj=adj, nouns=_noun(kind, True), noun_to=_noun(kind, _plural(after)),
                      from_w=NUMBER_WORDS[n_from], to_w=NUMBER_WORDS[n_to], count_delta=count_delta)
    return fields


def phrase_edit(edit: Edit, template_id: str, rng: random.Random | None = None) -> str:
    """One edit in one phrasing (lower case, no full stop)."""
    op, index = template_id.split(".")
    if op != edit["op"]:
        raise ValueError(f"template {template_id!r} does not phrase a {edit['op']!r} edit")
    return TEMPLATES[op][int(index)].format(**_fields(edit, rng))


def describe_edit(edit: Edit) -> str:
    """The canonical caption clause of one edit: first phrasing, every attribute named.

    For example "change the colour of the large striped chair on the left from red to blue".
    """
    return phrase_edit(edit, f"{edit['op']}.0", None)


def describe_edits(edits: list[Edit]) -> str:
    """One canonical sentence for a whole edit list."""
    return _sentence([describe_edit(e) for e in edits], ", and ")


def _sentence(clauses: list[str], connective: str) -> str:
    text = connective.join(clauses)
    return text[0].upper() + text[1:] + "."


def make_captions(edits: list[Edit], rng: random.Random, n: int, heldout: bool) -> list[str]:
    """``n`` distinct captions (fewer if the phrasings run out), each naming every edit.

    heldout=True draws only held-out phrasings, False only the others.
    """
    captions: list[str] = []
    for _ in range(n * 6):
        if len(captions) == n:
            break
        order = list(edits)
        rng.shuffle(order)
        clauses = [phrase_edit(e, rng.choice(template_ids(e["op"], heldout)), rng) for e in order]
        caption = _sentence(clauses, rng.choice(CONNECTIVES))
        if caption not in captions:
            captions.append(caption)
    return captions


def heldout_phrasings() -> list[dict[str, str]]:
    """The held-out phrasings as listed in world.json."""
    return [{"id": t, "op": t.split(".")[0], "template": TEMPLATES[t.split(".")[0]][int(t.split(".")[1])]}
            for t in sorted(HELDOUT_TEMPLATES)]
