"""What each stage must answer, as pydantic models (their JSON schemas go into
response_format, and every answer is validated against them)."""

from __future__ import annotations

import copy
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator


# The prompts show their answer format with "..." where the answer goes; a model that
# copies the example answers "..." (or "…"), which says nothing about any image.
COPIED_PLACEHOLDER = "copies the format example's placeholder"


def is_placeholder(text: str) -> bool:
    """Text with no letter or digit in any script ('...', '…', '-'): no name, descriptor
    or caption is made of punctuation alone."""
    return not any(ch.isalnum() for ch in text)


class ObjectDescriptors(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, description="the object, e.g. 'lamp'")
    descriptors: list[str] = Field(min_length=1, description="fine-grained descriptors of this object")

    @field_validator("name")
    @classmethod
    def _named(cls, name: str) -> str:
        name = name.strip()
        if not name:
            raise ValueError("an object's name is empty")
        if is_placeholder(name):
            raise ValueError(f"the name {name!r} {COPIED_PLACEHOLDER}; name an object you see")
        return name

    @field_validator("descriptors")
    @classmethod
    def _no_blank_descriptors(cls, descriptors: list[str]) -> list[str]:
        # A blank descriptor says nothing, yet it would be a review cell and count as an
        # item in the flag rates: drop it, and refuse an object left with none. A
        # placeholder beside real descriptors (["red", "..."], often the model's "and so
        # on") says nothing either and is dropped the same way: the real ones are a usable
        # answer, and refusing it would pay for a repair that can only ask for them again.
        # An object left with placeholders alone is refused, saying so, for the repair.
        stripped = [d.strip() for d in descriptors]
        kept = [d for d in stripped if d and not is_placeholder(d)]
        if not kept:
            copied = [d for d in stripped if d]
            if copied:
                raise ValueError(f"every descriptor {COPIED_PLACEHOLDER} ({copied[0]!r}); "
                                 "write what you see of the object")
            raise ValueError("every descriptor is empty")
        return kept


class DescriptorList(BaseModel):
    """Stage 1 and stage 2: objects from most to least prominent."""

    model_config = ConfigDict(extra="forbid")
    objects: list[ObjectDescriptors] = Field(min_length=1)


# Captions must describe the scene change, not the pair of pictures (paper, stage 3).
IMAGE_REFERENCE = re.compile(
    r"\b(?:image|picture|photo|img)\s*(?:#\s*)?(?:1|2|one|two)\b"
    r"|\b(?:first|second|former|latter|reference|target)\s+"
    r"(?:image|picture|photo)\b",
    re.IGNORECASE,
)


def _caption_key(caption: str) -> str:
    """What two captions share when one merely repeats the other (case, spacing, final stop)."""
    return re.sub(r"\s+", " ", caption).strip().rstrip(" .!;,").lower()


class ModificationCaptions(BaseModel):
    """Stage 3 and the single-stage baseline: 3 to 8 distinct modification captions
    (a caption repeated word for word is dropped; fewer than 3 left is an error)."""

    model_config = ConfigDict(extra="forbid")
    captions: list[str] = Field(min_length=3, max_length=8)

    @field_validator("captions")
    @classmethod
    def _plain_scene_captions(cls, captions: list[str]) -> list[str]:
        # One line, single-spaced: a caption's line breaks would reach exports and CLIP's
        # tokenizer (a reviewer's edit is stored the same way).
        cleaned = [" ".join(c.split()) for c in captions]
        for i, caption in enumerate(cleaned):
            if not caption:
                raise ValueError(f"caption {i + 1} is empty")
            # Refused, not dropped as a repeat would be (checked first: the example's three
            # "..." would read as repeats): the model did not write the captions it was asked
            # for, as with an empty one, and the repair asks for them.
            if is_placeholder(caption):
                raise ValueError(f"caption {i + 1} ({caption!r}) {COPIED_PLACEHOLDER}; "
                                 "write a change between the scenes")
            match = IMAGE_REFERENCE.search(caption)
            if match:
                raise ValueError(
                    f"caption {i + 1} refers to the images themselves ({match.group(0)!r}); "
                    "describe the change in the scene instead"
                )
        # A repeat adds no caption: it would be stored and trained on twice and count
        # twice in the rates and diversity. Keep the first of each.
        distinct: dict[str, int] = {}
        for i, caption in enumerate(cleaned):
            distinct.setdefault(_caption_key(caption), i)
        if len(distinct) < 3:
            repeats = [f"caption {i + 1} repeats caption {distinct[_caption_key(c)] + 1}"
                       for i, c in enumerate(cleaned) if distinct[_caption_key(c)] != i]
            raise ValueError(f"only {len(distinct)} distinct captions ({'; '.join(repeats)}); "
                             "write at least 3 different ones")
        return [cleaned[i] for i in sorted(distinct.values())]


# JSON Schema keywords that OpenAI's strict Structured Outputs mode rejects; pydantic
# still enforces them when the answer is validated.
_UNSUPPORTED_STRICT = ("minLength", "maxLength", "title", "default")


def strict_json_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The model's JSON schema in the form strict Structured Outputs accepts:
    every property required, no additional properties, no unsupported keywords."""
    schema = copy.deepcopy(model.model_json_schema())

    def visit(node: Any) -> None:
        if isinstance(node, dict):
            for key in _UNSUPPORTED_STRICT:
                if key in node and not isinstance(node[key], dict):
                    node.pop(key)
            if node.get("type") == "object" and "properties" in node:
                node["additionalProperties"] = False
                node["required"] = list(node["properties"])
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)

    visit(schema)
    return schema
