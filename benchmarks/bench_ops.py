"""Times every pyxtask op against its float64 reference, the plain-torch way, and peers.

The benchmark lives in the package (``pyxtask bench --ops`` runs it too); this script keeps
the published numbers' command: ``python benchmarks/bench_ops.py [--quick] [--device cuda]``
writes ``benchmarks/results/bench_ops.json``. See ``benchmarks/README.md``.
"""

import sys
from pathlib import Path

from pyxtask.bench.ops import *  # noqa: F403 (the names the pytest-benchmark suites reuse)
from pyxtask.bench.ops import main

OUT = Path(__file__).resolve().parent / "results" / "bench_ops.json"

if __name__ == "__main__":
    argv = sys.argv[1:]
    sys.exit(main(argv if "--out" in argv else [*argv, "--out", str(OUT)]))
