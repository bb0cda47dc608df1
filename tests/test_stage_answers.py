"""Edge cases of stage answers (pipeline.schemas via parse_answer): blanks and repeats."""

from __future__ import annotations

import json

import pytest

from pipeline.compound import compose_captions
from pipeline.stages import InvalidAnswerError, parse_answer


def _captions(*captions: str) -> str:
    return json.dumps({"captions": list(captions)})


def test_a_caption_repeated_word_for_word_is_kept_once():
    answer = parse_answer("stage3", _captions(
        "Add a lamp.", "add a lamp", "Make the bed red", "ADD A  LAMP!", "Remove the rug"))
    assert answer.captions == ["Add a lamp.", "Make the bed red", "Remove the rug"]


@pytest.mark.parametrize("stage", ["stage3", "single"])
def test_fewer_than_three_distinct_captions_is_an_invalid_answer(stage):
    with pytest.raises(InvalidAnswerError, match=r"only 2 distinct captions \(caption 3 repeats caption 1\)"):
        parse_answer(stage, _captions("Add a lamp", "Remove the rug", "add a lamp."))


def test_paraphrases_are_not_repeats():
    answer = parse_answer("stage3", _captions("Add a lamp", "Put a lamp in the room", "Place a new lamp"))
    assert len(answer.captions) == 3
    # stage 4 never joins two captions that say one thing in other words
    assert compose_captions(["Add a red lamp", "Add a lamp that is red", "Remove the rug"], seed="p")
    assert all(sorted(s) != [0, 1] for _, s, _ in compose_captions(
        ["Add a red lamp", "Add a lamp that is red", "Remove the rug"], seed="p"))


def test_blank_descriptors_are_dropped_and_blank_names_refused():
    answer = parse_answer("stage1", json.dumps(
        {"objects": [{"name": " lamp ", "descriptors": ["", " red ", "   "]}]}))
    assert answer.objects[0].name == "lamp" and answer.objects[0].descriptors == ["red"]
    with pytest.raises(InvalidAnswerError, match="name is empty"):
        parse_answer("stage2", json.dumps({"objects": [{"name": "  ", "descriptors": ["red"]}]}))
    with pytest.raises(InvalidAnswerError, match="every descriptor is empty"):
        parse_answer("stage1", json.dumps({"objects": [{"name": "lamp", "descriptors": [" ", ""]}]}))


def test_caption_count_bounds_hold_after_stripping():
    with pytest.raises(InvalidAnswerError, match="at least 3"):
        parse_answer("stage3", _captions("Add a lamp", "Remove the rug"))
    with pytest.raises(InvalidAnswerError, match="at most 8"):
        parse_answer("stage3", _captions(*[f"Add {n} lamps" for n in range(9)]))
    with pytest.raises(InvalidAnswerError, match="caption 2 is empty"):
        parse_answer("stage3", _captions("Add a lamp", "  ", "Remove the rug"))
