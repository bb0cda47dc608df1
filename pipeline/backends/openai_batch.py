"""The `openai-batch` backend: the OpenAI Batch API (half price, 24 h window).

The runner calls `complete(request)` for each request as it would with the `openai`
backend; here the request is pooled, and the pool is written as JSONL (one line per
request, `custom_id` = a hash of the request), uploaded, and submitted as a batch once
no new request has arrived for `flush_interval` seconds (or the pool is full). So stages
chain by themselves: as a stage 1 batch finishes, its pairs send their stage 2 requests,
which go out in the next batch. A pool larger than the API's limits (50,000 requests,
200 MB per file) is split over several files. A file's upload is given the request timeout
plus its size at `upload_bytes_per_s` (an upload of 190 MB takes minutes), and one that
times out is looked up by its unique name before it is sent again (see _upload).

Every submitted batch is stored (table `batches`: id, input file, custom ids), so a
restarted run finds its batches and waits for them instead of paying again. So does a new
run that asks the same requests (same model, prompts and settings) while another run's
batches are still open and no session of that run is live (the runner decides which:
pipeline.runner._runs_asking_the_same); the answers it takes are stored as its own calls,
and the other run, resumed, reuses them from the store. What each line asks is stored with
its batch (its request hash), so that when a batch is collected, the answers no session
asked for (the other run's pairs outside this run's scope) are stored too, as calls of the
batch's run: every run that asks the same reuses them instead of paying again. A poller
checks open batches every `poll_interval` seconds and gives up on one `batch_timeout`
after it was submitted, restarts included (it is cancelled; its finished lines are
kept). When a batch ends, its output and error files are downloaded and each line goes
back to the request that wrote it, by custom_id. A line the batch did not finish (expired,
cancelled by our deadline, or a 429 / 5xx inside the batch) becomes a TransientError, so
the runner asks again and the request goes into a new batch; finished lines are never
resubmitted. A batch cancelled outside good4cir (the provider's dashboard) is the user
choosing not to pay for the rest: its finished lines are kept, the others fail their
items as 'batch cancelled' (BatchCancelledError) and are sent again only when the user
asks (--retry-failed). Which side cancelled is stored (batches.cancelled_by) before the
cancel is sent, so a restarted session tells the two apart. A batch that fails
because the provider's queue for the model is full (`token_limit_exceeded`) ran nothing:
its lines wait until another batch of this session ends, then go out again, without
counting as an attempt (an immediate resubmission would fail the same way).

The response format steps down as in the `openai` backend (json_schema → json_object →
text): a line refused with a 400 (or 422) that names the response format lowers the
mode for every later request and goes out again in the next batch; a 400 for anything
else fails its item (PermanentError).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, ClassVar, Optional

from store import annotations as store_ann

from ..images import ImageEncoder
from .base import (AccountError, ConnectionFailedError, NotFoundError, PermanentError, TransientError,
                   UnreachableError, VLMRequest, VLMResponse)
from .openai_backend import (RESPONSE_MODES, answer_text, build_messages, configure_openai,
                             map_openai_error, message_reasoning, response_format_for, scrub,
                             token_limit_advice)

log = logging.getLogger("good4cir.pipeline.batch")

MAX_REQUESTS_PER_FILE = 50_000
MAX_BYTES_PER_FILE = 200 * 1024 * 1024
TERMINAL = {"completed", "expired", "cancelled", "failed"}
UPLOAD_ATTEMPTS = 3
# Polls in a row that reach no server (each after the client's own retries) before the run
# stops: a batch run has no other request that would notice the server is gone.
UNREACHABLE_POLLS = 6
UPLOAD_LOOKUP_FILES = 1000  # newest batch files looked through for an upload that timed out
# A batch that fails with these ran nothing (nothing was paid): the provider's queue for
# the model is full until some of the batches already in it finish.
QUEUE_FULL_CODES = {"token_limit_exceeded", "request_limit_exceeded"}


class BatchVLMResponse(VLMResponse):
    """An answer that came back in a batch: which batch and line it was, and the call row
    it was stored as when the batch was collected (the runner then writes nothing)."""

    batch_id: Optional[str] = None
    custom_id: Optional[str] = None
    call_id: Optional[int] = None


class BatchLineError(TransientError):
    def __init__(self, message: str, batch_id: Optional[str], custom_id: str):
        super().__init__(message, retry_after=0.0)
        self.batch_id = batch_id
        self.custom_id = custom_id


class BatchRejectedError(PermanentError):
    def __init__(self, message: str, batch_id: Optional[str], custom_id: str):
        super().__init__(message)
        self.batch_id = batch_id
        self.custom_id = custom_id


class BatchCancelledError(BatchRejectedError):
    """A line of a batch cancelled outside good4cir that the batch did not answer."""

    category: ClassVar[str] = "batch cancelled"


@dataclass
class _Watch:
    """One provider batch being waited on."""

    batch_id: str
    created: float = field(default_factory=time.monotonic)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    results: dict[str, Any] = field(default_factory=dict)  # custom_id -> BatchVLMResponse | Exception
    status: Optional[str] = None
    cancel_sent: bool = False
    cancelled_outside: bool = False  # by the user (the provider's dashboard), not by us
    note: str = ""
    error_codes: set = field(default_factory=set)  # of a batch that failed as a whole
    # A poll refused for the account (401, no credits): the batch is still the provider's,
    # paid and stored; its lines fail with this, which stops the run, and a rerun collects it.
    refused: Optional[AccountError] = None


@dataclass
class _Pending:
    custom_id: str
    stage: str
    line: bytes
    future: asyncio.Future
    meta: dict = field(default_factory=dict)  # what the line asks, as its call is stored


def _epoch(stamp: Optional[str]) -> Optional[float]:
    try:
        return datetime.fromisoformat(stamp).timestamp() if stamp else None
    except ValueError:
        return None


def _recorded_lines(db, run_ids: list[int]) -> list[tuple[str, str]]:
    """(batch id, custom id) of the batch lines stored as calls of these runs."""
    return [tuple(row) for row in db.execute(
        f"SELECT batch_id, custom_id FROM calls WHERE run_id IN ({','.join('?' * len(run_ids))})"
        " AND batch_id IS NOT NULL AND custom_id IS NOT NULL", run_ids)]


def _batches_to_wait_for(db, run_id: int, waited_run_ids: list[int]) -> list[dict]:
    """The run's stored batches, and the open ones of other runs it waits for, oldest first."""
    rows = store_ann.list_batches(db, run_id)
    for other in waited_run_ids:
        rows += [row for row in store_ann.list_batches(db, other) if not row["collected"]]
    return sorted(rows, key=lambda row: row["created_at"])


def custom_id_for(body_without_images: dict) -> str:
    digest = hashlib.sha256(json.dumps(body_without_images, sort_keys=True, ensure_ascii=False)
                            .encode()).hexdigest()
    return "g4c-" + digest[:56]  # the API allows 64 characters


def line_custom_id(request: VLMRequest, *, model: str, params: dict, mode: str) -> str:
    """The custom_id of the batch line asking `request` (params: the backend's
    cache_params; mode: the response mode it is sent with). A batch stored before its
    lines were (migration m006) is known only by these."""
    return custom_id_for({"model": model, "params": params, "mode": mode, "stage": request.stage,
                          "system": request.system, "text": request.text,
                          "images": request.image_ids, "history": request.history,
                          "schema": request.schema_name, "temperature": request.temperature,
                          "max_tokens": request.max_tokens})


def line_custom_ids(request: VLMRequest, *, model: str, detail: str, image_max_side: int) -> list[str]:
    """The custom ids the openai-batch backend may have sent `request` under, one per
    response mode (a session steps the mode down when the server refuses one)."""
    params = {"detail": detail, "image_max_side": image_max_side}
    return [line_custom_id(request, model=model, params=params, mode=mode) for mode in RESPONSE_MODES]


class OpenAIBatchBackend:
    name: ClassVar[str] = "openai-batch"
    supports_images: ClassVar[bool] = True
    supports_json_schema: ClassVar[bool] = True
    is_batch: ClassVar[bool] = True

    def __init__(self, model: str = "gpt-4o-mini", *, base_url: Optional[str] = None,
                 api_key_env: str = "OPENAI_API_KEY", timeout: float = 120.0,
                 image_max_side: int = 512, detail: str = "low", response_mode: str = "json_schema",
                 poll_interval: float = 30.0, batch_timeout: float = 26 * 3600.0,
                 flush_interval: float = 5.0, max_batch_requests: int = MAX_REQUESTS_PER_FILE,
                 max_batch_bytes: int = MAX_BYTES_PER_FILE, max_tokens_param: str = "max_tokens",
                 upload_bytes_per_s: float = 256 * 1024,
                 encoder: Optional[ImageEncoder] = None):
        # max_retries=2: this client makes only the file and batch bookkeeping calls.
        configure_openai(self, model=model, base_url=base_url, api_key_env=api_key_env,
                         timeout=timeout, image_max_side=image_max_side, detail=detail,
                         response_mode=response_mode, max_tokens_param=max_tokens_param,
                         encoder=encoder, max_retries=2)
        self.poll_interval = poll_interval
        self.batch_timeout = batch_timeout
        self.flush_interval = flush_interval
        self.max_batch_requests = min(max_batch_requests, MAX_REQUESTS_PER_FILE)
        self.max_batch_bytes = min(max_batch_bytes, MAX_BYTES_PER_FILE)
        self.timeout = timeout
        self.upload_bytes_per_s = upload_bytes_per_s
        self._ctx = None
        self._run_id: Optional[int] = None
        self._known: dict[str, list[str]] = {}       # custom_id -> stored batch ids, oldest first
        self._order: dict[str, int] = {}             # stored batch id -> its place, oldest first
        self._watches: dict[str, _Watch] = {}
        # When stored batches were submitted (epoch s): batch_timeout counts from then,
        # not from this session's start, or every restart would grant a new window.
        self._submitted_at: dict[str, Optional[float]] = {}
        self._waiters: dict[str, asyncio.Future] = {}  # custom_id -> shared answer
        self._line_mode: dict[str, str] = {}  # custom_id -> response mode it was sent with
        # Lines this session waits for -> when it was asked for them (perf_counter): their
        # answers are stored at collection as this run's calls, with that latency.
        self._asked_at: dict[str, float] = {}
        self._pool: list[_Pending] = []
        self._last_added = 0.0
        self._tasks: list[asyncio.Task] = []
        self._wake = None

    @property
    def cache_params(self) -> dict:
        return {"detail": self.detail, "image_max_side": self.encoder.max_side}

    # -- lifecycle (the runner calls start() and aclose())

    async def start(self, ctx) -> None:
        """Load this run's stored batches, and the open batches of the other runs it
        waits for (ctx.waited_run_ids: their requests are this run's, and no live session
        collects them); start the flusher and the poller."""
        self._ctx = ctx
        self._run_id = ctx.run_id
        waited = list(getattr(ctx, "waited_run_ids", []))
        rows = await ctx.db(_batches_to_wait_for, ctx.run_id, waited)
        if any(row["id"].startswith("pending:") for row in rows):
            rows = await self._adopt_placeholders(rows)
        # Lines whose answer (or error) is already stored as a call: the runner asks again
        # only on purpose (--retry-failed discards an answer that did not validate), so
        # reading the same answer back from the old batch would retry nothing and count
        # its cost twice.
        recorded = set(await ctx.db(_recorded_lines, [ctx.run_id, *waited]))
        for position, row in enumerate(rows):  # oldest first
            self._order[row["id"]] = position
            for custom_id in row["custom_ids"]:
                if (row["id"], custom_id) not in recorded:
                    self._known.setdefault(custom_id, []).append(row["id"])
            self._submitted_at[row["id"]] = _epoch(row["created_at"])
        self._wake = asyncio.Event()
        self._tasks = [asyncio.create_task(self._flusher()), asyncio.create_task(self._poller())]

    async def _adopt_placeholders(self, rows: list[dict]) -> list[dict]:
        """Rows saved just before a batch was created, by a session that died before it
        stored the batch's id: find each batch by its input file, or forget the row."""
        by_input: dict[str, str] = {}
        async for batch in self.client.batches.list(limit=100):
            by_input.setdefault(batch.input_file_id, batch.id)
        kept = []
        for row in rows:
            if not row["id"].startswith("pending:"):
                kept.append(row)
                continue
            batch_id = by_input.get(row["input_file_id"])
            if batch_id is None:  # never created: its lines simply go out again
                await self._ctx.db(store_ann.delete_batch, row["id"])
                continue
            log.info("adopting batch %s, created by a session that stopped before storing it", batch_id)
            await self._ctx.db(store_ann.adopt_batch, row["id"], batch_id, "validating")
            kept.append({**row, "id": batch_id})
        return kept

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for pending in self._pool:  # never submitted: nothing paid, a resume asks again
            if not pending.future.done():
                pending.future.set_exception(TransientError("run stopped before the batch was sent"))
                pending.future.exception()
        self._pool.clear()
        await self.client.close()
        self.encoder.close()

    # -- requests

    def _body(self, request: VLMRequest, messages: list[dict]) -> dict:
        body: dict[str, Any] = {"model": self.model, "messages": messages,
                                self.max_tokens_param: request.max_tokens}
        if self.send_temperature:
            body["temperature"] = request.temperature
        response_format = response_format_for(request, self.response_mode)
        if response_format is not None:
            body["response_format"] = response_format
        return body

    def _custom_id(self, request: VLMRequest, mode: Optional[str] = None) -> str:
        return line_custom_id(request, model=self.model, params=self.cache_params,
                              mode=mode or self.response_mode)

    async def complete(self, request: VLMRequest) -> VLMResponse:
        if self._ctx is None:
            raise RuntimeError("the openai-batch backend needs start(ctx) before use")
        custom_id = self._custom_id(request)
        shared = self._waiters.get(custom_id)
        if shared is not None:
            return await asyncio.shield(shared)
        future = asyncio.get_running_loop().create_future()
        self._waiters[custom_id] = future
        try:
            result = await self._answer(request, custom_id, time.perf_counter())
            future.set_result(result)
            return result
        except BaseException as exc:
            future.set_exception(exc if isinstance(exc, Exception) else TransientError("cancelled"))
            future.exception()
            raise
        finally:
            self._waiters.pop(custom_id, None)

    async def _answer(self, request: VLMRequest, custom_id: str, asked_at: float) -> VLMResponse:
        # A batch stored by an earlier session may hold this request: wait for it first.
        # That session may have stepped the response format down (a new session starts
        # from the top again), so the request is looked for as sent in every mode.
        for batch_id, line_id, mode in self._stored_lines(request):
            watch = self._watch(batch_id)
            self._asked_at[line_id] = asked_at
            await watch.done.wait()
            if watch.refused is not None:
                raise watch.refused
            result = watch.results.get(line_id)
            if isinstance(result, VLMResponse):
                if RESPONSE_MODES.index(mode) > RESPONSE_MODES.index(self.response_mode):
                    log.info("an earlier session of this run stepped the response format down "
                             "to %s: keeping it", mode)
                    self.response_mode = mode
                return result
            if batch_id in self._known.get(line_id, []):  # not answered there: never wait on it again
                self._known[line_id].remove(batch_id)
            result = self._unanswered(watch, line_id, result)
            if result is not None and not isinstance(result, BatchLineError):
                raise result
        return await self._submit(request, self._custom_id(request), asked_at)

    def _stored_lines(self, request: VLMRequest) -> list[tuple[str, str, str]]:
        """(batch id, custom id, response mode) of the stored batches holding this
        request, newest first."""
        found = []
        for mode in RESPONSE_MODES:
            line_id = self._custom_id(request, mode)
            for batch_id in self._known.get(line_id, []):
                found.append((self._order.get(batch_id, 0), batch_id, line_id, mode))
        found.sort(reverse=True)
        return [(batch_id, line_id, mode) for _, batch_id, line_id, mode in found]

    async def _submit(self, request: VLMRequest, custom_id: str, asked_at: float) -> VLMResponse:
        messages = await build_messages(request, self.encoder, self.detail)
        line = json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
                           "body": self._body(request, messages)}, ensure_ascii=False).encode() + b"\n"
        if len(line) > self.max_batch_bytes:
            raise PermanentError(f"request of {len(line)} bytes does not fit a batch file "
                                 f"({self.max_batch_bytes} bytes); lower --image-size")
        future = asyncio.get_running_loop().create_future()
        self._line_mode[custom_id] = self.response_mode
        describe = getattr(self._ctx, "describe", None)
        meta = describe(request) if describe is not None else {}
        self._asked_at[custom_id] = asked_at
        self._pool.append(_Pending(custom_id, request.stage, line, future, meta))
        self._last_added = time.monotonic()
        if len(self._pool) >= self.max_batch_requests:
            self._wake.set()
        return await future

    # -- submitting

    async def _flusher(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=min(0.5, self.flush_interval / 2 or 0.05))
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            quiet = time.monotonic() - self._last_added >= self.flush_interval
            if self._pool and (quiet or len(self._pool) >= self.max_batch_requests):
                pool, self._pool = self._pool, []
                for chunk in self._chunks(pool):
                    try:
                        await self._send(chunk)
                    except asyncio.CancelledError:
                        raise
                    except Exception as exc:  # the flusher must live on; these lines fail
                        log.exception("sending a batch failed")
                        for pending in chunk:
                            if not pending.future.done():
                                pending.future.set_exception(TransientError(f"sending the batch failed: {exc}"))
                                pending.future.exception()

    def _chunks(self, pool: list[_Pending]) -> list[list[_Pending]]:
        chunks, current, size = [], [], 0
        for pending in pool:
            if current and (len(current) >= self.max_batch_requests
                            or size + len(pending.line) > self.max_batch_bytes):
                chunks.append(current)
                current, size = [], 0
            current.append(pending)
            size += len(pending.line)
        if current:
            chunks.append(current)
        return chunks

    async def _send(self, chunk: list[_Pending]) -> None:
        import openai

        data = b"".join(p.line for p in chunk)
        stages = ",".join(sorted({p.stage for p in chunk}))
        custom_ids = [p.custom_id for p in chunk]
        placeholder = None
        try:
            uploaded = await self._upload(data)
            # Saved before the batch exists: if we die between creating it and storing its
            # id, a restart finds it by this input file instead of paying for it again.
            placeholder = f"pending:{uploaded.id}"
            await self._ctx.db(store_ann.save_batch, placeholder, self._run_id, stages,
                               input_file_id=uploaded.id, status="submitting", custom_ids=custom_ids,
                               lines={p.custom_id: p.meta for p in chunk if p.meta})
            # No automatic retries here: a create that times out (or meets a 5xx or a
            # dropped connection) may have made the batch, and a retry makes another one,
            # paid again. Such a batch is looked up by its input file instead.
            batch = await self.client.with_options(max_retries=0).batches.create(
                input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h",
                metadata={"good4cir_run": str(self._run_id), "stages": stages})
        except (openai.OpenAIError, ValueError) as exc:
            error = map_openai_error(exc, self._secrets) or TransientError(scrub(str(exc), self._secrets))
            batch = None
            if placeholder is not None and not isinstance(error, PermanentError):
                batch = await self._find_created(uploaded.id, exc)
            if batch is None:
                if placeholder is not None:  # no batch was made: nothing to find later
                    await self._ctx.db(store_ann.delete_batch, placeholder)
                for pending in chunk:
                    if not pending.future.done():
                        pending.future.set_exception(error)
                        pending.future.exception()
                return
        await self._ctx.db(store_ann.adopt_batch, placeholder, batch.id, batch.status)
        log.info("submitted batch %s: %d requests (%s), %d bytes", batch.id, len(chunk), stages, len(data))
        watch = self._watch(batch.id)
        for pending in chunk:
            asyncio.create_task(self._deliver(watch, pending))

    async def _upload(self, data: bytes):
        """Upload a batch input file. It gets the request timeout plus its size at
        upload_bytes_per_s (--timeout is per request; a file of hundreds of MB takes
        longer). An upload that fails without an answer (timeout, dropped connection, 5xx)
        may have arrived anyway: it is looked up by its file name, unique to this upload,
        before it is sent again, so no second copy is made of a file the provider has.
        No copy is ever paid for: a batch is made only from the file id we hold."""
        import openai

        name = f"good4cir-batch-{uuid.uuid4().hex}.jsonl"
        client = self.client.with_options(max_retries=0,
                                          timeout=self.timeout + len(data) / self.upload_bytes_per_s)
        for attempt in range(UPLOAD_ATTEMPTS):
            try:
                return await client.files.create(file=(name, data), purpose="batch")
            except (openai.APITimeoutError, openai.APIConnectionError, openai.InternalServerError,
                    openai.RateLimitError) as exc:
                found = await self._find_uploaded(name, len(data))
                if found is not None:
                    log.warning("uploading %s failed (%s), but the provider has it: %s", name,
                                scrub(str(exc), self._secrets)[:200], found.id)
                    return found
                if attempt + 1 == UPLOAD_ATTEMPTS:
                    raise
                log.warning("uploading %s (%d bytes) failed: %s; sending it again", name, len(data),
                            scrub(str(exc), self._secrets)[:200])
                await asyncio.sleep(2.0 ** attempt)

    async def _find_uploaded(self, name: str, size: int):
        """The batch input file called `name` of `size` bytes, if the provider has it."""
        try:
            seen = 0
            async for entry in self.client.files.list(purpose="batch", order="desc", limit=100):
                if entry.filename == name and entry.bytes == size:
                    return entry
                seen += 1
                if seen >= UPLOAD_LOOKUP_FILES:  # newest first: an upload of just now is near the top
                    break
        except Exception as lookup_error:  # then it is uploaded again: a spare copy, never paid
            log.warning("could not look up the uploaded file %s: %s", name, lookup_error)
        return None

    async def _find_created(self, input_file_id: str, exc: BaseException):
        """The batch a create that failed without an answer (timeout, 5xx, lost
        connection) may still have made, found by its input file; None if there is none."""
        try:
            async for batch in self.client.batches.list(limit=100):
                if batch.input_file_id == input_file_id:
                    log.warning("creating a batch failed (%s), but the provider made it: %s",
                                scrub(str(exc), self._secrets)[:200], batch.id)
                    return batch
        except Exception as lookup_error:  # the lines go out again; a restart can still adopt
            log.warning("could not look up the batch of input file %s: %s", input_file_id, lookup_error)
        return None

    async def _deliver(self, watch: _Watch, pending: _Pending) -> None:
        await watch.done.wait()
        if pending.future.done():
            return
        if watch.refused is not None:
            pending.future.set_exception(watch.refused)
            pending.future.exception()
            return
        result = watch.results.pop(pending.custom_id, None)
        if result is None and watch.error_codes & QUEUE_FULL_CODES and await self._wait_for_room(watch):
            # Not an attempt: nothing ran. The line goes out again in the next batch.
            if not pending.future.done():
                self._pool.append(pending)
                self._last_added = time.monotonic()
            return
        result = self._unanswered(watch, pending.custom_id, result)
        if result is None:
            note = f": {watch.note}" if watch.note else ""
            result = BatchLineError(f"batch {watch.batch_id} ended '{watch.status}' without this line{note}",
                                    watch.batch_id, pending.custom_id)
        if isinstance(result, Exception):
            pending.future.set_exception(result)
            pending.future.exception()
        else:
            pending.future.set_result(result)

    @staticmethod
    def _unanswered(watch: _Watch, custom_id: str, result):
        """A line a batch cancelled outside good4cir did not answer fails for good (the
        user chose not to pay for it); any other result is returned as it is."""
        if not watch.cancelled_outside or not (result is None or isinstance(result, BatchLineError)):
            return result
        return BatchCancelledError(
            f"batch {watch.batch_id} was cancelled outside good4cir (the provider's dashboard or "
            "API) before it answered this request, so it was not sent again; rerun the same "
            "command with --retry-failed to send it", watch.batch_id, custom_id)

    async def _wait_for_room(self, failed: _Watch) -> bool:
        """After a batch refused for a full queue: wait until one of this session's open
        batches ends (making room). False when none is open (the queue is full of
        others' batches) or the run is stopping: the line then fails as an attempt."""
        others = [w for w in self._watches.values() if w is not failed and not w.done.is_set()]
        if not others or self._ctx.stopping:
            return False
        waits = [asyncio.ensure_future(w.done.wait()) for w in others]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()
        return not self._ctx.stopping

    # -- polling

    def _watch(self, batch_id: str) -> _Watch:
        watch = self._watches.get(batch_id)
        if watch is None:
            watch = self._watches[batch_id] = _Watch(batch_id)
            submitted = self._submitted_at.get(batch_id)
            if submitted is not None:
                watch.created -= max(0.0, time.time() - submitted)
        return watch

    async def _poller(self) -> None:
        failed_polls = 0
        while True:
            open_watches = [w for w in self._watches.values() if not w.done.is_set()]
            for watch in open_watches:
                try:
                    await self._poll(watch)
                    failed_polls = 0
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    mapped = map_openai_error(exc, self._secrets)
                    failed_polls = failed_polls + 1 if isinstance(mapped, ConnectionFailedError) else 0
                    if failed_polls >= UNREACHABLE_POLLS:
                        log.warning("polling batch %s failed: %s", watch.batch_id, exc)
                        refused = UnreachableError(f"{mapped} ({failed_polls} polls in a row)")
                        for other in open_watches:
                            other.refused = refused
                            other.done.set()
                        break
                    if isinstance(mapped, AccountError) and not isinstance(mapped, NotFoundError):
                        # Not this batch's fault: sending its lines again would pay twice
                        # once the account is put right.
                        log.warning("polling batch %s was refused: %s", watch.batch_id, mapped)
                        watch.refused = mapped
                        watch.done.set()
                    elif isinstance(mapped, PermanentError):
                        # e.g. 404: a stored batch this key cannot see; its lines go out again
                        log.warning("batch %s cannot be read (%s): resubmitting its lines",
                                    watch.batch_id, mapped)
                        watch.status = "unreadable"
                        watch.done.set()
                    else:  # a failed poll is retried at the next tick
                        log.warning("polling batch %s failed: %s", watch.batch_id, exc)
            await asyncio.sleep(self.poll_interval)

    async def _poll(self, watch: _Watch) -> None:
        batch = await self.client.batches.retrieve(watch.batch_id)
        if batch.status != watch.status:
            watch.status = batch.status
            await self._ctx.db(store_ann.update_batch, watch.batch_id, status=batch.status)
        if batch.status not in TERMINAL:
            if time.monotonic() - watch.created > self.batch_timeout and not watch.cancel_sent:
                # Past our deadline: cancel; the lines it finished still come back.
                log.warning("batch %s still %s after %.0f s: cancelling", watch.batch_id,
                            batch.status, self.batch_timeout)
                # Stored first: a session that dies before the batch ends leaves the next
                # one knowing this cancel was ours (its lines go out again), not the user's.
                await self._ctx.db(store_ann.update_batch, watch.batch_id, cancelled_by="good4cir")
                try:
                    await self.client.batches.cancel(watch.batch_id)
                except Exception as exc:  # openai's errors, or a body that is not JSON
                    # Refused (e.g. a batch already finalizing): it is still readable and
                    # will end by itself; sending its lines again would pay twice. A
                    # transient failure is tried again at the next poll.
                    mapped = map_openai_error(exc, self._secrets)
                    log.warning("cancelling batch %s failed (%s): waiting for it to end",
                                watch.batch_id, mapped or exc)
                    if isinstance(mapped, TransientError):
                        return
                watch.cancel_sent = True
            return
        results: dict[str, Any] = {}
        if batch.output_file_id:
            for row in await self._lines(batch.output_file_id):
                results[row["custom_id"]] = self._line_result(watch.batch_id, row)
        if batch.error_file_id:
            for row in await self._lines(batch.error_file_id):
                results.setdefault(row["custom_id"], self._line_result(watch.batch_id, row))
        if batch.status == "failed" and not results:
            errors = list(getattr(getattr(batch, "errors", None), "data", None) or [])
            watch.error_codes = {e.code for e in errors if getattr(e, "code", None)}
            watch.note = "; ".join(f"{getattr(e, 'code', None)}: {getattr(e, 'message', '')}"
                                   for e in errors)[:300]
            log.warning("batch %s failed: %s", watch.batch_id, watch.note or "no reason given")
        watch.results = results
        extra = {}
        if batch.status == "cancelled" and await self._ctx.db(store_ann.batch_cancelled_by,
                                                               watch.batch_id) != "good4cir":
            watch.cancelled_outside = True
            extra["cancelled_by"] = "outside"
            answered = sum(isinstance(r, VLMResponse) for r in results.values())
            log.warning("batch %s was cancelled outside good4cir: keeping its %d answers; its "
                        "unfinished requests are not sent again (rerun with --retry-failed to send "
                        "them)", watch.batch_id, answered)
        # Every answer is stored once, here, with the batch marked collected: a line this
        # session asks for as this run's call (the runner then writes nothing), the others
        # (the batch's run may hold pairs outside this run's scope) as the batch's run's,
        # which any run that asks the same reuses instead of paying again.
        cost = getattr(self._ctx, "cost", None)
        now = time.perf_counter()
        answers = {}
        for custom_id, r in results.items():
            if not isinstance(r, VLMResponse):
                continue
            asked_at = self._asked_at.pop(custom_id, None)
            if asked_at is not None:
                r.latency_ms = (now - asked_at) * 1000
            answers[custom_id] = {
                "response": r.text, "model": r.model or self.model, "tokens_in": r.tokens_in,
                "tokens_out": r.tokens_out, "latency_ms": r.latency_ms,
                # kept as the runner keeps a chat answer's (FINISH_REASONS_STORED)
                "error": (f"finish_reason: {r.finish_reason}"
                          if r.finish_reason in ("length", "content_filter") else None),
                "cost_usd": cost(r.tokens_in, r.tokens_out) if cost else 0.0,
                "run_id": self._run_id if asked_at is not None else None}
        stored = await self._ctx.db(store_ann.collect_batch, watch.batch_id, answers, status=batch.status,
                                    output_file_id=batch.output_file_id, error_file_id=batch.error_file_id,
                                    **extra)
        for custom_id, call_id in stored.items():
            results[custom_id].call_id = call_id
        watch.done.set()

    async def _lines(self, file_id: str) -> list[dict]:
        content = await self.client.files.content(file_id)
        rows = []
        for raw in content.text.splitlines():
            raw = raw.strip()
            if not raw:
                continue
            try:
                rows.append(json.loads(raw))
            except ValueError:
                log.warning("skipping a line of file %s that is not JSON", file_id)
        return rows

    def _line_result(self, batch_id: str, row: dict):
        custom_id = row.get("custom_id", "")
        response = row.get("response") or {}
        error = row.get("error")
        status = response.get("status_code")
        if status == 200 and not error:
            body = response.get("body") or {}
            try:
                choice = body["choices"][0]
                usage = body.get("usage") or {}
                message = choice["message"]
                return BatchVLMResponse(
                    text=answer_text(message.get("content"), message_reasoning(message)),
                    tokens_in=usage.get("prompt_tokens", 0) or 0,
                    tokens_out=usage.get("completion_tokens", 0) or 0,
                    finish_reason=choice.get("finish_reason"), model=body.get("model"),
                    batch_id=batch_id, custom_id=custom_id)
            except (KeyError, IndexError, TypeError):
                return BatchLineError(f"malformed response line in batch {batch_id}", batch_id, custom_id)
        if error:
            message = f"batch {batch_id}: {error.get('code')}: {error.get('message')}"
            return BatchLineError(message[:500], batch_id, custom_id)
        body_error = ((response.get("body") or {}).get("error") or {}).get("message", "")
        message = f"batch {batch_id}: status {status}: {body_error}"[:500]
        if status == 429 or (status or 500) >= 500:
            return BatchLineError(message, batch_id, custom_id)
        refused = status in (400, 422)  # 422: servers that refuse a field as unprocessable
        if refused and self._adapt_parameters(body_error):
            return BatchLineError(f"{message} (adapted; resubmitting)", batch_id, custom_id)
        if refused and self._step_down_format(custom_id, body_error):
            return BatchLineError(f"{message} (response format now {self.response_mode}; resubmitting)",
                                  batch_id, custom_id)
        advice = token_limit_advice(body_error, None)
        return BatchRejectedError(f"{message}; {advice}" if advice else message, batch_id, custom_id)

    def _step_down_format(self, custom_id: str, message: str) -> bool:
        """A line refused for its response format: later requests use the next mode down.
        Many lines of one batch fail together, so the step is taken from the mode the
        line was sent with, not once per refused line."""
        lowered = message.lower()
        if not any(word in lowered for word in ("response_format", "json_schema", "json_object")):
            return False
        sent = self._line_mode.get(custom_id, self.response_mode)
        position = RESPONSE_MODES.index(sent)
        if position + 1 >= len(RESPONSE_MODES):
            return False
        if RESPONSE_MODES.index(self.response_mode) <= position:
            log.warning("the server refused response format %s; stepping down to %s",
                        sent, RESPONSE_MODES[position + 1])
            self.response_mode = RESPONSE_MODES[position + 1]
        return True

    def _adapt_parameters(self, message: str) -> bool:
        """As the `openai` backend: newer models want max_completion_tokens and no
        temperature. True when a line refused for that should simply go out again."""
        lowered = message.lower()
        if "max_completion_tokens" in lowered:
            if self.max_tokens_param == "max_tokens":
                self.max_tokens_param = "max_completion_tokens"
            return True
        if "temperature" in lowered:
            self.send_temperature = False
            return True
        return False
