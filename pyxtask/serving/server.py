"""HTTP serving of a bundle: FastAPI + uvicorn, with dynamic batching across requests.

Endpoints (the OpenAPI schema at ``GET /openapi.json`` describes every body and answer):

* ``POST /v1/tag`` takes one of ``{"sentences": [...]}`` (each a string or a list of words),
  ``{"text": "..."}`` or ``{"words": [...]}`` and answers
  ``{"results": [...], "task": ..., "variant": ...}`` in request order.
* ``GET /healthz`` answers ``{"status": "ok"}`` while the process runs (liveness).
* ``GET /v1/metadata`` answers the tagger's metadata, the server's limits and batching stats.
* ``GET /metrics``: Prometheus text format (see :class:`_Metrics` for the names).
* The Open Inference Protocol (KServe V2 REST; tensors as in :mod:`pyxtask.serving._v2`):
  ``GET /v2/health/live`` (``{"live": true}``), ``GET /v2/health/ready`` (``{"ready": true}``,
  503 until the model is loaded and again while shutting down), ``GET /v2`` (``name``,
  ``version``, ``extensions``), ``GET /v2/models/{name}`` (metadata), ``GET
  /v2/models/{name}/ready`` and ``POST /v2/models/{name}/infer``, each also under
  ``/v2/models/{name}/versions/1/...``. The model's name is ``model_name`` or the bundle's task.
  Its input is ``TEXT`` (BYTES, shape ``[n]``, one sentence per element). A token task's
  per-word answers come flattened over the request, ``words``, ``labels`` (BYTES) and
  ``scores`` (FP32), with ``word_counts`` (INT32 ``[n]``) saying how many belong to each
  sentence; a sentence task answers ``labels``, ``scores`` and ``probabilities`` (``[n, L]``).
  Not ready is 503 (the protocol says any 4xx; probes and tritonclient treat both as false).

Every error is ``{"error": "..."}``: 4xx for a request the client must fix (validated completely
before it reaches the model, so one malformed request can never fail a batch it would have
shared with others), 503 with ``Retry-After`` when the server refuses work it cannot do now.

Concurrent requests are merged into one ``Tagger.tag`` call by a single background worker (at
most ``max_batch_sentences`` sentences), and only one model call runs at a time so onnxruntime
has every core to itself. By default a batch is whatever queued while the previous model call
ran (``max_wait_ms=0``, as Triton's dynamic batcher does): under load batches form without
waiting, and the event loop answers one batch and reads the next while the model runs. A wait
lets batches grow past that, which pays only where bigger batches are much cheaper per sentence
(GPUs); on CPU it idles the model (a 5 ms wait cost 20 % of served throughput here).

Overload is refused rather than queued without end: at most ``max_queue_sentences`` sentences
wait for the model (more gets 503 at once, before queuing), a request that has not reached the
model ``request_timeout_s`` after it was queued gets 503 and is never run, a body that has not
arrived within ``body_timeout_s`` gets 408 and a closed connection, and a client that goes away
while its request waits takes its sentences out of the queue. The default queue bound, four
full batches, keeps a batch ready whenever the model finishes one (more queue adds latency,
not throughput) and bounds an admitted request's wait to about five model calls.

Only onnxruntime, numpy, tokenizers, fastapi, pydantic, uvicorn and prometheus-client are
needed: nothing here imports torch or anything from pyxtask outside :mod:`pyxtask.serving`.
"""

from __future__ import annotations

import asyncio
import copy
import importlib.metadata
import json
import logging
import math
import os
import re
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import fastapi
import uvicorn
from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from pydantic import BaseModel, ConfigDict, Field, RootModel
from pydantic.json_schema import models_json_schema
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pyxtask.serving import _v2
from pyxtask.serving.bundle import BundleError, read_manifest
from pyxtask.serving.tagger import Tagged, Tagger

__all__ = ["create_app", "serve"]

log = logging.getLogger("pyxtask.serving")

Sentence = str | list[str]
_INPUT_KEYS = ("sentences", "text", "words")
_PIECE = 4096  # characters pre-tokenized at a time when counting a long sentence's words
_WHITESPACE = re.compile(r"\s")
_REASONS = ("queue_full", "deadline", "body_timeout", "not_ready")
_CLIENT_GONE = 499  # nginx's "client closed request": only ever seen in logs and metrics


class _HTTPError(Exception):
    """An answer other than 200: ``{"error": message}`` with ``status``.

    ``reason`` names a refusal (one of ``_REASONS``) for the metrics; ``retry_after`` (seconds)
    becomes a Retry-After header; ``close`` closes the connection after the answer.
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        reason: str | None = None,
        retry_after: int | None = None,
        close: bool = False,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.reason = reason
        self.retry_after = retry_after
        self.close = close

    def response(self) -> JSONResponse:
        headers = {}
        if self.status == 503:  # every refusal says when to come back
            headers["Retry-After"] = str(self.retry_after or 1)
        if self.close:
            headers["Connection"] = "close"
        return JSONResponse({"error": self.message}, status_code=self.status, headers=headers)


class _ClientGone(Exception):
    """The client closed the connection before its answer: nobody to answer."""


class _ModelError(Exception):
    """``Tagger.tag`` failed on input that passed validation: a server-side fault."""


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


# -- request parsing --------------------------------------------------------------------------


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refusing more than ``limit`` bytes without buffering them.

    Content-Length is checked first so an honest oversized request is refused before anything
    is read; the running total is checked while reading because a chunked body has no length
    and a client may lie about it.
    """
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            length = int(declared)
        except ValueError:
            raise _HTTPError(400, f"invalid Content-Length header {declared!r}") from None
        if length > limit:
            raise _HTTPError(413, f"request body is {length} bytes; the limit is {limit} bytes")
    chunks: list[bytes] = []
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise _HTTPError(413, f"request body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _peer(request: Request) -> str:
    return f"{request.client.host}:{request.client.port}" if request.client else "a client"


async def _read_body_within(request: Request, limit: int, timeout: float) -> bytes:
    """:func:`_read_body`, or 408 when the whole body has not arrived within ``timeout``."""
    try:
        if sys.version_info >= (3, 11):
            # No task per request, unlike wait_for.
            async with asyncio.timeout(timeout):
                return await _read_body(request, limit)
        return await asyncio.wait_for(_read_body(request, limit), timeout)
    except asyncio.TimeoutError:
        # A warning without traceback: a stalled client is the client's problem, not ours.
        log.warning(
            "%s %s from %s: the request body did not arrive within %g s; answered 408 and "
            "closed the connection",
            request.method,
            request.url.path,
            _peer(request),
            timeout,
        )
        raise _HTTPError(
            408,
            f"the request body did not arrive within {timeout:g} s",
            reason="body_timeout",
            close=True,
        ) from None
    except ClientDisconnect:
        raise _ClientGone from None


def _check_string(value: str, where: str) -> None:
    # A lone surrogate ("\ud800") is valid JSON but cannot be handed to the Rust tokenizer;
    # caught here it is this request's 400 instead of a failed batch.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _HTTPError(
            400, f"{where} contains an invalid unicode character (a lone surrogate)"
        ) from None


def _sentence(value: object, where: str) -> Sentence:
    if isinstance(value, str):
        _check_string(value, where)
        return value
    if isinstance(value, list):
        for j, word in enumerate(value):
            if not isinstance(word, str):
                raise _HTTPError(
                    422,
                    f"{where}[{j}] must be a string (a word), got {type(word).__name__}; "
                    f"{where} must be a string or a list of strings",
                )
            _check_string(word, f"{where}[{j}]")
        return list(value)
    raise _HTTPError(
        422, f"{where} must be a string or a list of strings, got {type(value).__name__}"
    )


def _parse(body: bytes, *, max_sentences: int) -> tuple[str, list[Sentence]]:
    """The request's input key and sentences, or an :class:`_HTTPError` naming the problem."""
    example = 'send JSON like {"sentences": ["a sentence", ["pre", "split"]]}'
    if not body.strip():
        raise _HTTPError(400, f"request body is empty; {example}")
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, bad UTF-8, huge ints, depth
        raise _HTTPError(400, f"request body is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise _HTTPError(
            422, f"request body must be a JSON object, got {type(payload).__name__}; {example}"
        )
    unknown = sorted(k for k in payload if k not in _INPUT_KEYS)
    if unknown:
        raise _HTTPError(
            400, f"unknown field(s) {unknown}; expected exactly one of {list(_INPUT_KEYS)}"
        )
    given = [k for k in _INPUT_KEYS if k in payload]
    if len(given) != 1:
        found = f"got {given}" if given else "got none"
        raise _HTTPError(400, f"expected exactly one of {list(_INPUT_KEYS)}, {found}")
    key = given[0]
    value = payload[key]
    if key == "text":
        if not isinstance(value, str):
            raise _HTTPError(422, f"'text' must be a string, got {type(value).__name__}")
        return key, [_sentence(value, "text")]
    if key == "words":
        if not isinstance(value, list):
            raise _HTTPError(422, f"'words' must be a list of strings, got {type(value).__name__}")
        return key, [_sentence(value, "words")]
    if not isinstance(value, list):
        raise _HTTPError(422, f"'sentences' must be a list, got {type(value).__name__}")
    if not value:
        raise _HTTPError(400, "'sentences' is empty; send at least one sentence")
    if len(value) > max_sentences:
        raise _HTTPError(
            413, f"{len(value)} sentences in one request; the limit is {max_sentences}"
        )
    return key, [_sentence(v, f"sentences[{i}]") for i, v in enumerate(value)]


def _count_words(tagger: Tagger, sentence: Sentence, max_words: int) -> tuple[int, bool]:
    """Words as the tokenizer splits them, and whether that is all of them: counting stops
    once past ``max_words``.

    Pre-tokenizing holds the GIL, and its cost grows with the number of words it returns, so
    a 1 MB run of punctuation would stall the event loop for half a second. Long text is
    counted a piece at a time, cut at whitespace where there is some nearby (pre-tokenizers
    split there anyway), and counting stops as soon as the limit is certainly passed.
    """
    if isinstance(sentence, list):
        return len(sentence), True
    total = start = cuts = 0
    size = len(sentence)
    while start < size:
        end = start + _PIECE
        if end < size:
            space = _WHITESPACE.search(sentence, end, min(size, end + _PIECE))
            if space is not None:
                end = space.start()
            else:
                cuts += 1  # cut inside a word, which may then be counted twice
        else:
            end = size
        total += len(tagger.split_words(sentence[start:end]))
        start = end
        if total - cuts > max_words:
            return total - cuts, start >= size and cuts == 0
    if cuts:
        # Within the limit give or take the cut words: the exact count is cheap now.
        total = len(tagger.split_words(sentence))
    return total, True


def _check_words(
    tagger: Tagger, sentences: Sequence[Sentence], max_words: int, where: Callable[[int], str]
) -> None:
    for i, sentence in enumerate(sentences):
        n, whole = _count_words(tagger, sentence, max_words)
        if n > max_words:
            raise _HTTPError(
                413,
                f"{where(i)} has {'' if whole else 'at least '}{n} words; "
                f"the limit is {max_words} words per sentence",
            )


# -- limits and metrics ------------------------------------------------------------------------


@dataclass(frozen=True)
class _Limits:
    max_batch_sentences: int
    max_request_sentences: int
    max_request_bytes: int
    max_words: int
    max_queue_sentences: int
    max_wait_ms: float
    request_timeout_s: float
    body_timeout_s: float

    def check(self) -> None:
        for name, value in asdict(self).items():
            low_ok = value >= 0 if name == "max_wait_ms" else value > 0
            if not low_ok or (isinstance(value, float) and not math.isfinite(value)):
                bound = ">= 0" if name == "max_wait_ms" else "> 0"
                raise ValueError(f"{name} must be a finite number {bound}, got {value}")
        if self.max_queue_sentences < self.max_request_sentences:
            # Otherwise a request of the allowed size could never be admitted.
            raise ValueError(
                f"max_queue_sentences ({self.max_queue_sentences}) must be at least "
                f"max_request_sentences ({self.max_request_sentences})"
            )


class _Metrics:
    """Prometheus metrics in a registry of the app's own (several apps may share a process).

    ``pyxtask_http_requests_total{route,status}``, ``pyxtask_http_request_duration_seconds
    {route}`` (route: the path template, ``unmatched`` for unknown paths, so a scanner cannot
    grow the label set), ``pyxtask_batch_sentences`` and ``pyxtask_batch_duration_seconds``
    (per model call), ``pyxtask_queue_sentences`` (waiting for the model),
    ``pyxtask_refusals_total{reason}`` (queue_full, deadline, body_timeout, not_ready) and
    ``pyxtask_model_ready`` (1 once loaded, 0 while loading or shutting down).
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "pyxtask_http_requests", "HTTP requests answered", ["route", "status"], registry=r
        )
        self.latency = Histogram(
            "pyxtask_http_request_duration_seconds",
            "Time from a request's arrival to its answer",
            ["route"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.batch_sentences = Histogram(
            "pyxtask_batch_sentences",
            "Sentences per model call",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
            registry=r,
        )
        self.batch_seconds = Histogram(
            "pyxtask_batch_duration_seconds", "Time of one model call", registry=r
        )
        self.queue = Gauge(
            "pyxtask_queue_sentences", "Sentences waiting for a model call", registry=r
        )
        self.refusals = Counter(
            "pyxtask_refusals", "Requests refused by the server's limits", ["reason"], registry=r
        )
        for reason in _REASONS:  # every reason shows, at 0 until it happens
            self.refusals.labels(reason)
        self.ready = Gauge("pyxtask_model_ready", "1 when the model takes requests", registry=r)
        self._children: dict[tuple[str, int], tuple[Any, Any]] = {}

    def observe(self, route: str, status: int, seconds: float) -> None:
        key = (route, status)
        children = self._children.get(key)
        if children is None:  # labels() costs more than the update itself: once per pair
            children = (self.requests.labels(route, str(status)), self.latency.labels(route))
            self._children[key] = children
        children[0].inc()
        children[1].observe(seconds)


class _Metered:
    """ASGI middleware: every HTTP request's route, status and latency into :class:`_Metrics`."""

    def __init__(self, app: ASGIApp, metrics: _Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500  # what the server answers when the app raises before responding

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            # The router leaves the matched route in the scope: its template, not the path.
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.observe(route, status, time.perf_counter() - start)


# -- batching ---------------------------------------------------------------------------------


@dataclass(eq=False)
class _Job:
    sentences: list[Sentence]
    future: asyncio.Future[list[Tagged]]
    deadline: float  # event-loop time after which it is no longer started
    started: bool = False  # its model call has begun: it will finish
    queued: bool = True  # its sentences count against max_queue_sentences


@dataclass
class _Stats:
    requests: int = 0  # accepted into the queue
    sentences: int = 0
    batches: int = 0  # model calls (a failed batch retried request by request counts each)
    batch_requests: int = 0  # requests and sentences over all model calls, for the means
    batch_sentences: int = 0
    rejected: int = 0  # 4xx answers to tagging requests (/v1/tag, V2 infer)
    model_errors: int = 0  # requests that got a 500
    refused: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_REASONS, 0))

    def to_dict(self, queued: int) -> dict[str, Any]:
        batches = self.batches or 1  # the means are 0.0 before the first batch
        return {
            "requests": self.requests,
            "sentences": self.sentences,
            "batches": self.batches,
            "mean_batch_sentences": self.batch_sentences / batches,
            "mean_batch_requests": self.batch_requests / batches,
            "rejected": self.rejected,
            "model_errors": self.model_errors,
            "refused": dict(self.refused),
            "queued_sentences": queued,
        }


@dataclass
class _Batcher:
    tagger: Any  # a Tagger, or None until the model is loaded
    limits: _Limits
    metrics: _Metrics
    stats: _Stats = field(default_factory=_Stats)
    queued_sentences: int = 0
    _seconds_per_sentence: float | None = None  # moving average over recent model calls
    _queue: asyncio.Queue[_Job | None] | None = None
    _worker: asyncio.Task[None] | None = None
    closing: bool = False

    def start(self) -> None:
        """Start the worker (idempotent); called from the app's lifespan."""
        if self._worker is not None and not self._worker.done():
            return
        # A queue left by a worker that died keeps its jobs for the new worker; after close()
        # there is none, and a fresh queue binds to the current event loop.
        if self._queue is None:
            self._queue = asyncio.Queue()
        self.closing = False
        self._worker = asyncio.get_running_loop().create_task(self._work(self._queue))

    async def close(self) -> None:
        """Stop taking requests, finish every queued one, then stop the worker."""
        self.closing = True
        if self._worker is None or self._queue is None:
            return
        # The sentinel goes behind everything already queued (FIFO), so the worker drains the
        # queue before it sees it: graceful, no accepted request is dropped.
        self._queue.put_nowait(None)
        try:
            await self._worker
        except Exception:
            log.exception("the batching worker failed")
        self._worker = None
        self._queue = None

    def retry_after(self) -> int:
        """Seconds until the queue has likely drained (at least 1, at most 60)."""
        per = self._seconds_per_sentence or 0.0
        return min(60, max(1, math.ceil(self.queued_sentences * per)))

    def check_room(self, sentences: int) -> None:
        """503 unless ``sentences`` more sentences may queue now."""
        if self.closing:
            raise _HTTPError(503, "the server is shutting down", reason="not_ready")
        bound = self.limits.max_queue_sentences
        if self.queued_sentences + sentences > bound:
            wait = self.retry_after()
            raise _HTTPError(
                503,
                f"the server is at capacity ({self.queued_sentences} sentences wait for the "
                f"model; the limit is {bound}); retry in {wait} s",
                reason="queue_full",
                retry_after=wait,
            )

    def submit(self, sentences: list[Sentence]) -> _Job:
        """Queue one request's sentences, or refuse them (503) when the queue is full."""
        self.check_room(len(sentences))
        # Lazy start covers servers run without lifespan events (lifespan="off") and revives a
        # worker that died.
        self.start()
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        job = _Job(sentences, loop.create_future(), loop.time() + self.limits.request_timeout_s)
        # put_nowait right after the closing check, with no await between: a job can never land
        # behind the shutdown sentinel and wait forever.
        self._queue.put_nowait(job)
        self.queued_sentences += len(sentences)
        self.stats.requests += 1
        self.stats.sentences += len(sentences)
        return job

    def withdraw(self, job: _Job, exc: Exception | None = None) -> None:
        """Take a job that has not started out of the running: it will never be run. Its
        future gets ``exc`` (or is cancelled, when nobody waits for it any more)."""
        if job.started or job.future.done():
            return
        if exc is None:
            job.future.cancel()
        else:
            job.future.set_exception(exc)
        self._release(job)

    def expire(self, job: _Job) -> None:
        """At a job's deadline: 503 unless its model call has begun."""
        wait = self.retry_after()
        timeout = self.limits.request_timeout_s
        message = f"the model did not get to this request within {timeout:g} s; retry in {wait} s"
        self.withdraw(job, _HTTPError(503, message, reason="deadline", retry_after=wait))

    def _release(self, job: _Job) -> None:
        if job.queued:
            job.queued = False
            self.queued_sentences -= len(job.sentences)

    async def _work(self, queue: asyncio.Queue[_Job | None]) -> None:
        carry: _Job | None = None
        while True:
            job = carry if carry is not None else await queue.get()
            if job is None:
                return
            batch, carry, stop = await self._gather(queue, job)
            try:
                await self._run(batch)
            except Exception:  # the worker must outlive any bug in one batch
                log.exception("batch of %d request(s) failed", len(batch))
                for j in batch:
                    if not j.future.done():
                        j.future.set_exception(_ModelError("internal error while batching"))
            if stop:
                return

    async def _gather(
        self, queue: asyncio.Queue[_Job | None], job: _Job
    ) -> tuple[list[_Job], _Job | None, bool]:
        """A batch opened by ``job``, the request that opens the next one, and whether the
        shutdown sentinel was reached.

        Takes what queued while the model ran, then waits for more until the batch is full or
        max_wait has passed since its first request (not at all by default).
        """
        loop = asyncio.get_running_loop()
        batch = [job]
        count = len(job.sentences)
        deadline = loop.time() + self.limits.max_wait_ms / 1000.0
        while count < self.limits.max_batch_sentences:
            try:
                nxt = queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    nxt = await asyncio.wait_for(queue.get(), remaining)
                except asyncio.TimeoutError:
                    break
            if nxt is None:
                return batch, None, True
            if count + len(nxt.sentences) > self.limits.max_batch_sentences:
                return batch, nxt, False  # a request is never split; it opens the next batch
            batch.append(nxt)
            count += len(nxt.sentences)
        return batch, None, False

    async def _run(self, batch: list[_Job]) -> None:
        now = asyncio.get_running_loop().time()
        for j in batch:
            self._release(j)
        # A client that went away, or whose deadline passed, is not worth computing for; a job
        # already started (retried after a failed batch) is finished whatever the time.
        live = [j for j in batch if not j.future.done() and (j.started or now < j.deadline)]
        if not live:
            return
        for j in live:
            j.started = True
        sentences = [s for j in live for s in j.sentences]
        start = time.perf_counter()
        try:
            # In a thread so the event loop keeps accepting requests (which queue up as the next
            # batch); awaited here so only one model call runs at a time.
            results = await asyncio.to_thread(self.tagger.tag, sentences)
        except Exception as exc:
            self._count_batch(len(live), len(sentences), time.perf_counter() - start)
            await self._failed(live, exc)
            return
        self._count_batch(len(live), len(sentences), time.perf_counter() - start)
        offset = 0
        for j in live:
            n = len(j.sentences)
            self._settle(j, results=results[offset : offset + n])
            offset += n

    async def _failed(self, live: list[_Job], exc: Exception) -> None:
        if len(live) == 1:
            log.exception("tagging failed", exc_info=exc)
            self.stats.model_errors += 1
            self._settle(live[0], exc=_ModelError(f"{type(exc).__name__}: {exc}"))
            return
        # Validation should have caught every bad input; if one still slipped through,
        # retrying request by request fails only the request that caused it.
        for j in live:
            await self._run([j])

    def _count_batch(self, requests: int, sentences: int, seconds: float) -> None:
        self.stats.batches += 1
        self.stats.batch_requests += requests
        self.stats.batch_sentences += sentences
        self.metrics.batch_sentences.observe(sentences)
        self.metrics.batch_seconds.observe(seconds)
        per = seconds / max(1, sentences)
        old = self._seconds_per_sentence
        self._seconds_per_sentence = per if old is None else 0.8 * old + 0.2 * per

    @staticmethod
    def _settle(
        job: _Job, *, results: list[Tagged] | None = None, exc: Exception | None = None
    ) -> None:
        if job.future.done():  # cancelled meanwhile
            return
        if exc is not None:
            job.future.set_exception(exc)
        else:
            job.future.set_result(results or [])


_WATCH_AFTER_S = 0.05  # most answers come sooner; watching a connection costs a task


async def _watch(batcher: _Batcher, job: _Job, receive: Receive) -> None:
    """Withdraws ``job`` when its client closes the connection (the body must have been
    read)."""
    while (await receive())["type"] != "http.disconnect":
        pass
    batcher.withdraw(job, _ClientGone())


async def _outcome(batcher: _Batcher, job: _Job, receive: Receive) -> list[Tagged]:
    """The job's results; 503 if it has not started by its deadline, :class:`_ClientGone` if
    the client leaves before (either way its sentences are then never run).

    Timers rather than a task per request: on a busy server most requests are answered
    within a few milliseconds, and only those still waiting get a task that watches their
    connection.
    """
    loop = asyncio.get_running_loop()
    watcher: list[asyncio.Task[None]] = []

    def watch() -> None:
        if not job.future.done():
            watcher.append(loop.create_task(_watch(batcher, job, receive)))

    expiry = loop.call_at(job.deadline, batcher.expire, job)
    watching = loop.call_later(_WATCH_AFTER_S, watch)
    try:
        return await job.future
    finally:
        expiry.cancel()
        watching.cancel()
        for task in watcher:
            task.cancel()
        batcher.withdraw(job)  # a no-op unless this handler was cancelled while queued


# -- the model --------------------------------------------------------------------------------


class _Model:
    """The tagger, given loaded or loaded in the background once the server runs, so that the
    server answers liveness (and 503 to the rest) while a large bundle loads."""

    def __init__(
        self,
        tagger: Tagger | None,
        loader: Callable[[], Tagger] | None,
        name: str | None,
        on_load: Callable[[Tagger], None],
    ) -> None:
        self.tagger = tagger
        self.error: Exception | None = None
        self._loader = loader
        self._name = name
        self._on_load = on_load
        self._loading: asyncio.Task[None] | None = None

    @property
    def name(self) -> str | None:
        if self._name is not None:
            return self._name
        return None if self.tagger is None else self.tagger.task

    def start_loading(self) -> None:
        """Start loading (idempotent) on the running event loop."""
        if self.tagger is None and self._loader is not None and self._loading is None:
            self._loading = asyncio.get_running_loop().create_task(self._load(self._loader))

    async def _load(self, loader: Callable[[], Tagger]) -> None:
        def load_and_warm() -> Tagger:
            tagger = loader()
            tagger.tag(["warm up"])  # onnxruntime's first call allocates: not on a client's time
            return tagger

        try:
            tagger = await asyncio.to_thread(load_and_warm)
        except Exception as exc:
            self.error = exc
            # A bad bundle is the operator's mistake: one line. Anything else: the traceback.
            log.error(
                "the model failed to load: %s",
                exc,
                exc_info=not isinstance(exc, (BundleError, OSError)),
            )
            return
        self.tagger = tagger
        self._on_load(tagger)
        log.info("model %r loaded", self.name)

    def get(self) -> Tagger:
        """The tagger, or 503 while it loads (or if it failed to)."""
        if self.tagger is not None:
            return self.tagger
        self.start_loading()
        if self.error is not None:
            raise _HTTPError(503, f"the model failed to load: {self.error}", reason="not_ready")
        raise _HTTPError(503, "the model is still loading", reason="not_ready", retry_after=1)


def _server_version() -> str:
    try:
        return importlib.metadata.version("pyxtask")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


# -- the OpenAPI schema -------------------------------------------------------------------------


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TagSentences(_Closed):
    sentences: list[str | list[str]] = Field(
        min_length=1,
        description="raw sentences (split by the bundle's tokenizer) or lists of words; at "
        "most limits.max_request_sentences, each at most limits.max_words words",
    )


class TagText(_Closed):
    text: str = Field(description="one raw sentence")


class TagWords(_Closed):
    words: list[str] = Field(description="one sentence, already split into words")


class TagRequest(RootModel[TagSentences | TagText | TagWords]):
    """Exactly one of ``sentences``, ``text`` or ``words``."""


class TokenResult(BaseModel):
    words: list[str]
    labels: list[str | None] = Field(description="null: a word the tokenizer drops entirely")
    scores: list[float]


class SentenceResult(BaseModel):
    label: str
    score: float
    probabilities: dict[str, float]


class TagResponse(BaseModel):
    results: list[TokenResult | SentenceResult]
    task: str
    variant: str


class ErrorResponse(BaseModel):
    error: str


class Health(BaseModel):
    status: str


class Live(BaseModel):
    live: bool


class Ready(BaseModel):
    ready: bool


class ModelReady(BaseModel):
    name: str
    ready: bool


_WHY = {
    400: "a malformed request",
    404: "no such model or version",
    408: "the body did not arrive within limits.body_timeout_s (the connection is closed)",
    413: "over a size limit (limits in /v1/metadata)",
    422: "a JSON value of the wrong type",
    500: "the model failed on this request",
    503: "not ready, shutting down, at capacity, or not started within "
    "limits.request_timeout_s: retry after Retry-After seconds",
}
_RETRY_AFTER = {"Retry-After": {"description": "seconds", "schema": {"type": "integer"}}}


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {
        status: {
            "model": ErrorResponse,
            "description": _WHY[status],
            **({"headers": _RETRY_AFTER} if status == 503 else {}),
        }
        for status in statuses
    }


_TAG_ERRORS = _errors(400, 408, 413, 422, 500, 503)
_INFER_ERRORS = _errors(400, 404, 408, 413, 500, 503)
# The handlers read their bodies themselves (size and time limits, exact messages); these are
# the schemas they enforce, put into the OpenAPI document by _openapi.
_REQUEST_BODIES = {"/v1/tag": TagRequest, "/v2/models/{name}/infer": _v2.InferRequest}
_REQUEST_BODIES["/v2/models/{name}/versions/{version}/infer"] = _v2.InferRequest


def _openapi(app: FastAPI, limits: _Limits) -> dict[str, Any]:
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        models: list[tuple[type[BaseModel], Literal["validation"]]] = [
            (TagRequest, "validation"),
            (_v2.InferRequest, "validation"),
        ]
        _, defs = models_json_schema(models, ref_template="#/components/schemas/{model}")
        schema.setdefault("components", {}).setdefault("schemas", {}).update(defs["$defs"])
        for path, model in _REQUEST_BODIES.items():
            ref = {"$ref": f"#/components/schemas/{model.__name__}"}
            schema["paths"][path]["post"]["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": ref}},
            }
        _drop_validation_errors(schema)
        _describe_limits(schema["components"]["schemas"], limits)
        app.openapi_schema = schema
    return app.openapi_schema


def _describe_limits(schemas: dict[str, Any], limits: _Limits) -> None:
    """This app's sentence limit in its request schemas, and the V2 input's ``data`` required:
    a JSON body needs it (a body in the binary tensor extension is not JSON, and carries the
    sentences after its JSON header instead)."""
    most = limits.max_request_sentences
    schemas["TagSentences"]["properties"]["sentences"]["maxItems"] = most
    tensor = schemas["RequestInput"]
    tensor["properties"]["shape"]["items"]["maximum"] = most
    tensor["properties"]["data"] = {
        "type": "array",
        "items": {"type": "string"},
        "minItems": 1,
        "maxItems": most,
        "description": "the n sentences (n as in shape)",
    }
    tensor["required"] = [*tensor["required"], "data"]


def _drop_validation_errors(schema: dict[str, Any]) -> None:
    """FastAPI declares its own 422 on every route with a path parameter; here a path
    parameter is any string, and every error is an ``ErrorResponse``, so that 422 never
    happens."""
    for operations in schema["paths"].values():
        for operation in operations.values():
            declared = operation["responses"].get("422", {})
            if "HTTPValidationError" in json.dumps(declared):
                del operation["responses"]["422"]
    for name in ("HTTPValidationError", "ValidationError"):
        schema["components"]["schemas"].pop(name, None)


# -- the app ----------------------------------------------------------------------------------


def create_app(
    tagger: Tagger | None = None,
    *,
    loader: Callable[[], Tagger] | None = None,
    model_name: str | None = None,
    max_batch_sentences: int = 64,
    max_wait_ms: float = 0.0,
    max_request_sentences: int = 256,
    max_request_bytes: int = 1_000_000,
    max_words: int = 512,
    max_queue_sentences: int | None = None,
    request_timeout_s: float = 10.0,
    body_timeout_s: float = 10.0,
) -> fastapi.FastAPI:
    """A FastAPI app serving ``tagger`` (see the module docstring for the endpoints).

    Args:
        tagger: the loaded bundle; or
        loader: makes the tagger, called in a thread once the server runs: until it returns,
            the server is live but not ready (503 to everything that needs the model).
        model_name: the model's name in the V2 protocol (default: the bundle's task).
        max_batch_sentences: most sentences per model call (one request is never split, so a
            request with more sentences runs as a batch of its own).
        max_wait_ms: how long a batch waits, from its first request, for more requests (0: it
            takes what queued while the previous batch ran and starts at once).
        max_request_sentences: most sentences in one request (413 beyond).
        max_request_bytes: largest request body (413 beyond).
        max_words: most words in one sentence, as the bundle's tokenizer splits raw text
            (413 beyond).
        max_queue_sentences: most sentences waiting for the model; a request that would pass
            it gets 503 with Retry-After at once (default: 4 full batches, and at least
            ``max_request_sentences``).
        request_timeout_s: longest a request waits for its model call, from when it was
            queued; then it gets 503 and is never run (a call that has begun is finished).
        body_timeout_s: longest the whole request body may take to arrive (408 beyond).
    """
    if (tagger is None) == (loader is None):
        raise ValueError("create_app takes a tagger or a loader (exactly one)")
    if max_queue_sentences is None:
        max_queue_sentences = max(4 * max_batch_sentences, max_request_sentences)
    limits = _Limits(
        max_batch_sentences=max_batch_sentences,
        max_request_sentences=max_request_sentences,
        max_request_bytes=max_request_bytes,
        max_words=max_words,
        max_queue_sentences=max_queue_sentences,
        max_wait_ms=float(max_wait_ms),
        request_timeout_s=float(request_timeout_s),
        body_timeout_s=float(body_timeout_s),
    )
    limits.check()
    metrics = _Metrics()
    batcher = _Batcher(tagger, limits, metrics)

    def loaded(t: Tagger) -> None:
        batcher.tagger = t

    model = _Model(tagger, loader, model_name, loaded)
    metrics.queue.set_function(lambda: batcher.queued_sentences)
    metrics.ready.set_function(lambda: float(model.tagger is not None and not batcher.closing))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        model.start_loading()
        try:
            yield
        finally:
            await batcher.close()

    app = FastAPI(
        title="pyxtask tagger",
        version=_server_version(),
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.openapi = lambda: _openapi(app, limits)  # type: ignore[method-assign]
    app.state.batcher = batcher
    app.state.model = model
    app.state.metrics = metrics
    app.add_middleware(_Metered, metrics=metrics)

    # Routing errors (404, 405) get the same {"error": ...} shape as everything else.
    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail))

    async def answer(handle: Awaitable[Response], *, tagging: bool = False) -> Response:
        """``handle``'s response, or the error response it raised (counted in the stats)."""
        try:
            return await handle
        except _HTTPError as exc:
            if exc.reason is not None:
                batcher.stats.refused[exc.reason] += 1
                metrics.refusals.labels(exc.reason).inc()
            elif exc.status < 500 and tagging:
                batcher.stats.rejected += 1
            return exc.response()
        except _v2.InferError as exc:
            batcher.stats.rejected += 1
            return _error(exc.status, exc.message)
        except _ClientGone:
            log.debug("the client closed the connection before its answer")
            return Response(status_code=_CLIENT_GONE)
        except _ModelError as exc:
            return _error(500, f"model error: {exc}")

    async def read(request: Request) -> bytes:
        body = await _read_body_within(request, max_request_bytes, limits.body_timeout_s)
        # Refusing costs the least before the body is parsed: under overload most requests
        # are refused, and their parsing would take time from the model.
        batcher.check_room(1)
        return body

    async def run(
        request: Request, tagger: Tagger, sentences: list[Sentence], where: Callable[[int], str]
    ) -> list[Tagged]:
        batcher.check_room(len(sentences))  # before the words are counted, for the same reason
        _check_words(tagger, sentences, max_words, where)
        job = batcher.submit(sentences)
        return await _outcome(batcher, job, request.receive)

    @app.post("/v1/tag", response_model=TagResponse, responses=_TAG_ERRORS)
    async def tag(request: Request) -> Response:
        async def handle() -> Response:
            body = await read(request)
            key, sentences = _parse(body, max_sentences=max_request_sentences)
            tagger = model.get()

            def where(i: int) -> str:
                return f"sentences[{i}]" if key == "sentences" else f"'{key}'"

            results = await run(request, tagger, sentences, where)
            return JSONResponse(
                {
                    "results": [r.to_dict() for r in results],
                    "task": tagger.task,
                    "variant": tagger.variant,
                }
            )

        return await answer(handle(), tagging=True)

    @app.get("/healthz", response_model=Health)
    async def healthz() -> JSONResponse:
        return JSONResponse({"status": "ok"})

    @app.get("/v1/metadata", response_model=dict[str, Any], responses=_errors(503))
    async def metadata() -> Response:
        async def handle() -> Response:
            info = dict(model.get().metadata)
            info["model_name"] = model.name
            info["limits"] = asdict(limits)
            info["stats"] = batcher.stats.to_dict(batcher.queued_sentences)
            return JSONResponse(info)

        return await answer(handle())

    @app.get(
        "/metrics",
        response_class=Response,
        responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
    )
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    _add_v2_routes(app, model=model, batcher=batcher, answer=answer, read=read, run=run)
    return app


# -- the Open Inference Protocol (V2) routes ----------------------------------------------------


def _add_v2_routes(
    app: FastAPI,
    *,
    model: _Model,
    batcher: _Batcher,
    answer: Callable[..., Awaitable[Response]],
    read: Callable[[Request], Awaitable[bytes]],
    run: Callable[..., Awaitable[list[Tagged]]],
) -> None:
    def resolve(name: str, version: str | None) -> None:
        """404 unless ``name`` (and ``version``) is this server's model."""
        known = model.name
        if known is None:
            model.get()  # loading, and no name was given: 503 until the bundle tells it
            known = model.name
        if name != known:
            raise _HTTPError(404, f"unknown model {name!r}; this server serves {known!r}")
        if version is not None and version != _v2.VERSION:
            raise _HTTPError(
                404, f"model {name!r} has no version {version!r}; it has [{_v2.VERSION!r}]"
            )

    def ready() -> bool:
        return model.tagger is not None and not batcher.closing

    @app.get("/v2/health/live", response_model=Live)
    async def live() -> JSONResponse:
        return JSONResponse({"live": True})

    @app.get("/v2/health/ready", response_model=Ready, responses=_errors(503))
    async def server_ready() -> JSONResponse:
        if ready():
            return JSONResponse({"ready": True})
        return _not_ready(model, batcher)

    @app.get("/v2", response_model=_v2.ServerMetadata)
    async def server_metadata() -> JSONResponse:
        return JSONResponse(
            {"name": "pyxtask", "version": _server_version(), "extensions": ["binary_tensor_data"]}
        )

    async def model_metadata(name: str, version: str | None) -> Response:
        async def handle() -> Response:
            resolve(name, version)
            t = model.get()
            return JSONResponse(_v2.model_metadata(name, t.kind, t.task, t.labels))

        return await answer(handle())

    async def model_ready(name: str, version: str | None) -> Response:
        async def handle() -> Response:
            resolve(name, version)
            if ready():
                return JSONResponse({"name": name, "ready": True})
            return _not_ready(model, batcher)

        return await answer(handle())

    async def infer(request: Request, name: str, version: str | None) -> Response:
        async def handle() -> Response:
            resolve(name, version)
            t = model.get()
            body = await read(request)
            specs = _v2.output_specs(t.kind, t.labels)
            call = _v2.parse_infer(
                body,
                request.headers.get(_v2.HEADER_LENGTH),
                max_sentences=batcher.limits.max_request_sentences,
                outputs=[n for n, _, _ in specs],
            )
            for i, sentence in enumerate(call.sentences):
                _check_string(sentence, f"{_v2.INPUT}[{i}]")
            results = await run(request, t, list(call.sentences), lambda i: f"{_v2.INPUT}[{i}]")
            content, headers = _v2.encode_response(
                model_name=name, kind=t.kind, labels=t.labels, call=call, results=results
            )
            return Response(content, headers=headers)

        return await answer(handle(), tagging=True)

    meta: dict[str, Any] = {"response_model": _v2.ModelMetadata, "responses": _errors(404, 503)}
    status: dict[str, Any] = {"response_model": ModelReady, "responses": _errors(404, 503)}
    infers: dict[str, Any] = {
        "response_model": _v2.InferResponse,
        "responses": {
            **_INFER_ERRORS,
            200: {"content": {"application/octet-stream": {}}},  # binary outputs
        },
    }

    @app.get("/v2/models/{name}", **meta)
    async def v2_model(name: str) -> Response:
        return await model_metadata(name, None)

    @app.get("/v2/models/{name}/versions/{version}", **meta)
    async def v2_model_version(name: str, version: str) -> Response:
        return await model_metadata(name, version)

    @app.get("/v2/models/{name}/ready", **status)
    async def v2_model_ready(name: str) -> Response:
        return await model_ready(name, None)

    @app.get("/v2/models/{name}/versions/{version}/ready", **status)
    async def v2_model_version_ready(name: str, version: str) -> Response:
        return await model_ready(name, version)

    @app.post("/v2/models/{name}/infer", **infers)
    async def v2_infer(request: Request, name: str) -> Response:
        return await infer(request, name, None)

    @app.post("/v2/models/{name}/versions/{version}/infer", **infers)
    async def v2_infer_version(request: Request, name: str, version: str) -> Response:
        return await infer(request, name, version)


def _not_ready(model: _Model, batcher: _Batcher) -> JSONResponse:
    if batcher.closing:
        message = "the server is shutting down"
    elif model.error is not None:
        message = f"the model failed to load: {model.error}"
    else:
        message = "the model is still loading"
    return JSONResponse({"error": message}, status_code=503, headers={"Retry-After": "1"})


# -- running it -------------------------------------------------------------------------------


def serve(
    bundle: str | os.PathLike[str],
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    variant: str = "fp32",
    threads: int | None = None,
    model_name: str | None = None,
    log_level: str = "info",
    access_log: bool = True,
    **limits: Any,
) -> None:
    """Serve ``bundle`` until SIGINT/SIGTERM (blocking); ``limits`` are :func:`create_app`'s
    (``max_batch_sentences``, ``max_wait_ms``, ``max_queue_sentences``, ...).

    The manifest is checked before the port is bound, so a wrong folder or variant fails at
    once; the model then loads while the server already answers liveness (readiness: 503 until
    it is loaded). If loading fails the server stops and the error is raised here. On a signal
    uvicorn stops accepting connections, lets in-flight requests finish (up to 10 s), then the
    lifespan shutdown finishes anything still queued.
    """
    manifest = read_manifest(bundle, verify=False)
    if variant not in manifest["variants"]:
        raise BundleError(
            f"bundle {os.fspath(bundle)!r} has no {variant!r} model; it has "
            f"{sorted(manifest['variants'])}"
        )
    server: uvicorn.Server | None = None

    def load() -> Tagger:
        try:
            return Tagger(bundle, variant, threads=threads)
        except Exception:
            if server is not None:
                server.should_exit = True  # nothing to serve: stop, and raise below
            raise

    app = create_app(loader=load, model_name=model_name or manifest["task"], **limits)
    # The server's own lines (a stalled body, the model loaded) in uvicorn's format, beside its.
    log_config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    log_config["loggers"]["pyxtask.serving"] = {
        "handlers": ["default"],
        "level": log_level.upper(),
        "propagate": False,
    }
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        log_config=log_config,
        access_log=access_log,
        timeout_graceful_shutdown=10,
    )
    server = uvicorn.Server(config)
    server.run()
    error = app.state.model.error
    if error is not None:
        raise error
