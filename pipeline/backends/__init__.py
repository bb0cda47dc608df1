"""VLM backends behind one small interface (base.Backend); `create_backend` builds one.

    create_backend("openai", model="gpt-4o-mini", base_url=None, detail="low", ...)
    create_backend("openai-batch", model=..., poll_interval=30, ...)
    create_backend("simulator", db_path="data.db", error_rate=0.1, seed=0)

Each backend module is imported only when asked for, so `openai` is never imported by
a simulator run.
"""

from __future__ import annotations

from typing import Any

BACKENDS = ("openai", "openai-batch", "simulator")


def list_backends() -> list[str]:
    return list(BACKENDS)


def create_backend(name: str, **options: Any):
    if name == "openai":
        from .openai_backend import OpenAIBackend
        return OpenAIBackend(**options)
    if name == "openai-batch":
        from .openai_batch import OpenAIBatchBackend
        return OpenAIBatchBackend(**options)
    if name == "simulator":
        from .simulator import SimulatorBackend
        return SimulatorBackend(options.pop("db_path"), **options)
    raise ValueError(f"unknown backend {name!r}; use one of {', '.join(BACKENDS)}")
