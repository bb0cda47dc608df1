"""What each stage must answer, as pydantic models (their JSON schemas go into
response_format, and every answer is validated against them)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class ObjectDescriptors(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, description="the object, e.g. 'lamp'")
    descriptors: list[str] = Field(min_length=1, description="fine-grained descriptors of this object")


class DescriptorList(BaseModel):
    """Stage 1 and stage 2: objects from most to least prominent."""

    model_config = ConfigDict(extra="forbid")
    objects: list[ObjectDescriptors] = Field(min_length=1)


class ModificationCaptions(BaseModel):
    """Stage 3 and the single-stage baseline: 3 to 8 modification captions."""

    model_config = ConfigDict(extra="forbid")
    captions: list[str] = Field(min_length=3, max_length=8)
