"""The `openai` backend: chat completions through AsyncOpenAI against any base_url.

OpenAI itself or any OpenAI-compatible server (vLLM, Ollama, LM Studio, SGLang) is
configuration, not code. The client is made with `max_retries=0`: retries, backoff and
the retry budget belong to the runner, which sees every attempt and stores it. This
module is the one place where openai's error classes are mapped to TransientError and
PermanentError, so nothing else imports `openai`.

Structured output falls back in steps: `json_schema` (strict) → `json_object` → plain
text (the prompt asks for JSON either way, and the stages extract it). A 400 (or 422,
or a 500 that names the format, as llama.cpp answers) to one mode is retried at once with
the next; the mode that works is kept for the run.
A 400 that names `max_completion_tokens` or `temperature` (newer OpenAI models) first
adapts those parameters and retries the same mode.
The API key is read from the environment and is scrubbed from every error message.
"""

from __future__ import annotations

import email.utils
import os
import re
import time
from typing import Any, ClassVar, Iterable, Optional, Union

from ..images import DETAILS, ImageEncoder
from .base import (AuthenticationError, ConnectionFailedError, ImageLimitError, ImagesUnsupportedError,
                   NotFoundError, PermanentError, QuotaExceededError, ServerUnavailableError,
                   TransientError, VLMRequest, VLMResponse)

RESPONSE_MODES = ("json_schema", "json_object", "text")

FORMAT_REFUSED = re.compile(r"response_format|json_schema|json_object", re.IGNORECASE)

# How servers refuse an image for a text-only model: llama.cpp (500, or "Unsupported
# content part type" before it knew images), vLLM (400 "... is not a multimodal model"),
# OpenRouter (404 "No endpoints found that support image input"), Ollama, and the wording
# others use.
IMAGES_REFUSED = re.compile(
    r"image input is not supported|is not a multimodal model|support image input"
    r"|does not support (?:image|vision|multimodal)"
    r"|(?:image|vision|multimodal)[\w ]{0,20} (?:is|are) not supported|content part type:\W*image_url"
    r"|missing data required for image input", re.IGNORECASE)
# vLLM's refusal of more images than --limit-mm-per-prompt allows (1 by default in many
# versions): "At most 1 image(s) may be provided in one request.", later "You set
# image=1 (or defaulted to 1) in `--limit-mm-per-prompt`, but passed 2 image items ...".
IMAGE_LIMIT = re.compile(r"at most \d+ image\(s\)|limit-mm-per-prompt", re.IGNORECASE)
# A request too long for the model's context (vLLM: "This model's maximum context length
# is 4096 tokens. However, you requested ..."; llama.cpp: "the request exceeds the
# available context size"), or an answer that ran out of max_tokens under Structured
# Outputs (OpenAI, Azure: "Could not finish the message because max_tokens or model output
# limit was reached"; a reasoning model spends its max_tokens thinking), or a max_tokens
# the model cannot give ("This model supports at most 4096 completion tokens"). Another
# response format does not help: the same request would only be sent again, and an answer
# cut off in a lower format would keep that format for the rest of the run.
CONTEXT_REFUSED = re.compile(r"maximum context length|context (?:length|size|window)|context_length_exceeded"
                             r"|prompt is too long|too many (?:input )?tokens", re.IGNORECASE)
OUTPUT_LIMIT = re.compile(r"max_tokens or model output limit", re.IGNORECASE)
TOO_MANY_TOKENS = re.compile(r"supports at most \d+ completion tokens|max_(?:completion_)?tokens is too large",
                             re.IGNORECASE)


# A 429 for a daily request cap, not a rate: OpenRouter's "Rate limit exceeded:
# free-models-per-day", and the like from other providers.
DAILY_LIMIT = re.compile(r"per[- ]day|daily (?:limit|quota|cap)|requests per day", re.IGNORECASE)


def token_limit_advice(said: str, max_tokens: Optional[int]) -> Optional[str]:
    """What to change for a refusal about the token limit or the model's context (the
    server's words `said`); None for any other refusal."""
    now = f" (now {max_tokens})" if max_tokens else ""
    if TOO_MANY_TOKENS.search(said):
        return f"the model cannot answer that many tokens: lower --max-tokens{now}"
    if OUTPUT_LIMIT.search(said):
        return (f"the answer did not fit in --max-tokens{now}; a reasoning model spends it on "
                "thinking too: raise --max-tokens")
    if CONTEXT_REFUSED.search(said):
        return (f"the request does not fit the model's context: lower --max-tokens{now} or "
                "--image-size, or give the server a longer context (vLLM: --max-model-len; "
                "llama.cpp: --ctx-size; Ollama: num_ctx)")
    return None


def check_api_key_env(api_key_env: str) -> None:
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", api_key_env or ""):
        # Likely the key itself (`--api-key-env $OPENAI_API_KEY`): run settings store this
        # name, so it must not go further, nor be echoed.
        raise ValueError("--api-key-env takes the name of an environment variable (letters, digits "
                         "and _, e.g. OPENAI_API_KEY), not the key itself; the value given is not shown")


def resolve_api_key(api_key_env: str, base_url: Optional[str]) -> str:
    check_api_key_env(api_key_env)
    # A key read from a file often ends in a newline; httpx refuses such a header and the
    # client reports only "Connection error", which sends the user to check the server.
    key = (os.environ.get(api_key_env) or "").strip()
    if key and any(ch.isspace() or not ch.isprintable() for ch in key):
        raise ValueError(f"{api_key_env} holds a space or control character inside the key; "
                         "set it to the key alone")
    if key:
        return key
    if base_url:
        return "not-needed"  # local OpenAI-compatible servers usually take any key
    raise ValueError(f"set {api_key_env} in the environment, or pass --base-url for a local server")


def parse_retry_after(headers: Any) -> Optional[float]:
    """Seconds to wait from `retry-after-ms` / `retry-after` (seconds or an HTTP date)."""
    if headers is None:
        return None
    value = headers.get("retry-after-ms")
    if value:
        try:
            return max(0.0, float(value) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        parsed = email.utils.parsedate_to_datetime(value) if value else None
        if parsed is None:
            return None
        return max(0.0, parsed.timestamp() - time.time())


def scrub(text: str, secrets: Union[str, Iterable[str], None]) -> str:
    """text with each secret replaced by "***": an API key (one under 8 characters, such as
    a local server's "EMPTY", is left alone), or a backend's `_secrets`."""
    if isinstance(secrets, str):
        secrets = (secrets,) if len(secrets) >= 8 else ()
    for secret in sorted(secrets or (), key=len, reverse=True):  # "user:pw" before "pw"
        text = text.replace(secret, "***")
    return text


def scrub_list(api_key: Optional[str], base_url: Optional[str]) -> tuple[str, ...]:
    """The secrets `scrub` removes for a backend with this key and base URL."""
    from store.redaction import url_secrets

    key = (api_key,) if api_key and len(api_key) >= 8 else ()
    return key + url_secrets(base_url)


def map_openai_error(exc: BaseException, secret: Union[str, Iterable[str], None] = None,
                     timeout: Optional[float] = None):
    """The TransientError or PermanentError that stands for an openai client error
    (`timeout`: the client's, in seconds, named in a timeout's message)."""
    import openai

    message = scrub(f"{type(exc).__name__}: {exc}", secret)[:500]
    if isinstance(exc, openai.APITimeoutError):
        # A slow local server times out on every request: say which limit, and how to raise it.
        within = f" (no answer within {timeout:g} s; a slow server needs a larger --timeout)" if timeout else ""
        return TransientError(f"timeout: {message}{within}")
    if isinstance(exc, openai.APIConnectionError):  # APITimeoutError is one too: caught above
        return ConnectionFailedError(f"connection error: {message}")
    if isinstance(exc, openai.APIResponseValidationError):
        return TransientError(f"malformed response: {message}")
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        retry_after = parse_retry_after(getattr(exc.response, "headers", None))
        if status not in (401, 429) and IMAGE_LIMIT.search(str(exc)):
            return ImageLimitError(f"too many images for the server ({status}): {message}")
        if status not in (401, 429) and IMAGES_REFUSED.search(str(exc)):
            # A 500 from llama.cpp too: no retry, no other response format will help.
            return ImagesUnsupportedError(f"images refused ({status}): {message}")
        if status == 429 and "insufficient_quota" in (getattr(exc, "code", None), getattr(exc, "type", None)):
            return QuotaExceededError(f"quota exceeded (429): {message}")
        if status == 429 and DAILY_LIMIT.search(str(exc)):
            # A daily cap (OpenRouter's free models): retrying before it resets cannot help.
            return QuotaExceededError(f"daily limit reached (429): {message}")
        if status == 429:
            return TransientError(f"rate limited (429): {message}", retry_after=retry_after)
        if status == 503:
            return ServerUnavailableError(f"server error ({status}): {message}", retry_after=retry_after)
        if status in (408, 409) or status >= 500:
            return TransientError(f"server error ({status}): {message}", retry_after=retry_after)
        if status == 401:
            return AuthenticationError(f"authentication failed (401): {message}")
        if status == 404:
            return NotFoundError(f"not found (404): {message}")
        return PermanentError(f"request rejected ({status}): {message}")
    if isinstance(exc, ValueError):  # a body that is not JSON, from a broken server
        return TransientError(f"malformed response: {message}")
    return None


def check_base_url(base_url: Optional[str]) -> None:
    """Refuse a --base-url no request can go to, before any pair is tried: the client
    takes it as it is and fails each call (an out-of-range port as an internal error)."""
    if not base_url:
        return
    from urllib.parse import urlsplit

    from store.redaction import redact_url

    shown = redact_url(base_url)
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"--base-url {shown}: must start with http:// or https://")
    if not parts.hostname:
        raise ValueError(f"--base-url {shown}: names no host")
    try:
        parts.port
    except ValueError:
        raise ValueError(f"--base-url {shown}: the port must be a number from 1 to 65535") from None
    if re.search(r"/openai/deployments(?:/|$)", parts.path):
        # Azure OpenAI's deployment URLs take the key in an `api-key` header and the
        # deployment in the path: the OpenAI client sends a bearer key and the model in the
        # body, so every call failed as a wrong key or a missing model. The resource's v1
        # endpoint speaks the OpenAI protocol.
        raise ValueError(f"--base-url {shown}: an Azure OpenAI deployment URL, which the OpenAI "
                         f"protocol cannot call; use the resource's v1 endpoint instead: --base-url "
                         f"{parts.scheme}://{parts.netloc.rsplit('@', 1)[-1]}/openai/v1 with the "
                         "deployment's name as --model")


def split_base_url(base_url: Optional[str]) -> tuple[Optional[str], Optional[dict]]:
    """(the base URL without its query, the query's parameters): the client appends each
    endpoint's path to the base URL as text, so a query in it ('.../v1?api-key=K', as some
    proxies take their key) went before the path ('/v1/?api-key=Kchat/completions', a 404).
    The parameters go with every request instead."""
    if not base_url:
        return base_url, None
    from urllib.parse import parse_qsl, urlsplit, urlunsplit

    parts = urlsplit(base_url)
    if not parts.query:
        return base_url, None
    return urlunsplit(parts._replace(query="")), dict(parse_qsl(parts.query, keep_blank_values=True))


def answer_text(content: Any, reasoning: Any = None) -> str:
    """An answer's text from a chat message's `content`, as compatible servers send it: a
    string, or a list of text parts (Mistral's API, some proxies). Where content is empty,
    the message's reasoning text: a reasoning model served with a reasoning parser (vLLM,
    Ollama, LM Studio) that found no end of thinking puts the whole output there, the
    answer included, and asking again would come back the same."""
    if isinstance(content, list):
        content = "".join(part.get("text") or "" if isinstance(part, dict)
                          else getattr(part, "text", None) or "" for part in content)
    if isinstance(content, str) and content.strip():
        return content
    return reasoning if isinstance(reasoning, str) and reasoning.strip() else (content or "")


def message_reasoning(message: Any) -> Any:
    """The reasoning text of a chat message (a dict or the client's object): vLLM calls it
    `reasoning_content`, and `reasoning` since 0.11, as Ollama and OpenRouter do."""
    get = message.get if isinstance(message, dict) else lambda name: getattr(message, name, None)
    return get("reasoning_content") or get("reasoning")


def response_format_for(request: VLMRequest, mode: str) -> Optional[dict]:
    if mode == "json_schema":
        return {"type": "json_schema", "json_schema": {
            "name": request.schema_name, "schema": request.json_schema, "strict": True}}
    if mode == "json_object":
        return {"type": "json_object"}
    return None


async def build_messages(request: VLMRequest, encoder: ImageEncoder, detail: str) -> list[dict]:
    """Chat messages for a request: system, user text + images as data URLs, history."""
    content: list[dict] = [{"type": "text", "text": request.text}]
    for path, image_id in zip(request.image_paths, request.image_ids or request.image_paths):
        url = await encoder.data_url(path, key=image_id)
        content.append({"type": "image_url", "image_url": {"url": url, "detail": detail}})
    messages: list[dict] = []
    if request.system:
        messages.append({"role": "system", "content": request.system})
    messages.append({"role": "user", "content": content})
    messages.extend({"role": turn["role"], "content": turn["content"]} for turn in request.history)
    return messages


def configure_openai(backend: Any, *, model: str, base_url: Optional[str], api_key_env: str,
                     timeout: float, image_max_side: int, detail: str, response_mode: str,
                     max_tokens_param: str, encoder: Optional[ImageEncoder],
                     max_retries: int) -> None:
    """The settings both OpenAI backends share, checked, and their client."""
    from openai import AsyncOpenAI

    if detail not in DETAILS:
        raise ValueError(f"detail must be one of {', '.join(DETAILS)}, not {detail!r}")
    if response_mode not in RESPONSE_MODES:
        raise ValueError(f"response mode must be one of {', '.join(RESPONSE_MODES)}")
    check_base_url(base_url)
    backend.model = model
    backend.base_url = base_url
    backend.timeout = timeout
    backend.detail = detail
    backend.response_mode = response_mode
    backend.max_tokens_param = max_tokens_param
    backend.send_temperature = True
    backend._secret = resolve_api_key(api_key_env, base_url)
    # What a server may echo back in an error (the key, and credentials in the URL), kept
    # out of every message the run stores or prints.
    backend._secrets = scrub_list(backend._secret, base_url)
    backend.encoder = encoder or ImageEncoder(max_side=image_max_side)
    url, query = split_base_url(base_url)
    backend.client = AsyncOpenAI(base_url=url, api_key=backend._secret, timeout=timeout,
                                 max_retries=max_retries, default_query=query)


class OpenAIBackend:
    name: ClassVar[str] = "openai"
    supports_images: ClassVar[bool] = True
    supports_json_schema: ClassVar[bool] = True
    is_batch: ClassVar[bool] = False

    def __init__(self, model: str = "gpt-4o-mini", *, base_url: Optional[str] = None,
                 api_key_env: str = "OPENAI_API_KEY", timeout: float = 120.0,
                 image_max_side: int = 512, detail: str = "low",
                 response_mode: str = "json_schema", max_tokens_param: str = "max_tokens",
                 encoder: Optional[ImageEncoder] = None):
        configure_openai(self, model=model, base_url=base_url, api_key_env=api_key_env,
                         timeout=timeout, image_max_side=image_max_side, detail=detail,
                         response_mode=response_mode, max_tokens_param=max_tokens_param,
                         encoder=encoder, max_retries=0)
        self._served_models: Optional[list[str]] = None  # from /v1/models, asked on a 404

    @property
    def cache_params(self) -> dict:
        """Settings that change the answer, hence part of every cache key."""
        return {"detail": self.detail, "image_max_side": self.encoder.max_side}

    def _adapt_parameters(self, message: str) -> bool:
        """Newer OpenAI models refuse `max_tokens` (they want `max_completion_tokens`)
        and any temperature but the default: adapt once, say whether anything changed."""
        lowered = message.lower()
        if "max_completion_tokens" in lowered and self.max_tokens_param == "max_tokens":
            self.max_tokens_param = "max_completion_tokens"
            return True
        if "temperature" in lowered and self.send_temperature:
            self.send_temperature = False
            return True
        return False

    def _body(self, request: VLMRequest, messages: list[dict], mode: str) -> dict:
        body: dict[str, Any] = {"model": self.model, "messages": messages,
                                self.max_tokens_param: request.max_tokens}
        if self.send_temperature:
            body["temperature"] = request.temperature
        response_format = response_format_for(request, mode)
        if response_format is not None:
            body["response_format"] = response_format
        return body

    async def complete(self, request: VLMRequest) -> VLMResponse:
        import openai

        messages = await build_messages(request, self.encoder, self.detail)
        modes = list(RESPONSE_MODES[RESPONSE_MODES.index(self.response_mode):])
        started = time.perf_counter()
        i = 0
        while i < len(modes):
            mode = modes[i]
            try:
                completion = await self.client.chat.completions.create(
                    **self._body(request, messages, mode))
            except (openai.BadRequestError, openai.UnprocessableEntityError,
                    openai.InternalServerError) as exc:
                # 422 too: FastAPI-style servers (TGI, many wrappers) refuse an unknown or
                # unsupported field such as response_format as unprocessable, not 400. A 5xx
                # only where it names the format (llama.cpp's 500 "response_format type must
                # be one of ..."): any other is the server's trouble, retried by the runner.
                if isinstance(exc, openai.InternalServerError) and not (
                        i + 1 < len(modes) and FORMAT_REFUSED.search(str(exc))):
                    raise map_openai_error(exc, self._secrets) from None
                if self._adapt_parameters(str(exc)):
                    continue  # same mode again, with the parameter this model wants
                token_limit = self._token_limit_error(exc, request.max_tokens)
                if token_limit is not None:
                    raise token_limit from None
                if i + 1 < len(modes) and not (IMAGES_REFUSED.search(str(exc))
                                               or IMAGE_LIMIT.search(str(exc))):
                    i += 1
                    continue  # many local servers reject response_format: step down
                raise map_openai_error(exc, self._secrets) from None
            except (openai.OpenAIError, ValueError) as exc:
                mapped = map_openai_error(exc, self._secrets, self.timeout)
                if mapped is None:
                    raise
                if isinstance(mapped, NotFoundError):
                    mapped = NotFoundError(f"{str(mapped).rstrip('. ')}{await self._served_models_note()}")
                raise mapped from None
            if mode != self.response_mode:
                self.response_mode = mode  # keep what this server accepts
            return self._response(completion, started)
        raise AssertionError("unreachable")

    def _token_limit_error(self, exc: BaseException, max_tokens: int) -> Optional[PermanentError]:
        """The PermanentError, with what to change, for a refusal about the token limit or
        the model's context; None for any other refusal."""
        advice = token_limit_advice(str(exc), max_tokens)
        if advice is None:
            return None
        return PermanentError(f"{map_openai_error(exc, self._secrets)}; {advice}")

    async def _served_models_note(self) -> str:
        """'; the server serves A, B' for a 404: a local server's model name is rarely the
        one guessed ('llava:13b', 'Qwen/Qwen2.5-VL-7B-Instruct'), and /v1/models lists them.
        Empty where the server lists none, or lists this model (the 404 is the URL's)."""
        import openai

        if self._served_models is None:
            try:
                page = await self.client.models.list()
                self._served_models = [model.id for model in page.data]
            except (openai.OpenAIError, ValueError, AttributeError, TypeError):
                self._served_models = []
        served = self._served_models
        if not served or self.model in served:
            return ""
        more = f" and {len(served) - 20} more" if len(served) > 20 else ""
        return f"; the server serves {', '.join(served[:20])}{more}"

    def _response(self, completion: Any, started: float) -> VLMResponse:
        if not getattr(completion, "choices", None):
            # Some proxies answer an upstream failure with 200 and {"error": {...}}.
            error = getattr(completion, "error", None)
            said = error.get("message") or error if isinstance(error, dict) else error
            raise TransientError("malformed response: no choices"
                                 + (f"; the server said: {scrub(str(said), self._secrets)[:300]}" if said else ""))
        choice = completion.choices[0]
        message = choice.message
        refusal = getattr(message, "refusal", None)
        if message.content is None and refusal:
            raise PermanentError(f"refused: {refusal[:300]}")
        text = answer_text(message.content, message_reasoning(message))
        usage = completion.usage
        return VLMResponse(
            text=text,
            tokens_in=getattr(usage, "prompt_tokens", 0) or 0,
            tokens_out=getattr(usage, "completion_tokens", 0) or 0,
            finish_reason=choice.finish_reason,
            model=completion.model,
            latency_ms=(time.perf_counter() - started) * 1000,
        )

    async def aclose(self) -> None:
        await self.client.close()
        self.encoder.close()
