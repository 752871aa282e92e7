"""Every method's step (and the peers') against the plain summed-loss step: the CPU table.

The benchmark is ``pyxtask bench`` (see ``pyxtask bench --help``); this script keeps the
command behind the README's published table: a 4-layer 256-wide BERT, T = 4 tagging tasks,
16 x 64 tokens per task, 2 warm-up and 7 timed rounds, results in
``benchmarks/results/bench-<encoder>-<device>/``. Extra options are passed through, e.g.
``python benchmarks/bench_methods.py --device cuda --encoder bert-base --batch 32 --seq 128``.
"""

import argparse
import sys
from pathlib import Path

from pyxtask.bench import add_arguments
from pyxtask.bench.steps import run

RESULTS = Path(__file__).resolve().parent / "results"

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args()
    if "--out" not in sys.argv:
        args.out = RESULTS / f"bench-{args.encoder}-{args.device.split(':')[0]}"
    sys.exit(run(args))
