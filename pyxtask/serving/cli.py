"""``pyxtask tag`` and ``pyxtask serve``: the serving half of the command line.

This is the whole command line of the torch-free ``pyxtask-serve`` distribution
(``packaging/pyxtask-serve``) and the code :mod:`pyxtask.cli` runs for these two commands, so
both installs parse, tag, serve and report errors the same way. Only the standard library is
imported up front: ``--help`` and argument errors load nothing else, the commands import what
they use (numpy, onnxruntime, tokenizers; fastapi and uvicorn to serve), and nothing here
loads torch, transformers or the compiled extension.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any

__all__ = [
    "COMMANDS",
    "USER_ERRORS",
    "add_debug",
    "add_serve",
    "add_tag",
    "command_of",
    "main",
    "progress",
    "run_guarded",
    "serve",
    "tag",
]

COMMANDS = ("tag", "serve")
# Commands of the full pyxtask: named when asked of pyxtask-serve, rather than "invalid choice".
_TORCH_SIDE = ("data", "train", "export", "bench")
# Errors a user can act on (module, class): the message says what is wrong and what to do.
# Looked up among the modules loaded so far, so recognising one never imports anything.
USER_ERRORS = [("pyxtask.serving.bundle", "BundleError")]
_DEBUG_HELP = "print an error's traceback (default: one error line)"


def progress(line: str) -> None:
    # Progress goes to stderr so stdout stays the result, fit for redirecting to a file.
    print(line, file=sys.stderr, flush=True)


def add_tag(commands: Any) -> None:
    """The ``tag`` subcommand and its options, on ``commands`` (an argparse subparsers)."""
    tag = commands.add_parser("tag", help="tag files or stdin with an exported bundle")
    tag.add_argument("bundle", metavar="BUNDLE", help="an exported bundle folder")
    tag.add_argument(
        "inputs", nargs="*", metavar="FILE", help="input files (default: stdin; '-' is stdin)"
    )
    tag.add_argument(
        "--format",
        default="text",
        choices=["text", "conll", "jsonl"],
        help="input: one sentence per line (text), CoNLL words, or JSONL",
    )
    tag.add_argument(
        "--output-format",
        default="conll",
        choices=["conll", "jsonl"],
        help="output: CoNLL word-tag columns or JSONL (default conll)",
    )
    tag.add_argument("--output", "-o", metavar="FILE", help="output file (default: stdout)")
    tag.add_argument(
        "--variant", default="fp32", metavar="NAME", help="fp32 | fp16 | int8 (if exported)"
    )
    tag.add_argument(
        "--batch-size",
        type=int,
        metavar="N",
        help="windows per model call (default 32; int8: 1, see Tagger)",
    )
    tag.add_argument("--threads", type=int, metavar="N", help="onnxruntime intra-op threads")
    tag.add_argument("--quiet", action="store_true", help="no progress bar")


def add_serve(commands: Any) -> None:
    """The ``serve`` subcommand and its options, on ``commands`` (an argparse subparsers)."""
    serve = commands.add_parser(
        "serve",
        help="serve a bundle over HTTP: POST /v1/tag, the V2 inference protocol, /metrics",
    )
    serve.add_argument("bundle", metavar="BUNDLE", help="an exported bundle folder")
    serve.add_argument(
        "--host", default="127.0.0.1", metavar="HOST", help="address (default 127.0.0.1)"
    )
    serve.add_argument("--port", type=int, default=8000, metavar="N", help="port (default 8000)")
    serve.add_argument(
        "--variant", default="fp32", metavar="NAME", help="fp32 | fp16 | int8 (if exported)"
    )
    serve.add_argument("--threads", type=int, metavar="N", help="onnxruntime intra-op threads")
    serve.add_argument(
        "--max-batch", type=int, default=64, metavar="N", help="sentences per model call"
    )
    serve.add_argument(
        "--max-wait-ms",
        type=float,
        default=0.0,
        metavar="X",
        help="how long a batch waits for more requests (default 0: it takes what queued "
        "while the model ran; a wait pays on GPUs, where bigger batches are cheaper)",
    )
    serve.add_argument(
        "--model-name", metavar="NAME", help="the V2 model name (default: the bundle's task)"
    )
    serve.add_argument(
        "--max-queue",
        type=int,
        metavar="N",
        help="queued sentences before new requests get 503 + Retry-After (default 4 x --max-batch)",
    )
    serve.add_argument(
        "--max-request-sentences",
        type=int,
        default=256,
        metavar="N",
        help="most sentences in one request, 413 beyond (default 256; at most --max-queue)",
    )
    serve.add_argument(
        "--request-timeout",
        type=float,
        default=10.0,
        metavar="X",
        help="seconds a request may wait for the model before a 503 (default 10)",
    )
    serve.add_argument(
        "--body-timeout",
        type=float,
        default=10.0,
        metavar="X",
        help="seconds to read a request body before a 408 (default 10)",
    )
    serve.add_argument(
        "--no-access-log",
        dest="access_log",
        action="store_false",
        help="no log line per request (uvicorn's access log; errors are still logged)",
    )


def add_debug(parser: argparse.ArgumentParser, commands: Any) -> None:
    """``--debug`` before the subcommand and after it (``pyxtask tag --debug``)."""
    parser.add_argument("--debug", action="store_true", help=_DEBUG_HELP)
    _debug_after(commands)


def _debug_after(commands: Any) -> None:
    for sub in commands.choices.values():
        # SUPPRESS: absent here, it leaves the top-level flag's value alone.
        sub.add_argument(
            "--debug", action="store_true", default=argparse.SUPPRESS, help=_DEBUG_HELP
        )
        for action in sub._actions:
            if isinstance(action, argparse._SubParsersAction):
                _debug_after(action)


def tag(args: argparse.Namespace) -> int:
    """Tag the inputs (see :mod:`pyxtask.serving.files` for what is skipped and why).

    Every problem (a malformed line, invalid UTF-8, an input that cannot be read, a word left
    untagged) is one ``warning: file:line: problem`` on stderr, and the rest is still tagged.
    Exit status: 0 when every input that could be opened was tagged, warnings or not (a count
    of them closes the run), as it always was for malformed lines; 1 with ``error:`` when no
    input could be opened at all (an existing ``--output`` file is then left untouched).
    With ``--output`` the file appears only once the run is complete; a run that stops early
    leaves its output so far in ``FILE.partial``.
    """
    from pyxtask.serving.files import Output, read_inputs, tag_stream  # noqa: PLC0415
    from pyxtask.serving.tagger import Tagger  # noqa: PLC0415

    tagger = Tagger(args.bundle, args.variant, batch_size=args.batch_size, threads=args.threads)
    problems: list[str] = []

    def report(line: str) -> None:
        problems.append(line)
        print(f"warning: {line}", file=sys.stderr, flush=True)

    opened: list[str] = []
    items = read_inputs(args.inputs or ["-"], args.format, report, opened=opened)
    with Output(args.output, report) as output:
        count = tag_stream(
            tagger, items, output.stream, args.output_format, progress=not args.quiet, report=report
        )
        if not opened:
            output.discard()
    if not opened:
        print("error: no input could be read", file=sys.stderr)
        return 1
    if problems:
        progress(f"tagged {count} sentences; {len(problems)} warning(s) above")
    return 0


def serve(args: argparse.Namespace) -> None:
    from pyxtask.serving.server import serve  # noqa: PLC0415

    serve(
        args.bundle,
        host=args.host,
        port=args.port,
        variant=args.variant,
        threads=args.threads,
        max_batch_sentences=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        access_log=args.access_log,
        model_name=args.model_name,
        max_queue_sentences=args.max_queue,
        max_request_sentences=args.max_request_sentences,
        request_timeout_s=args.request_timeout,
        body_timeout_s=args.body_timeout,
    )


def command_of(argv: Sequence[str]) -> str | None:
    """The subcommand ``argv`` names, if it comes first (after a ``--debug``), else None."""
    for arg in argv:
        if arg != "--debug":
            return None if arg.startswith("-") else arg
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``pyxtask tag`` or ``pyxtask serve`` with ``argv`` (default ``sys.argv[1:]``)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    command = command_of(argv)
    if command in _TORCH_SIDE:
        print(
            f"error: pyxtask {command} is not part of pyxtask-serve, which has only tag and "
            "serve; it needs the full pyxtask (with torch), in an environment of its own",
            file=sys.stderr,
        )
        return 2
    return run_guarded(_parser().parse_args(argv), _run, USER_ERRORS)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pyxtask",
        description="Tag and serve with a bundle that pyxtask export wrote (pyxtask-serve: "
        "train, export, data and bench are in the full pyxtask).",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    add_tag(commands)
    add_serve(commands)
    add_debug(parser, commands)
    return parser


def _run(args: argparse.Namespace) -> int:
    if args.command == "tag":
        return tag(args)
    serve(args)
    return 0


def run_guarded(
    args: argparse.Namespace,
    run: Callable[[argparse.Namespace], int],
    user_errors: Sequence[tuple[str, str]],
) -> int:
    """``run(args)``'s exit status; an exception is one ``error:`` line and status 1.

    ``user_errors`` are the (module, class) errors whose message is the whole story: no
    type name, no hint of a traceback.
    """
    try:
        return run(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        _report(exc, args, user_errors)
        return 1


def _report(
    exc: Exception, args: argparse.Namespace, user_errors: Sequence[tuple[str, str]]
) -> None:
    """One ``error:`` line on stderr; with ``--debug`` the traceback before it."""
    if args.debug:
        traceback.print_exc()
    if isinstance(exc, _loaded_errors(user_errors)):
        print(f"error: {exc}", file=sys.stderr)
        return
    name = getattr(exc, "name", None) if isinstance(exc, ModuleNotFoundError) else None
    if name and not name.startswith("pyxtask"):
        needed = name.split(".")[0]
        print(f"error: pyxtask {args.command} needs {needed} ({exc})", file=sys.stderr)
    elif not args.debug:  # the traceback already ends with the exception's type and message
        message = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        print(
            f"error: {type(exc).__name__}: {message} (run with --debug for the traceback)",
            file=sys.stderr,
        )


def _loaded_errors(user_errors: Sequence[tuple[str, str]]) -> tuple[type[BaseException], ...]:
    found: list[type[BaseException]] = [OSError]
    for module, name in user_errors:
        error = getattr(sys.modules.get(module), name, None)
        if isinstance(error, type) and issubclass(error, BaseException):
            found.append(error)
    return tuple(found)


if __name__ == "__main__":
    sys.exit(main())
