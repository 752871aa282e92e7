"""The ``pyxtask`` command line: ``pyxtask data list | prepare NAME | info NAME`` and
``pyxtask train [CONFIG] [--key value ...] [--resume]``.

Errors a user can act on (an unknown corpus or task, a bad config key, a failed download, a
checksum mismatch) print one ``error:`` line and exit with status 1, without a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any, cast

from pyxtask.data import corpora

# Flags of `pyxtask train`: (flag, config key, type, help). A flag overrides the config file.
_TRAIN_FLAGS: list[tuple[str, str, type, str]] = [
    ("--target", "target", str, "target task, corpus.task (default wsj-pos.pos)"),
    ("--target-size", "target_size", int, "target training sentences (default 200)"),
    ("--sources", "sources", str, "comma-separated source tasks"),
    ("--source-size", "source_size", int, "training sentences per source task (default 2000)"),
    ("--dev-size", "dev_size", int, "target dev sentences (default: all)"),
    ("--test-size", "test_size", int, "target test sentences (default: all)"),
    ("--paradigm", "paradigm", str, "single | joint | normalized-joint | pretrain"),
    ("--weighting", "weighting", str, "fixed | tawt"),
    ("--weights-as", "weights_as", str, "loss (factors, the paper) | sampling (probabilities)"),
    ("--epoch", "epoch", str, "stream (all tasks' batches) | target (one pass over the target)"),
    ("--encoder", "encoder", str, "minilm | tiny | a local encoder folder"),
    ("--epochs", "epochs", int, "epochs (default 4)"),
    ("--batch-size", "batch_size", int, "batch size (default 32)"),
    ("--lr", "lr", float, "AdamW learning rate (default 5e-5)"),
    ("--max-length", "max_length", int, "sub-words per window (default 128)"),
    ("--seed", "seed", int, "seed (default 0)"),
    ("--device", "device", str, "auto | cpu | cuda[:N]"),
    ("--output", "output", str, "run folder"),
    ("--compare", "compare", str, "baselines: single,single-steps,joint,normalized-joint,pretrain"),
    ("--checkpoint-every", "checkpoint_every", int, "checkpoint every N steps (default 50)"),
    ("--cache", "cache", str, "corpus cache folder"),
]
_TAWT_FLAGS: list[tuple[str, str, type, str]] = [
    ("--similarity", "similarity", str, "TAWT: cosine (paper) | dot | exact (eq. 2.7, CG)"),
    ("--c", "c", str, "TAWT: g = -c * s; comma-separated values sweep (pretrain)"),
    ("--update-every", "update_every", int, "TAWT: update every N steps (default: per epoch)"),
    ("--gradients", "gradients", str, "TAWT probe gradients: streaming | buffer"),
]

__all__ = ["main"]


def _progress(line: str) -> None:
    # Progress goes to stderr so stdout stays the card, fit for redirecting to a file.
    print(line, file=sys.stderr, flush=True)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pyxtask", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    data = commands.add_parser("data", help="named corpora: list, prepare, info")
    actions = data.add_subparsers(dest="action", required=True)
    actions.add_parser("list", help="list the named corpora and whether each is prepared")
    cache_help = "cache folder (default: $PYXTASK_CACHE, $XDG_CACHE_HOME/pyxtask, ~/.cache/pyxtask)"
    prepare = actions.add_parser("prepare", help="fetch, check and convert a corpus once")
    prepare.add_argument("name")
    prepare.add_argument("--cache", help=cache_help)
    info = actions.add_parser("info", help="print a corpus card: counts, tasks, labels, licence")
    info.add_argument("name")
    info.add_argument("--cache", help=cache_help)

    train = commands.add_parser(
        "train",
        help="train a target model with source tasks (TAWT and baselines)",
        description="Train a target task with help from source tasks. Settings come from "
        "CONFIG (.toml, .yaml or .json; keys as in pyxtask.config.TrainConfig) and the flags, "
        "which override it.",
    )
    train.add_argument("config", nargs="?", help="config file (.toml, .yaml, .json)")
    for flag, key, kind, text in _TRAIN_FLAGS + _TAWT_FLAGS:
        train.add_argument(flag, dest=f"set_{key}", type=kind, help=text)
    train.add_argument("--resume", action="store_true", help="continue the run in --output")
    train.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def _train_config(args: argparse.Namespace) -> Any:
    from pyxtask.config import from_mapping, load_config  # noqa: PLC0415

    base = load_config(args.config).to_dict() if args.config else {}
    for _, key, _, _ in _TRAIN_FLAGS:
        value = getattr(args, f"set_{key}")
        if value is not None:
            base[key] = value
    tawt = dict(base.get("tawt", {}))
    for _, key, _, _ in _TAWT_FLAGS:
        value = getattr(args, f"set_{key}")
        if value is None:
            continue
        if key == "c":
            try:
                cs = [float(x) for x in str(value).split(",") if x.strip()]
            except ValueError:
                raise ValueError(
                    f"--c {value!r}: expected a number or comma-separated numbers"
                ) from None
            value = cs[0] if len(cs) == 1 else cs
        tawt[key] = value
    if tawt:
        base["tawt"] = tawt
    return from_mapping(base, source=args.config or "flags")


def _train(args: argparse.Namespace) -> None:
    import transformers  # noqa: PLC0415

    from pyxtask.train import run_experiment  # noqa: PLC0415

    config = _train_config(args)
    # The run's own tqdm bars say what is happening; transformers' per-save bars are noise.
    cast(Any, transformers).utils.logging.disable_progress_bar()
    result = run_experiment(config, resume=args.resume, progress=not args.quiet, log=_progress)
    print(result.table())
    print(f"run folder: {config.output} (summary.json, metrics.jsonl, weights.csv, *.png, best/)")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); return the exit status."""
    from pyxtask.config import ConfigError  # noqa: PLC0415

    args = _parser().parse_args(argv)
    try:
        if args.command == "train":
            _train(args)
        elif args.action == "list":
            for name in corpora.list_corpora():
                corpus = corpora.get_corpus(name)
                state = "prepared" if corpora.cached_card(name) is not None else "not prepared"
                print(f"{name:<14} {state:<13} {corpus.description}")
        elif args.action == "prepare":
            card = corpora.prepare(args.name, args.cache, progress=_progress)
            print(card.text())
        else:
            print(corpora.info(args.name, args.cache))
    except (corpora.CorpusError, corpora.FetchError, ConfigError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
