"""Serving under load with locust: throughput, admitted latency and refusals of ``pyxtask serve``.

Run from the repository root::

    python benchmarks/bench_serving_locust.py            # 30 s per scenario
    python benchmarks/bench_serving_locust.py --quick    # 10 s per scenario
    python benchmarks/bench_serving_locust.py --bundle DIR --run-time 60

Without ``--bundle`` the tiny test bundle of ``tests/_bundles.py`` (a tiny random BERT trained
for a few seconds on synthetic tags, as ``tests/test_server.py`` uses) is built into a temporary
folder first (about 20 s on 2 cores). The server runs as deployed: ``pyxtask serve`` in its own
process, on a free loopback port, with a small ``--max-queue``; the script waits for
``GET /v2/health/ready`` and then loads ``POST /v1/tag`` in two scenarios:

- ``normal``: 8 users, 1 sentence per request, a short wait (10-50 ms) between requests;
- ``overload``: 96 users, 16 sentences per request, no wait; a refused user sleeps for the
  server's ``Retry-After`` before its next request, as a well-behaved client does.

A 503 is the server refusing work it cannot do now (its queue is full, or a request waited past
its deadline), which is the behaviour under test, not a failure: it is counted as a refusal and
kept out of the latency figures. Only a 200 with one result per sentence sent counts as
admitted; anything else (other statuses, wrong result counts, connection errors) is a failure.
Per scenario the table shows requests/s (all answered), admitted requests/s, sentences/s served
(admitted sentences), the p50/p99 latency of admitted requests (exact, from every admitted
request; locust's own rounded histogram figures are kept in the JSON too), refusals and
failures. The measurement window starts once all users are spawned. The JSON
(``benchmarks/results/serving-locust.json`` by default) also holds the server's own counters
over the window (from ``GET /v1/metadata``: batches, mean batch size, refusals by reason), the
Retry-After values seen, whether locust warned that its own CPU use limited the load, and the
machine.

Why locust: the earlier load generator (``benchmarks/load_test.py``, threads over
``http.client``) is code of our own to keep correct; locust is a maintained, widely used load
testing tool (users as classes, spawn rates, per-request statistics, headless runs). It is
driven here through its library API (``locust.env.Environment`` and a local runner) rather than
its CLI, so that refusals, admitted latencies and the server's counters are collected in this
process without parsing CSV files. Its users are gevent greenlets over geventhttpclient
(``FastHttpUser``), cheap on CPU, which matters when the load generator shares a small machine
with the server: check ``locust_cpu_warning`` and ``loadavg_1min_at_end`` in the JSON before
trusting the numbers.

Note: ``pyxtask serve`` has no flag for the largest request (``max_request_sentences``, 256 by
default) and refuses a ``--max-queue`` below it, so 256 is the smallest queue it accepts and the
default here.
"""

# isort: off
# locust monkey-patches the standard library for gevent when it is imported: first, before
# anything below opens a socket or starts a thread.
import locust
from locust import FastHttpUser, between, constant, task
from locust.env import Environment

# isort: on

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, ClassVar

import gevent
import numpy as np
from geventhttpclient import URL, HTTPClient

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "serving-locust.json"
ADMITTED = "/v1/tag"
REFUSED = "/v1/tag (503 refused)"

SCENARIOS: dict[str, dict[str, Any]] = {
    "normal": {"users": 8, "spawn_rate": 8, "per_request": 1, "wait": (0.01, 0.05)},
    "overload": {"users": 96, "spawn_rate": 96, "per_request": 16, "wait": None},
}

# Builds the bundle in a child process, so that torch never runs under gevent's patches.
_BUILD = """
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from tests._bundles import make_bundle
print(make_bundle(Path(sys.argv[2]), "token")[1])
"""


# -- inputs ------------------------------------------------------------------------------------


def make_sentences(count=512, seed=0):
    """Sentences of 3-13 words like the test bundle's: its words ``w0..w39`` and, one word in
    five, a word outside its vocabulary (split into many sub-words)."""
    rng = random.Random(seed)
    return [
        " ".join(
            f"w{rng.randrange(40)}" if rng.random() < 0.8 else f"zq{rng.randrange(10**6)}x"
            for _ in range(rng.randint(3, 13))
        )
        for _ in range(count)
    ]


# -- the server --------------------------------------------------------------------------------


def build_bundle(folder: Path) -> Path:
    proc = subprocess.run(
        [sys.executable, "-c", _BUILD, str(ROOT), str(folder)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        sys.exit(f"building the test bundle failed:\n{proc.stderr[-3000:]}")
    return Path(proc.stdout.strip().splitlines()[-1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_command(bundle: Path, port: int, args: argparse.Namespace) -> list[str]:
    exe = Path(sys.executable).parent / "pyxtask"
    if exe.exists():
        command = [str(exe)]
    elif shutil.which("pyxtask"):
        command = [shutil.which("pyxtask") or "pyxtask"]
    else:
        command = [
            sys.executable,
            "-c",
            "import sys; from pyxtask.cli import main; sys.exit(main())",
        ]
    command += ["serve", str(bundle), "--port", str(port), "--max-queue", str(args.max_queue)]
    command += ["--no-access-log"]
    if args.max_batch is not None:
        command += ["--max-batch", str(args.max_batch)]
    if args.threads is not None:
        command += ["--threads", str(args.threads)]
    return command


def get_json(url: str, path: str, timeout=5.0) -> tuple[int, Any]:
    client = HTTPClient.from_url(URL(url), connection_timeout=timeout, network_timeout=timeout)
    try:
        response = client.get(path)
        body = response.read()
        try:
            return response.status_code, json.loads(body)
        except ValueError:
            return response.status_code, None
    finally:
        client.close()


@contextlib.contextmanager
def running_server(bundle: Path, args: argparse.Namespace, log_path: Path):
    """Start ``pyxtask serve``, wait for readiness, yield (url, command); stop it after."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = serve_command(bundle, port, args)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + args.ready_timeout
        while True:
            if proc.poll() is not None:
                sys.exit(f"the server exited ({proc.returncode}):\n{log_path.read_text()[-3000:]}")
            with contextlib.suppress(OSError, gevent.Timeout):
                if get_json(url, "/v2/health/ready", timeout=2.0)[0] == 200:
                    break
            if time.monotonic() > deadline:
                sys.exit(f"the server was not ready in {args.ready_timeout:g} s")
            time.sleep(0.2)
        yield url, command
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # graceful: in-flight requests finish
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def server_stats(url: str) -> dict[str, Any]:
    with contextlib.suppress(OSError, gevent.Timeout, KeyError, TypeError):
        status, body = get_json(url, "/v1/metadata")
        if status == 200:
            return body["stats"]
    return {}


def stats_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """The server's counters over the window (``/v1/metadata`` gives totals and overall means)."""
    if not before or not after:
        return {}
    out: dict[str, Any] = {
        key: after[key] - before.get(key, 0)
        for key in ("requests", "sentences", "batches", "rejected", "model_errors")
        if isinstance(after.get(key), int)
    }
    if isinstance(after.get("refused"), dict):
        out["refused"] = {
            reason: n - before.get("refused", {}).get(reason, 0)
            for reason, n in after["refused"].items()
        }
    if out.get("batches"):
        for key in ("mean_batch_sentences", "mean_batch_requests"):
            total = after[key] * after["batches"] - before[key] * before["batches"]
            out[key] = total / out["batches"]
    return out


# -- the load ----------------------------------------------------------------------------------


def retry_after_of(response) -> float:
    """A 503's Retry-After in seconds (1 when missing or not a number of seconds)."""
    try:
        return float(response.headers.get("Retry-After") or 1)
    except (AttributeError, ValueError):
        return 1.0


class TagUser(FastHttpUser):
    """POSTs ``per_request`` sentences to /v1/tag, again and again; a 503 is a refusal."""

    abstract = True
    per_request: ClassVar[int] = 1
    sentences: ClassVar[list[str]] = []

    def on_start(self):
        self._next = random.randrange(len(self.sentences))

    @task
    def tag(self):
        n = self.per_request
        batch = [self.sentences[(self._next + i) % len(self.sentences)] for i in range(n)]
        self._next = (self._next + n) % len(self.sentences)
        retry_after = None
        with self.client.post(
            ADMITTED, json={"sentences": batch}, name=ADMITTED, catch_response=True
        ) as response:
            if response.status_code == 200:
                try:
                    results = len(response.json()["results"])
                except (ValueError, KeyError, TypeError) as e:
                    response.failure(f"200 with an unreadable body: {e!r}")
                else:
                    if results == n:
                        response.success()
                    else:
                        response.failure(f"200 with {results} results for {n} sentences")
            elif response.status_code == 503:
                # A refusal: reported under its own name, so it stays out of the latencies.
                response.request_meta["name"] = REFUSED
                response.success()
                retry_after = retry_after_of(response)
            else:
                text = (response.text or "")[:200] if response.status_code else ""
                response.failure(f"HTTP {response.status_code} {text}".strip())
        if retry_after is not None:
            gevent.sleep(retry_after)  # honour Retry-After before the next request


def user_class(name: str, spec: dict[str, Any], url: str, sentences: list[str]) -> type:
    wait = between(*spec["wait"]) if spec["wait"] else constant(0)
    return type(
        f"{name.capitalize()}TagUser",
        (TagUser,),
        {
            "host": url,
            "wait_time": wait,
            "per_request": spec["per_request"],
            "sentences": sentences,
            "network_timeout": 60.0,
            "connection_timeout": 10.0,
        },
    )


def percentile(sorted_values: list[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation; nan for no values."""
    return float(np.percentile(sorted_values, q)) if sorted_values else math.nan


def run_scenario(name: str, spec: dict[str, Any], url: str, run_time: float, sentences):
    cls = user_class(name, spec, url, sentences)
    env = Environment(user_classes=[cls], host=url)
    record: dict[str, Any] = {
        "on": False,
        "admitted_ms": [],
        "refused": 0,
        "retry_after_s": [],
        "failures": {},
    }

    def on_request(name, response_time, exception=None, response=None, **_kwargs):
        if not record["on"]:
            return
        if exception is not None:
            key = str(exception)[:200]
            record["failures"][key] = record["failures"].get(key, 0) + 1
        elif name == REFUSED:
            record["refused"] += 1
            record["retry_after_s"].append(retry_after_of(response))
        else:
            record["admitted_ms"].append(response_time)

    env.events.request.add_listener(on_request)
    runner = env.create_local_runner()
    runner.start(spec["users"], spawn_rate=spec["spawn_rate"])
    spawned_by = time.monotonic() + 30
    while runner.user_count < spec["users"] and time.monotonic() < spawned_by:
        gevent.sleep(0.05)
    gevent.sleep(0.5)  # let the first requests of the last users go out
    env.stats.reset_all()
    before = server_stats(url)
    record["on"] = True
    start = time.monotonic()
    gevent.sleep(run_time)
    record["on"] = False
    elapsed = time.monotonic() - start
    after = server_stats(url)
    admitted_entry = env.stats.get(ADMITTED, "POST")
    locust_p50 = admitted_entry.get_response_time_percentile(0.5)
    locust_p99 = admitted_entry.get_response_time_percentile(0.99)
    retry_afters = record["retry_after_s"]
    cpu_warning = bool(getattr(runner, "cpu_warning_emitted", False))
    runner.quit()
    runner.greenlet.join(timeout=30)

    admitted = sorted(record["admitted_ms"])
    failures = sum(record["failures"].values())
    answered = len(admitted) + record["refused"] + failures
    per = spec["per_request"]
    return {
        "users": spec["users"],
        "spawn_rate": spec["spawn_rate"],
        "sentences_per_request": per,
        "wait_s": list(spec["wait"]) if spec["wait"] else [0, 0],
        "honours_retry_after": True,
        "duration_s": elapsed,
        "requests": answered,
        "requests_per_s": answered / elapsed,
        "admitted": len(admitted),
        "admitted_per_s": len(admitted) / elapsed,
        "sentences_served": len(admitted) * per,
        "sentences_per_s": len(admitted) * per / elapsed,
        "refused": record["refused"],
        "refused_fraction": record["refused"] / answered if answered else 0.0,
        "failures": failures,
        "failure_messages": record["failures"],
        "admitted_latency_ms": {
            "p50": percentile(admitted, 50),
            "p90": percentile(admitted, 90),
            "p99": percentile(admitted, 99),
            "max": admitted[-1] if admitted else math.nan,
            "mean": sum(admitted) / len(admitted) if admitted else math.nan,
        },
        "locust_admitted_p50_ms": locust_p50,
        "locust_admitted_p99_ms": locust_p99,
        "retry_after_s": {
            "count": len(retry_afters),
            "min": min(retry_afters) if retry_afters else None,
            "max": max(retry_afters) if retry_afters else None,
            "mean": sum(retry_afters) / len(retry_afters) if retry_afters else None,
        },
        "server": stats_delta(before, after),
        "locust_cpu_warning": cpu_warning,
    }


# -- report ------------------------------------------------------------------------------------


def table(results: dict[str, dict[str, Any]]) -> str:
    head = (
        f"{'scenario':<10} {'users':>5} {'sent/req':>8} {'req/s':>8} {'adm/s':>8} "
        f"{'sent/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'refused':>8} {'failed':>6}"
    )
    lines = [head, "-" * len(head)]
    for name, r in results.items():
        lat = r["admitted_latency_ms"]
        lines.append(
            f"{name:<10} {r['users']:>5} {r['sentences_per_request']:>8} "
            f"{r['requests_per_s']:>8.1f} {r['admitted_per_s']:>8.1f} {r['sentences_per_s']:>8.1f} "
            f"{lat['p50']:>8.1f} {lat['p99']:>8.1f} "
            f"{r['refused']:>5} {100 * r['refused_fraction']:>2.0f}% {r['failures']:>6}"
        )
    return "\n".join(lines)


def finite(value: Any) -> Any:
    """``value`` with every nan (no admitted request) as None: strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite(v) for v in value]
    return value


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "locust": locust.__version__,
    }
    with contextlib.suppress(OSError):
        info["loadavg_1min_at_end"] = os.getloadavg()[0]
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    return info


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument(
        "--bundle", type=Path, help="an exported bundle (default: build the tiny one)"
    )
    parser.add_argument("--quick", action="store_true", help="10 s per scenario")
    parser.add_argument("--run-time", type=float, help="seconds per scenario (default 30)")
    parser.add_argument(
        "--scenarios", default="normal,overload", help="comma list of: normal, overload"
    )
    parser.add_argument(
        "--max-queue", type=int, default=256, help="the server's --max-queue (default 256)"
    )
    parser.add_argument("--max-batch", type=int, help="the server's --max-batch")
    parser.add_argument("--threads", type=int, help="the server's --threads (onnxruntime)")
    parser.add_argument("--ready-timeout", type=float, default=120.0, metavar="S")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON path")
    args = parser.parse_args(argv)
    run_time = args.run_time or (10.0 if args.quick else 30.0)
    names = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = [s for s in names if s not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario(s) {unknown}; choose from {sorted(SCENARIOS)}")

    sentences = make_sentences()
    with tempfile.TemporaryDirectory(prefix="bench-locust-") as tmp:
        bundle = args.bundle
        if bundle is None:
            print("building the tiny test bundle ...", file=sys.stderr, flush=True)
            bundle = build_bundle(Path(tmp))
        log_path = Path(tmp) / "server.log"
        with running_server(bundle, args, log_path) as (url, command):
            print(f"serving {bundle} at {url}", file=sys.stderr, flush=True)
            results = {}
            for name in names:
                spec = SCENARIOS[name]
                print(
                    f"{name}: {spec['users']} users, {spec['per_request']} sentence(s) per "
                    f"request, {run_time:g} s ...",
                    file=sys.stderr,
                    flush=True,
                )
                results[name] = run_scenario(name, spec, url, run_time, sentences)
        server_log = log_path.read_text(errors="replace").splitlines()[-20:]

    print(table(results))
    for name, r in results.items():
        if r["failure_messages"]:
            print(f"{name} failures: {r['failure_messages']}", file=sys.stderr)
        if r["locust_cpu_warning"]:
            print(f"{name}: locust warned that its CPU use was above 90 %", file=sys.stderr)
    report = {
        "benchmark": "serving-locust",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "quick": args.quick,
        "run_time_s": run_time,
        "bundle": str(args.bundle) if args.bundle else "tests/_bundles.py make_bundle (tiny)",
        "server_command": [Path(c).name if i == 0 else c for i, c in enumerate(command)],
        "max_queue": args.max_queue,
        "machine": machine(),
        "scenarios": results,
        "server_log_tail": server_log,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(finite(report), indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    return 1 if any(r["failures"] for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
