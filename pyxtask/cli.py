"""The ``pyxtask`` command line: ``pyxtask data list | prepare NAME | info NAME``,
``pyxtask train [CONFIG] [--key value ...] [--resume]``, ``pyxtask export RUN_DIR --out
BUNDLE``, ``pyxtask tag BUNDLE [FILE ...]`` and ``pyxtask serve BUNDLE``.

``tag`` and ``serve`` import nothing that needs torch, so a serving machine needs only
onnxruntime, numpy, tokenizers (and fastapi/uvicorn to serve).

Errors a user can act on (an unknown corpus or task, a bad config key, a failed download, a
checksum mismatch, an unreadable checkpoint, missing training dependencies) print one
``error:`` line and exit with status 1, without a traceback; so does any other exception, as
``error: Type: message``, unless ``--debug`` asks for the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from collections.abc import Sequence
from typing import Any, cast

from pyxtask.bench import add_arguments


def _size(text: str) -> int | str:
    """A number of sentences, or ``all``."""
    if text == "all":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'all', got {text!r}") from None


# Flags of `pyxtask train`: (flag, config key, type, help). A flag overrides the config file.
_TRAIN_FLAGS: list[tuple[str, str, Any, str]] = [
    (
        "--target",
        "target",
        str,
        "target task: corpus.task (default wsj-pos.pos), a data file (.conll, .conllu, .csv, "
        ".tsv, .jsonl), a corpus definition (.toml) or a [tasks.NAME] of the config",
    ),
    ("--target-size", "target_size", _size, "target training sentences, or all (default 200)"),
    ("--sources", "sources", str, "comma-separated source tasks (named, files or definitions)"),
    ("--source-size", "source_size", _size, "sentences per source task, or all (default 2000)"),
    ("--dev-size", "dev_size", _size, "target dev sentences (default: all)"),
    ("--test-size", "test_size", _size, "target test sentences (default: all)"),
    (
        "--unseen-labels",
        "unseen_labels",
        str,
        "a dev/test label no training example has: error (default) | unknown",
    ),
    ("--paradigm", "paradigm", str, "single | joint | normalized-joint | pretrain"),
    (
        "--method",
        "method",
        str,
        "tawt (default) | tawt-step | fixed | equal | mgda | mgda-ub | metaweighting | "
        "gradnorm | uncertainty | upgrad | dualproj | pcgrad | cagrad | imtl-g | aligned-mtl | "
        "nash-mtl | dwa | famo | rlw | metaxt | xt (or a registered method)",
    ),
    ("--weights-as", "weights_as", str, "loss (factors, the paper) | sampling (probabilities)"),
    ("--epoch", "epoch", str, "stream (all tasks' batches) | target (one pass over the target)"),
    ("--encoder", "encoder", str, "minilm | tiny | a local encoder folder"),
    ("--epochs", "epochs", int, "epochs (default 4)"),
    ("--batch-size", "batch_size", int, "batch size (default 32)"),
    ("--accumulate", "accumulate", int, "micro-batches per optimizer step (default 1)"),
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
# What each string flag's value is, for --help (numbers are N or X).
_METAVARS = {
    "target": "TASK",
    "sources": "TASKS",
    "target_size": "N",
    "source_size": "N",
    "dev_size": "N",
    "test_size": "N",
    "unseen_labels": "CHOICE",
    "paradigm": "NAME",
    "method": "NAME",
    "weights_as": "CHOICE",
    "epoch": "CHOICE",
    "encoder": "NAME",
    "device": "DEVICE",
    "output": "DIR",
    "compare": "NAMES",
    "cache": "DIR",
    "similarity": "CHOICE",
    "c": "X",
    "gradients": "CHOICE",
}
# Modules each torch-side command imports first: without them, say what to install.
_NEEDS = {
    "train": ("torch", "transformers"),
    "export": ("torch", "transformers"),
    "bench": ("torch", "transformers"),
    "data": ("torch",),
}
# Errors a user can act on (module, class): the message says what is wrong and what to do.
# Looked up among the modules loaded so far, so tag and serve never import torch for them.
_USER_ERRORS = [
    ("pyxtask.serving.bundle", "BundleError"),
    ("pyxtask.config", "ConfigError"),
    ("pyxtask.data.corpora", "CorpusError"),
    ("pyxtask.data.corpora", "FetchError"),
    ("pyxtask.data.readers", "CorpusFormatError"),
    ("pyxtask.data.files", "FileTaskError"),
    ("pyxtask.export", "ExportError"),
    ("pyxtask.checkpoint", "CheckpointError"),
]

__all__ = ["main"]


def _progress(line: str) -> None:
    # Progress goes to stderr so stdout stays the card, fit for redirecting to a file.
    print(line, file=sys.stderr, flush=True)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pyxtask",
        description="Cross-task learning: prepare corpora, train with source tasks, export the "
        "target model, tag and serve with it.",
    )
    parser.add_argument("--debug", action="store_true", help=_DEBUG_HELP)
    commands = parser.add_subparsers(dest="command", required=True)
    data = commands.add_parser("data", help="named corpora: list, prepare, info")
    actions = data.add_subparsers(dest="action", required=True)
    actions.add_parser("list", help="list the named corpora and whether each is prepared")
    cache_help = "cache folder (default: $PYXTASK_CACHE, $XDG_CACHE_HOME/pyxtask, ~/.cache/pyxtask)"
    prepare = actions.add_parser("prepare", help="fetch, check and convert a corpus once")
    prepare.add_argument("name", metavar="NAME", help="a corpus (pyxtask data list)")
    prepare.add_argument("--cache", help=cache_help, metavar="DIR")
    info = actions.add_parser("info", help="print a corpus card: counts, tasks, labels, licence")
    info.add_argument(
        "name", metavar="NAME", help="a corpus (pyxtask data list), a data file or a definition"
    )
    info.add_argument("--cache", help=cache_help, metavar="DIR")

    train = commands.add_parser(
        "train",
        help="train a target model with source tasks (TAWT and baselines)",
        description="Train a target task with help from source tasks. Settings come from "
        "CONFIG (.toml, .yaml or .json; keys as in pyxtask.config.TrainConfig) and the flags, "
        "which override it.",
    )
    train.add_argument(
        "config", nargs="?", metavar="CONFIG", help="config file (.toml, .yaml, .json)"
    )
    for flag, key, kind, text in _TRAIN_FLAGS + _TAWT_FLAGS:
        metavar = {int: "N", float: "X"}.get(kind) or _METAVARS[key]
        train.add_argument(flag, dest=f"set_{key}", type=kind, help=text, metavar=metavar)
    train.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any config key, also a method's table: --set metaweighting.eta=1e-3 "
        "--set mgda.normalization=l2 (values are read as TOML: numbers, true/false, strings)",
    )
    # The key's old name (configs say weighting = "tawt" | "fixed"): still read.
    train.add_argument("--weighting", dest="set_weighting", help=argparse.SUPPRESS)
    train.add_argument("--resume", action="store_true", help="continue the run in --output")
    train.add_argument("--quiet", action="store_true", help="no progress bars")

    export = commands.add_parser(
        "export", help="export a run's target model: ONNX, TorchScript, tokenizer, labels"
    )
    export.add_argument(
        "run_dir", metavar="RUN_DIR", help="a finished run folder (pyxtask train --output)"
    )
    export.add_argument("--out", required=True, metavar="DIR", help="bundle folder to write")
    export.add_argument(
        "--opset", type=int, default=17, metavar="N", help="ONNX opset, 10-20 (default 17)"
    )
    export.add_argument("--fp16", action="store_true", help="also fp16 weights (model.fp16.onnx)")
    export.add_argument(
        "--int8", action="store_true", help="also dynamic int8 quantization (model.int8.onnx)"
    )
    export.add_argument(
        "--no-optimize", action="store_true", help="skip onnxruntime's transformer fusions"
    )
    export.add_argument("--no-torchscript", action="store_true", help="skip model.ts")
    export.add_argument(
        "--no-measure",
        action="store_true",
        help="skip measuring each variant on the target's test split",
    )
    export.add_argument("--overwrite", action="store_true", help="replace an existing bundle")

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

    bench = commands.add_parser(
        "bench",
        help="time every method's step (and the peers') against the plain step; --ops: the ops",
    )
    add_arguments(bench)

    serve = commands.add_parser("serve", help="serve a bundle over HTTP (POST /v1/tag)")
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
        "--no-access-log",
        dest="access_log",
        action="store_false",
        help="no log line per request (uvicorn's access log; errors are still logged)",
    )
    _add_debug(commands)
    return parser


_DEBUG_HELP = "print an error's traceback (default: one error line)"


def _add_debug(commands: Any) -> None:
    """``--debug`` after the subcommand too (``pyxtask train --debug``)."""
    for sub in commands.choices.values():
        # SUPPRESS: absent here, it leaves the top-level flag's value alone.
        sub.add_argument(
            "--debug", action="store_true", default=argparse.SUPPRESS, help=_DEBUG_HELP
        )
        for action in sub._actions:
            if isinstance(action, argparse._SubParsersAction):
                _add_debug(action)


def _train_config(args: argparse.Namespace) -> Any:
    from pyxtask.config import from_mapping, load_config  # noqa: PLC0415

    base = load_config(args.config).to_dict() if args.config else {}
    if args.set_weighting is not None:
        base["weighting"] = args.set_weighting
        base.pop("method", None)
    for item in args.overrides:
        _override(base, item)
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


def _override(config: dict[str, Any], item: str) -> None:
    """``KEY=VALUE`` (``section.key=value`` for a method's table) into a config mapping."""
    import tomllib  # noqa: PLC0415

    from pyxtask.config import ConfigError  # noqa: PLC0415

    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set metaweighting.eta=1e-3")
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text  # a bare word: a string
    *tables, name = key.strip().split(".")
    target = config
    for table in tables:
        inner = target.get(table)
        target[table] = inner = dict(inner) if isinstance(inner, dict) else {}
        target = inner
    target[name] = value


def _export(args: argparse.Namespace) -> None:
    from pyxtask.export import export_run  # noqa: PLC0415

    _no_transformers_bars()  # the loads of the run's model: noise beside the export's lines
    manifest = export_run(
        args.run_dir,
        args.out,
        opset=args.opset,
        fp16=args.fp16,
        int8=args.int8,
        optimize=not args.no_optimize,
        torchscript=not args.no_torchscript,
        measure=not args.no_measure,
        overwrite=args.overwrite,
        log=_progress,
    )
    print(
        f"bundle: {args.out} ({manifest['task']}, {manifest['kind']} task, "
        f"{len(manifest['labels'])} labels, opset {manifest['opset']})"
    )
    fp32 = manifest["variants"]["fp32"].get("test_metric")
    for name, variant in manifest["variants"].items():
        metric = variant.get("test_metric")
        measured = (
            "not measured" if metric is None else f"test {manifest['metric']} {100 * metric:.2f}"
        )
        if metric is not None and fp32 is not None and name != "fp32":
            measured += f" ({100 * (metric - fp32):+.2f} points vs fp32)"
        fused = "fused" if variant.get("optimized") else "unfused"
        print(f"  {name:<5} {variant['file']:<18} {fused:<8} {measured}")


def _tag(args: argparse.Namespace) -> int:
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
        _progress(f"tagged {count} sentences; {len(problems)} warning(s) above")
    return 0


def _serve(args: argparse.Namespace) -> None:
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
    )


def _bench(args: argparse.Namespace) -> int:
    if args.ops:
        from pyxtask.bench import ops  # noqa: PLC0415

        device = "cuda" if args.device.startswith("cuda") else "cpu"
        argv = ["--device", device, "--out", str(args.out / "bench_ops.json")]
        return ops.main(argv + ["--quick"] * args.quick)
    from pyxtask.bench import steps  # noqa: PLC0415

    if not sys.stderr.isatty():  # a log file would hold every redraw of every bar
        _no_transformers_bars()
    try:
        return steps.run(args)
    except steps.BenchOptionError as exc:  # a bad option value: one line, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _no_transformers_bars() -> None:
    import transformers  # noqa: PLC0415

    cast(Any, transformers).utils.logging.disable_progress_bar()


def _train(args: argparse.Namespace) -> None:
    from pyxtask.experiment import run_experiment  # noqa: PLC0415

    config = _train_config(args)
    # The run's own tqdm bars say what is happening; transformers' per-save bars are noise.
    _no_transformers_bars()
    result = run_experiment(config, resume=args.resume, progress=not args.quiet, log=_progress)
    print(result.table())
    print(f"run folder: {config.output} (summary.json, metrics.jsonl, weights.csv, *.png, best/)")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); return the exit status."""
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        _report(exc, args)
        return 1


def _run(args: argparse.Namespace) -> int:
    if args.command == "tag":  # tag and serve: torch-free paths
        return _tag(args)
    if args.command == "serve":
        _serve(args)
        return 0
    missing = _missing_dependency(args.command)
    if missing is not None:
        print(f"error: {missing}", file=sys.stderr)
        return 1
    if args.command == "bench":
        return _bench(args)
    if args.command == "train":
        _train(args)
    elif args.command == "export":
        _export(args)
    else:
        _data(args)
    return 0


def _data(args: argparse.Namespace) -> None:
    from pyxtask.data import corpora  # noqa: PLC0415
    from pyxtask.data import files  # noqa: PLC0415

    if args.action == "list":
        for name in corpora.list_corpora():
            corpus = corpora.get_corpus(name)
            state = "prepared" if corpora.cached_card(name) is not None else "not prepared"
            print(f"{name:<14} {state:<13} {corpus.description}")
    elif args.action == "prepare":
        card = corpora.prepare(args.name, args.cache, progress=_progress)
        print(card.text())
    elif files.is_task_file(args.name):
        print(files.card(*files.infer_task(args.name)))
    else:
        print(corpora.info(args.name, args.cache))


def _missing_dependency(command: str) -> str | None:
    """What to install when a module ``command`` needs cannot be imported, else None."""
    needs = _NEEDS.get(command, ())
    for module in needs:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            return (
                f"pyxtask {command} needs {' and '.join(needs)}, and {module} cannot be "
                f"imported ({exc}); install: pip install {' '.join(needs)}"
            )
    return None


def _report(exc: Exception, args: argparse.Namespace) -> None:
    """One ``error:`` line on stderr; with ``--debug`` the traceback before it."""
    if args.debug:
        traceback.print_exc()
    if isinstance(exc, _user_errors()):
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


def _user_errors() -> tuple[type[BaseException], ...]:
    found: list[type[BaseException]] = [OSError]
    for module, name in _USER_ERRORS:
        error = getattr(sys.modules.get(module), name, None)
        if isinstance(error, type) and issubclass(error, BaseException):
            found.append(error)
    return tuple(found)


if __name__ == "__main__":
    sys.exit(main())
