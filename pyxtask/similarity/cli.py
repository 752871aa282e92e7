"""``pyxtask similarity --target T --sources S1,S2,...``: the parser and the command.

Only argparse at import time: the parser of every ``pyxtask`` command is built with it.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, cast

__all__ = ["add_parser", "run"]


def add_parser(commands: Any) -> None:
    """The ``similarity`` subcommand and its options, on ``commands`` (argparse subparsers)."""
    p = commands.add_parser(
        "similarity",
        help="score candidate source tasks for a target before training (covariance, "
        "gradient cosine, LEEP, LogME)",
        description="Score each source task for the target from the pretrained encoder, "
        "without training it: Wu-Zhang-Re's covariance similarity (eq. 6, and normalised), "
        "TAWT's gradient cosine under linear probes, LEEP and LogME. Prints a ranked table "
        "and writes similarity.json, similarity.txt and similarity.png into --out.",
    )
    p.add_argument("--target", required=True, metavar="TASK", help="corpus.task or a data file")
    p.add_argument(
        "--sources", required=True, metavar="TASKS", help="comma-separated candidate sources"
    )
    p.add_argument(
        "--encoder", default="minilm", metavar="NAME", help="minilm (default) | tiny | a folder"
    )
    p.add_argument(
        "--size", type=int, default=400, metavar="N", help="examples per task (default 400)"
    )
    p.add_argument(
        "--probe-size",
        type=int,
        metavar="N",
        help="examples per gradient batch (default: TAWT's tawt.probe_size, 64)",
    )
    p.add_argument(
        "--probe-batches", type=int, default=4, metavar="N", help="gradient batches (default 4)"
    )
    p.add_argument(
        "--keep",
        type=float,
        default=0.99,
        metavar="X",
        help="share of the covariance spectrum eq. 6 keeps (default 0.99)",
    )
    p.add_argument("--max-length", type=int, default=128, metavar="N", help="sub-words (128)")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="sampling seed (0)")
    p.add_argument("--out", default="runs/similarity", metavar="DIR", help="output folder")
    p.add_argument(
        "--cache",
        metavar="DIR",
        help="features and gradients cache (default: the corpus cache's similarity/)",
    )
    p.add_argument("--no-cache", action="store_true", help="compute everything afresh")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> None:
    import transformers  # noqa: PLC0415

    from pyxtask.config import TAWTConfig  # noqa: PLC0415
    from pyxtask.data import corpora  # noqa: PLC0415
    from pyxtask.similarity.report import compute, write_outputs  # noqa: PLC0415

    cast(Any, transformers).utils.logging.disable_progress_bar()  # the encoder's load
    sources = [s.strip() for s in args.sources.split(",") if s.strip()]
    cache = None if args.no_cache else (args.cache or corpora.cache_dir() / "similarity")
    result = compute(
        args.target,
        sources,
        encoder=args.encoder,
        size=args.size,
        max_length=args.max_length,
        probe_size=TAWTConfig().probe_size if args.probe_size is None else args.probe_size,
        probe_batches=args.probe_batches,
        keep=args.keep,
        seed=args.seed,
        cache=cache,
        progress=not args.quiet and sys.stderr.isatty(),
    )
    paths = write_outputs(result, args.out)
    print(result.table())
    print(f"{result.seconds:.0f} s; written: " + ", ".join(str(p) for p in paths))
