"""A load generator for ``pyxtask serve``: concurrent clients POSTing to ``/v1/tag``.

Run against a live server::

    python benchmarks/load_test.py --url http://127.0.0.1:8000/v1/tag \\
        --clients 8 --requests 50 --sentences-file sentences.txt --per-request 4

or import :func:`run_load` (``benchmarks/bench_serving.py`` does, after putting this folder on
``sys.path``). Each client is a thread with its own keep-alive connection (the standard
library's ``http.client``: cheap on CPU, which matters when the generator shares a small
machine with the server), so the server sees ``clients`` concurrent connections; a request
counts as an error unless it answers 200 with one result per sentence sent.
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import json
import math
import sys
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any

DEFAULT_SENTENCES = [
    "The quick brown fox jumps over the lazy dog .",
    "Zoë bought a naïve painting in Tokyo 日本 🙂",
    "Cross-task learning reuses what one task taught for another .",
    "She said no .",
]


def _expected_results(payload: dict[str, Any]) -> int:
    if "sentences" in payload and isinstance(payload["sentences"], list):
        return len(payload["sentences"])
    return 1  # {"text": ...} or {"words": [...]}


def _percentile(sorted_values: list[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation; nan for no values."""
    if not sorted_values:
        return math.nan
    k = (len(sorted_values) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


def run_load(
    url: str,
    payloads: list[dict[str, Any]],
    *,
    clients: int = 8,
    requests_per_client: int = 50,
    timeout: float = 30.0,
) -> dict[str, Any]:
    """POST ``payloads`` (cycled) to ``url`` from ``clients`` threads, ``requests_per_client``
    requests each, and report throughput and latency.

    Returns ``requests``, ``errors``, ``sentences`` (in successful requests), ``seconds`` (wall
    time of the whole run), ``requests_per_s``, ``sentences_per_s``, and the latency of
    successful requests in milliseconds: ``p50_ms``, ``p99_ms``, ``mean_ms``.
    """
    if not payloads:
        raise ValueError("run_load needs at least one payload")
    if clients < 1 or requests_per_client < 0:
        raise ValueError("clients must be >= 1 and requests_per_client >= 0")
    lock = threading.Lock()
    latencies: list[float] = []
    errors = 0
    sentences = 0
    # All clients start together, so the run measures concurrency, not thread start-up.
    barrier = threading.Barrier(clients + 1)

    def client(index: int) -> None:
        nonlocal errors, sentences
        mine: list[float] = []
        my_errors = my_sentences = 0
        # Each client starts at a different payload so concurrent requests differ.
        cycle = itertools.islice(itertools.cycle(payloads), index, None)
        parts = urllib.parse.urlsplit(url)
        path = parts.path or "/"

        def connect() -> http.client.HTTPConnection:
            return http.client.HTTPConnection(
                parts.hostname or "127.0.0.1", parts.port or 80, timeout=timeout
            )

        # The standard library's client, one keep-alive connection per thread: on a small
        # machine the load generator shares the cores with the server, and httpx costs
        # several times more CPU per request.
        conn = connect()
        barrier.wait()
        for payload in itertools.islice(cycle, requests_per_client):
            expected = _expected_results(payload)
            body = json.dumps(payload).encode("utf-8")
            start = time.perf_counter()
            try:
                conn.request("POST", path, body, {"Content-Type": "application/json"})
                response = conn.getresponse()
                data = response.read()
                ok = response.status == 200 and len(json.loads(data).get("results", ())) == expected
            except Exception:  # no answer, a bad URL, bad JSON: all count as errors
                ok = False
                conn.close()
                conn = connect()
            elapsed = time.perf_counter() - start
            if ok:
                mine.append(elapsed)
                my_sentences += expected
            else:
                my_errors += 1
        conn.close()
        with lock:
            latencies.extend(mine)
            errors += my_errors
            sentences += my_sentences

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    barrier.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - start
    latencies.sort()
    ms = [x * 1000.0 for x in latencies]
    total = clients * requests_per_client
    return {
        "requests": total,
        "errors": errors,
        "sentences": sentences,
        "seconds": seconds,
        "requests_per_s": (total - errors) / seconds if seconds > 0 else math.nan,
        "sentences_per_s": sentences / seconds if seconds > 0 else math.nan,
        "p50_ms": _percentile(ms, 50),
        "p99_ms": _percentile(ms, 99),
        "mean_ms": sum(ms) / len(ms) if ms else math.nan,
    }


def make_payloads(sentences: list[str], per_request: int) -> list[dict[str, Any]]:
    """Consecutive groups of ``per_request`` sentences (wrapping around), one payload each."""
    if per_request < 1:
        raise ValueError("per_request must be >= 1")
    count = max(1, math.ceil(len(sentences) / per_request))
    cycle = itertools.cycle(sentences)
    return [{"sentences": list(itertools.islice(cycle, per_request))} for _ in range(count)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000/v1/tag")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=50, help="requests per client")
    parser.add_argument("--sentences-file", help="one sentence per line (default: built-in)")
    parser.add_argument("--per-request", type=int, default=1, help="sentences per request")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per request")
    args = parser.parse_args(argv)
    if args.sentences_file:
        lines = Path(args.sentences_file).read_text(encoding="utf-8").splitlines()
        sentences = [line.strip() for line in lines if line.strip()]
        if not sentences:
            parser.error(f"{args.sentences_file} has no sentences")
    else:
        sentences = DEFAULT_SENTENCES
    result = run_load(
        args.url,
        make_payloads(sentences, args.per_request),
        clients=args.clients,
        requests_per_client=args.requests,
        timeout=args.timeout,
    )
    print(json.dumps(result, indent=2))
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
