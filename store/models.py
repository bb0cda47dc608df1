"""Pydantic models for every record that crosses a module boundary."""

from __future__ import annotations

import json
from typing import Any, ClassVar, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

ReviewStatus = Literal["unreviewed", "approved", "rejected"]
AnnotationStatus = Literal["pending", "done", "failed"]
FLAG_REASONS = (
    "object not there",
    "wrong attribute",
    "wrong count",
    "not a real difference",
    "other",
)
# Flags the pipeline sets itself, on an answer still wrong after its repair request
# (pipeline.stages.AnswerProblem): shown and left out of exports as a reviewer's flag is.
PIPELINE_REVIEWER = "pipeline"
PIPELINE_FLAG_REASONS = (
    "over 77 CLIP tokens",
    "renamed a reference object",
)


# Per class: (field names, JSON columns). Looked up once: pydantic's class attribute
# access costs microseconds, which the review queue's hot path would pay per column.
_SHAPES: dict[type, tuple[frozenset, tuple]] = {}


def _shape(cls) -> tuple[frozenset, tuple]:
    shape = _SHAPES.get(cls)
    if shape is None:
        shape = (frozenset(cls.__pydantic_fields__), tuple(getattr(cls, "_json_fields", ()) or ()))
        _SHAPES[cls] = shape
    return shape


class Record(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @classmethod
    def _decoded(cls, row: dict) -> dict:
        fields, json_fields = _shape(cls)
        data = {k: v for k, v in row.items() if k in fields}
        for name in json_fields:
            if isinstance(data.get(name), str):
                data[name] = json.loads(data[name])
        return data

    @classmethod
    def from_row(cls, row: dict) -> "Record":
        """Build from a sqlite row dict, decoding JSON columns named in _json_fields."""
        return cls(**cls._decoded(row))


class ImageRecord(Record):
    _json_fields: ClassVar[tuple[str, ...]] = ("scene_json",)
    id: str
    name: str
    path: Optional[str] = None
    url: Optional[str] = None
    root: Optional[str] = None
    width: Optional[int] = None
    height: Optional[int] = None
    size_bytes: Optional[int] = None
    format: Optional[str] = None
    split: Optional[str] = None
    scene_json: Optional[dict[str, Any]] = None
    created_at: Optional[str] = None


class PairRecord(Record):
    _json_fields: ClassVar[tuple[str, ...]] = ("original_captions", "img_set", "ground_truth", "extra")
    id: str
    source: str
    external_id: Optional[str] = None
    reference_id: str
    target_id: Optional[str] = None  # None for a query whose target is withheld (CIRR test1)
    split: Optional[str] = None
    original_captions: list[str] = Field(default_factory=list)
    img_set: Optional[list[str]] = None
    ground_truth: Optional[Any] = None
    extra: dict[str, Any] = Field(default_factory=dict)
    created_at: Optional[str] = None


# The settings of a run that tell it apart from runs of the same backend and model, shown
# where runs are compared (the app's run labels, score's table and plot).
RUN_SETTINGS_SHOWN = ("method", "error_rate", "split", "limit", "base_url", "temperature", "seed", "detail")


class RunRecord(Record):
    _json_fields: ClassVar[tuple[str, ...]] = ("settings", "prompt_versions")
    id: int
    name: Optional[str] = None
    backend: str
    model: str
    base_url: Optional[str] = None
    method: str = "staged"
    settings: dict[str, Any] = Field(default_factory=dict)
    prompt_versions: dict[str, str] = Field(default_factory=dict)
    status: str = "created"
    pairs_total: int = 0
    started_at: Optional[str] = None
    finished_at: Optional[str] = None
    created_at: Optional[str] = None


class CallRecord(Record):
    id: Optional[int] = None
    run_id: Optional[int] = None
    stage: str
    request_hash: str
    prompt_version: Optional[str] = None
    model: Optional[str] = None
    subject_id: Optional[str] = None
    request: Optional[str] = None
    response: Optional[str] = None
    status: Literal["ok", "error"]
    error: Optional[str] = None
    tokens_in: int = 0
    tokens_out: int = 0
    latency_ms: Optional[float] = None
    cost_usd: float = 0.0
    batch_id: Optional[str] = None
    custom_id: Optional[str] = None
    created_at: Optional[str] = None


class DescribedObject(BaseModel):
    """One object of a stage 1 / stage 2 descriptor list."""

    model_config = ConfigDict(extra="forbid")
    name: str
    descriptors: list[str]


class DescriptionRecord(Record):
    _json_fields: ClassVar[tuple[str, ...]] = ("objects",)
    id: str
    stage: int
    image_id: str
    pair_id: Optional[str] = None
    prompt_version: Optional[str] = None
    model: Optional[str] = None
    objects: list[DescribedObject]
    call_id: Optional[int] = None
    created_at: Optional[str] = None


class AnnotationRecord(Record):
    id: str
    run_id: int
    pair_id: str
    status: AnnotationStatus = "pending"
    error: Optional[str] = None
    stage1_id: Optional[str] = None
    stage2_id: Optional[str] = None
    review_status: ReviewStatus = "unreviewed"
    flag_count: int = 0
    note: Optional[str] = None
    reviewer: Optional[str] = None
    reviewed_at: Optional[str] = None
    seq: Optional[int] = None
    updated_at: Optional[str] = None


class CaptionRecord(Record):
    """A caption with its current text (latest edit, else the VLM's original)."""

    _json_fields: ClassVar[tuple[str, ...]] = ("sources",)
    id: str
    annotation_id: str
    kind: Literal["individual", "compound"]
    position: int
    text: str                       # the VLM's original, never overwritten
    current_text: Optional[str] = None
    version: int = 0                # the version current_text belongs to (0 = original)
    sources: Optional[list[str]] = None
    token_count: Optional[int] = None
    created_at: Optional[str] = None


class CaptionEdit(Record):
    id: Optional[int] = None
    caption_id: str
    version: int
    text: str
    action: Literal["edit", "undo"]
    restores: int
    editor: str
    created_at: str


class FlagRecord(Record):
    id: int
    annotation_id: str
    target_kind: Literal["descriptor", "caption"]
    target_id: str
    reason: Optional[str] = None
    reviewer: str
    created_at: str
    removed_at: Optional[str] = None
    removed_by: Optional[str] = None


class ReviewEvent(Record):
    id: Optional[int] = None
    annotation_id: str
    action: str
    value: Optional[str] = None
    reviewer: str
    created_at: str


class ImportProblem(BaseModel):
    """One item that could not be imported, and why."""

    item: str
    reason: str


class ImportReport(BaseModel):
    images_added: int = 0
    pairs_added: int = 0
    pairs_skipped: int = 0      # already in the store
    images_moved: int = 0       # known images found at a new path (the dataset moved)
    images_rerooted: int = 0    # known images from outside their folder, now in one --images names
    images_downloaded: int = 0  # URL images stored before without a file, now with one (--download)
    problems: list[ImportProblem] = Field(default_factory=list)   # items not imported
    warnings: list[ImportProblem] = Field(default_factory=list)   # imported, but note this


class LeaseRecord(Record):
    """A session's claim on a run (store.leases); times are unix seconds."""

    run_id: int
    owner: str
    pid: int
    host: str
    acquired_at: float
    heartbeat_at: float
