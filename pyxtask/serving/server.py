"""HTTP serving of a bundle: FastAPI + uvicorn, with dynamic batching across requests.

Endpoints:

* ``POST /v1/tag`` takes one of ``{"sentences": [...]}`` (each a string or a list of words),
  ``{"text": "..."}`` or ``{"words": [...]}`` and answers
  ``{"results": [...], "task": ..., "variant": ...}`` in request order.
* ``GET /healthz`` answers ``{"status": "ok"}``.
* ``GET /v1/metadata`` answers the tagger's metadata, the server's limits and batching stats.

Every client error is a 4xx with ``{"error": "..."}``: requests are validated completely before
they reach the model, so one malformed request can never fail a batch it would have shared with
others. Concurrent requests are merged into one ``Tagger.tag`` call by a single background
worker (at most ``max_batch_sentences`` sentences), and only one model call runs at a time so
onnxruntime has every core to itself. By default a batch is whatever queued while the previous
model call ran (``max_wait_ms=0``, as Triton's dynamic batcher does): under load batches form
without waiting, and the event loop answers one batch and reads the next while the model runs.
A wait lets batches grow past that, which pays only where bigger batches are much cheaper per
sentence (GPUs); on CPU it idles the model (a 5 ms wait cost 20 % of served throughput here).

Only onnxruntime, numpy, tokenizers, fastapi and uvicorn are needed: nothing here imports
torch or anything from pyxtask outside :mod:`pyxtask.serving`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import fastapi
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from pyxtask.serving.tagger import Tagged, Tagger

__all__ = ["create_app", "serve"]

log = logging.getLogger("pyxtask.serving")

Sentence = str | list[str]
_INPUT_KEYS = ("sentences", "text", "words")
_PIECE = 4096  # characters pre-tokenized at a time when counting a long sentence's words
_WHITESPACE = re.compile(r"\s")


class _ClientError(Exception):
    """A request the client must fix; becomes ``{"error": message}`` with ``status``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


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
            raise _ClientError(400, f"invalid Content-Length header {declared!r}") from None
        if length > limit:
            raise _ClientError(413, f"request body is {length} bytes; the limit is {limit} bytes")
    chunks: list[bytes] = []
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise _ClientError(413, f"request body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _check_string(value: str, where: str) -> None:
    # A lone surrogate ("\ud800") is valid JSON but cannot be handed to the Rust tokenizer;
    # caught here it is this request's 400 instead of a failed batch.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _ClientError(
            400, f"{where} contains an invalid unicode character (a lone surrogate)"
        ) from None


def _sentence(value: object, where: str) -> Sentence:
    if isinstance(value, str):
        _check_string(value, where)
        return value
    if isinstance(value, list):
        for j, word in enumerate(value):
            if not isinstance(word, str):
                raise _ClientError(
                    422,
                    f"{where}[{j}] must be a string (a word), got {type(word).__name__}; "
                    f"{where} must be a string or a list of strings",
                )
            _check_string(word, f"{where}[{j}]")
        return list(value)
    raise _ClientError(
        422, f"{where} must be a string or a list of strings, got {type(value).__name__}"
    )


def _parse(body: bytes, *, max_sentences: int) -> tuple[str, list[Sentence]]:
    """The request's input key and sentences, or a :class:`_ClientError` naming the problem."""
    example = 'send JSON like {"sentences": ["a sentence", ["pre", "split"]]}'
    if not body.strip():
        raise _ClientError(400, f"request body is empty; {example}")
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, bad UTF-8, huge ints, depth
        raise _ClientError(400, f"request body is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise _ClientError(
            422, f"request body must be a JSON object, got {type(payload).__name__}; {example}"
        )
    unknown = sorted(k for k in payload if k not in _INPUT_KEYS)
    if unknown:
        raise _ClientError(
            400, f"unknown field(s) {unknown}; expected exactly one of {list(_INPUT_KEYS)}"
        )
    given = [k for k in _INPUT_KEYS if k in payload]
    if len(given) != 1:
        found = f"got {given}" if given else "got none"
        raise _ClientError(400, f"expected exactly one of {list(_INPUT_KEYS)}, {found}")
    key = given[0]
    value = payload[key]
    if key == "text":
        if not isinstance(value, str):
            raise _ClientError(422, f"'text' must be a string, got {type(value).__name__}")
        return key, [_sentence(value, "text")]
    if key == "words":
        if not isinstance(value, list):
            raise _ClientError(
                422, f"'words' must be a list of strings, got {type(value).__name__}"
            )
        return key, [_sentence(value, "words")]
    if not isinstance(value, list):
        raise _ClientError(422, f"'sentences' must be a list, got {type(value).__name__}")
    if not value:
        raise _ClientError(400, "'sentences' is empty; send at least one sentence")
    if len(value) > max_sentences:
        raise _ClientError(
            413, f"{len(value)} sentences in one request; the limit is {max_sentences}"
        )
    return key, [_sentence(v, f"sentences[{i}]") for i, v in enumerate(value)]


# -- batching ---------------------------------------------------------------------------------


@dataclass
class _Job:
    sentences: list[Sentence]
    future: asyncio.Future[list[Tagged]]


@dataclass
class _Stats:
    requests: int = 0  # accepted into the queue
    sentences: int = 0
    batches: int = 0  # model calls (a failed batch retried request by request counts each)
    batch_requests: int = 0  # requests and sentences over all model calls, for the means
    batch_sentences: int = 0
    rejected: int = 0  # 4xx answers from /v1/tag
    model_errors: int = 0  # requests that got a 500

    def to_dict(self) -> dict[str, Any]:
        batches = self.batches or 1  # the means are 0.0 before the first batch
        return {
            "requests": self.requests,
            "sentences": self.sentences,
            "batches": self.batches,
            "mean_batch_sentences": self.batch_sentences / batches,
            "mean_batch_requests": self.batch_requests / batches,
            "rejected": self.rejected,
            "model_errors": self.model_errors,
        }


@dataclass
class _Batcher:
    tagger: Tagger
    max_batch_sentences: int
    max_wait_s: float
    stats: _Stats = field(default_factory=_Stats)
    _queue: asyncio.Queue[_Job | None] | None = None
    _worker: asyncio.Task[None] | None = None
    _closing: bool = False

    def start(self) -> None:
        """Start the worker (idempotent); called from the app's lifespan."""
        if self._worker is not None and not self._worker.done():
            return
        # A queue left by a worker that died keeps its jobs for the new worker; after close()
        # there is none, and a fresh queue binds to the current event loop.
        if self._queue is None:
            self._queue = asyncio.Queue()
        self._closing = False
        self._worker = asyncio.get_running_loop().create_task(self._work(self._queue))

    async def close(self) -> None:
        """Stop taking requests, finish every queued one, then stop the worker."""
        self._closing = True
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

    def submit(self, sentences: list[Sentence]) -> asyncio.Future[list[Tagged]]:
        """Queue one request's sentences; the future gets its results in order."""
        if self._closing:
            raise _ClientError(503, "the server is shutting down")
        # Lazy start covers servers run without lifespan events (lifespan="off") and revives a
        # worker that died.
        self.start()
        assert self._queue is not None
        future: asyncio.Future[list[Tagged]] = asyncio.get_running_loop().create_future()
        # put_nowait right after the closing check, with no await between: a job can never land
        # behind the shutdown sentinel and wait forever.
        self._queue.put_nowait(_Job(sentences, future))
        self.stats.requests += 1
        self.stats.sentences += len(sentences)
        return future

    async def _work(self, queue: asyncio.Queue[_Job | None]) -> None:
        loop = asyncio.get_running_loop()
        carry: _Job | None = None
        while True:
            job = carry if carry is not None else await queue.get()
            carry = None
            if job is None:
                return
            batch = [job]
            count = len(job.sentences)
            stop = False
            deadline = loop.time() + self.max_wait_s
            # Take what queued while the model ran, then wait for more until the batch is full or
            # max_wait has passed since its first request (not at all by default).
            while count < self.max_batch_sentences:
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
                    stop = True
                    break
                if count + len(nxt.sentences) > self.max_batch_sentences:
                    carry = nxt  # a request is never split; it opens the next batch
                    break
                batch.append(nxt)
                count += len(nxt.sentences)
            try:
                await self._run(batch)
            except Exception:  # the worker must outlive any bug in one batch
                log.exception("batch of %d request(s) failed", len(batch))
                for j in batch:
                    if not j.future.done():
                        j.future.set_exception(_ModelError("internal error while batching"))
            if stop:
                return

    async def _run(self, batch: list[_Job]) -> None:
        # A client that went away cancelled its future; its sentences are not worth computing.
        live = [j for j in batch if not j.future.done()]
        if not live:
            return
        sentences = [s for j in live for s in j.sentences]
        try:
            # In a thread so the event loop keeps accepting requests (which queue up as the next
            # batch); awaited here so only one model call runs at a time.
            results = await asyncio.to_thread(self.tagger.tag, sentences)
            self._count_batch(len(live), len(sentences))
        except Exception as exc:
            self._count_batch(len(live), len(sentences))
            if len(live) == 1:
                log.exception("tagging failed")
                self.stats.model_errors += 1
                self._settle(live[0], exc=_ModelError(f"{type(exc).__name__}: {exc}"))
                return
            # Validation should have caught every bad input; if one still slipped through,
            # retrying request by request fails only the request that caused it.
            for j in live:
                await self._run([j])
            return
        offset = 0
        for j in live:
            n = len(j.sentences)
            self._settle(j, results=results[offset : offset + n])
            offset += n

    def _count_batch(self, requests: int, sentences: int) -> None:
        self.stats.batches += 1
        self.stats.batch_requests += requests
        self.stats.batch_sentences += sentences

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


# -- the app ----------------------------------------------------------------------------------


def create_app(
    tagger: Tagger,
    *,
    max_batch_sentences: int = 64,
    max_wait_ms: float = 0.0,
    max_request_sentences: int = 256,
    max_request_bytes: int = 1_000_000,
    max_words: int = 512,
) -> fastapi.FastAPI:
    """A FastAPI app serving ``tagger`` (see the module docstring for the endpoints).

    Args:
        tagger: the loaded bundle.
        max_batch_sentences: most sentences per model call (one request is never split, so a
            request with more sentences runs as a batch of its own).
        max_wait_ms: how long a batch waits, from its first request, for more requests (0: it
            takes what queued while the previous batch ran and starts at once).
        max_request_sentences: most sentences in one request (413 beyond).
        max_request_bytes: largest request body (413 beyond).
        max_words: most words in one sentence, as the bundle's tokenizer splits raw text
            (413 beyond).
    """
    limits = {
        "max_batch_sentences": max_batch_sentences,
        "max_request_sentences": max_request_sentences,
        "max_request_bytes": max_request_bytes,
        "max_words": max_words,
    }
    for name, value in limits.items():
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if max_wait_ms < 0:
        raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
    batcher = _Batcher(tagger, max_batch_sentences, max_wait_ms / 1000.0)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        try:
            yield
        finally:
            await batcher.close()

    app = FastAPI(
        title="pyxtask tagger",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.batcher = batcher

    # Routing errors (404, 405) get the same {"error": ...} shape as everything else.
    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail))

    def count_words(sentence: Sentence) -> tuple[int, bool]:
        """Words as the tokenizer splits them, and whether that is all of them: counting stops
        once past ``max_words``.

        Pre-tokenizing holds the GIL, and its cost grows with the number of words it returns,
        so a 1 MB run of punctuation would stall the event loop for half a second. Long text is
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

    @app.post("/v1/tag")
    async def tag(request: Request) -> JSONResponse:
        try:
            body = await _read_body(request, max_request_bytes)
            key, sentences = _parse(body, max_sentences=max_request_sentences)
            for i, sentence in enumerate(sentences):
                n, whole = count_words(sentence)
                if n > max_words:
                    where = f"sentences[{i}]" if key == "sentences" else f"'{key}'"
                    raise _ClientError(
                        413,
                        f"{where} has {'' if whole else 'at least '}{n} words; "
                        f"the limit is {max_words} words per sentence",
                    )
            future = batcher.submit(sentences)
        except _ClientError as exc:
            batcher.stats.rejected += 1
            return _error(exc.status, exc.message)
        try:
            results = await future
        except _ModelError as exc:
            return _error(500, f"model error: {exc}")
        return JSONResponse(
            {
                "results": [r.to_dict() for r in results],
                "task": tagger.task,
                "variant": tagger.variant,
            }
        )

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        return JSONResponse({"status": "ok"})

    @app.get("/v1/metadata")
    async def metadata() -> JSONResponse:
        info = dict(tagger.metadata)
        info["limits"] = {**limits, "max_wait_ms": max_wait_ms}
        info["stats"] = batcher.stats.to_dict()
        return JSONResponse(info)

    return app


def serve(
    bundle: str | os.PathLike[str],
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    variant: str = "fp32",
    threads: int | None = None,
    max_batch_sentences: int = 64,
    max_wait_ms: float = 0.0,
    log_level: str = "info",
    access_log: bool = True,
) -> None:
    """Load ``bundle`` and serve it until SIGINT/SIGTERM (blocking).

    On a signal uvicorn stops accepting connections, lets in-flight requests finish (up to
    10 s), then the lifespan shutdown finishes anything still queued.
    """
    tagger = Tagger(bundle, variant, threads=threads)
    app = create_app(tagger, max_batch_sentences=max_batch_sentences, max_wait_ms=max_wait_ms)
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level=log_level,
        access_log=access_log,
        timeout_graceful_shutdown=10,
    )
