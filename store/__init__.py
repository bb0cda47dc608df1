"""The good4cir store: SQLite through sqlite-utils, pydantic records, import/export.

This package imports none of good4cir's other packages.
"""

from .db import open_db, transaction, utc_now
from .errors import ConflictError, FormatError, ImageError, NotFoundError, StoreError
from .migrations import migrate, schema_version
from .models import (
    FLAG_REASONS,
    PIPELINE_FLAG_REASONS,
    PIPELINE_REVIEWER,
    AnnotationRecord,
    CallRecord,
    CaptionEdit,
    CaptionRecord,
    DescribedObject,
    DescriptionRecord,
    FlagRecord,
    ImageRecord,
    ImportProblem,
    ImportReport,
    PairRecord,
    ReviewEvent,
    RunRecord,
)
from .images import inspect_image, load_image_rgb
from .importers import import_dataset
from .exporters import export_dataset

__all__ = [
    "open_db", "transaction", "utc_now", "migrate", "schema_version",
    "ConflictError", "FormatError", "ImageError", "NotFoundError", "StoreError",
    "FLAG_REASONS", "PIPELINE_FLAG_REASONS", "PIPELINE_REVIEWER", "AnnotationRecord", "CallRecord", "CaptionEdit", "CaptionRecord",
    "DescribedObject", "DescriptionRecord", "FlagRecord", "ImageRecord", "ImportProblem",
    "ImportReport", "PairRecord", "ReviewEvent", "RunRecord",
    "inspect_image", "load_image_rgb", "import_dataset", "export_dataset",
]
