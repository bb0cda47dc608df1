"""Pipeline runs: create or resume a run, schedule the stages, store every call.

Python API (the CLI and the review app call these):

    from pipeline.runner import RunOptions, run_pipeline, start_run_in_thread, plan_run

    options = RunOptions(backend="simulator", concurrency=8, limit=100)
    summary = run_pipeline("data.db", options)            # blocks; returns a Progress

    handle = start_run_in_thread("data.db", options, on_progress=callback)
    handle.wait_started(timeout=10)   # the run row exists (handle.run_id), or the run
                                      # could not start (handle.error says why)
    handle.progress                   # Progress snapshot (see below), any time
    handle.running                    # False once the thread has ended
    handle.stop()                     # no new pairs; in-flight calls finish and are stored
    handle.join(timeout=None)         # -> final Progress, or None if still running
    handle.error                      # the exception that ended the run, if any

    callback(progress) is called from the run's thread after each pair and at the end.
    Progress fields: run_id, status ('running'/'stopped'/'finished'/'failed'),
    pairs_total, pairs_done, pairs_failed, pairs_pending, calls (calls stored for the
    run, all sessions), calls_reused (answers taken from the store this session),
    call_errors, cost_usd, failures ({reason: count}), last_error.

    plan_run(db_path, options) -> Plan: pairs, calls per stage, estimated cost
    (for --dry-run; writes nothing; RunBusyError where the run would be refused).

Identity and resume: a run is identified by what changes its answers (backend, model,
base URL, method, prompt versions, image and sampling parameters, split). Running the
same options again resumes the latest matching run: done pairs are skipped, stored
descriptions are reused, and every request whose answer is already stored (by request
hash, any run) is answered from the store instead of the backend. Calls are stored
(store.annotations.record_call) before their answer is acted on: all writes go through
one store thread in order (pipeline.store_worker), so a call's row is committed before
anything made from it, and the event loop never waits on sqlite. `--retry-failed`
(retry_failed=True) puts a resumed run's failed pairs back to pending; for pairs that
failed on an invalid answer, the run's stored answers about that pair (and its
reference image) are not reused, so the model is asked again.

One session per run: a session takes the run's lease (store.leases) before any work is
handed out and renews it every few seconds; a second session on the same run (another
terminal, or the app's Pipeline tab) fails at once with RunBusyError, making no call.
A killed session's lease is taken over as soon as its process is gone (same host), or
once its heartbeat is stale; `run_status` reports such a run as 'interrupted'. Another
run that asks the same requests (same model, prompts and settings) over pairs a live
session of it has pending is refused at start too, naming that run: each run has its own
lease, so both would pay for the answers in flight (_runs_asking_the_same).

Stage 1 runs once per reference image: its description id is a hash of (image id,
prompt version, model, parameters), shared by every pair and every run with that key,
and concurrent pairs with one reference wait on a single call.

Failures: a transient error (429, 5xx, timeout, malformed body) is retried with
exponential backoff and full jitter, or after Retry-After when the server sends one, up
to `max_attempts` per request and `retry_budget` retries per run (its earlier sessions'
retries count; pass a larger budget to resume a run that spent its own). An answer that
does not validate gets one repair request quoting the validation error. After that the
pair is marked failed with '<category>: <detail>' and the run goes on. An answer that
validates but has a problem pipeline.stages finds (a caption over 77 CLIP tokens, a
stage 2 object that is a stage 1 object under another name) gets
one repair request too; what is still wrong after it is stored flagged by 'pipeline'. Categories:
bad image, no target, request rejected, content filtered, batch cancelled (its request was in a batch
cancelled outside good4cir, and is sent again only by --retry-failed), retries exhausted,
retry budget spent, invalid answer, stage 4 error, internal error. A refused key (401) is no item's fault: the run
stops at once with RunAuthError, its pairs left pending for a rerun with a good key; so
does an account out of credits (429 insufficient_quota: RunQuotaError), which waiting
and retrying would not mend, and a model or endpoint that does not exist (404: a mistyped
--model, a --base-url without /v1: RunNotFoundError), and a model that refuses images
(a text-only model, or a server taking fewer images per request than --method single
sends: RunImagesUnsupportedError). So does a model whose answers do not validate at all
(prose, JSON of another shape): once INVALID_ANSWERS_TO_STOP requests' answers failed,
each after its repair, before any answer of the session validated
(RunInvalidAnswersError); after one valid answer the session never stops for this.

Scheduling: `concurrency` request slots, served later stages first (pipeline.slots), and
twice as many pair workers, so pairs waiting on a shared stage 1 never leave a slot idle.
Stop (handle.stop(), or a first Ctrl-C in run_pipeline): no new calls; calls in flight
get `stop_grace` seconds to finish and be stored; unfinished pairs stay pending.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import random
import signal
import sys
import threading
import time
import uuid
import weakref
from collections import Counter, deque
from dataclasses import asdict, dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import Any, Callable, Optional

from store import annotations as store_ann
from store import leases
from store.db import open_db, transaction, utc_now
from store.errors import LeaseHeldError
from store.models import CallRecord
from store.redaction import redact_url

from .backends import create_backend
from .backends.base import (AccountError, ConnectionFailedError, ImageLimitError, ImagesUnsupportedError,
                            ServerUnavailableError,
                            NotFoundError, PermanentError, QuotaExceededError, TransientError,
                            UnreachableError, VLMRequest)
from .images import BadImageError
from .pricing import PriceTable
from .prompts import prompt_versions
from .slots import STAGE_PRIORITY, PrioritySlots
from .store_worker import CallRef, StoreWorker, StoreWriteError
from .stages import (
    InvalidAnswerError,
    describe_problems,
    overlong_captions,
    parse_answer,
    renamed_objects,
    repair_request,
    single_request,
    stage1_request,
    stage2_request,
    stage3_request,
)

log = logging.getLogger("good4cir.pipeline")

DEFAULT_MODELS = {"openai": "gpt-4o-mini", "openai-batch": "gpt-4o-mini", "simulator": "simulator-v1"}
METHODS = ("staged", "single")
# A model that answers prose (or JSON of another shape) pays a request and a repair for
# every pair, all failing. So a session stops once the answers to this many requests
# (distinct: a stage 1 answer failing every pair of its reference image is one) failed
# validation, each after its repair, before any answer of the session validated. Six,
# because pairs finish out of order: with --concurrency C up to 2C pairs are in flight, and
# a usable model's first valid answer (which disarms the check for good) comes with the
# first calls, long before six pairs have failed twice over; a prose model costs about
# 2 x 6 calls plus the C in flight instead of 2 per pair.
INVALID_ANSWERS_TO_STOP = 6


@dataclass
class RunOptions:
    """Everything a run needs. Secrets are never here: the key comes from api_key_env."""

    backend: str = "openai"
    model: Optional[str] = None              # default per backend (DEFAULT_MODELS)
    base_url: Optional[str] = None
    method: str = "staged"                   # 'staged' (stages 1-4) or 'single' (ablation)
    concurrency: Optional[int] = None        # requests in flight; default 16 (batch: pairs
                                             # in flight, default 5000)
    limit: Optional[int] = None
    split: Optional[str] = None
    run_id: Optional[int] = None             # resume this run instead of matching by options
    new_run: bool = False                    # start a fresh run even if one matches
    retry_failed: bool = False               # put failed pairs of a resumed run back to pending
    name: Optional[str] = None
    api_key_env: str = "OPENAI_API_KEY"
    timeout: float = 120.0
    image_max_side: int = 512
    detail: str = "low"
    response_mode: str = "json_schema"
    temperature: float = 0.2
    max_tokens: int = 1500
    max_attempts: int = 6                    # per request, transient errors
    retry_budget: Optional[int] = None       # retries per run (all sessions); default 100 + 2 per pair
    backoff_base: float = 1.0
    backoff_max: float = 60.0
    prices_path: Optional[str] = None
    seed: int = 0
    error_rate: float = 0.15                 # simulator only
    stop_grace: float = 30.0                 # seconds in-flight calls get after stop()
    # openai-batch only
    poll_interval: float = 30.0
    batch_timeout: float = 26 * 3600.0
    flush_interval: float = 5.0
    max_batch_requests: int = 50_000
    max_batch_bytes: int = 190 * 1024 * 1024
    # The slowest upload speed allowed for: a batch file's upload may take `timeout` plus
    # its size at this speed (190 MB: about 12 minutes) before it counts as timed out.
    upload_bytes_per_s: float = 256 * 1024

    def resolved_concurrency(self) -> int:
        if self.concurrency is not None:
            return self.concurrency
        return 5000 if self.backend == "openai-batch" else 16

    def resolved_model(self) -> str:
        if self.backend not in DEFAULT_MODELS:
            raise ValueError(f"unknown backend {self.backend!r}; use one of {', '.join(DEFAULT_MODELS)}")
        return self.model or DEFAULT_MODELS[self.backend]


@dataclass
class Progress:
    run_id: Optional[int] = None
    status: str = "created"
    pairs_total: int = 0
    pairs_done: int = 0
    pairs_failed: int = 0
    pairs_pending: int = 0
    calls: int = 0
    calls_reused: int = 0
    call_errors: int = 0
    cost_usd: float = 0.0
    failures: dict[str, int] = field(default_factory=dict)
    last_error: Optional[str] = None

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Plan:
    run_id: Optional[int]
    pairs: int
    calls_by_stage: dict[str, int]
    estimated_cost_usd: float
    unknown_price: bool
    pairs_without_target: int = 0  # selected by split but left out: no target to compare
    # {batch id: requests of this run it holds}: open batches the run would wait for,
    # whose requests are not counted above (their answers are collected from there)
    awaited_in_batches: dict[str, int] = field(default_factory=dict)


    @property
    def calls(self) -> int:
        return sum(self.calls_by_stage.values())


class ItemFailedError(Exception):
    """One pair cannot be annotated; `reason` is '<category>: <detail>'."""

    def __init__(self, category: str, detail: str, *, source: Optional[tuple[str, str]] = None,
                 answer: Optional[str] = None, problem: Optional[str] = None):
        super().__init__(f"{category}: {detail}")
        self.reason = f"{category}: {detail}"[:1000]
        # An invalid answer's request (stage, subject id), what the model answered first,
        # and what was wrong with it: RunInvalidAnswersError quotes them.
        self.source, self.answer, self.problem = source, answer, problem


class RunStoppedError(Exception):
    """The run was asked to stop before this pair finished (it stays pending)."""


class RunBusyError(ValueError):
    """Another live session is working on the run; this one made no call and changed nothing."""


class RunAuthError(ValueError):
    """The backend refused the credentials; the run stopped with its pairs pending."""


class RunNotFoundError(RunAuthError):
    """The backend has no such model or endpoint (404); the run stopped with its pairs pending."""


class RunUnreachableError(RunAuthError):
    """No request of the session reached the server (refused, unknown host): the run
    stopped with its pairs pending."""


class RunImagesUnsupportedError(RunAuthError):
    """The model refuses image input (a text-only model); the run stopped with its pairs
    pending."""


class RunQuotaError(RunAuthError):
    """The account has no credits left (429 insufficient_quota); the run stopped with its
    pairs pending."""


class RunInvalidAnswersError(RunAuthError):
    """The model's answers do not validate (prose, or JSON of another shape): the answers
    to INVALID_ANSWERS_TO_STOP requests failed, each after its repair, before any answer
    of the session validated; the run stopped with its other pairs pending."""


@dataclass
class _CallResult:
    text: str
    finish_reason: Optional[str]
    call: CallRef
    reused: bool = False  # read from the store, not answered in this session


def _hash(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


# ---------------------------------------------------------------- run identity


def _backend_options(options: RunOptions, db_path: str) -> dict:
    model = options.resolved_model()
    if options.backend == "simulator":
        return {"db_path": db_path, "error_rate": options.error_rate, "seed": options.seed}
    common = {"model": model, "base_url": options.base_url, "api_key_env": options.api_key_env,
              "timeout": options.timeout, "image_max_side": options.image_max_side,
              "detail": options.detail, "response_mode": options.response_mode}
    if options.backend == "openai-batch":
        common.update(poll_interval=options.poll_interval, batch_timeout=options.batch_timeout,
                      flush_interval=options.flush_interval,
                      max_batch_requests=options.max_batch_requests,
                      max_batch_bytes=options.max_batch_bytes,
                      upload_bytes_per_s=options.upload_bytes_per_s)
    return common


KEYED_MAX_TOKENS = 1500


def answer_params(options: RunOptions) -> dict:
    """What changes a model's answer besides the prompt: part of every cache key."""
    # max_tokens only decides whether an answer is cut off, and a cut-off answer fails and
    # is asked again under --retry-failed. Keyed by its value, raising --max-tokens (the
    # advice on a token-limit refusal) started a new run that paid again for every pair
    # done. Every key holds 1500, the value all keys held before the option existed, so
    # runs and answers stored since still match.
    params = {"model": options.resolved_model(), "temperature": options.temperature,
              "max_tokens": KEYED_MAX_TOKENS}
    if options.backend == "simulator":
        params.update(backend="simulator", error_rate=options.error_rate, seed=options.seed)
    else:
        # openai and openai-batch share answers: same model, same request.
        params.update(base_url=redact_url(options.base_url), detail=options.detail,
                      image_max_side=options.image_max_side)
    return params


def run_fingerprint(options: RunOptions) -> str:
    return _hash({"backend": options.backend, "method": options.method,
                  "prompts": prompt_versions(), "params": answer_params(options),
                  "split": options.split})[:16]


def _settings(options: RunOptions) -> dict:
    settings = asdict(options)
    settings.pop("run_id", None)
    settings["model"] = options.resolved_model()
    settings["base_url"] = redact_url(options.base_url)
    settings["fingerprint"] = run_fingerprint(options)
    return settings


def _find_run(db, options: RunOptions):
    if options.run_id is not None:
        run = store_ann.get_run(db, options.run_id)
        if run.settings.get("fingerprint") != run_fingerprint(options):
            raise ValueError(
                f"run {run.id} was made with other settings (backend {run.backend}, model "
                f"{run.model}, method {run.method}, or other prompts or parameters); give the "
                "same options to resume it, or leave out --run to start or resume a matching run")
        return run
    if options.new_run:
        return None
    fingerprint = run_fingerprint(options)
    matches = [r for r in store_ann.list_runs(db) if r.settings.get("fingerprint") == fingerprint]
    return matches[-1] if matches else None


def _asks_the_same(run, options: RunOptions, prompts: dict) -> bool:
    """Whether `run` makes the very requests these options make (same answer parameters,
    method and prompts): its stored answers and open batches answer this run too."""
    names = {f.name for f in fields(RunOptions)}
    try:
        theirs = RunOptions(**{k: v for k, v in run.settings.items() if k in names})
        return (run.method == options.method and run.prompt_versions == prompts
                and answer_params(theirs) == answer_params(options))
    except (TypeError, ValueError):  # settings of another version: not comparable
        return False


def _settled_pairs(db, run_id: int, retry_failed: bool) -> set[str]:
    """Pairs of the run a session will not annotate again (failed ones only without
    --retry-failed)."""
    statuses = ("done",) if retry_failed else ("done", "failed")
    return {row[0] for row in db.execute(
        f"SELECT pair_id FROM annotations WHERE run_id = ? AND status IN "
        f"({','.join('?' * len(statuses))})", [run_id, *statuses])}


def _runs_asking_the_same(db, run, options: RunOptions, pair_ids: list[str], prompts: dict) -> list[int]:
    """Other runs with requests in flight that this run is about to make (request hashes
    are shared by runs with the same answer parameters): a run with batches still open
    at the provider, or a live session (chat or batch: each run has its own lease, so
    the lease does not keep two runs from asking the same), whose pending pairs (or,
    staged, their reference images: stage 1 is per image) are among this run's.

    Returns those this run waits for: runs no live session holds, whose open batches the
    openai-batch backend adopts (it waits for them and takes their answers). Raises
    RunBusyError, naming the run and its batches, where waiting cannot be done: the other
    run is live (both sessions would send what neither has yet), or this backend is not
    openai-batch (it cannot wait for a batch).
    """
    own = run.id if run is not None else None
    open_batches: dict[int, list[str]] = {}
    for run_id, batch_id in db.execute("SELECT run_id, id FROM batches WHERE collected = 0 ORDER BY created_at"):
        if run_id != own:
            open_batches.setdefault(run_id, []).append(batch_id)
    live = leases.live_leases(db)
    # Simulator answers cost nothing (and are asked only by simulator runs).
    others = [r for r in store_ann.list_runs(db) if r.id != own and (
        r.id in open_batches or (r.id in live and r.backend != "simulator"))]
    others = [r for r in others if _asks_the_same(r, options, prompts)]
    if not others:
        return []
    mine = set(pair_ids)
    if run is not None:
        mine -= _settled_pairs(db, run.id, options.retry_failed)
    staged = options.method == "staged"
    reference_of = dict(_rows_in(db, "SELECT id, reference_id FROM pairs WHERE id IN ({})", sorted(mine)))
    waited = []
    for other in others:
        theirs = dict(db.execute(
            "SELECT a.pair_id, p.reference_id FROM annotations a JOIN pairs p ON p.id = a.pair_id"
            " WHERE a.run_id = ? AND a.status = 'pending'", [other.id]).fetchall())
        # Counted among the pairs this session would send (its --limit, not the other
        # run's scope): the same pair, or (staged) one whose reference image's stage 1
        # the other run asks for one of its own pairs.
        their_references = set(theirs.values()) if staged else set()
        same = mine & theirs.keys()
        by_reference = sum(reference_of.get(pair) in their_references for pair in mine - same)
        shared = len(same) + by_reference
        if not shared:
            continue
        what = f"{shared} of the {len(mine)} pairs this run would annotate" + (
            f" ({by_reference} of them only through {'its' if by_reference == 1 else 'their'} "
            "reference image, described once for every pair)" if by_reference else "")
        batches = open_batches.get(other.id, [])
        held = (f"batch{'es' if len(batches) > 1 else ''} {', '.join(batches[:3])}"
                f"{f' and {len(batches) - 3} more' if len(batches) > 3 else ''}")
        if other.id in live:
            raise RunBusyError(
                f"run {other.id} is annotating {what} with the same model, prompts and settings "
                f"({leases.describe_lease(live[other.id])})"
                f"{f' and has {held} open at the provider' if batches else ''}: this run would send "
                f"the same requests again and pay twice. Wait for run {other.id} to finish (its "
                "answers are then reused here), or stop it and run this again"
                + (" (this run then waits for its open batches instead of paying again)" if batches
                   else " (the answers it has stored are reused here)"))
        if options.backend != "openai-batch":
            raise RunBusyError(
                f"run {other.id} has {held} open at the provider, holding requests for {what} "
                f"(same model, prompts and settings); the {options.backend} backend "
                f"cannot wait for a batch and would pay for them again. Resume run {other.id} to "
                f"collect them (good4cir annotate --run {other.id} with its options, --backend "
                "openai-batch), then run this again to reuse its answers; or run this with "
                "--backend openai-batch, which waits for those batches")
        log.info("run %s has %s open with requests of this run: waiting for them instead of "
                 "sending them again", other.id, held)
        waited.append(other.id)
    return waited


def stage1_key(image_id: str, params: dict, prompts: dict) -> str:
    return "s1:" + _hash({"image": image_id, "prompt": prompts["stage1"], "params": params})[:40]


def stage2_key(pair_id: str, stage1_id: str, params: dict, prompts: dict) -> str:
    return "s2:" + _hash({"pair": pair_id, "stage1": stage1_id, "prompt": prompts["stage2"],
                          "params": params})[:40]


def request_hash(request: VLMRequest, params: dict) -> str:
    """Identical requests (same text, images, history, parameters) share one answer."""
    return _hash({"params": params, "stage": request.stage, "system": request.system,
                  "text": request.text, "images": request.image_ids, "history": request.history,
                  "schema": request.schema_name, "prompt": request.prompt_version})


def _request_json(request: VLMRequest, params: dict) -> str:
    # Images as ids, never bytes or paths; the JSON schema is implied by schema_name.
    return json.dumps({"params": params, "stage": request.stage, "system": request.system,
                       "text": request.text, "image_ids": request.image_ids,
                       "history": request.history, "schema_name": request.schema_name},
                      ensure_ascii=False)


# ---------------------------------------------------------------- planning


def _check_numbers(options: RunOptions) -> None:
    # SQLite reads a negative LIMIT as none at all: a typo must not lift the cap on spend.
    if options.limit is not None and options.limit < 1:
        raise ValueError(f"limit must be at least 1, not {options.limit}")
    # Each of these was taken as given: --timeout 0 timed out every request, and
    # --max-attempts 0 or a negative --retry-budget quietly meant something else.
    for name, value, low, strict in (("timeout", options.timeout, 0, True),
                                     ("max attempts", options.max_attempts, 1, False),
                                     ("max tokens", options.max_tokens, 1, False),
                                     ("retry budget", options.retry_budget, 0, False),
                                     ("poll interval", options.poll_interval, 0, True),
                                     ("flush interval", options.flush_interval, 0, False)):
        if value is not None and (value <= low if strict else value < low):
            raise ValueError(f"{name} must be {'more than' if strict else 'at least'} {low:g}, not {value:g}")


def _check_simulator_pairs(db, options: RunOptions, pair_ids: list[str]) -> None:
    """The simulator answers from the demo world's ground truth: refuse, before a run row
    exists, a selection in which no pair has any (a user's own images), rather than fail
    every pair one by one."""
    if options.backend != "simulator" or not pair_ids:
        return
    sample = pair_ids[:500]  # a mixed store's demo-world pairs are found among the first
    rows = _rows_in(db, "SELECT external_id FROM pairs WHERE id IN ({}) AND ground_truth IS NULL", sample)
    if len(rows) < len(sample):
        return
    raise ValueError(
        f"the simulator backend needs demo-world ground truth, and none of the {len(pair_ids)} "
        f"pairs to annotate has any (pair {rows[0][0]!r} is one): it is an offline stand-in "
        "for the demo world only. For your own images use --backend openai (with "
        "OPENAI_API_KEY, or --base-url for a local OpenAI-compatible server)")


def _select_pairs(db, options: RunOptions, run) -> tuple[list[str], int]:
    """The pairs a run annotates, and how many of its split it leaves out for want of a
    target image (CIRR's test1 and CIRCO's test withhold it): with no target there is no
    change to describe, and asking would pay for the reference's stage 1, then fail the
    pair with advice to retry that could never help."""
    pair_ids = store_ann.select_pair_ids(db, split=options.split, limit=options.limit, with_target=True)
    where = " AND split = ?" if options.split else ""
    withheld = db.execute(f"SELECT COUNT(*) FROM pairs WHERE target_id IS NULL{where}",
                          [options.split] if options.split else []).fetchone()[0]
    if not pair_ids and run is None:
        store_ann.require_split(db, options.split)
        if withheld:
            of = f" of split {options.split!r}" if options.split else ""
            raise ValueError(f"the {withheld} pairs{of} have no target image (their split withholds it, "
                             "as CIRR's test1 does): there is no change to describe, so nothing to "
                             "annotate; export their imported captions with --include-unreviewed")
    return pair_ids, withheld


def withheld_note(withheld: int) -> str:
    """What a run or a dry run says about the pairs it leaves out for want of a target."""
    return (f"{withheld} pair{'' if withheld == 1 else 's'} without a target image left out (its "
            "split withholds it, as CIRR's test1 does): there is no change to describe")


def _say_withheld(withheld: int) -> None:
    if withheld:
        log.warning("%s", withheld_note(withheld))


def plan_run(db_path: str | Path, options: RunOptions) -> Plan:
    """How many calls a run of these options would make now, and roughly what they cost:
    requests answered in the store or in the open batches the run would wait for are not
    counted. Raises RunBusyError where the run itself would be refused at start."""
    _check_numbers(options)
    if options.backend in ("openai", "openai-batch"):
        # The run refuses these before any call; a dry run that passed them misled.
        from .backends.openai_backend import check_api_key_env, check_base_url

        check_base_url(options.base_url)
        check_api_key_env(options.api_key_env)
    db = open_db(db_path)
    try:
        params = answer_params(options)
        prompts = prompt_versions()
        run = _find_run(db, options)
        pair_ids, withheld = _select_pairs(db, options, run)
        if not pair_ids and run is None:
            store_ann.require_split(db, options.split)
        _check_simulator_pairs(db, options, pair_ids)
        done = _settled_pairs(db, run.id, options.retry_failed) if run is not None else set()
        todo = [p for p in pair_ids if p not in done]
        # As the run would: refused (RunBusyError, the same message) where it cannot wait
        # for another run's requests in flight; else it waits for the open batches of the
        # runs it names (and a resumed batch run for its own) and pays nothing for what
        # they hold.
        waited = _runs_asking_the_same(db, run, options, pair_ids, prompts)
        own = [run.id] if run is not None and options.backend == "openai-batch" else []
        in_batches = store_ann.open_batch_lines(db, [*own, *waited])  # {request hash: batch id}
        # A batch stored before m006 kept only its lines' custom ids: a request is found
        # there by the custom id the batch backend gives it, as the run finds it.
        unlisted = store_ann.unlisted_batch_lines(db, [*own, *waited])
        if unlisted:
            from .backends.openai_batch import line_custom_ids
        awaited: Counter[str] = Counter()
        calls: dict[str, int] = {}
        if todo:
            # Answers already stored (any run) are read back, not paid: a --new-run, or
            # another split over the same pairs, asks only what was never answered.
            stale = Runner._stale_answers(db, run.id) if run is not None and options.retry_failed else set()

            def request_key(request: VLMRequest) -> str:
                key = request_hash(request, params)
                if unlisted:
                    for custom_id in line_custom_ids(request, model=options.resolved_model(),
                                                     detail=options.detail,
                                                     image_max_side=options.image_max_side):
                        if custom_id in unlisted:
                            in_batches.setdefault(key, unlisted[custom_id])
                return key

            def unpaid(hashes: set[str]) -> set[str]:
                stored = _stored_ok(db, hashes) - stale
                awaited.update(in_batches[key] for key in hashes - stored if key in in_batches)
                return stored | (hashes & in_batches.keys())

            images_of = {pair: (ref, tgt) for pair, ref, tgt in _rows_in(
                db, "SELECT id, reference_id, target_id FROM pairs WHERE id IN ({})", todo)}
            if options.method == "single":
                hashes = {p: request_key(single_request(
                    p, (ref, ""), (tgt, ""), temperature=options.temperature,
                    max_tokens=options.max_tokens)) for p, (ref, tgt) in images_of.items()}
                answered = unpaid(set(hashes.values()))
                calls["single"] = len(todo) - sum(h in answered for h in hashes.values())
            else:
                reference_of = {pair: ref for pair, (ref, _) in images_of.items()}
                keys = {stage1_key(r, params, prompts): r for r in reference_of.values()}
                # A session stopped or killed mid-run left stage 2 descriptions of pairs
                # still pending: the rerun reads them back instead of asking again.
                keys2 = [stage2_key(p, stage1_key(reference_of[p], params, prompts), params, prompts)
                         for p in todo if p in reference_of]
                cached = {row[0] for row in _rows_in(db, "SELECT id FROM descriptions WHERE id IN ({})",
                                                     list(keys) + keys2)}
                stage1 = {key: request_key(stage1_request(
                    image_id, "", temperature=options.temperature, max_tokens=options.max_tokens))
                    for key, image_id in keys.items() if key not in cached}
                objects: dict[str, list[dict]] = {}
                stage2, stage3 = {}, {}
                for p in todo:
                    if p not in reference_of:
                        continue
                    key1 = stage1_key(reference_of[p], params, prompts)
                    key2 = stage2_key(p, key1, params, prompts)
                    if key1 not in cached:
                        continue
                    objects1 = objects.setdefault(key1, _stored_objects(db, key1))
                    target_id = images_of[p][1]
                    if key2 in cached:
                        stage3[p] = request_key(stage3_request(
                            p, objects1, _stored_objects(db, key2),
                            temperature=options.temperature, max_tokens=options.max_tokens))
                    elif target_id:
                        stage2[p] = request_key(stage2_request(
                            p, target_id, "", objects1, temperature=options.temperature,
                            max_tokens=options.max_tokens))
                answered = unpaid({*stage1.values(), *stage2.values(), *stage3.values()})
                calls = {"stage1": sum(h not in answered for h in stage1.values()),
                         "stage2": len(todo) - len(cached & set(keys2))
                         - sum(h in answered for h in stage2.values()),
                         "stage3": len(todo) - sum(h in answered for h in stage3.values())}
        prices = PriceTable.load(options.prices_path)
        model = options.resolved_model()
        estimate = prices.estimate(model, calls, detail=options.detail,
                                   batch=options.backend == "openai-batch",
                                   image_max_side=options.image_max_side)
        return Plan(run_id=run.id if run else None, pairs=len(todo), calls_by_stage=calls,
                    estimated_cost_usd=estimate, unknown_price=bool(prices.unknown),
                    pairs_without_target=withheld, awaited_in_batches=dict(awaited))
    finally:
        db.conn.close()


def _stored_objects(db, key: str) -> list[dict]:
    return [o.model_dump() for o in store_ann.get_description(db, key).objects]


SQL_CHUNK = 500  # values per `IN (...)`: far below any SQLite build's variable limit


def _rows_in(db, sql: str, values: list) -> list[tuple]:
    """Rows of `sql` (its `IN ({})` filled) for every value, a chunk at a time: SQLite
    refuses more variables than its build allows (32766 in many, fewer in some)."""
    rows: list[tuple] = []
    for i in range(0, len(values), SQL_CHUNK):
        part = values[i:i + SQL_CHUNK]
        rows += db.execute(sql.format(",".join("?" * len(part))), part).fetchall()
    return rows


def _stored_ok(db, hashes: set[str]) -> set[str]:
    """Those of `hashes` with a stored successful answer."""
    return {row[0] for row in _rows_in(
        db, "SELECT DISTINCT request_hash FROM calls WHERE status = 'ok' AND request_hash IN ({})",
        sorted(hashes))}


# ---------------------------------------------------------------- the run


class Runner:
    def __init__(self, db_path: str | Path, options: RunOptions,
                 on_progress: Optional[Callable[[Progress], None]] = None,
                 stop_event: Optional[threading.Event] = None):
        if options.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, not {options.method!r}")
        if options.resolved_concurrency() < 1:
            raise ValueError("concurrency must be at least 1")
        _check_numbers(options)
        self.db_path = str(db_path)
        self.options = options
        self.model = options.resolved_model()
        self.on_progress = on_progress
        self.stop_event = stop_event or threading.Event()
        self.started = threading.Event()
        self.progress = Progress()
        self.params = answer_params(options)
        self.prompts = prompt_versions()
        self.prices = PriceTable.load(options.prices_path)
        if self.prices.price_for(self.model) is None:
            log.warning("no price known for model %s: its calls are counted at $0; pass a price "
                        "file (--prices FILE) to count them", self.model)
        self._rng = random.Random(options.seed)
        self._failures: Counter[str] = Counter()
        self._stopping = False
        # This session's id in the run's lease (store.leases): random, never a secret.
        self.session_id = uuid.uuid4().hex
        self._lease_lost = False
        self._auth_error: Optional[str] = None  # the first refusal of the credentials
        self._usage_warned = False  # said once that the server sends no token usage
        self._account_error_type: Optional[type] = None  # or of the account (no credits)
        self._answered = False  # the server answered a request of this session
        # Whether an answer of this session validated, and else the requests whose answers
        # did not, each after its repair ({(stage, subject id): the ItemFailedError}):
        # INVALID_ANSWERS_TO_STOP of them stop the run. Only this session's answers count,
        # a resumed run's included: pairs an earlier session did, and answers read back from
        # the store, say nothing of the model as served now (a server restarted without
        # its JSON support, another model under the same name), while a model that answers
        # well disarms the check with its first answers at no cost.
        self._valid_answer = False
        self._invalid_answers: dict[tuple[str, str], ItemFailedError] = {}
        self._invalid_pairs = 0

    # -- the database, from one thread so the event loop never waits on sqlite
    async def _db(self, fn, *args, **kwargs):
        """Run fn(db, ...) on the store's thread and wait for its result."""
        return await self._store.call(partial(fn, **kwargs) if kwargs else fn, *args)

    def _db_later(self, fn, *args, **kwargs) -> None:
        """Queue fn(db, ...) on the store's thread; runs after everything queued before."""
        self._store.later(partial(fn, **kwargs) if kwargs else fn, *args)

    def _emit(self) -> None:
        if self.on_progress is not None:
            try:
                self.on_progress(self.progress)
            except Exception:  # a broken progress display must not stop the run
                log.exception("progress callback failed")

    def _prepare(self, db) -> list[dict]:
        """Create or resume the run row and its annotations; returns the pending work.

        Raises RunBusyError, having changed nothing, when another live session holds the run,
        or another run has requests in flight that this one cannot wait for
        (_runs_asking_the_same).
        """
        # Finding (or creating) the run and taking its lease are one transaction, so two
        # sessions started at once cannot both create a run, or both take one.
        with transaction(db):
            run = _find_run(db, self.options)
            pair_ids, withheld = _select_pairs(db, self.options, run)
            if not pair_ids and run is None:
                store_ann.require_split(db, self.options.split)
                where = f" of split {self.options.split!r}" if self.options.split else ""
                raise ValueError(f"the store has no pairs{where} to annotate: import some first "
                                 "(good4cir import --db DB --format pairs DIR)")
            # Before a run row exists: a refused start leaves nothing behind.
            _check_simulator_pairs(db, self.options, pair_ids)
            self._waited_runs = _runs_asking_the_same(db, run, self.options, pair_ids, self.prompts)
            _say_withheld(withheld)
            if run is None:
                run = store_ann.create_run(
                    db, self.options.backend, self.model, base_url=redact_url(self.options.base_url),
                    method=self.options.method, settings=_settings(self.options),
                    prompt_versions=self.prompts, name=self.options.name)
            try:
                replaced = leases.acquire_lease(db, run.id, self.session_id)
            except LeaseHeldError as exc:
                raise RunBusyError(
                    f"{exc}. It would pay again for answers that session is paying for; wait "
                    "for it to finish, or stop it (Ctrl-C in its terminal, or Stop in the app's "
                    "Pipeline tab) and run this again. A killed session frees the run as soon as "
                    f"its process is gone, or {leases.STALE_AFTER_S:.0f} s after its last "
                    "heartbeat") from None
        if replaced is not None:
            log.warning("run %s: taking over from a session that is gone (%s)", run.id,
                        leases.describe_lease(replaced))
        self.run_id = run.id
        store_ann.ensure_annotations(db, run.id, pair_ids)
        stale: set[str] = set()
        if self.options.retry_failed:
            stale = self._stale_answers(db, run.id)
            store_ann.reset_failed_annotations(db, run.id)
        total = db.execute("SELECT COUNT(*) FROM annotations WHERE run_id = ?", [run.id]).fetchone()[0]
        store_ann.update_run(db, run.id, status="running", pairs_total=total,
                             started_at=run.started_at or utc_now(), finished_at=None)
        self._ok_hashes = store_ann.ok_call_hashes(db) - stale
        # Which descriptions exist, so only those are read back (no lookup per pair).
        self._descriptions = {row[0] for row in db.execute("SELECT id FROM descriptions")}
        counts = store_ann.run_counts(db, run.id)
        self.progress = Progress(
            run_id=run.id, status="running", pairs_total=total, pairs_done=counts["pairs_done"],
            pairs_failed=counts["pairs_failed"], pairs_pending=counts["pairs_pending"],
            calls=counts["calls"], call_errors=counts["call_errors"], cost_usd=counts["cost_usd"],
            failures=dict(counts["failures"]))
        self._failures = Counter(counts["failures"])
        # Retries earlier sessions made (saved when a session ends; a killed session's
        # retries are not counted, which errs on the generous side).
        self._retries_used = int(run.settings.get("retries_used", 0))
        self._run_settings = dict(run.settings)
        work = store_ann.pending_work(db, run.id)
        # --limit N caps this session at the first N pairs, even when an earlier session
        # of the run (with a larger limit) left pairs beyond them pending.
        self._scope = set(pair_ids) if self.options.limit is not None else None
        if self._scope is not None:
            work = [item for item in work if item["pair_id"] in self._scope]
        return work

    @staticmethod
    def _stale_answers(db, run_id: int) -> set[str]:
        """Request hashes whose stored answers made a pair of this run fail as an invalid
        answer (or one a content filter withheld): asking again is the point of retrying
        it, so they are not reused."""
        failed = db.execute(
            "SELECT a.pair_id, p.reference_id FROM annotations a JOIN pairs p ON p.id = a.pair_id"
            " WHERE a.run_id = ? AND a.status = 'failed'"
            " AND (a.error LIKE 'invalid answer%' OR a.error LIKE 'content filtered%')",
            [run_id]).fetchall()
        subjects = sorted({s for row in failed for s in row if s})
        stale: set[str] = set()
        for i in range(0, len(subjects), 500):
            chunk = subjects[i:i + 500]
            stale |= {row[0] for row in db.execute(
                f"SELECT request_hash FROM calls WHERE run_id = ? AND status = 'ok' AND subject_id IN"
                f" ({','.join('?' * len(chunk))})", [run_id, *chunk])}
        return stale

    async def run(self) -> Progress:
        self._store = StoreWorker(self.db_path, asyncio.get_running_loop())
        backend = None
        heartbeat: Optional[asyncio.Task] = None
        status = "failed"
        try:
            # The backend first: a missing key or bad option fails before a run row exists.
            backend = create_backend(self.options.backend, **_backend_options(self.options, self.db_path))
            self.backend = backend
            work = await self._db(lambda db: self._prepare(db))
            heartbeat = asyncio.create_task(self._heartbeat())
            self.started.set()
            self._emit()
            if hasattr(backend, "start"):
                await backend.start(_BackendContext(self))
            self._batch_pricing = bool(getattr(backend, "is_batch", False))
            budget = self.options.retry_budget
            if budget is None:
                budget = 100 + 2 * self.progress.pairs_total
            # The budget is the run's: retries earlier sessions of this run made count.
            self._retries_budget = budget
            self._retries_left = budget - self._retries_used
            self._slots = PrioritySlots(self.options.resolved_concurrency())
            self._inflight: dict[str, asyncio.Future] = {}
            self._stage1_futures: dict[str, asyncio.Future] = {}
            # Stage 4's CLIP token counter reads its BPE vocabulary (a fraction of a second):
            # load it on a thread while the first calls are out, not on the event loop.
            self._stage4_ready = asyncio.get_running_loop().run_in_executor(None, _load_stage4)
            await self._run_work(work)
            await self._db(lambda db: None)  # every queued write is in the store
            status = "stopped" if self._stopping else "finished"
            if self._auth_error is not None:
                if self._account_error_type is InvalidAnswerError:
                    raise RunInvalidAnswersError(self._invalid_answers_message())
                if self._account_error_type is NotFoundError:
                    raise RunNotFoundError(
                        f"run {self.run_id} stopped: {self._auth_error.rstrip('.')}. Check the model "
                        f"({self.model}) and the base URL ({redact_url(self.options.base_url) or 'OpenAI'}; an "
                        "OpenAI-compatible server's usually ends in /v1), then run again; the pairs "
                        "not yet annotated stay pending")
                if self._account_error_type in (ConnectionFailedError, UnreachableError):
                    attempts = (f", {self.options.max_attempts} attempts"
                                if self._account_error_type is ConnectionFailedError else "")
                    raise RunUnreachableError(
                        f"run {self.run_id} stopped: cannot reach the server at "
                        f"{redact_url(self.options.base_url) or 'OpenAI'} ({self._auth_error.rstrip('.')}"
                        f"{attempts}). Check that the server is running and "
                        "the --base-url (host and port), or the network, then run again; the pairs "
                        "not yet annotated stay pending")
                if self._account_error_type is ServerUnavailableError:
                    raise RunUnreachableError(
                        f"run {self.run_id} stopped: the server at "
                        f"{redact_url(self.options.base_url) or 'OpenAI'} has not served a request of "
                        f"this session ({self._auth_error.rstrip('.')}, {self.options.max_attempts} "
                        "attempts): a model still loading (llama.cpp answers 'Loading model'), an "
                        "endpoint waking up, or a full queue. Wait until it serves (or pass a larger "
                        "--max-attempts), then rerun the same command to resume; the pairs not yet "
                        "annotated stay pending")
                if self._account_error_type is ImageLimitError:
                    staged = ("" if self.options.method == "staged" else
                              ", or annotate with --method staged (one image per request)")
                    raise RunImagesUnsupportedError(
                        f"run {self.run_id} stopped: the server at "
                        f"{redact_url(self.options.base_url) or 'OpenAI'} takes fewer images per "
                        f"request than this run sends ({self._auth_error.rstrip('.')}). Start vLLM "
                        "with --limit-mm-per-prompt '{\"image\": 2}'" + staged + ", then run again; "
                        "the pairs not yet annotated stay pending")
                if self._account_error_type is ImagesUnsupportedError:
                    raise RunImagesUnsupportedError(
                        f"run {self.run_id} stopped: the model {self.model} at "
                        f"{redact_url(self.options.base_url) or 'OpenAI'} takes no images "
                        f"({self._auth_error.rstrip('.')}). Annotating needs a vision model: pass "
                        "--model with one the server serves with image input (llama.cpp: start it "
                        "with --mmproj), then run again; the pairs not yet annotated stay pending")
                if self._account_error_type is QuotaExceededError:
                    raise RunQuotaError(
                        f"run {self.run_id} stopped: {self._auth_error.rstrip('.')}. "
                        + ("Wait until the daily limit resets (or add credits to lift it)"
                           if self._auth_error.startswith("daily limit") else
                           "Add credits to the account (or raise its spending limit)")
                        + " and rerun the same command to resume; the pairs not yet annotated "
                        "stay pending")
                raise RunAuthError(
                    f"run {self.run_id} stopped: {self._auth_error}. Set {self.options.api_key_env} "
                    "to a valid key (or pass --api-key-env NAME) and rerun the same command to "
                    "resume; the pairs not yet annotated stay pending")
            return self.progress
        except (KeyboardInterrupt, asyncio.CancelledError):
            status = "stopped"
            raise
        finally:
            if heartbeat is not None:
                heartbeat.cancel()
                await asyncio.gather(heartbeat, return_exceptions=True)
            if backend is not None and hasattr(backend, "aclose"):
                try:
                    await backend.aclose()
                except Exception:
                    log.exception("closing the backend failed")
            try:
                if getattr(self, "run_id", None) is not None and self._store.error is None:
                    self._store.call_blocking(self._finish, status)
                    self._emit()
            finally:
                self._store.close()
            if self._store.error is not None:
                raise StoreWriteError(f"a write to the store failed: {self._store.error}")

    def _finish(self, db, status: str) -> None:
        """Record how the session ended and give the run's lease back."""
        try:
            counts = store_ann.run_counts(db, self.run_id)
            if status == "finished" and counts["pairs_pending"] and self._pending_in_scope(db):
                status = "stopped"
            # A session whose lease was taken over leaves the run row to its new holder.
            if not self._lease_lost:
                settings = self._run_settings
                if hasattr(self, "_retries_budget"):
                    settings["retries_used"] = self._retries_budget - self._retries_left
                store_ann.update_run(db, self.run_id, status=status, settings=settings,
                                     finished_at=utc_now() if status == "finished" else None)
        finally:
            leases.release_lease(db, self.run_id, self.session_id)
        self.progress.status = status
        self.progress.pairs_pending = counts["pairs_pending"]
        self.progress.pairs_done = counts["pairs_done"]
        self.progress.pairs_failed = counts["pairs_failed"]

    def _pending_in_scope(self, db) -> bool:
        """Whether pairs this session was to annotate are still pending (pairs beyond its
        --limit that an earlier session left pending do not make it 'stopped')."""
        scope = getattr(self, "_scope", None)
        if scope is None:
            return True
        return any(row[0] in scope for row in db.execute(
            "SELECT pair_id FROM annotations WHERE run_id = ? AND status = 'pending'", [self.run_id]))

    async def _heartbeat(self) -> None:
        """Renew the run's lease until the session ends. If another session took the run
        over (this one hung past the stale limit), stop: two sessions would pay twice."""
        while True:
            await asyncio.sleep(leases.HEARTBEAT_EVERY_S)
            if not await self._db(leases.heartbeat_lease, self.run_id, self.session_id):
                self._lease_lost = True
                self.progress.last_error = (f"run {self.run_id} was taken over by another session "
                                            "(this one missed its heartbeats); stopping")
                log.error("%s", self.progress.last_error)
                self._stopping = True
                return

    async def _run_work(self, work: list[dict]) -> None:
        queue = deque(work)
        # More pair workers than request slots, so pairs waiting on a shared stage 1 or
        # between stages never leave a slot idle. The batch backend wants every pair in
        # flight (its requests are pooled into batch files).
        batch = getattr(self.backend, "is_batch", False)
        concurrency = self.options.resolved_concurrency()
        n_workers = concurrency if batch else concurrency * 2
        n_workers = max(1, min(n_workers, len(queue)))

        async def worker() -> None:
            while queue and not self._stopping:
                await self._pair(queue.popleft())

        workers = [asyncio.create_task(worker()) for _ in range(n_workers)]
        watcher = asyncio.create_task(self._watch_stop(workers))
        try:
            await asyncio.gather(*workers, return_exceptions=False)
        except asyncio.CancelledError:
            # Workers a stop cancelled (at once for the batch backend, else after the
            # grace): a stop, not an abort. Only a cancel of this task itself goes on up.
            if asyncio.current_task().cancelling() or not self._stopping:
                raise
        finally:
            watcher.cancel()
            # Shared stage 1 calls run as their own tasks: they end with the workers.
            others = [f for f in self._stage1_futures.values() if not f.done()]
            for task in [*workers, *others]:
                task.cancel()
            await asyncio.gather(*workers, *others, watcher, return_exceptions=True)

    async def _watch_stop(self, workers: list[asyncio.Task]) -> None:
        while not self.stop_event.is_set():
            await asyncio.sleep(0.05)
        self._stopping = True
        grace = 0.0 if getattr(self.backend, "is_batch", False) else self.options.stop_grace
        done, pending = await asyncio.wait(workers, timeout=grace)
        for task in pending:
            task.cancel()  # unfinished pairs stay pending; a resume picks them up

    # -- one pair

    async def _pair(self, item: dict) -> None:
        annotation_id = item["annotation_id"]
        try:
            if not item["target_id"]:
                raise ItemFailedError("no target", f"pair {item['pair_id']} has no target image")
            if self.options.method == "staged":
                stage1_id, objects1 = await self._stage1(item["reference_id"], item["reference_path"],
                                                         item["reference_name"])
                stage2_id, objects2 = await self._stage2(item, stage1_id, objects1)
                request = stage3_request(
                    item["pair_id"], objects1, objects2, temperature=self.options.temperature,
                    max_tokens=self.options.max_tokens)
            else:
                stage1_id = stage2_id = None
                self._check_paths(item)
                request = single_request(
                    item["pair_id"], (item["reference_id"], item["reference_path"]),
                    (item["target_id"], item["target_path"]),
                    temperature=self.options.temperature, max_tokens=self.options.max_tokens)
            # Counting CLIP tokens needs the BPE vocabulary, loaded off the event loop.
            await asyncio.shield(self._stage4_ready)
            answer, _ = await self._ask(request, lambda a: overlong_captions(a.captions))
            captions = answer.captions
            compounds = self._compose(captions, item["pair_id"])
            # A stored stage 2 (a resumed pair) is checked as a fresh one is: the same flags.
            renamed = renamed_objects(objects1, objects2) if stage2_id else []
            self._db_later(store_ann.complete_annotation, annotation_id, stage1_id=stage1_id,
                           stage2_id=stage2_id, captions=captions, compounds=compounds,
                           caption_flags={p.index: p.reason for p in overlong_captions(captions)},
                           descriptor_flags={f"{stage2_id}/{p.index}/{k}": p.reason for p in renamed
                                             for k in range(len(objects2[p.index]["descriptors"]))})
            self.progress.pairs_done += 1
        except RunStoppedError:
            return
        except ItemFailedError as exc:
            await self._fail(annotation_id, exc.reason)
            if exc.source is not None:
                self._invalid_pairs += 1  # an invalid answer: RunInvalidAnswersError says how many
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # one bad item never kills a run
            log.exception("pair %s failed unexpectedly", item["pair_id"])
            await self._fail(annotation_id, f"internal error: {type(exc).__name__}: {exc}")
        else:
            self.progress.pairs_pending = max(0, self.progress.pairs_pending - 1)
            self._emit()

    async def _fail(self, annotation_id: str, reason: str) -> None:
        self._db_later(store_ann.fail_annotation, annotation_id, reason)
        category = reason.split(": ", 1)[0]
        self._failures[category] += 1
        self.progress.failures = dict(self._failures)
        self.progress.pairs_failed += 1
        self.progress.pairs_pending = max(0, self.progress.pairs_pending - 1)
        self.progress.last_error = reason
        self._emit()

    def _count_invalid_answer(self, exc: ItemFailedError) -> None:
        """Stop the run (RunInvalidAnswersError) once INVALID_ANSWERS_TO_STOP requests'
        answers failed validation before any answer of this session validated. Called as
        the answer is found invalid, before anything else runs: a stage 1 answer reaches
        its pairs a step later, by which time another request could have been sent."""
        if self._valid_answer or self._stopping:
            return
        self._invalid_answers.setdefault(exc.source, exc)
        if len(self._invalid_answers) < INVALID_ANSWERS_TO_STOP or self._auth_error is not None:
            return
        self._auth_error = exc.reason
        self._account_error_type = InvalidAnswerError
        log.error("%d requests' answers failed validation and none validated: stopping the run",
                  len(self._invalid_answers))
        self._stop_sending()

    def _stop_sending(self) -> None:
        """Stop the run for an error every request would meet: no new call; calls in
        flight finish and are stored."""
        self._stopping = True
        if getattr(self.backend, "is_batch", False):
            # Pairs waiting on lines not yet sent, or on open batches (stored, so a resume
            # collects them; a batch can take its 24 h), are let go at once, as a stop does:
            # nothing more goes out.
            self.stop_event.set()

    def _invalid_answers_message(self) -> str:
        first = next(iter(self._invalid_answers.values()))
        sample = " ".join((first.answer or "").split()) or "(an empty answer)"
        sample = sample if len(sample) <= 120 else sample[:117] + "..."
        where = redact_url(self.options.base_url) or "OpenAI"
        mode = getattr(self.backend, "response_mode", None)
        if first.problem and "finish_reason 'length'" in first.problem:
            advice = (f"Its answers were cut off at the token limit (--max-tokens {self.options.max_tokens}, "
                      "or the server's context: vLLM's --max-model-len): raise --max-tokens (a "
                      "reasoning model spends them on thinking too), use a model that answers in "
                      "JSON without a long preamble (--model), or give the server more context")
        elif mode == "text":
            advice = ("The server refused response_format (json_schema and json_object), so the "
                      "model was asked for JSON in the prompt alone: use a model that follows "
                      "JSON instructions (--model), or a server with structured output support")
        else:
            advice = (f"The server took response_format {mode or 'json_schema'} but did not hold the "
                      "model to it: use a model that follows JSON instructions (--model), or a "
                      "server that enforces structured output")
        pairs = self._invalid_pairs
        return (f"run {self.run_id} stopped: no answer of the model {self.model} at {where} in "
                f"this session validated as the JSON the stages ask for; {pairs} pair"
                f"{'' if pairs == 1 else 's'} failed as invalid answers, each after one repair "
                f"request. It answered, for example: \"{sample}\" ({first.problem}). {advice}, "
                "then rerun the same command with --retry-failed to ask again for the failed "
                "pairs; the pairs not yet annotated stay pending")

    def _compose(self, captions: list[str], pair_id: str) -> list:
        from .compound import compose_captions  # stage 4: deterministic, no model

        try:
            return [(text, list(sources), tokens)
                    for text, sources, tokens in compose_captions(captions, seed=pair_id)]
        except Exception as exc:
            raise ItemFailedError("stage 4 error", f"{type(exc).__name__}: {exc}") from None

    @staticmethod
    def _check_paths(item: dict) -> None:
        for role in ("reference", "target"):
            if not item[f"{role}_path"]:
                raise ItemFailedError("bad image", f"{role} image {item[f'{role}_name']} has no file or URL")

    async def _stage1(self, image_id: str, path: Optional[str], name: str) -> tuple[str, list[dict]]:
        key = stage1_key(image_id, self.params, self.prompts)
        future = self._stage1_futures.get(key)
        if future is None:
            future = asyncio.ensure_future(self._describe_reference(key, image_id, path, name))
            self._stage1_futures[key] = future
        try:
            return await asyncio.shield(future)
        except RunStoppedError:
            raise
        finally:
            # A stop must not poison the cache for a later call in this process.
            if future.done() and not future.cancelled() and isinstance(future.exception(), RunStoppedError):
                self._stage1_futures.pop(key, None)

    async def _describe_reference(self, key: str, image_id: str, path: Optional[str],
                                  name: str) -> tuple[str, list[dict]]:
        if key in self._descriptions:
            existing = await self._db(store_ann.get_description, key)
            if existing is not None:
                return key, [o.model_dump() for o in existing.objects]
        if not path:
            raise ItemFailedError("bad image", f"reference image {name} has no file or URL")
        answer, call = await self._ask(stage1_request(
            image_id, path, temperature=self.options.temperature, max_tokens=self.options.max_tokens))
        objects = [o.model_dump() for o in answer.objects]
        self._db_later(_save_description, call, key, 1, image_id, objects, None,
                       self.prompts["stage1"], self.model)
        return key, objects

    async def _stage2(self, item: dict, stage1_id: str, objects1: list[dict]) -> tuple[str, list[dict]]:
        key = stage2_key(item["pair_id"], stage1_id, self.params, self.prompts)
        if key in self._descriptions:
            existing = await self._db(store_ann.get_description, key)
            if existing is not None:
                return key, [o.model_dump() for o in existing.objects]
        if not item["target_path"]:
            raise ItemFailedError("bad image", f"target image {item['target_name']} has no file or URL")
        answer, call = await self._ask(stage2_request(
            item["pair_id"], item["target_id"], item["target_path"], objects1,
            temperature=self.options.temperature, max_tokens=self.options.max_tokens),
            lambda a: renamed_objects(objects1, [o.model_dump() for o in a.objects]))
        objects = [o.model_dump() for o in answer.objects]
        self._db_later(_save_description, call, key, 2, item["target_id"], objects, item["pair_id"],
                       self.prompts["stage2"], self.model)
        return key, objects

    # -- one validated answer: a call, then at most one repair

    async def _ask(self, request: VLMRequest, problems_of: Optional[Callable[[Any], list]] = None):
        """(answer, call). An invalid answer, or a valid one with problems_of(answer)
        (AnswerProblems), gets one repair request. A valid answer is never thrown away for
        a worse repair: the caller stores what problems remain as flags."""
        first = await self._call(request, request.stage)
        if first.finish_reason == "content_filter" and not first.text.strip():
            # Azure's content filter withheld the answer: the model did nothing wrong, and a
            # repair request would only be filtered again.
            raise ItemFailedError("content filtered", f"{request.stage}: the server's content filter "
                                  "withheld the answer (finish_reason 'content_filter'); look at the "
                                  "pair's images, or at the filter's settings for your deployment")
        kept = None
        try:
            answer = parse_answer(request.stage, first.text, first.finish_reason)
        except InvalidAnswerError as exc:
            error = str(exc)
        else:
            self._valid_answer = self._valid_answer or not first.reused
            problems = problems_of(answer) if problems_of else []
            if not problems:
                return answer, first.call
            kept, error = (answer, first.call, len(problems)), describe_problems(problems)
        repair = repair_request(request, first.text, error)
        second = await self._call(repair, "repair")
        try:
            answer = parse_answer(request.stage, second.text, second.finish_reason)
        except InvalidAnswerError as exc:
            if kept:
                return kept[:2]
            failure = ItemFailedError("invalid answer", f"{request.stage}: {exc} (after one repair; "
                                                        f"first answer: {error})",
                                      source=(request.stage, request.subject_id), answer=first.text,
                                      problem=error)
            self._count_invalid_answer(failure)
            raise failure from None
        self._valid_answer = self._valid_answer or not second.reused
        if kept and kept[2] < len(problems_of(answer)):
            return kept[:2]
        return answer, second.call

    async def _call(self, request: VLMRequest, call_stage: str) -> _CallResult:
        """One answer for `request`: from the store if already paid for, else from the
        backend (identical requests in flight share one call)."""
        key = request_hash(request, self.params)
        shared = self._inflight.get(key)
        if shared is not None:
            return await asyncio.shield(shared)
        future = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            result = await self._call_once(request, call_stage, key)
        except BaseException as exc:
            if not future.done():
                future.set_exception(exc if isinstance(exc, Exception) else RunStoppedError())
                future.exception()  # mark retrieved: waiters may be none
            raise
        else:
            future.set_result(result)
            return result
        finally:
            self._inflight.pop(key, None)

    async def _call_once(self, request: VLMRequest, call_stage: str, key: str) -> _CallResult:
        if key in self._ok_hashes:
            stored = await self._db(store_ann.find_ok_call, key)
            if stored is not None:
                self.progress.calls_reused += 1
                finish = (stored.error.split(": ", 1)[1] if stored.error in FINISH_REASONS_STORED
                          else "stop")
                return _CallResult(stored.response or "", finish, CallRef(stored.id), reused=True)
        attempt = 0
        request_json = None
        while True:
            if self._stopping:
                raise RunStoppedError()
            error: Optional[Exception] = None
            async with self._slots.slot(STAGE_PRIORITY.get(call_stage, 1)):
                if self._stopping:
                    raise RunStoppedError()
                started = time.perf_counter()
                try:
                    response = await self.backend.complete(request)
                except BadImageError as exc:
                    raise ItemFailedError("bad image", str(exc)) from None
                except (TransientError, PermanentError) as exc:
                    error = exc
            latency_ms = (time.perf_counter() - started) * 1000
            answered_at = utc_now()  # when it happened, not when the store thread writes it
            if request_json is None:
                request_json = _request_json(request, self.params)
            if error is None:
                cost = self.prices.cost(self.model, response.tokens_in, response.tokens_out,
                                        batch=self._batch_pricing)
                if not (response.tokens_in or response.tokens_out) and not self._usage_warned \
                        and _priced(self.prices.price_for(self.model)):
                    # Some OpenAI-compatible servers send no `usage`: say so once, rather
                    # than let a priced model's run report $0 as if it were free.
                    self._usage_warned = True
                    log.warning("the server reported no token usage (model %s): its answers are "
                                "counted at $0, so the run's cost is not known", self.model)
                stored_id = getattr(response, "call_id", None)
                if stored_id is not None:
                    # A batch answer is stored as this run's call when the batch is collected,
                    # before it is handed over: written once, never again here.
                    ref = CallRef(stored_id)
                else:
                    call = CallRecord(
                        run_id=self.run_id, stage=call_stage, request_hash=key,
                        prompt_version=request.prompt_version, model=response.model or self.model,
                        subject_id=request.subject_id, request=request_json, response=response.text,
                        status="ok",
                        error=(f"finish_reason: {response.finish_reason}"
                               if f"finish_reason: {response.finish_reason}" in FINISH_REASONS_STORED
                               else None),
                        tokens_in=response.tokens_in, tokens_out=response.tokens_out,
                        latency_ms=response.latency_ms if response.latency_ms is not None else latency_ms,
                        cost_usd=cost, batch_id=getattr(response, "batch_id", None),
                        custom_id=getattr(response, "custom_id", None), created_at=answered_at)
                    # Queued before anything made from the answer, so it is in the store
                    # first: a crash from here on never pays for it again.
                    ref = CallRef()
                    self._db_later(_record_call, call, ref)
                self._ok_hashes.add(key)
                self._answered = True
                self.progress.calls += 1
                self.progress.cost_usd += cost
                return _CallResult(response.text, response.finish_reason, ref)
            message = str(error)
            self._db_later(store_ann.record_call, CallRecord(
                run_id=self.run_id, stage=call_stage, request_hash=key,
                prompt_version=request.prompt_version, model=self.model,
                subject_id=request.subject_id, request=request_json, status="error",
                error=message[:2000], latency_ms=latency_ms,
                batch_id=getattr(error, "batch_id", None), custom_id=getattr(error, "custom_id", None),
                created_at=answered_at))
            self.progress.calls += 1
            self.progress.call_errors += 1
            self.progress.last_error = message[:300]
            if isinstance(error, AccountError):
                # Every request would be refused (a bad key, no credits left): stop, and
                # leave the pairs pending for a rerun once the account is put right,
                # rather than failing (or retrying) each of them.
                if self._auth_error is None:
                    self._auth_error = message
                    self._account_error_type = type(error)
                    log.error("%s: stopping the run", message)
                self._stop_sending()
                raise RunStoppedError()
            if isinstance(error, PermanentError):
                raise ItemFailedError(error.category, f"{request.stage}: {message}")
            attempt += 1
            if attempt >= self.options.max_attempts and not self._answered \
                    and isinstance(error, (ConnectionFailedError, ServerUnavailableError)):
                # Not one answer in this session (the store's answers came from earlier runs,
                # maybe from another server), and still no connection after every attempt (a
                # wrong --base-url or a server not started), or still 503 (a model loading):
                # every pair would fail the same way.
                if self._auth_error is None:
                    self._auth_error = message
                    self._account_error_type = type(error)
                    log.error("%s: stopping the run", message)
                self._stop_sending()
                raise RunStoppedError()
            if attempt >= self.options.max_attempts:
                raise ItemFailedError("retries exhausted",
                                      f"{request.stage}: {attempt} attempts, last: {message}")
            if self._retries_left <= 0:
                raise ItemFailedError("retry budget spent", f"{request.stage}: last error: {message}")
            self._retries_left -= 1
            await asyncio.sleep(self._backoff(attempt, error.retry_after))

    def _backoff(self, attempt: int, retry_after: Optional[float]) -> float:
        if retry_after is not None:
            # Honour the server's wait, plus a little jitter so waiters do not stampede.
            return min(self.options.backoff_max, retry_after) * self._rng.uniform(1.0, 1.2)
        ceiling = min(self.options.backoff_max, self.options.backoff_base * 2 ** (attempt - 1))
        return self._rng.uniform(0, ceiling)  # "full jitter"


def _prices_of(run) -> PriceTable:
    """The prices a run was counted with (its --prices file, where still readable)."""
    try:
        return PriceTable.load(run.settings.get("prices_path"))
    except ValueError:
        return PriceTable.load()


# An ok call's answer that stopped for a reason its text does not show: kept in its error
# column, so a reused answer is judged as the fresh one was.
FINISH_REASONS_STORED = ("finish_reason: length", "finish_reason: content_filter")


def _priced(price) -> bool:
    return price is not None and bool(price.input_per_1m or price.output_per_1m)


def _load_stage4() -> None:
    try:
        from .compound import compose_captions

        compose_captions(["Make the lamp red", "Add a plant", "Remove the rug"], seed="warm-up")
    except Exception:  # reported per pair by _compose, with the reason
        log.exception("loading stage 4 failed")


def _record_call(db, call: CallRecord, ref: CallRef) -> None:
    ref.id = store_ann.record_call(db, call)


def _save_description(db, call: CallRef, key: str, stage: int, image_id: str, objects: list,
                      pair_id: Optional[str], prompt_version: str, model: str) -> None:
    store_ann.save_description(db, key, stage, image_id, objects, pair_id=pair_id,
                               prompt_version=prompt_version, model=model, call_id=call.id)


class _BackendContext:
    """What a backend that keeps state in the store (openai-batch) may use."""

    def __init__(self, runner: Runner):
        self._runner = runner
        self.run_id = runner.run_id
        # Other runs (no live session) whose open batches hold requests of this run.
        self.waited_run_ids = list(getattr(runner, "_waited_runs", []))

    async def db(self, fn, *args, **kwargs):
        return await self._runner._db(fn, *args, **kwargs)

    def describe(self, request: VLMRequest) -> dict:
        """What a request's call row holds besides the answer (request hash, stage as
        stored, subject, prompt version, request JSON): a batch stores it per line."""
        params = self._runner.params
        return {"request_hash": request_hash(request, params),
                "stage": "repair" if request.history else request.stage,
                "subject_id": request.subject_id, "prompt_version": request.prompt_version,
                "request": _request_json(request, params)}

    def cost(self, tokens_in: int, tokens_out: int) -> float:
        """USD of a batch answer, as the runner counts its calls."""
        return self._runner.prices.cost(self._runner.model, tokens_in, tokens_out, batch=True)

    @property
    def stopping(self) -> bool:
        return self._runner._stopping or self._runner.stop_event.is_set()


def run_pipeline(db_path: str | Path, options: RunOptions,
                 on_progress: Optional[Callable[[Progress], None]] = None,
                 stop_event: Optional[threading.Event] = None) -> Progress:
    """Run (or resume) to the end, or until stop_event is set; returns the final Progress.

    From the main thread, a first Ctrl-C stops gracefully (no new pairs; calls in flight
    finish and are stored), a second one aborts at once (calls in flight are lost). A
    SIGTERM (`kill PID`, `timeout`, a container or service stop) or SIGHUP (the terminal
    closed) is taken as a first Ctrl-C: left to their default, they ended the process at
    once and lost the answers in flight, already paid for, and those received and not yet
    written.
    """
    runner = Runner(db_path, options, on_progress, stop_event)

    async def main() -> Progress:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        installed: dict[int, Any] = {}

        def on_stop(name: str) -> None:
            if runner.stop_event.is_set():
                task.cancel()
                return
            runner.stop_event.set()
            said = "stopping" if name == "Ctrl-C" else f"stopping ({name})"
            again = "Ctrl-C again" if name == "Ctrl-C" else "Ctrl-C"
            # A batch run stops at once (_watch_stop): its open batches wait on the server
            what = ("what is in a batch stays on the server, and the rerun collects its answers"
                    if options.backend == "openai-batch" else "calls in flight finish and are stored")
            try:  # after a SIGHUP the terminal may be gone: the stop matters, not the note
                print(f"\n{said}: {what} ({again} to abort)", file=sys.stderr)
            except OSError:
                pass

        if threading.current_thread() is threading.main_thread():
            for sig, name in ((signal.SIGINT, "Ctrl-C"), (signal.SIGTERM, "SIGTERM"),
                              (getattr(signal, "SIGHUP", None), "SIGHUP")):
                previous = signal.getsignal(sig) if sig is not None else None
                if sig is None or previous == signal.SIG_IGN:  # nohup's SIGHUP stays ignored
                    continue
                try:
                    loop.add_signal_handler(sig, on_stop, name)
                    installed[sig] = previous
                except (NotImplementedError, RuntimeError, ValueError):  # no signal support here
                    pass
        try:
            return await runner.run()
        finally:
            for sig, previous in installed.items():
                loop.remove_signal_handler(sig)
                # remove_signal_handler leaves SIGTERM and SIGHUP at their default: give
                # back whatever handler the caller had
                signal.signal(sig, previous if previous is not None else signal.SIG_DFL)

    try:
        return asyncio.run(main())
    except asyncio.CancelledError:
        raise KeyboardInterrupt from None


class RunHandle:
    """A run going on in a background thread (see the module docstring)."""

    def __init__(self, runner: Runner):
        self._runner = runner
        self._thread: Optional[threading.Thread] = None
        self.result: Optional[Progress] = None
        self.error: Optional[BaseException] = None

    @property
    def run_id(self) -> Optional[int]:
        return getattr(self._runner, "run_id", None)

    @property
    def progress(self) -> Progress:
        return Progress(**{**asdict(self._runner.progress),
                           "failures": dict(self._runner.progress.failures)})

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wait_started(self, timeout: Optional[float] = None) -> bool:
        return self._runner.started.wait(timeout)

    def stop(self) -> None:
        self._runner.stop_event.set()

    def join(self, timeout: Optional[float] = None) -> Optional[Progress]:
        if self._thread is not None:
            self._thread.join(timeout)
        return None if self.running else self.progress

    def _target(self) -> None:
        try:
            self.result = asyncio.run(self._runner.run())
        except (RunAuthError, RunBusyError) as exc:
            # A stop the run explains (server unreachable, key refused, quota, run busy): the
            # message says what to do, and is all the app's terminal needs; no traceback.
            self.error = exc
            log.warning("%s", exc)
        except BaseException as exc:  # reported through .error, never lost in the thread
            self.error = exc
            log.exception("pipeline run failed")
        finally:
            self._runner.started.set()


# Runs started by start_run_in_thread, for stop_runs_in_threads.
_THREAD_RUNS: "weakref.WeakSet[RunHandle]" = weakref.WeakSet()


def start_run_in_thread(db_path: str | Path, options: RunOptions,
                        on_progress: Optional[Callable[[Progress], None]] = None) -> RunHandle:
    """Start a run in a daemon thread and return its handle at once."""
    handle = RunHandle(Runner(db_path, options, on_progress))
    handle._thread = threading.Thread(target=handle._target, name="good4cir-run", daemon=True)
    _THREAD_RUNS.add(handle)
    handle._thread.start()
    return handle


def stop_runs_in_threads(on_stop: Optional[Callable[[RunHandle], None]] = None) -> list[RunHandle]:
    """Stop every run of start_run_in_thread still going and wait for each to end (its
    calls in flight get stop_grace seconds, then are stored). For a process about to
    exit: its daemon threads would die with answers in flight or not yet written, paid
    for and lost. on_stop(handle) is called before each wait."""
    handles = [handle for handle in list(_THREAD_RUNS) if handle.running]
    for handle in handles:
        handle.stop()
    for handle in handles:
        if on_stop is not None:
            on_stop(handle)
        handle.join()
    return handles


def run_status(db_path: str | Path) -> dict:
    """Every run's progress: {"runs": [{"id", "backend", "model", "status", "pairs_done",
    "pairs_failed", "pairs_pending", "calls", "cost_usd", "failures": {reason: count}}]}
    (plus "method", "name", "session", "open_batches": batches submitted and not
    collected yet, and "calls_without_usage": answers of a priced model the server sent
    without token usage, left out of cost_usd; scripts may ignore them).

    A run whose row says 'running' but that no live session holds (its process was
    killed, or stopped renewing its lease) is reported as 'interrupted': rerunning the
    same command resumes it. "session" describes the live holder ('pid 12 on host, last
    heartbeat 3 s ago'), or is None.
    """
    db = open_db(db_path)
    try:
        live = leases.live_leases(db)
        open_batches = store_ann.open_batch_counts(db)
        runs = []
        for run in store_ann.list_runs(db):
            counts = store_ann.run_counts(db, run.id)
            lease = live.get(run.id)
            status = run.status
            if status == "running" and lease is None:
                status = "interrupted"
            runs.append({
                "id": run.id, "backend": run.backend, "model": run.model,
                "pairs_done": counts["pairs_done"], "pairs_failed": counts["pairs_failed"],
                "pairs_pending": counts["pairs_pending"], "calls": counts["calls"],
                "cost_usd": counts["cost_usd"], "failures": counts["failures"],
                "status": status, "method": run.method, "name": run.name,
                "session": leases.describe_lease(lease) if lease is not None else None,
                "open_batches": open_batches.get(run.id, 0),
                "calls_without_usage": (counts["calls_without_usage"]
                                        if _priced(_prices_of(run).price_for(run.model)) else 0),
            })
        return {"runs": runs}
    finally:
        db.conn.close()
