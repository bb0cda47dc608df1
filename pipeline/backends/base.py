"""The one small interface every VLM backend implements.

A request is backend-neutral: prompt text plus the *paths* of the images to attach.
The `openai` backend turns paths into downscaled base64 data URLs (off the event loop);
the simulator never opens them. Errors are mapped to TransientError (worth retrying)
or PermanentError (the item fails with that reason) at the backend, so stages never
import `openai`.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal, Optional, Protocol

from pydantic import BaseModel, ConfigDict, Field

Stage = Literal["stage1", "stage2", "stage3", "single"]


class VLMRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    stage: Stage
    system: str
    text: str
    image_paths: list[str] = Field(default_factory=list)   # attached in this order
    image_ids: list[str] = Field(default_factory=list)     # sha256 ids of those images
    subject_id: str                                        # image id (stage 1) or pair id
    prompt_version: str
    schema_name: str
    json_schema: dict[str, Any]
    # Earlier turns for a repair request: [{"role": "assistant"|"user", "content": str}]
    history: list[dict[str, str]] = Field(default_factory=list)
    max_tokens: int = 1500
    temperature: float = 0.2


class VLMResponse(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str
    tokens_in: int = 0
    tokens_out: int = 0
    finish_reason: Optional[str] = "stop"
    model: Optional[str] = None
    latency_ms: Optional[float] = None


class BackendError(Exception):
    """Base class for errors a backend reports."""


class TransientError(BackendError):
    """Worth retrying (429, 5xx, timeouts, connection resets)."""

    def __init__(self, message: str, retry_after: Optional[float] = None):
        super().__init__(message)
        self.retry_after = retry_after


class ConnectionFailedError(TransientError):
    """No answer came back: the server refused the connection, its name did not resolve,
    or it dropped the connection (not a timeout)."""


class ServerUnavailableError(TransientError):
    """503: the server answers but does not serve yet (llama.cpp's 'Loading model' while a
    model loads, an endpoint waking from zero, a full queue)."""


class PermanentError(BackendError):
    """Retrying the same request will not help (400, auth, content filter)."""

    category: ClassVar[str] = "request rejected"  # the failed item's reason starts with it


class AccountError(PermanentError):
    """No request can succeed until the account or the setup is put right: every request
    would fail the same way, so the runner stops the run instead of failing each item."""


class AuthenticationError(AccountError):
    """The server refused the credentials (401)."""


class NotFoundError(AccountError):
    """404: the model or the endpoint does not exist (a mistyped --model, or a --base-url
    that lacks its /v1)."""


class ImagesUnsupportedError(AccountError):
    """The model takes no image input (a text-only model, or llama.cpp started without
    its --mmproj): every request with an image would be refused the same way."""


class ImageLimitError(ImagesUnsupportedError):
    """The server takes fewer images per request than the request sends (vLLM's
    --limit-mm-per-prompt)."""


class UnreachableError(AccountError):
    """The server has not answered for a while (the batch backend's polls of its open
    batches): waiting on would never end while it is gone. The batches stay stored for a
    rerun to collect."""


class QuotaExceededError(AccountError):
    """429 `insufficient_quota`: the account has no credits left. Unlike a rate limit,
    waiting does not help."""


class Backend(Protocol):
    name: ClassVar[str]
    supports_images: ClassVar[bool]
    supports_json_schema: ClassVar[bool]

    async def complete(self, request: VLMRequest) -> VLMResponse:
        """Run one request and return the raw answer text (not yet validated)."""
        ...
