"""Start-up time of the serving commands, with and without torch-side imports.

Run ``python benchmarks/serving_startup.py`` from the repository root (``--bundle DIR`` to use
an exported bundle; by default a tiny one is trained and exported, about 10 s). Timed, as the
wall time from starting the process, median of ``--runs``:

- ``tag --help``;
- ``tag BUNDLE FILE`` on one sentence (process start to exit);
- ``serve BUNDLE`` up to its first ``GET /v2/health/ready`` answer (polled every 5 ms);

in three environments:

- ``main``: this venv's ``pyxtask`` as it is (submodules load on first use: no torch);
- ``main-eager``: the same commands after importing what ``import pyxtask`` and ``pyxtask.cli``
  imported before that (data, gradients, hessian, metrics, ops with the compiled extension,
  reference, weighting, bench): the start-up as it was;
- ``serve-only``: the ``pyxtask`` of a venv with only the ``pyxtask-serve`` wheel
  (``--serve-venv DIR``, built there from ``packaging/pyxtask-serve`` when it has none;
  ``--no-serve-venv`` skips it).

Each command also runs once under ``python -X importtime`` to count the modules it imports and
name the heavy ones among them. Results go to ``benchmarks/results/serving-startup.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT = HERE / "results" / "serving-startup.json"
# What import pyxtask (and pyxtask.cli's import of pyxtask.bench) loaded before it was lazy.
EAGER = (
    "import pyxtask.data, pyxtask.gradients, pyxtask.hessian, pyxtask.metrics, pyxtask.ops, "
    "pyxtask.reference, pyxtask.weighting, pyxtask.bench, sys\n"
    "from pyxtask.cli import main\n"
    "sys.exit(main(sys.argv[1:]))"
)
# pyxtask._extension stands for pyxtask._C: it loads _C with importlib.import_module, which
# -X importtime does not log.
HEAVY = (
    "torch",
    "transformers",
    "pyxtask._extension",
    "pyxtask.bench",
    "numpy",
    "onnxruntime",
    "tokenizers",
    "fastapi",
    "uvicorn",
)
COMMANDS = ("tag --help", "tag BUNDLE (1 sentence)", "serve BUNDLE to /v2/health/ready")


@dataclass(frozen=True)
class Env:
    name: str
    python: Path
    script: tuple[str, ...]  # what runs the command line: the console script, or -c CODE

    def argv(self, args: list[str], importtime: bool = False) -> list[str]:
        return [str(self.python), *(["-X", "importtime"] * importtime), *self.script, *args]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def command_args(command: str, bundle: Path, sentence: Path, port: int) -> list[str]:
    if command == "tag --help":
        return ["tag", "--help"]
    if command.startswith("tag"):
        return ["tag", str(bundle), str(sentence), "--quiet"]
    return ["serve", str(bundle), "--port", str(port), "--no-access-log"]


def run_once(argv: list[str], serve_port: int | None, stderr: Any) -> float:
    """Seconds from starting ``argv`` to its exit, or to a served ``/v2/health/ready`` answer."""
    start = time.perf_counter()
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=stderr)
    if serve_port is None:
        if process.wait(timeout=300) != 0:
            raise RuntimeError(f"{' '.join(argv)} failed")
        return time.perf_counter() - start
    try:
        wait_healthy(process, serve_port)
        return time.perf_counter() - start
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=60)


def wait_healthy(process: subprocess.Popen[bytes], port: int) -> None:
    deadline = time.monotonic() + 120
    while True:
        url = f"http://127.0.0.1:{port}/v2/health/ready"
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1) as answer:
            if answer.status == 200:
                return
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("pyxtask serve did not answer /v2/health/ready")
        time.sleep(0.005)


def imports_of(env: Env, command: str, bundle: Path, sentence: Path) -> dict[str, Any]:
    """How many modules ``command`` imports in ``env``, and which of them are heavy."""
    port = free_port()
    args = command_args(command, bundle, sentence, port)
    with tempfile.TemporaryFile("w+") as log:  # a pipe could fill and stall the server
        run_once(env.argv(args, importtime=True), port if "serve" in command else None, log)
        log.seek(0)
        modules = [
            line.rsplit("|", 1)[1].strip()
            for line in log
            if line.startswith("import time:") and "|" in line and "imported package" not in line
        ]
    return {"modules": len(modules), "heavy": [m for m in HEAVY if m in modules]}


def measure(envs: list[Env], bundle: Path, sentence: Path, runs: int) -> dict[str, Any]:
    times: dict[str, dict[str, list[float]]] = {e.name: {c: [] for c in COMMANDS} for e in envs}
    for _ in range(runs):  # rounds interleave the environments, so load drifts hit them alike
        for env in envs:
            for command in COMMANDS:
                port = free_port()
                args = command_args(command, bundle, sentence, port)
                serve_port = port if "serve" in command else None
                seconds = run_once(env.argv(args), serve_port, subprocess.DEVNULL)
                times[env.name][command].append(seconds)
    return {
        env.name: {
            command: {
                "median_s": round(statistics.median(samples), 3),
                "runs_s": [round(s, 3) for s in samples],
                "imports": imports_of(env, command, bundle, sentence),
            }
            for command, samples in times[env.name].items()
        }
        for env in envs
    }


def build_bundle(work: Path) -> Path:
    sys.path.insert(0, str(ROOT))  # tests._bundles: the tiny trained run the tests use
    from tests._bundles import make_bundle

    return Path(make_bundle(work, "token")[1])


def serve_venv(folder: Path) -> Path:
    """The ``pyxtask`` script of a venv holding only pyxtask-serve (built if missing)."""
    script = folder / "bin" / "pyxtask"
    if script.exists():
        return script
    pip = [sys.executable, "-m", "pip", "-q"]
    wheels = folder / "dist"
    dist = ROOT / "packaging" / "pyxtask-serve"
    subprocess.run([*pip, "wheel", "--no-deps", str(dist), "-w", str(wheels)], check=True)
    subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True)
    (wheel,) = wheels.glob("pyxtask_serve-*.whl")
    subprocess.run([str(folder / "bin" / "pip"), "install", "-q", str(wheel)], check=True)
    return script


def environments(args: argparse.Namespace, work: Path) -> list[Env]:
    python = Path(sys.executable)
    envs = [
        Env("main", python, (str(python.parent / "pyxtask"),)),
        Env("main-eager", python, ("-c", EAGER)),
    ]
    if not args.no_serve_venv:
        script = serve_venv(args.serve_venv or work / "serve-venv")
        envs.append(Env("serve-only", script.parent / "python", (str(script),)))
    return envs


def machine_info() -> dict[str, Any]:
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "onnxruntime": metadata.version("onnxruntime"),
        "cpu_count": os.cpu_count(),
        # Other processes on the cores stretch every start-up; this shows how busy they were.
        "loadavg_1min": os.getloadavg()[0],
    }


def print_table(results: dict[str, Any]) -> None:
    names = list(results)
    print(f"{'command':<26}" + "".join(f"{n:>14}" for n in names) + "   (median seconds)")
    for command in COMMANDS:
        medians = [results[name][command]["median_s"] for name in names]
        print(f"{command:<26}" + "".join(f"{m:>14.3f}" for m in medians))
    print()
    print(f"{'imports (modules / heavy)':<26}")
    for command in COMMANDS:
        for name in names:
            found = results[name][command]["imports"]
            heavy = ", ".join(found["heavy"]) or "none"
            print(f"  {command:<24} {name:<11} {found['modules']:>5}  {heavy}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, help="an exported bundle (default: build one)")
    parser.add_argument("--runs", type=int, default=5, help="runs per command (default 5)")
    parser.add_argument("--serve-venv", type=Path, help="venv with pyxtask-serve (built if none)")
    parser.add_argument("--no-serve-venv", action="store_true", help="skip the serve-only venv")
    parser.add_argument("--out", type=Path, default=OUT, help=f"JSON path (default {OUT})")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="serving-startup-") as tmp:
        work = Path(tmp)
        bundle = args.bundle or build_bundle(work)
        sentence = work / "one-sentence.txt"
        sentence.write_text("w1 w2 zq99x w3 w5 .\n", encoding="utf-8")
        envs = environments(args, work)
        info = machine_info()
        results = measure(envs, bundle, sentence, args.runs)
    info["loadavg_1min_at_end"] = os.getloadavg()[0]
    report = {"machine": info, "runs": args.runs, "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print_table(results)
    print(f"\nwritten: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
