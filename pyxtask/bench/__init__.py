"""Benchmarks a user runs with ``pyxtask bench``: the cost of every method's step, and the ops.

:mod:`pyxtask.bench.steps` times every method's optimizer step (and the peers' on the same
work) against the plain summed-loss step; :mod:`pyxtask.bench.ops` times every compiled op
against its float64 reference and the plain-torch way (``pyxtask bench --ops``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["ENCODER_NAMES", "add_arguments"]

#: Architectures `pyxtask bench` can time (random weights; see :mod:`pyxtask.bench.workload`).
ENCODER_NAMES = ("tiny", "small", "minilm", "bert-base")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`pyxtask bench`'s options (shared by the CLI and ``benchmarks/bench_methods.py``)."""
    parser.add_argument(
        "--encoder",
        choices=ENCODER_NAMES,
        default="small",
        help="architecture timed (random weights): tiny 2x128, small 4x256, "
        "minilm 6x384, bert-base 12x768 (default: small)",
    )
    parser.add_argument("--tasks", type=int, default=4, metavar="T", help="tasks (default 4)")
    parser.add_argument(
        "--batch",
        type=int,
        default=16,
        metavar="N",
        help="sequences per task per step (default 16)",
    )
    parser.add_argument(
        "--seq", type=int, default=64, metavar="N", help="tokens per sequence (default 64)"
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    parser.add_argument(
        "--dtype",
        choices=("fp32", "bf16"),
        default=None,
        help="bf16 autocast (GPUs only; default: bf16 on a GPU, fp32 on the CPU)",
    )
    parser.add_argument(
        "--only",
        default=None,
        metavar="NAMES",
        help="comma list of contenders (plain always runs); see --list",
    )
    parser.add_argument("--no-peers", action="store_true", help="skip the TorchJD/LibMTL rows")
    parser.add_argument("--warmup", type=int, default=2, metavar="N", help="warm-up steps (2)")
    parser.add_argument("--reps", type=int, default=7, metavar="N", help="timed rounds (7)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help="torch.set_num_threads (default: torch's own)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("bench"),
        metavar="DIR",
        help="folder for bench.json and bench.png (default ./bench)",
    )
    parser.add_argument("--list", action="store_true", help="list the contenders and exit")
    parser.add_argument(
        "--ops",
        action="store_true",
        help="time the compiled ops instead (against their float64 references "
        "and plain torch); with --quick, a small subset",
    )
    parser.add_argument("--quick", action="store_true", help="--ops: the CI subset (< 1 min)")
