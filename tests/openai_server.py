"""A real HTTP server speaking the parts of the OpenAI protocol the pipeline uses.

    /v1/chat/completions, /v1/files (upload, list), /v1/files/{id}, /v1/files/{id}/content,
    /v1/batches, /v1/batches/{id}, /v1/batches/{id}/cancel
    /_stats (GET), /_config (POST JSON: fields of ServerConfig), /_reset (POST)

It is the other end of the real `openai` client in the pipeline tests and the benchmark,
not a mock of the client: requests go over TCP, through the client's own parsing.
Answers are plausible and deterministic functions of the request (so an interrupted and
an uninterrupted run end with identical stores): stage 1 lists objects chosen from a
hash of the image bytes, stage 2 copies the reference objects from its prompt and
changes some, stage 3 writes captions from the difference of the two lists in its prompt.

Faults are injected per request with the configured probabilities: 429 with
Retry-After, 500, a timeout (the answer comes too late), a body that is not JSON, an
answer that is not JSON, an answer that fails validation, a truncated answer with
finish_reason "length", a 503, a 200 whose body is an error, a connection dropped halfway;
`reject_json_schema` / `reject_json_object` answer 400 to those response formats, as many
local servers do. Other servers' habits are switches: `answer_style` (prose, fences,
reasoning_content, content parts, schema-invalid JSON), `usage_zeros`,
`reject_images_status` (a text-only model), `served_models` (404 for any other model, as
vLLM answers; listed at /v1/models), `context_length` (vLLM's 400 past --max-model-len),
`thinking_tokens` (a reasoning model that spends its max_tokens thinking).

In a test:   server = start_server(latency=0.0); server.url; server.config.rate_429 = 0.2;
             server.stats; server.requests; server.stop()
As a process: python tests/openai_server.py --latency 0.2   (prints "PORT <n>", serves)
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import random
import socket
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, fields
from typing import Any, Optional

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route


@dataclass
class ServerConfig:
    latency: float = 0.0            # seconds added to every chat completion
    hold: bool = False              # completions wait while True: a test keeps a session mid-run
    seed: int = 0
    rate_429: float = 0.0
    rate_500: float = 0.0
    rate_timeout: float = 0.0
    rate_malformed_body: float = 0.0
    rate_malformed_answer: float = 0.0
    rate_invalid_answer: float = 0.0
    rate_length: float = 0.0
    retry_after: float = 0.05       # seconds, sent as Retry-After (and retry-after-ms)
    timeout_sleep: float = 3.0      # how late a "timeout" answer comes
    reject_json_schema: bool = False
    reject_json_object: bool = False
    # 422: servers that refuse an unknown field as unprocessable; 500: llama.cpp before it
    # took json_schema (and ik_llama.cpp)
    reject_format_status: int = 400
    reject_auth: bool = False       # 401 that echoes the key, as some servers do
    reject_quota: bool = False      # 429 insufficient_quota: the account is out of credits
    # Batch API calls that reject_auth / reject_quota / reject_not_found refuse too
    # (comma-separated: "upload", "create", "poll"), as the API checks the key at every call;
    # chat completions always check reject_auth and reject_quota.
    refuse_at: str = ""
    reject_not_found: bool = False  # 404 at refuse_at's calls: a --base-url whose path is wrong
    reject_max_tokens: bool = False  # 400 unless max_completion_tokens (newer OpenAI models)
    reject_temperature: bool = False  # 400 for any temperature but the default
    keep_requests: int = 200        # how many request bodies to keep for inspection
    batch_delay: float = 0.2        # seconds from batch creation to completion
    batch_expire_after: Optional[int] = None  # lines done before a batch expires
    batch_line_error_rate: float = 0.0       # per-line 500s inside a batch
    batch_invalid_answer_rate: float = 0.0   # per-line answers that fail validation
    batch_create_response_delay: float = 0.0  # the batch exists at once; the answer comes late
    batch_cancel_keeps: int = 0     # lines a batch had finished when a cancel reached it
    # An upload is answered only after its size at this speed (bytes/s): a slow link, or a
    # provider checking a large file. The file exists (and is listed) once it has arrived.
    upload_bytes_per_s: Optional[float] = None
    batch_queue_limit: Optional[int] = None  # lines enqueued at once; a batch over it fails
    batch_cancel_refused: bool = False  # cancel answers 400, as for a batch past cancelling
    omit_usage: bool = False        # answers without `usage`, as some compatible servers send
    # Answers that validate but need a repair: "first" spoils a request's first answer only
    # (its repair comes back right), "always" its repair too.
    overlong_captions: str = ""     # stage 3/single: the first caption runs past CLIP's 77 tokens
    rename_objects: str = ""        # stage 2: the first reference object it copies gets another name
    # "first" / "always" as above: the answer is the prompt's own format example, placeholders
    # and all ({"objects": [{"name": "...", ...}]}, {"captions": ["...", ...]}), as a careless
    # model copies it.
    echo_format_example: str = ""
    # How an answer comes back, as servers other than OpenAI send it: "prose" (no JSON at
    # all), "fence" (```json fenced, response_format or not), "trailing" (JSON, then a
    # remark), "think" (<think>...</think> with a draft answer before the answer, as a
    # reasoning model served without a reasoning parser writes), "reasoning" (content null, the text in reasoning_content: a reasoning model
    # whose parser found no end of thinking), "parts" (content as a list of text parts),
    # "wrong_keys" (valid JSON under other keys), "strings" (a string where a list belongs),
    # "filtered" (content null, finish_reason "content_filter": Azure's content filter).
    answer_style: str = ""
    usage_zeros: bool = False       # usage present, every count 0 (some proxies)
    rate_503: float = 0.0           # 503 overloaded (vLLM/TGI queue full), Retry-After as for 429
    rate_error_body: float = 0.0    # HTTP 200 whose body is {"error": {...}}, no choices
    rate_reset: float = 0.0         # the connection drops halfway through the answer's body
    no_retry_after: bool = False    # 429 and 503 without Retry-After / retry-after-ms
    # A text-only model: any image is refused with this status (llama.cpp: 500, vLLM and
    # Ollama: 400) and llama.cpp's message; 404: OpenRouter's ("No endpoints found ...").
    reject_images_status: int = 0
    # Images a request may carry (vLLM's --limit-mm-per-prompt, 1 by default in many
    # versions): more get vLLM's 400.
    max_images_per_request: Optional[int] = None
    # Models the server has (listed at /v1/models); another model gets vLLM's 404 body.
    served_models: Optional[list] = None
    # Query parameters every request must carry, as a proxy that takes its key in the URL
    # (?api-key=...) checks: 401 without them.
    require_query: Optional[dict] = None
    # llama.cpp's server while its model loads: every chat request gets 503 {"error":
    # {"message": "Loading model", "type": "unavailable_error"}}, no Retry-After.
    loading: bool = False
    # OpenRouter's free tier: after this many answered chat requests, every request gets its
    # daily-cap 429 ("Rate limit exceeded: free-models-per-day ..."), no Retry-After.
    daily_limit_after: Optional[int] = None
    # vLLM's --max-model-len: a request whose prompt (text/4 + 85 per image) plus its
    # max_tokens exceeds it gets vLLM's 400 ("This model's maximum context length is ...").
    context_length: Optional[int] = None
    # A reasoning model (gpt-5-mini, Qwen3-VL-Thinking) that thinks this many tokens before
    # it answers: a request allowing fewer comes back cut off with nothing in content
    # (finish_reason "length"), and under json_schema as OpenAI's 400 "Could not finish the
    # message because max_tokens or model output limit was reached".
    thinking_tokens: Optional[int] = None


OBJECTS = {
    "bed": ["white sheets", "double size", "wooden headboard", "against the back wall"],
    "lamp": ["brass base", "white shade", "on the nightstand", "switched on"],
    "painting": ["framed", "abstract", "above the bed", "blue tones"],
    "plant": ["potted", "green leaves", "in the corner", "tall"],
    "chair": ["armchair", "grey fabric", "by the window", "cushioned"],
    "window": ["large", "white curtains", "on the right wall", "daylight"],
    "rug": ["rectangular", "striped", "on the floor", "beige"],
    "wall": ["painted", "pale yellow", "plain"],
}
COLOURS = ["red", "blue", "green", "yellow", "black", "white", "orange", "purple"]
# Another word for the same thing, as a model that does not keep stage 1's names writes.
RENAMES = {"bed": "cot", "lamp": "light", "painting": "artwork", "plant": "greenery",
           "chair": "seat", "window": "glazing", "rug": "carpet", "wall": "backdrop"}
OVERLONG_TAIL = ", " + ", ".join(f"then look at it again from corner number {n} of the room"
                                 for n in range(1, 9))


def _h(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).digest()[:8], "big")


def _objects_for(seed: int) -> list[dict]:
    rng = random.Random(seed)
    names = rng.sample(sorted(OBJECTS), k=rng.randint(3, 5))
    return [{"name": n, "descriptors": rng.sample(OBJECTS[n], k=rng.randint(2, len(OBJECTS[n])))}
            for n in names]


def _json_values(text: str) -> list[dict]:
    """Every JSON object embedded in a prompt, in order."""
    decoder, found, i = json.JSONDecoder(), [], 0
    while True:
        i = text.find("{", i)
        if i < 0:
            return found
        try:
            value, end = decoder.raw_decode(text, i)
        except ValueError:
            i += 1
            continue
        if isinstance(value, dict):
            found.append(value)
        i = end


def _placeholder(text: Any) -> bool:
    """A format example's stand-in ("...", "…"): no letter or digit."""
    return isinstance(text, str) and not any(ch.isalnum() for ch in text)


def _json_lists(text: str) -> list[list[dict]]:
    """Every {"objects": [...]} value embedded in a prompt, in order, except the prompt's
    format example (objects named "..."): every stage 1 and 2 prompt shows one, and taking
    it for a reference list made stage 1 answer as stage 2."""
    return [v["objects"] for v in _json_values(text) if isinstance(v.get("objects"), list)
            and not (v["objects"] and all(isinstance(o, dict) and _placeholder(o.get("name"))
                                          for o in v["objects"]))]


def _captions_from(before: list[dict], after: list[dict], seed: int) -> list[str]:
    rng = random.Random(seed)
    old = {o["name"]: o["descriptors"] for o in before}
    new = {o["name"]: o["descriptors"] for o in after}
    captions = []
    for name in new:
        if name not in old:
            captions.append(f"Add a {name} that is {', '.join(new[name][:2])}")
        elif new[name] != old[name]:
            changed = [d for d in new[name] if d not in old[name]] or new[name][:1]
            captions.append(f"Make the {name} {changed[0]}")
    for name in old:
        if name not in new:
            captions.append(f"Remove the {name}")
    fillers = ["Keep the rest of the room as it is", "Leave the other furniture unchanged",
               "The layout of the room stays the same"]
    while len(captions) < 3:
        captions.append(fillers[len(captions) % len(fillers)])
    rng.shuffle(captions)
    return captions[:8]


def _message_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "\n".join(part.get("text", "") for part in content or [] if part.get("type") == "text")


def _images(content: Any) -> list[str]:
    if isinstance(content, str):
        return []
    return [part["image_url"]["url"] for part in content or [] if part.get("type") == "image_url"]


def answer_for(body: dict) -> tuple[str, str]:
    """(kind, answer JSON text) for a chat request: deterministic in its content."""
    messages = body.get("messages", [])
    user = next((m for m in messages if m.get("role") == "user"), {"content": ""})
    text = _message_text(user.get("content"))
    images = _images(user.get("content"))
    image_seeds = [_h(hashlib.sha256(url.encode()).hexdigest()) for url in images]
    lists = _json_lists(text)
    if '"captions"' in text:
        if len(lists) >= 2:
            captions = _captions_from(lists[0], lists[1], _h(text))
        else:  # single stage: both images
            seeds = image_seeds + [0, 0]
            captions = _captions_from(_objects_for(seeds[0]), _objects_for(seeds[1]), _h(text, seeds))
        return "captions", json.dumps({"captions": captions})
    seed = image_seeds[0] if image_seeds else _h(text)
    if lists:  # stage 2: copy the reference objects, change some
        rng = random.Random(seed)
        objects = [dict(o) for o in lists[0]]
        if objects and rng.random() < 0.5:
            objects.pop(rng.randrange(len(objects)))
        for o in objects:
            if rng.random() < 0.3:
                o["descriptors"] = [rng.choice(COLOURS)] + list(o["descriptors"][1:])
        extra = [o for o in _objects_for(seed) if o["name"] not in {x["name"] for x in objects}]
        objects += extra[:1]
        return "objects", json.dumps({"objects": objects})
    return "objects", json.dumps({"objects": _objects_for(seed)})


def extract_answer(content: str) -> str:
    """The JSON text of an answer this server wrapped (text mode puts prose around it)."""
    start, end = content.find("{"), content.rfind("}")
    return content[start:end + 1]


def _error(status: int, message: str, headers: Optional[dict] = None, code: str = "error") -> Response:
    return JSONResponse({"error": {"message": message, "type": code, "code": code}},
                        status_code=status, headers=headers)


class FakeOpenAI:
    """The server's state: config, counters, stored files and batches."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.stats: Counter = Counter()
        self.requests: list[dict] = []
        self.files: dict[str, dict] = {}
        self.batches: dict[str, dict] = {}
        self.rng = random.Random(config.seed)
        self.lock = threading.Lock()
        self._ids = 0

    def _new_id(self, prefix: str) -> str:
        with self.lock:
            self._ids += 1
            return f"{prefix}_{self._ids:06d}"

    def reset(self) -> None:
        with self.lock:
            self.stats.clear()
            self.requests.clear()
            self.rng = random.Random(self.config.seed)

    def _roll(self, rate: float) -> bool:
        return rate > 0 and self.rng.random() < rate

    # -- chat completions

    def completion(self, body: dict, *, count: bool = True) -> tuple[int, Any, dict]:
        """(status, JSON body, headers) for one chat request, faults not included."""
        fmt = (body.get("response_format") or {}).get("type")
        if self.config.reject_max_tokens and "max_tokens" in body:
            self.stats["rejected_max_tokens"] += 1
            return 400, {"error": {"message": "Unsupported parameter: 'max_tokens' is not supported "
                                   "with this model. Use 'max_completion_tokens' instead.",
                                   "type": "invalid_request_error"}}, {}
        if self.config.reject_temperature and body.get("temperature", 1) != 1:
            self.stats["rejected_temperature"] += 1
            return 400, {"error": {"message": "Unsupported value: 'temperature' does not support "
                                   f"{body['temperature']} with this model.",
                                   "type": "invalid_request_error"}}, {}
        limit = self.config.context_length
        asked = body.get("max_tokens") or body.get("max_completion_tokens") or 0
        if limit is not None and self._prompt_tokens(body) + asked > limit:
            self.stats["rejected_context_length"] += 1
            prompt = self._prompt_tokens(body)
            return 400, {"object": "error", "message": (  # vLLM's body and words
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{prompt + asked} tokens ({prompt} in the messages, {asked} in the completion). "
                "Please reduce the length of the messages or completion."),
                "type": "BadRequestError", "param": None, "code": 400}, {}
        thinking = self.config.thinking_tokens
        if thinking is not None and asked <= thinking:
            self.stats["thinking_cut_off"] += 1
            if fmt == "json_schema":
                return 400, {"error": {"message": "Could not finish the message because max_tokens or "
                                       "model output limit was reached. Please try again with higher "
                                       "max_tokens.", "type": "invalid_request_error", "param": None,
                                       "code": None}}, {}
            payload = self._completion_body(body, "", "length")
            payload["usage"]["completion_tokens"] = asked
            return 200, payload, {}
        if fmt == "json_schema" and self.config.reject_json_schema:
            self.stats["rejected_json_schema"] += 1
            return self.config.reject_format_status, {"error": {  # llama.cpp's words (a 500 there)
                "message": 'response_format type must be one of "text" or "json_object", but got: json_schema',
                "type": "invalid_request_error"}}, {}
        if fmt == "json_object" and self.config.reject_json_object:
            self.stats["rejected_json_object"] += 1
            return self.config.reject_format_status, {"error": {"message": "response_format json_object is not supported",
                                   "type": "invalid_request_error"}}, {}
        kind, content = answer_for(body)
        content = self._spoil(body, kind, content)
        if fmt is None:  # text mode: prose around the JSON, as chatty models answer
            content = f"Sure! Here is the JSON you asked for:\n```json\n{content}\n```\nHope this helps."
        if count:
            self.stats["completions_ok"] += 1
            self.stats[f"answers_{kind}"] += 1
        payload = self._styled(self._completion_body(body, content, "stop"))
        if self.config.omit_usage:
            del payload["usage"]
        return 200, payload, {}

    def _spoil(self, body: dict, kind: str, content: str) -> str:
        """The answer with the configured wrong content (overlong_captions, rename_objects,
        echo_format_example); a repair request is one whose messages hold an earlier answer."""
        if not (self.config.overlong_captions or self.config.rename_objects
                or self.config.echo_format_example):
            return content
        repair = any(m.get("role") == "assistant" for m in body.get("messages", []))
        spoil = {"first": not repair, "always": True}
        if spoil.get(self.config.echo_format_example):
            user = next((m for m in body.get("messages", []) if m.get("role") == "user"), {})
            # Every prompt ends with its format example ("Answer with only a JSON object of
            # this form: ..."), after the lists it quotes.
            self.stats["echoed_format_example"] += 1
            return json.dumps(_json_values(_message_text(user.get("content")))[-1])
        value = json.loads(content)
        if kind == "captions" and spoil.get(self.config.overlong_captions):
            value["captions"][0] += OVERLONG_TAIL
            self.stats["spoiled_overlong_caption"] += 1
        elif kind == "objects" and spoil.get(self.config.rename_objects):
            user = next((m for m in body.get("messages", []) if m.get("role") == "user"), {})
            lists = _json_lists(_message_text(user.get("content")))
            unchanged = [o for o in lists[0] if o in value["objects"]] if lists else []
            for obj in value["objects"]:
                if obj in unchanged and obj["name"] in RENAMES:
                    obj["name"] = RENAMES[obj["name"]]
                    self.stats["spoiled_renamed_object"] += 1
                    break
        return json.dumps(value)

    def _styled(self, payload: dict) -> dict:
        """The payload with its answer sent as answer_style says."""
        style = self.config.answer_style
        message = payload["choices"][0]["message"]
        content = message["content"]
        if style == "prose":
            message["content"] = "The room has a bed, a lamp and a plant; the lamp is now red."
        elif style == "fence":
            message["content"] = f"```json\n{content}\n```"
        elif style == "trailing":
            message["content"] = f"{content}\n\nLet me know if you need anything else!"
        elif style == "reasoning":
            message["content"] = None
            message["reasoning_content"] = f"The user wants JSON. Final answer:\n{content}"
        elif style == "think":  # no reasoning parser: the thinking, a draft and all, in content
            draft = json.dumps({"objects": [{"name": "thing", "descriptors": ["draft"]}]}
                               if '"objects"' in content else {"captions": ["draft"]})
            message["content"] = f"<think>\nA first try: {draft}. Let me look again.\n</think>\n\n{content}"
        elif style == "parts":
            message["content"] = [{"type": "text", "text": content}]
        elif style == "filtered":  # Azure's content filter on the completion: 200, no content
            message["content"] = None
            payload["choices"][0]["finish_reason"] = "content_filter"
        elif style in ("wrong_keys", "strings"):
            value = json.loads(extract_answer(content))
            key = next(iter(value))
            if style == "wrong_keys":
                value = {"result": value[key]}
            elif key == "captions":
                value = {"captions": "; ".join(value["captions"])}
            else:
                value = {"objects": [{"name": o["name"], "descriptors": ", ".join(o["descriptors"])}
                                     for o in value["objects"]]}
            message["content"] = json.dumps(value)
        if style:
            self.stats[f"styled_{style}"] += 1
        if self.config.usage_zeros and "usage" in payload:
            payload["usage"] = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        return payload

    @staticmethod
    def _prompt_tokens(body: dict) -> int:
        user_text = sum(len(_message_text(m.get("content"))) for m in body.get("messages", []))
        images = sum(len(_images(m.get("content"))) for m in body.get("messages", []))
        return user_text // 4 + 85 * images

    def _completion_body(self, body: dict, content: str, finish: str) -> dict:
        user_text = sum(len(_message_text(m.get("content"))) for m in body.get("messages", []))
        images = sum(len(_images(m.get("content"))) for m in body.get("messages", []))
        return {
            "id": self._new_id("chatcmpl"), "object": "chat.completion", "created": int(time.time()),
            "model": body.get("model", "unknown"),
            "choices": [{"index": 0, "finish_reason": finish,
                         "message": {"role": "assistant", "content": content}}],
            "usage": {"prompt_tokens": user_text // 4 + 85 * images,
                      "completion_tokens": max(1, len(content) // 4),
                      "total_tokens": user_text // 4 + 85 * images + max(1, len(content) // 4)},
        }

    async def chat(self, request: Request) -> Response:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except ValueError:
            return _error(400, "request body is not JSON")
        cfg = self.config
        if cfg.require_query and any(request.query_params.get(k) != v for k, v in cfg.require_query.items()):
            self.stats["rejected_query"] += 1
            return _error(401, "missing or wrong key in the URL's query", code="invalid_api_key")
        if cfg.daily_limit_after is not None and self.stats["completions_ok"] >= cfg.daily_limit_after:
            self.stats["rejected_daily_limit"] += 1
            return JSONResponse({"error": {
                "message": "Rate limit exceeded: free-models-per-day. Add 10 credits to unlock 1000 free "
                           "model requests per day", "code": 429, "metadata": {"headers": {
                               "X-RateLimit-Limit": "50", "X-RateLimit-Remaining": "0"}}}}, status_code=429)
        if cfg.loading:
            self.stats["loading_503"] += 1
            return _error(503, "Loading model", code="unavailable_error")
        if cfg.reject_auth:
            self.stats["rejected_auth"] += 1
            # echoes the credentials it was given, header and URL query, as some servers do
            query = f" for {request.url.path}?{request.url.query}" if request.url.query else ""
            return _error(401, f"Incorrect API key provided: {request.headers.get('authorization', '')}{query}",
                          code="invalid_api_key")
        if cfg.reject_quota:  # as OpenAI answers once the credits are spent: no Retry-After
            self.stats["rejected_quota"] += 1
            return JSONResponse({"error": {
                "message": "You exceeded your current quota, please check your plan and billing details.",
                "type": "insufficient_quota", "param": None, "code": "insufficient_quota"}}, status_code=429)
        served = cfg.served_models
        if served is not None and body.get("model") not in served:
            self.stats["rejected_model"] += 1  # vLLM's body: no "error" wrapper
            return JSONResponse({"object": "error", "message": f"The model `{body.get('model')}` does not exist.",
                                 "type": "NotFoundError", "param": None, "code": 404}, status_code=404)
        if cfg.reject_images_status and any(_images(m.get("content")) for m in body.get("messages", [])):
            self.stats["rejected_images"] += 1
            said = ("No endpoints found that support image input" if cfg.reject_images_status == 404
                    else "image input is not supported - hint: if this is unexpected, you may need "
                    "to provide the mmproj")  # OpenRouter's 404; llama.cpp's words otherwise
            return _error(cfg.reject_images_status, said, code="server_error"
                          if cfg.reject_images_status >= 500 else "invalid_request_error")
        limit = cfg.max_images_per_request
        if limit is not None and sum(len(_images(m.get("content"))) for m in body.get("messages", [])) > limit:
            self.stats["rejected_image_count"] += 1
            return JSONResponse({"object": "error", "message": f"At most {limit} image(s) may be provided in "
                                 "one request.", "type": "BadRequestError", "param": None, "code": 400},
                                status_code=400)
        with self.lock:
            self.stats["chat_requests"] += 1
            if cfg.keep_requests:
                self.requests.append(body)
                del self.requests[:-cfg.keep_requests]
            fault = None
            for name in ("429", "500", "503", "error_body", "reset", "timeout", "malformed_body",
                         "malformed_answer", "invalid_answer", "length"):
                if self._roll(getattr(cfg, f"rate_{name}")):
                    fault = name
                    break
        if cfg.latency:
            await asyncio.sleep(cfg.latency)
        while cfg.hold:
            await asyncio.sleep(0.01)
        if fault:
            self.stats[f"fault_{fault}"] += 1
        wait = None if cfg.no_retry_after else {
            "retry-after": f"{cfg.retry_after:g}", "retry-after-ms": str(int(cfg.retry_after * 1000))}
        if fault == "429":
            return _error(429, "Rate limit reached, slow down", code="rate_limit_exceeded", headers=wait)
        if fault == "503":
            return _error(503, "The server is overloaded, please try again later", code="overloaded",
                          headers=wait)
        if fault == "error_body":  # some proxies answer an upstream failure with 200
            return JSONResponse({"error": {"message": "upstream model crashed", "type": "server_error",
                                           "code": 500}})
        if fault == "reset":
            return self._reset_midway(body)
        if fault == "500":
            return _error(500, "The server had an error while processing your request", code="server_error")
        if fault == "timeout":
            await asyncio.sleep(cfg.timeout_sleep)
        if fault == "malformed_body":
            return Response(b'{"id": "chatcmpl-broken", "choices": [', media_type="application/json")
        status, payload, headers = self.completion(body, count=fault != "timeout")
        if status != 200:
            return JSONResponse(payload, status_code=status, headers=headers)
        message = payload["choices"][0]["message"]
        if fault == "malformed_answer":
            message["content"] = message["content"].replace("{", "", 1).replace('"', "'")
        elif fault == "invalid_answer":
            if '"captions"' in message["content"]:
                message["content"] = json.dumps({"captions": ["In image 1 the lamp is red", "ok"]})
            else:
                message["content"] = json.dumps({"objects": []})
        elif fault == "length":
            message["content"] = message["content"][: len(message["content"]) // 2]
            payload["choices"][0]["finish_reason"] = "length"
        return JSONResponse(payload)

    def _reset_midway(self, body: dict) -> Response:
        """Half of a real answer's body, then the connection drops."""
        data = json.dumps(self.completion(body, count=False)[1]).encode()

        async def halves():
            yield data[: len(data) // 2]
            raise ConnectionResetError("dropped by the test server (rate_reset)")

        return StreamingResponse(halves(), media_type="application/json",
                                 headers={"content-length": str(len(data))})

    async def list_models(self, request: Request) -> Response:
        names = self.config.served_models or []
        return JSONResponse({"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "test"} for name in names]})

    # -- files

    def _refusal(self, place: str) -> Optional[Response]:
        """The account or setup error configured for this batch API call, if any."""
        cfg = self.config
        if place not in cfg.refuse_at.split(","):
            return None
        if cfg.reject_auth:
            self.stats[f"rejected_auth_{place}"] += 1
            return _error(401, "Incorrect API key provided.", code="invalid_api_key")
        if cfg.reject_quota:
            self.stats[f"rejected_quota_{place}"] += 1
            return JSONResponse({"error": {
                "message": "You exceeded your current quota, please check your plan and billing details.",
                "type": "insufficient_quota", "param": None, "code": "insufficient_quota"}}, status_code=429)
        if cfg.reject_not_found:
            self.stats[f"rejected_not_found_{place}"] += 1
            return _error(404, f"Invalid URL ({place})", code="invalid_request_error")
        return None

    async def upload_file(self, request: Request) -> Response:
        refused = self._refusal("upload")
        if refused is not None:
            return refused
        form = await request.form()
        upload = form.get("file")
        if upload is None:
            return _error(400, "missing file")
        data = await upload.read()
        file_id = self._new_id("file")
        self.files[file_id] = {"id": file_id, "object": "file", "bytes": len(data),
                               "created_at": int(time.time()), "filename": upload.filename or "upload",
                               "purpose": form.get("purpose", "batch"), "status": "processed",
                               "_data": data}
        self.stats["files_uploaded"] += 1
        if self.config.upload_bytes_per_s:
            await asyncio.sleep(len(data) / self.config.upload_bytes_per_s)
        return JSONResponse(self._public(self.files[file_id]))

    async def list_files(self, request: Request) -> Response:
        """GET /v1/files: a cursor page (purpose, order, limit, after), as the API lists."""
        query = request.query_params
        entries = [f for f in self.files.values() if f["purpose"] == query.get("purpose", f["purpose"])]
        entries.sort(key=lambda f: f["id"], reverse=query.get("order", "desc") == "desc")
        if "after" in query:
            ids = [f["id"] for f in entries]
            entries = entries[ids.index(query["after"]) + 1:] if query["after"] in ids else []
        limit = int(query.get("limit", 10000))
        page = [self._public(f) for f in entries[:limit]]
        self.stats["file_lists"] += 1
        return JSONResponse({"object": "list", "data": page, "has_more": len(entries) > limit,
                             "first_id": page[0]["id"] if page else None,
                             "last_id": page[-1]["id"] if page else None})

    @staticmethod
    def _public(obj: dict) -> dict:
        return {k: v for k, v in obj.items() if not k.startswith("_")}

    async def get_file(self, request: Request) -> Response:
        entry = self.files.get(request.path_params["file_id"])
        return JSONResponse(self._public(entry)) if entry else _error(404, "no such file")

    async def file_content(self, request: Request) -> Response:
        entry = self.files.get(request.path_params["file_id"])
        if entry is None:
            return _error(404, "no such file")
        self.stats["files_downloaded"] += 1
        return Response(entry["_data"], media_type="application/octet-stream")

    # -- batches

    async def create_batch(self, request: Request) -> Response:
        refused = self._refusal("create")
        if refused is not None:
            return refused
        body = await request.json()
        if body.get("input_file_id") not in self.files:
            return _error(400, f"input file {body.get('input_file_id')} does not exist")
        batch_id = self._new_id("batch")
        lines = self.files[body["input_file_id"]]["_data"].decode().splitlines()
        batch = {"id": batch_id, "object": "batch", "endpoint": body.get("endpoint"),
                 "input_file_id": body["input_file_id"], "completion_window": "24h",
                 "status": "validating", "created_at": int(time.time()), "output_file_id": None,
                 "error_file_id": None, "metadata": body.get("metadata"),
                 "request_counts": {"total": len(lines), "completed": 0, "failed": 0}}
        limit = self.config.batch_queue_limit
        enqueued = sum(b["request_counts"]["total"] for b in self.batches.values()
                       if b["status"] in ("validating", "in_progress", "finalizing", "cancelling"))
        self.batches[batch_id] = batch
        self.stats["batches_created"] += 1
        if limit is not None and enqueued + len(lines) > limit:
            # As the Batch API does past the organisation's enqueued token limit: the batch
            # fails without running a line (nothing is paid).
            batch["status"] = "failed"
            batch["errors"] = {"object": "list", "data": [{
                "code": "token_limit_exceeded", "line": None, "param": None,
                "message": "Enqueued token limit reached for this model. Please try again once "
                           "some in_progress batches have been completed."}]}
            self.stats["batches_failed"] += 1
            return JSONResponse(batch)
        self.stats["batch_lines_submitted"] += len(lines)
        asyncio.get_running_loop().create_task(self._process(batch_id, lines))
        if self.config.batch_create_response_delay:
            await asyncio.sleep(self.config.batch_create_response_delay)
        return JSONResponse(batch)

    async def _process(self, batch_id: str, lines: list[str]) -> None:
        batch = self.batches[batch_id]
        started = time.monotonic()
        # Wait out the batch's delay in small steps, so a cancel takes effect promptly.
        while time.monotonic() - started < self.config.batch_delay and batch["status"] != "cancelling":
            if time.monotonic() - started >= self.config.batch_delay / 2:
                batch["status"] = "in_progress"
            await asyncio.sleep(min(0.02, self.config.batch_delay / 4 or 0.01))
        # A cancelled batch still returns the lines it had finished (they are paid).
        lines_to_do = self.config.batch_cancel_keeps if batch["status"] == "cancelling" else len(lines)
        expire_after = self.config.batch_expire_after
        outputs, errors = [], []
        for index, line in enumerate(lines):
            item = json.loads(line)
            custom_id = item["custom_id"]
            cut = (expire_after is not None and index >= expire_after) or index >= lines_to_do
            if cut:
                code = "batch_expired" if expire_after is not None else "batch_cancelled"
                errors.append({"id": self._new_id("req"), "custom_id": custom_id, "response": None,
                               "error": {"code": code, "message": "not processed before the batch ended"}})
                continue
            with self.lock:
                line_error = self._roll(self.config.batch_line_error_rate)
            if line_error:
                errors.append({"id": self._new_id("req"), "custom_id": custom_id,
                               "response": {"status_code": 500, "request_id": self._new_id("req"),
                                            "body": {"error": {"message": "server error", "type": "server_error"}}},
                               "error": None})
                continue
            status, payload, _ = self.completion(item["body"], count=False)
            with self.lock:
                invalid = status == 200 and self._roll(self.config.batch_invalid_answer_rate)
            if invalid:  # valid JSON that fails the stage's validation, as in chat()
                message = payload["choices"][0]["message"]
                message["content"] = json.dumps({"captions": ["ok"]} if '"captions"' in message["content"]
                                                else {"objects": []})
                self.stats["batch_invalid_answers"] += 1
            self.stats["batch_lines_answered"] += 1
            outputs.append({"id": self._new_id("req"), "custom_id": custom_id, "error": None,
                            "response": {"status_code": status, "request_id": self._new_id("req"),
                                         "body": payload}})
        final = "completed"
        if expire_after is not None and len(lines) > expire_after:
            final = "expired"
        if batch["status"] == "cancelling":
            final = "cancelled"
        for key, rows in (("output_file_id", outputs), ("error_file_id", errors)):
            if rows:
                file_id = self._new_id("file")
                data = ("\n".join(json.dumps(r) for r in rows) + "\n").encode()
                self.files[file_id] = {"id": file_id, "object": "file", "bytes": len(data),
                                       "created_at": int(time.time()), "filename": f"{key}.jsonl",
                                       "purpose": "batch_output", "status": "processed", "_data": data}
                batch[key] = file_id
        batch["request_counts"] = {"total": len(lines), "completed": len(outputs), "failed": len(errors)}
        batch["status"] = final

    async def list_batches(self, request: Request) -> Response:
        batches = sorted(self.batches.values(), key=lambda b: b["id"], reverse=True)
        return JSONResponse({"object": "list", "data": batches, "has_more": False,
                             "first_id": batches[0]["id"] if batches else None,
                             "last_id": batches[-1]["id"] if batches else None})

    async def get_batch(self, request: Request) -> Response:
        refused = self._refusal("poll")
        if refused is not None:
            return refused
        batch = self.batches.get(request.path_params["batch_id"])
        self.stats["batch_polls"] += 1
        return JSONResponse(batch) if batch else _error(404, "no such batch")

    async def cancel_batch(self, request: Request) -> Response:
        batch = self.batches.get(request.path_params["batch_id"])
        if batch is None:
            return _error(404, "no such batch")
        if self.config.batch_cancel_refused:
            self.stats["batch_cancels_refused"] += 1
            return _error(400, f"Cannot cancel a batch with status '{batch['status']}'.",
                          code="invalid_request_error")
        if batch["status"] in ("validating", "in_progress"):
            batch["status"] = "cancelling"
        return JSONResponse(batch)

    # -- control

    async def get_stats(self, request: Request) -> Response:
        return JSONResponse(dict(self.stats))

    async def set_config(self, request: Request) -> Response:
        updates = await request.json()
        names = {f.name for f in fields(ServerConfig)}
        for key, value in updates.items():
            if key not in names:
                return _error(400, f"unknown config field {key}")
            setattr(self.config, key, value)
        return JSONResponse(asdict(self.config))

    async def do_reset(self, request: Request) -> Response:
        self.reset()
        return JSONResponse({"ok": True})

    def app(self) -> Starlette:
        return Starlette(routes=[
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/v1/models", self.list_models, methods=["GET"]),
            Route("/v1/files", self.upload_file, methods=["POST"]),
            Route("/v1/files", self.list_files, methods=["GET"]),
            Route("/v1/files/{file_id}", self.get_file, methods=["GET"]),
            Route("/v1/files/{file_id}/content", self.file_content, methods=["GET"]),
            Route("/v1/batches", self.create_batch, methods=["POST"]),
            Route("/v1/batches", self.list_batches, methods=["GET"]),
            Route("/v1/batches/{batch_id}", self.get_batch, methods=["GET"]),
            Route("/v1/batches/{batch_id}/cancel", self.cancel_batch, methods=["POST"]),
            Route("/_stats", self.get_stats, methods=["GET"]),
            Route("/_config", self.set_config, methods=["POST"]),
            Route("/_reset", self.do_reset, methods=["POST"]),
        ])


class ServerHandle:
    def __init__(self, state: FakeOpenAI, server, thread: threading.Thread, port: int):
        self.state = state
        self._server = server
        self._thread = thread
        self.port = port
        self.url = f"http://127.0.0.1:{port}/v1"

    @property
    def config(self) -> ServerConfig:
        return self.state.config

    @property
    def stats(self) -> Counter:
        return self.state.stats

    @property
    def requests(self) -> list[dict]:
        return self.state.requests

    def stop(self) -> None:
        self._server.should_exit = True
        self._server.force_exit = True  # do not wait for answers a test left hanging
        self._thread.join(timeout=10)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def _bind(port: int = 0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(2048)
    return sock


def _uvicorn_server(app):
    import uvicorn

    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                            timeout_keep_alive=30, backlog=2048)
    return uvicorn.Server(config)


def start_server(**config: Any) -> ServerHandle:
    """Serve on 127.0.0.1 (a free port) from a daemon thread; returns when it listens."""
    state = FakeOpenAI(ServerConfig(**config))
    sock = _bind()
    server = _uvicorn_server(state.app())
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True,
                              name="fake-openai")
    thread.start()
    deadline = time.time() + 10
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("the test OpenAI server did not start")
        time.sleep(0.01)
    return ServerHandle(state, server, thread, sock.getsockname()[1])


def server_fixture(**config: Any):
    """A module-scoped pytest fixture serving start_server(**config) and stopping it after."""
    import pytest

    @pytest.fixture(scope="module")
    def server():
        handle = start_server(**config)
        yield handle
        handle.stop()

    return server


def fresh_server_fixture(api_key: str):
    """An autouse pytest fixture: each test starts from a well-behaved server (default
    config, no recorded state) with OPENAI_API_KEY set to api_key, and leaves no batch
    running that could finish during the next test."""
    import pytest

    @pytest.fixture(autouse=True)
    def fresh_server(server, monkeypatch):
        server.state.config.__init__()
        server.state.reset()
        monkeypatch.setenv("OPENAI_API_KEY", api_key)
        yield
        for batch in server.state.batches.values():
            if batch["status"] in ("validating", "in_progress"):
                batch["status"] = "cancelling"

    return fresh_server


def main() -> None:
    parser = argparse.ArgumentParser(description="A local OpenAI-protocol server for tests and benchmarks.")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency", type=float, default=0.0)
    parser.add_argument("--config", default="{}", help="JSON object of ServerConfig fields")
    args = parser.parse_args()
    state = FakeOpenAI(ServerConfig(**{"latency": args.latency, **json.loads(args.config)}))
    sock = _bind(args.port)
    print(f"PORT {sock.getsockname()[1]}", flush=True)
    _uvicorn_server(state.app()).run(sockets=[sock])


if __name__ == "__main__":
    main()
