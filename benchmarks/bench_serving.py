"""Serving speed: the exported tagger (onnxruntime fp32 / int8, Tagger, HTTP) against PyTorch.

Run ``python benchmarks/bench_serving.py`` from the repository root (trains a quick MiniLM
POS tagger, about a minute on 2 cores, then times everything) or ``--quick`` (fewer repeats,
fewer requests). ``--run RUN_DIR`` times an already trained run instead of training one.
Tables go to stdout and everything, with machine information, to
``benchmarks/results/serving-<timestamp>.json``. See ``benchmarks/README.md``.

What is timed, all on the same ``--threads`` CPU threads (``torch.set_num_threads`` and
onnxruntime's ``intra_op_num_threads``), as the median of repeated calls after a warm-up:

- ``eager``: the run's best model as :class:`~pyxtask.export.TargetModel` under
  ``torch.inference_mode()``, on padded input ids;
- ``onnx-fp32`` / ``onnx-int8``: an ``onnxruntime.InferenceSession`` of the bundle's model file
  on the very same input ids (model time only);
- ``tagger-fp32`` / ``tagger-int8``: the full ``Tagger.tag`` path from words to labels
  (tokenization, windowing, batching, padding, softmax and argmax included);

for (a) one 20-word sentence and (b) a batch of 32 sentences of 40 words. Then the HTTP server
(``pyxtask serve`` in its own process, as deployed; ``--server thread`` runs
:func:`pyxtask.serving.server.create_app` under uvicorn in a thread of this process) is
loaded by concurrent clients sending one sentence per request, and its throughput is compared
with in-process ``Tagger.tag`` on the same sentences (one at a time and in batches; the best
of those is the reference).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
import transformers

import pyxtask
from pyxtask.config import TrainConfig
from pyxtask.data import corpora
from pyxtask.export import TargetModel, export_run
from pyxtask.models import MultiTaskModel
from pyxtask.serving import Tagger

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
SERVED_TARGET = 0.80  # served throughput as a fraction of in-process Tagger.tag throughput

transformers.utils.logging.disable_progress_bar()


# ---------------------------------------------------------------------------------------------
# Timing


def _summary(samples: list[float]) -> dict[str, Any]:
    return {
        "median_ms": statistics.median(samples),
        "min_ms": min(samples),
        "max_ms": max(samples),
        "reps": len(samples),
    }


def timed(fn: Callable[[], object], *, warmup: int, reps: int) -> dict[str, Any]:
    """Median (and min, max) wall milliseconds of ``reps`` calls after ``warmup`` calls."""
    return timed_together({"fn": fn}, warmup=warmup, reps=reps)["fn"]


def timed_together(
    fns: dict[str, Callable[[], object]], *, warmup: int, reps: int, rounds: int = 3
) -> dict[str, dict[str, Any]]:
    """Like :func:`timed` for several contenders, in ``rounds`` rounds of blocks: each round
    times a block of ``reps / rounds`` calls of every contender in turn, so a change in
    background load hits all of them alike.

    Blocks, not call-by-call interleaving: onnxruntime's intra-op threads spin-wait for a
    while after each ``run()``, and a contender called right after another's session shares
    the cores with those spinning threads (on 2 cores that made one eager call 7x slower). The
    first call of every block is an untimed warm-up that absorbs this.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    rounds = max(1, min(rounds, reps))
    for r in range(rounds):
        block = reps // rounds + (1 if r < reps % rounds else 0)
        for name, fn in fns.items():
            fn()  # untimed: lets the previous contender's threads go idle
            for _ in range(block):
                start = time.perf_counter()
                fn()
                samples[name].append((time.perf_counter() - start) * 1000.0)
    return {name: _summary(values) for name, values in samples.items()}


# ---------------------------------------------------------------------------------------------
# The run and its bundle


def train_run(args: argparse.Namespace, work: Path) -> Path:
    from pyxtask.trainer import Trainer

    run_dir = work / "run"
    if (run_dir / "summary.json").is_file():
        print(f"reusing the trained run in {run_dir}", file=sys.stderr)
        return run_dir
    config = TrainConfig(
        target=args.corpus,
        sources=[],
        target_size=args.target_size,
        paradigm="single",
        method="fixed",
        epochs=1,
        encoder="minilm",
        device="cpu",
        seed=0,
        output=str(run_dir),
    )
    print(
        f"training {args.corpus} (MiniLM, {args.target_size} sentences, 1 epoch)", file=sys.stderr
    )
    start = time.perf_counter()
    Trainer(config, run_dir, progress=False).fit()
    print(f"  trained in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return run_dir


def export_bundle(run_dir: Path, work: Path) -> tuple[Path, dict[str, Any], float]:
    bundle = work / "bundle"
    print(f"exporting {run_dir} (fp32 + int8, measured) to {bundle}", file=sys.stderr)
    start = time.perf_counter()
    manifest = export_run(
        run_dir,
        bundle,
        int8=True,
        fp16=False,
        measure=True,
        overwrite=True,
        log=lambda m: print(f"  {m}", file=sys.stderr),
    )
    return bundle, manifest, time.perf_counter() - start


def corpus_sentences(name: str) -> list[list[str]]:
    """The target corpus's test (then dev) sentences: real words for the timings."""
    corpus, task = name.split(".")
    out: list[list[str]] = []
    for split in ("test", "dev"):
        with contextlib.suppress(Exception):
            out += [list(e.words) for e in corpora.load(corpus, task, split, None, 0)]
    if not out:
        raise SystemExit(f"{name}: no test or dev sentences to time with")
    return out


def sentences_of(
    pool: list[list[str]], count: int, length: int, offset: int = 0
) -> list[list[str]]:
    """``count`` sentences of exactly ``length`` words, cut from the corpus's running text."""
    stream = [w for s in pool for w in s]
    out = []
    for i in range(count):
        start = ((offset + i) * length) % max(1, len(stream) - length)
        out.append(stream[start : start + length])
    return out


# ---------------------------------------------------------------------------------------------
# The contenders


class Inputs:
    """The padded input ids of some sentences, as the Tagger's tokenizer makes them."""

    def __init__(self, bundle: Path, manifest: dict[str, Any], sentences: list[list[str]]) -> None:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(bundle / manifest["tokenizer"]))  # what the Tagger uses
        tok.no_padding()
        tok.enable_truncation(int(manifest["max_length"]))
        rows = [tok.encode(s, is_pretokenized=True).ids for s in sentences]
        longest = max(len(r) for r in rows)
        self.subwords = [len(r) for r in rows]
        pad = int(manifest["pad_token_id"])
        self.ids = np.full((len(rows), longest), pad, dtype=np.int64)
        self.mask = np.zeros_like(self.ids)
        for i, r in enumerate(rows):
            self.ids[i, : len(r)] = r
            self.mask[i, : len(r)] = 1
        self.ids_t = torch.from_numpy(self.ids)
        self.mask_t = torch.from_numpy(self.mask)
        self.feeds = {"input_ids": self.ids, "attention_mask": self.mask}


def session(bundle: Path, manifest: dict[str, Any], variant: str, threads: int) -> Any:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    path = bundle / manifest["variants"][variant]["file"]
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def check_outputs(eager: TargetModel, sessions: dict[str, Any], inputs: Inputs) -> dict[str, float]:
    """Max |logit difference| of each session against eager on the real tokens (a sanity check
    that the timed models compute the same thing)."""
    with torch.inference_mode():
        want = eager(inputs.ids_t, inputs.mask_t).numpy()
    real = inputs.mask.astype(bool)  # token logits at padding are meaningless
    out = {}
    for name, s in sessions.items():
        (got,) = s.run(["logits"], inputs.feeds)
        diff = np.abs(got - want)
        out[name] = float((diff[real] if diff.ndim == 3 else diff).max())
    return out


# ---------------------------------------------------------------------------------------------
# The served path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def running_server(tagger: Tagger, **limits: Any) -> Iterator[str]:
    """``create_app(tagger)`` under uvicorn in a thread on a free loopback port; yields the
    ``/v1/tag`` URL and stops the server on exit."""
    import uvicorn

    from pyxtask.serving.server import create_app

    app = create_app(tagger, **limits)
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the uvicorn server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}/v1/tag"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@contextlib.contextmanager
def server_process(bundle: Path, threads: int, max_wait_ms: float) -> Iterator[str]:
    """``pyxtask serve`` in its own process, as it is deployed (the load generator then does
    not share the server's interpreter lock); yields the ``/v1/tag`` URL, stops it with
    SIGTERM on exit."""
    import subprocess

    port = free_port()
    command = [
        sys.executable,
        "-m",
        "pyxtask.cli",
        "serve",
        str(bundle),
        "--port",
        str(port),
        "--threads",
        str(threads),
        "--max-batch",
        "64",
        "--max-wait-ms",
        str(max_wait_ms),
    ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    try:
        while True:
            try:
                # Ready, not just live: the server answers /healthz while the model loads.
                ready = f"http://127.0.0.1:{port}/v2/health/ready"
                with urllib.request.urlopen(ready, timeout=1):
                    break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("pyxtask serve did not start") from None
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}/v1/tag"
    finally:
        process.terminate()
        process.wait(timeout=30)


def load_tools() -> tuple[Any, Any] | str:
    """(create_app, run_load), or why the served benchmark cannot run."""
    try:
        from pyxtask.serving.server import create_app
    except ImportError as exc:
        return f"pyxtask.serving.server is not available ({exc}); served benchmark skipped"
    sys.path.insert(0, str(HERE))
    try:
        from load_test import run_load
    except ImportError as exc:
        return f"benchmarks/load_test.py is not available ({exc}); served benchmark skipped"
    finally:
        sys.path.remove(str(HERE))
    return create_app, run_load


def served(
    bundle: Path, threads: int, sentences: list[list[str]], args: argparse.Namespace
) -> dict[str, Any]:
    tools = load_tools()
    if isinstance(tools, str):
        print(f"\n!! {tools}")
        return {"skipped": tools}
    _, run_load = tools
    tagger = Tagger(bundle, "fp32", threads=threads, batch_size=64, verify=False)
    payloads = [{"sentences": [s]} for s in sentences]

    # In process: the same sentences one at a time, in batches of as many as there are
    # one-sentence clients, and at the largest batch the server allows. The served throughput
    # is compared with the best batch these clients can fill (at most one sentence each), so
    # the reference is what the server could reach with no HTTP cost at all.
    inproc: dict[str, Any] = {}
    for batch in sorted({1, args.clients, 64}):
        chunks = [sentences[i : i + batch] for i in range(0, len(sentences), batch)]
        t = timed(lambda c=chunks: [tagger.tag(x) for x in c], warmup=1, reps=args.served_reps)
        inproc[str(batch)] = {
            "batch": batch,
            "sentences_per_s": len(sentences) / (t["median_ms"] / 1000.0),
            **t,
        }

    if args.server == "process":
        serving = server_process(bundle, threads, args.max_wait_ms)
    else:
        serving = running_server(tagger, max_batch_sentences=64, max_wait_ms=args.max_wait_ms)
    with serving as url:
        # Warm-up: connections, the batcher, onnxruntime's shapes.
        run_load(url, payloads, clients=args.clients, requests_per_client=5)
        load = run_load(url, payloads, clients=args.clients, requests_per_client=args.requests)
        metadata_url = url.rsplit("/v1/", 1)[0] + "/v1/metadata"
        with urllib.request.urlopen(metadata_url, timeout=10) as response:
            batching = json.load(response)["stats"]
    fillable = [item for item in inproc.values() if item["batch"] <= args.clients]
    best = max(fillable, key=lambda item: item["sentences_per_s"])
    reference = best["sentences_per_s"]
    return {
        "server": args.server,
        "clients": args.clients,
        "requests_per_client": args.requests,
        "sentences_per_request": 1,
        "max_wait_ms": args.max_wait_ms,
        "load": load,
        "server_batching": batching,
        "in_process": inproc,
        "reference_batch": best["batch"],
        "ratio": load["sentences_per_s"] / reference if reference else None,
        "target": SERVED_TARGET,
    }


# ---------------------------------------------------------------------------------------------
# Output


def machine_info(threads: int) -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "pyxtask": pyxtask.__version__,
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
        "cpu_model": cpu,
        "cpu_count": os.cpu_count(),
        "threads": threads,
        # Other processes on the cores skew multithreaded timings badly; this shows it.
        "loadavg_1min_at_end": os.getloadavg()[0],
    }


def print_table(cases: dict[str, dict[str, Any]]) -> None:
    names = ["eager", "onnx-fp32", "onnx-int8", "tagger-fp32", "tagger-int8"]
    head = f"{'path':<13}" + "".join(f"{c['label']:>24}" for c in cases.values())
    print(head)
    print(f"{'':<13}" + "".join(f"{'ms':>12}{'vs eager':>12}" for _ in cases))
    print("-" * len(head))
    for name in names:
        line = f"{name:<13}"
        for case in cases.values():
            ms = case["times"][name]["median_ms"]
            ratio = case["times"]["eager"]["median_ms"] / ms
            line += f"{ms:>12.2f}{ratio:>11.2f}x"
        print(line)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="a trained run folder (default: train one)")
    parser.add_argument("--work", type=Path, help="folder for the run and bundle (default: temp)")
    parser.add_argument("--corpus", default="wsj-pos.pos", help="target task to train on")
    parser.add_argument("--target-size", type=int, default=200)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--quick", action="store_true", help="fewer repeats and requests")
    parser.add_argument("--clients", type=int, default=8, help="concurrent HTTP clients")
    parser.add_argument("--requests", type=int, help="requests per client (default 100; 25)")
    parser.add_argument(
        "--max-wait-ms", type=float, default=0.0, help="the server's batch wait (default 0)"
    )
    parser.add_argument(
        "--server",
        choices=["process", "thread"],
        default="process",
        help="pyxtask serve in its own process (default, as deployed) or in a thread here",
    )
    parser.add_argument("--out", type=Path, help="JSON path (default results/serving-<ts>.json)")
    args = parser.parse_args(argv)
    if args.requests is None:
        args.requests = 25 if args.quick else 100
    args.served_reps = 3 if args.quick else 7
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    n = args.threads
    torch.set_num_threads(n)
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if args.work is not None:
            work = args.work
            work.mkdir(parents=True, exist_ok=True)
        else:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-serving-")))
        run_dir = args.run if args.run is not None else train_run(args, work)
        bundle, manifest, export_s = export_bundle(run_dir, work)
        result = bench(args, run_dir, bundle, manifest, n)
        result["export_seconds"] = export_s
        result["elapsed_s"] = time.perf_counter() - started
        result["machine"] = machine_info(n)

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = args.out or RESULTS / f"serving-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(f"\nresults: {out}  ({result['elapsed_s']:.0f} s in all)")
    return 0


def bench(
    args: argparse.Namespace, run_dir: Path, bundle: Path, manifest: dict[str, Any], n: int
) -> dict[str, Any]:
    warmup, reps = (2, 5) if args.quick else (5, 30)
    batch_reps = 3 if args.quick else 10

    # Accuracy of the two variants, measured by the export through the serving path.
    v = manifest["variants"]
    fp32_acc, int8_acc = v["fp32"].get("test_metric"), v["int8"].get("test_metric")
    metric = manifest.get("metric") or "metric"

    model = MultiTaskModel.load(run_dir / "best")
    eager = TargetModel(model, manifest["head"]).eval()
    attn = getattr(model.encoder.config, "_attn_implementation", "?")
    sessions = {name: session(bundle, manifest, name, n) for name in ("fp32", "int8")}
    taggers = {name: Tagger(bundle, name, threads=n, verify=False) for name in ("fp32", "int8")}
    pool = corpus_sentences(args.corpus)
    cases_in = {
        "one": ("1 x 20 words", sentences_of(pool, 1, 20), reps),
        "batch": ("32 x 40 words", sentences_of(pool, 32, 40, offset=7), batch_reps),
    }
    cases: dict[str, dict[str, Any]] = {}
    for key, (label, sentences, k) in cases_in.items():
        inputs = Inputs(bundle, manifest, sentences)
        print(f"timing {label} ({inputs.ids.shape[1]} positions padded)", file=sys.stderr)

        def eager_call(x: Inputs = inputs) -> None:
            with torch.inference_mode():
                eager(x.ids_t, x.mask_t)

        fns: dict[str, Callable[[], object]] = {
            "eager": eager_call,
            "onnx-fp32": lambda x=inputs: sessions["fp32"].run(["logits"], x.feeds),
            "onnx-int8": lambda x=inputs: sessions["int8"].run(["logits"], x.feeds),
            "tagger-fp32": lambda s=sentences: taggers["fp32"].tag(s),
            "tagger-int8": lambda s=sentences: taggers["int8"].tag(s),
        }
        times = timed_together(fns, warmup=warmup, reps=k)
        cases[key] = {
            "label": label,
            "sentences": len(sentences),
            "words_per_sentence": len(sentences[0]),
            "padded_positions": int(inputs.ids.shape[1]),
            "subwords": inputs.subwords,
            "times": times,
            "speedup_vs_eager": {
                name: times["eager"]["median_ms"] / t["median_ms"] for name, t in times.items()
            },
            "max_abs_logit_diff_vs_eager": check_outputs(
                eager, {"onnx-fp32": sessions["fp32"], "onnx-int8": sessions["int8"]}, inputs
            ),
        }
    # The served sentences: real corpus sentences of their natural lengths.
    served_sentences = pool[:64]
    print(f"serving: {args.clients} clients x {args.requests} requests", file=sys.stderr)
    serving = served(bundle, n, served_sentences, args)

    print(
        f"\n== Exported tagger vs PyTorch eager ({n} threads, median of repeats; eager attention "
        f"{attn!r}, model {model.encoder.config.name_or_path or 'minilm'})"
    )
    print_table(cases)
    for case in cases.values():
        diffs = ", ".join(f"{k} {d:.1e}" for k, d in case["max_abs_logit_diff_vs_eager"].items())
        print(f"  {case['label']}: max |logit - eager| {diffs}")
    print(f"\n== Test {metric} ({args.corpus} test split, through Tagger)")
    if fp32_acc is not None and int8_acc is not None:
        print(
            f"  fp32 {fp32_acc:.4f}   int8 {int8_acc:.4f}   int8 - fp32 "
            f"{(int8_acc - fp32_acc) * 100:+.2f} points"
        )
        trained = manifest.get("trained_test_metric")
        if isinstance(trained, float):
            print(f"  (the trainer's own PyTorch test {metric}: {trained:.4f})")
    else:
        print("  not measured (the run's target is not a named corpus)")
    if "skipped" not in serving:
        load = serving["load"]
        ref = serving["in_process"][str(serving["reference_batch"])]
        print(
            f"\n== Served (HTTP, {serving['clients']} clients x {serving['requests_per_client']} "
            f"requests of 1 sentence, {len(served_sentences)} corpus sentences)"
        )
        print(
            f"  served      {load['sentences_per_s']:8.1f} sentences/s   p50 "
            f"{load['p50_ms']:.1f} ms   p99 {load['p99_ms']:.1f} ms   errors {load['errors']}   "
            f"mean batch {serving['server_batching']['mean_batch_sentences']:.1f} sentences"
        )
        for item in serving["in_process"].values():
            print(
                f"  in-process  {item['sentences_per_s']:8.1f} sentences/s   "
                f"(Tagger.tag, batches of {item['batch']})"
            )
        ok = serving["ratio"] is not None and serving["ratio"] >= SERVED_TARGET
        print(
            f"  served / best in-process that {serving['clients']} clients can fill (batches of "
            f"{ref['batch']}): {serving['ratio']:.1%} "
            f"[{'PASS' if ok else 'FAIL'}: target >= {SERVED_TARGET:.0%}]"
        )
    return {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "run": str(run_dir),
        "bundle_manifest": {
            k: manifest.get(k)
            for k in ("task", "kind", "max_length", "stride", "opset", "variants", "versions")
        },
        "test_metric": {
            "name": metric,
            "fp32": fp32_acc,
            "int8": int8_acc,
            "int8_minus_fp32_points": None
            if fp32_acc is None or int8_acc is None
            else (int8_acc - fp32_acc) * 100,
            "trained (PyTorch)": manifest.get("trained_test_metric"),
        },
        "eager_attention": attn,
        "cases": cases,
        "served": serving,
    }


if __name__ == "__main__":
    sys.exit(main())
