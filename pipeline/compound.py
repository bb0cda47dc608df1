"""Stage 4: compound captions, deterministic, no model.

Two or three individual captions are joined into one sentence with varied connectives
and syntax ("and", "; also", "then", "as well as", "while", sentence joins). A
compound of one caption is the individual caption itself, which is stored already, so
this module only builds the 2- and 3-caption compounds. Anything over CLIP's 77-token
context (start and end tokens counted, as open_clip's tokenizer counts them) is dropped: CLIP
would silently truncate it during training.
"""

from __future__ import annotations

import hashlib
import itertools
import random
import re
from typing import Callable

from .clip_tokens import counter

CLIP_CONTEXT_LENGTH = 77
DEFAULT_MAX_PER_PAIR = 8

# Imperative verbs a stage 3 caption usually starts with, and their gerunds, so that
# "while"/"as well as" read as English ("..., while adding a plant").
_GERUNDS = {
    "add": "adding", "remove": "removing", "make": "making", "change": "changing",
    "replace": "replacing", "move": "moving", "put": "putting", "place": "placing",
    "paint": "painting", "swap": "swapping", "turn": "turning", "take": "taking",
    "recolor": "recoloring", "recolour": "recolouring", "shift": "shifting",
    "increase": "increasing", "decrease": "decreasing", "reduce": "reducing",
    "include": "including", "insert": "inserting", "delete": "deleting",
    "drop": "dropping", "get": "getting", "use": "using", "set": "setting",
    "show": "showing", "give": "giving", "switch": "switching", "enlarge": "enlarging",
    "shrink": "shrinking", "relocate": "relocating", "double": "doubling",
    "have": "having", "keep": "keeping", "bring": "bringing", "hang": "hanging",
    "cover": "covering", "transform": "transforming", "update": "updating",
}


def count_clip_tokens(text: str) -> int:
    """Tokens CLIP's text encoder sees for `text`, start and end tokens included."""
    return counter().count(text)


_STOPWORDS = frozenset(
    "a an the of to from in on at with and or it its is are be should by for into as this that "
    "there their them they then also now instead rather than".split())
# Two captions of which the shorter shares at least this share of its content words with
# the longer likely say the same thing in other words (stage 3 pads to 3 captions with
# paraphrases): joining them would be redundant.
PARAPHRASE_OVERLAP = 0.75


def _content_words(text: str) -> frozenset[str]:
    return frozenset(w for w in re.findall(r"[a-z0-9]+", text.lower()) if w not in _STOPWORDS)


# Words that say what changes or how, not which thing: what is left of a caption without
# them (and the stopwords) names the objects it is about. Stage 3 pads a pair with one or
# two changes to 3 captions with rewordings that share little but the object ("The rug
# should be gone" / "Take away the small rug"; "Move the black rug to the centre" /
# "Relocate the small checked rug to the centre"), and joining those reads as two changes.
_NOT_OBJECT_WORDS = frozenset(
    list(_GERUNDS) + list(_GERUNDS.values()) + """
    relocate relocating slide sliding repaint repainting recolour recolor lay hung added removed
    changed moved replaced placed put gone away rid out off over should would must can now
    larger smaller bigger taller shorter wider size colour color pattern design print shade tone
    number count amount total more fewer less another extra additional second third only single
    pair one two three four five six new old same different other instead rather
    left right centre center middle top bottom front back side sides corner near next beside
    above below under behind between opposite far close room scene space area
    small large big tiny little huge tall short wide narrow long round square
    red orange yellow green blue purple pink white black grey gray brown beige cream navy
    lavender terracotta sage teal gold silver dark light pale bright deep
    plain striped stripes dotted dots spotted checked checkered chequered patterned floral solid
    wooden wood metal metallic glass leather fabric marble plastic carpeted tiled
    """.split()) - {"painting"}  # a gerund, but in these rooms mostly the object on the wall


def _object_words(text: str) -> frozenset[str]:
    """Content words left when change and attribute words are taken out, singular."""
    words = set()
    for word in _content_words(text) - _NOT_OBJECT_WORDS:
        if word.endswith("s") and len(word) > 3 and not word.endswith("ss"):
            word = word[:-1]  # lamps -> lamp (curtains -> curtain on both sides)
        if word not in _NOT_OBJECT_WORDS:
            words.add(word)
    return frozenset(words)


# Stage 3 captions are plain text (no object or attribute fields), so what a caption
# changes is read from its words. Words that say which change it is ("move", "paint",
# "larger", "remove") decide; without any, attribute words are the change ("make the lamp
# red"). An attribute word beside a change word names the object ("move the red lamp").
_CHANGE_WORDS = {
    # adding, removing and recounting one kind of object are one change in other words
    # ("make it one clock instead of two" / "remove one of the clocks")
    "count": "add adding added insert inserting inserted include including introduce introducing new bring "
             "bringing place placing placed put putting hang hanging "
             "remove removing removed delete deleting deleted take taking away gone rid drop dropping "
             "without missing clear clearing "
             "number count amount more fewer less another extra additional double doubling",
    "position": "move moving moved relocate relocating relocated shift shifting shifted slide sliding "
                "position positioned reposition place placing placed put putting",
    "colour": "paint painted repaint repainting repainted recolour recolor recolouring recoloring "
              "colour color coloured colored",  # not "painting": the object
    "size": "larger smaller bigger taller shorter wider narrower enlarge enlarging enlarged shrink "
            "shrinking shrunk resize resized size",
    "pattern": "pattern patterned design print",
    "material": "material",
}
_ATTRIBUTE_WORDS = {
    "colour": "red orange yellow green blue purple pink white black grey gray brown beige cream navy "
              "lavender terracotta sage teal gold silver dark light pale bright deep",
    "pattern": "plain striped stripes dotted dots spotted checked checkered chequered floral solid",
    "size": "small large big tiny little huge tall short wide narrow long",
    "position": "left right centre center middle top bottom front back corner near next beside above "
                "below under behind between opposite far close",
    "count": "one two three four five six second third pair single only",
    "material": "wooden wood metal metallic glass leather fabric marble plastic",
}
_CHANGE_SETS = {kind: frozenset(words.split()) for kind, words in _CHANGE_WORDS.items()}
_ATTRIBUTE_SETS = {kind: frozenset(words.split()) for kind, words in _ATTRIBUTE_WORDS.items()}


def _changed_attributes(text: str) -> frozenset[str]:
    """What a caption changes ('colour', 'position', 'count', ...); empty when unknown."""
    words = set(re.findall(r"[a-z]+", text.lower()))
    changes = {kind for kind, signal in _CHANGE_SETS.items() if words & signal}
    return frozenset(changes or {kind for kind, signal in _ATTRIBUTE_SETS.items() if words & signal})


def are_paraphrases(a: str, b: str) -> bool:
    """Whether two captions likely state the same change: about the same object (share an
    object word) and the same attribute of it, or one whose change cannot be read; when one
    names no object word, they share most content words. Two different changes to one
    object ("make the lamp red" / "move the lamp to the left") are not paraphrases; a
    compound of two wordings of one change would read as two changes."""
    wa, wb = _content_words(a), _content_words(b)
    if not wa or not wb:
        return a.strip().lower() == b.strip().lower()
    oa, ob = _object_words(a), _object_words(b)
    if oa and ob:
        if not oa & ob:
            return False  # "make the small lamp red" / "make the small bed red": two things
        ca, cb = _changed_attributes(a), _changed_attributes(b)
        return not ca or not cb or bool(ca & cb)
    return len(wa & wb) / min(len(wa), len(wb)) >= PARAPHRASE_OVERLAP


def _seed_rng(seed: int | str) -> random.Random:
    digest = hashlib.sha256(str(seed).encode("utf-8")).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _clause(caption: str) -> str:
    """The caption as a clause: trimmed, no final punctuation, whitespace collapsed."""
    text = re.sub(r"\s+", " ", caption).strip()
    return text.rstrip(" .;,!").strip()


def _lower_first(clause: str) -> str:
    """Lowercase the first letter for use mid-sentence, unless the first word looks like
    an acronym or a name ("TV", "I", "McDonald")."""
    if not clause:
        return clause
    first_word = clause.split(" ", 1)[0]
    if first_word == "I" or (len(first_word) > 1 and any(c.isupper() for c in first_word[1:])):
        return clause
    return clause[0].lower() + clause[1:]


def _upper_first(clause: str) -> str:
    return clause[:1].upper() + clause[1:]


def _gerund(clause: str) -> str | None:
    """'Add a plant' -> 'adding a plant'; None when it does not start with a known verb."""
    first, _, rest = clause.partition(" ")
    gerund = _GERUNDS.get(first.lower())
    if gerund is None:
        return None
    return f"{gerund} {rest}".strip()


def _sentence(text: str) -> str:
    text = _upper_first(text.strip())
    return text if text.endswith((".", "!", "?")) else text + "."


# Each joiner takes the clauses (already trimmed) and returns a sentence, or None when
# its syntax does not fit those captions (then another joiner is tried).
Joiner = Callable[[list[str]], "str | None"]


def _join_and(c: list[str]) -> str | None:
    if len(c) == 2:
        return _sentence(f"{c[0]} and {_lower_first(c[1])}")
    return _sentence(f"{c[0]}, {_lower_first(c[1])}, and {_lower_first(c[2])}")


def _join_also(c: list[str]) -> str | None:
    rest = "; ".join(_lower_first(x) for x in c[1:-1])
    middle = f"; {rest}" if rest else ""
    return _sentence(f"{c[0]}{middle}; also {_lower_first(c[-1])}")


def _join_then(c: list[str]) -> str | None:
    if any(_gerund(x) is None for x in c[1:]):
        return None  # "then" needs instructions after it ("..., then add a lamp")
    if len(c) == 2:
        return _sentence(f"{c[0]}, then {_lower_first(c[1])}")
    return _sentence(f"first {_lower_first(c[0])}, then {_lower_first(c[1])}, and finally {_lower_first(c[2])}")


def _join_as_well_as(c: list[str]) -> str | None:
    gerund = _gerund(c[-1])
    if gerund is None:
        return None
    head = c[0] if len(c) == 2 else f"{c[0]} and {_lower_first(c[1])}"
    return _sentence(f"{head}, as well as {gerund}")


def _join_while(c: list[str]) -> str | None:
    gerund = _gerund(c[-1])
    if gerund is None:
        return None
    head = c[0] if len(c) == 2 else f"{c[0]}, {_lower_first(c[1])},"
    separator = " " if head.endswith(",") else ", "
    return _sentence(f"{head}{separator}while {gerund}")


def _join_sentences(c: list[str]) -> str | None:
    parts = [_sentence(x) for x in c[:-1]]
    last = c[-1]
    if len(c) == 3:
        parts.append(_sentence(f"also {_lower_first(last)}"))
    else:
        parts.append(_sentence(last))
    return " ".join(parts)


def _join_plus(c: list[str]) -> str | None:
    if len(c) == 2:
        return _sentence(f"{c[0]}, and also {_lower_first(c[1])}")
    return _sentence(f"{c[0]} and {_lower_first(c[1])}, plus {_lower_first(c[2])}")


JOINERS: dict[str, Joiner] = {
    "and": _join_and,
    "also": _join_also,
    "then": _join_then,
    "as well as": _join_as_well_as,
    "while": _join_while,
    "sentences": _join_sentences,
    "plus": _join_plus,
}


def join_captions(clauses: list[str], style: str) -> str | None:
    """Join trimmed captions with one named style; None when the style does not fit."""
    if any(re.search(r"[.!?] ", x) for x in clauses) and style != "sentences":
        return None  # a multi-sentence caption only reads well as its own sentence
    return JOINERS[style](clauses)


def compose_captions(
    captions: list[str],
    seed: int | str,
    max_per_pair: int = DEFAULT_MAX_PER_PAIR,
    *,
    max_tokens: int = CLIP_CONTEXT_LENGTH,
) -> list[tuple[str, list[int], int]]:
    """Compound captions for one pair: (text, indexes of the captions it joins, tokens).

    Joins 2 or 3 distinct captions (their order varies too), each compound a different
    set of captions, with a style drawn per compound; deterministic for a given seed.
    Captions that paraphrase each other are never joined, so a pair whose captions all
    state one change gets no compounds. Compounds over `max_tokens` CLIP tokens
    (start/end included) are dropped.
    """
    clauses = [_clause(c) for c in captions]
    usable = [i for i, c in enumerate(clauses) if c]
    redundant = {(i, j) for i in usable for j in usable if i < j and are_paraphrases(clauses[i], clauses[j])}
    if len(usable) < 2 or max_per_pair <= 0:
        return []
    rng = _seed_rng(seed)
    # Alternate between pairs and triples so both lengths appear; shuffle within each.
    by_size: dict[int, list[tuple[int, ...]]] = {}
    for size in (2, 3):
        combos = list(itertools.permutations(usable, size)) if len(usable) >= size else []
        rng.shuffle(combos)
        by_size[size] = combos
    styles = list(JOINERS)
    rng.shuffle(styles)
    style_turn = 0

    out: list[tuple[str, list[int], int]] = []
    seen_sets: set[frozenset[int]] = set()
    seen_texts: set[str] = set()
    cursors = {2: 0, 3: 0}
    sizes = [2, 3]
    turn = rng.randrange(2)
    while len(out) < max_per_pair and any(cursors[s] < len(by_size[s]) for s in sizes):
        size = sizes[turn % 2]
        turn += 1
        combos = by_size[size]
        while cursors[size] < len(combos):
            combo = combos[cursors[size]]
            cursors[size] += 1
            if frozenset(combo) in seen_sets or any(
                    (min(i, j), max(i, j)) in redundant for i, j in itertools.combinations(combo, 2)):
                continue
            chosen = None
            # Try the styles in rotation from this compound's turn, so styles spread out.
            for k in range(len(styles)):
                style = styles[(style_turn + k) % len(styles)]
                text = join_captions([clauses[i] for i in combo], style)
                if text is None or text in seen_texts:
                    continue
                tokens = count_clip_tokens(text)
                if tokens > max_tokens:
                    continue  # a terser style may still fit
                chosen = (text, list(combo), tokens)
                style_turn = (style_turn + k + 1) % len(styles)
                break
            if chosen is None:
                continue
            seen_sets.add(frozenset(combo))
            seen_texts.add(chosen[0])
            out.append(chosen)
            break
    return out
