"""The ``pyxtask`` command line: ``pyxtask data list | prepare NAME | info NAME``.

Errors a user can act on (an unknown corpus, a failed download, a checksum mismatch) print one
``error:`` line and exit with status 1, without a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from pyxtask.data import corpora

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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); return the exit status."""
    args = _parser().parse_args(argv)
    try:
        if args.action == "list":
            for name in corpora.list_corpora():
                corpus = corpora.get_corpus(name)
                state = "prepared" if corpora.cached_card(name) is not None else "not prepared"
                print(f"{name:<14} {state:<13} {corpus.description}")
        elif args.action == "prepare":
            card = corpora.prepare(args.name, args.cache, progress=_progress)
            print(card.text())
        else:
            print(corpora.info(args.name, args.cache))
    except (corpora.CorpusError, corpora.FetchError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
