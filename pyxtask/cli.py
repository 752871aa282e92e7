"""The ``pyxtask`` command line: ``pyxtask data list | prepare NAME | info NAME``,
``pyxtask train [CONFIG] [--key value ...] [--resume]``, ``pyxtask export RUN_DIR --out
BUNDLE``, ``pyxtask similarity --target T --sources S1,S2``, ``pyxtask tag BUNDLE [FILE ...]``
and ``pyxtask serve BUNDLE``.

``tag`` and ``serve`` are :mod:`pyxtask.serving.cli`, run before this module builds its own
parser: they import nothing that needs torch (not even :mod:`pyxtask.bench` for the
parser), so a serving machine needs only onnxruntime, numpy, tokenizers (and
fastapi/uvicorn to serve), which is what the ``pyxtask-serve`` distribution installs. This
module imports whatever a torch-side command needs inside that command.

Errors a user can act on (an unknown corpus or task, a bad config key, a failed download, a
checksum mismatch, an unreadable checkpoint, missing training dependencies) print one
``error:`` line and exit with status 1, without a traceback; so does any other exception, as
``error: Type: message``, unless ``--debug`` asks for the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from typing import Any, cast

from pyxtask.serving import cli as serving_cli
from pyxtask.serving.cli import progress as _progress
from pyxtask.similarity import cli as _similarity_cli


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
        "tawt (default) | tawt-step | tawt-samples | fixed | equal | mgda | mgda-ub | "
        "metaweighting | gradnorm | uncertainty | upgrad | dualproj | pcgrad | cagrad | imtl-g | "
        "aligned-mtl | nash-mtl | dwa | famo | rlw | metaxt | xt | alignment | svd "
        "(or a registered method)",
    ),
    ("--weights-as", "weights_as", str, "loss (factors, the paper) | sampling (probabilities)"),
    ("--epoch", "epoch", str, "stream (all tasks' batches) | target (one pass over the target)"),
    ("--encoder", "encoder", str, "minilm | tiny | window-mlp | an encoder folder | a run's best/"),
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
    "similarity": ("torch", "transformers"),
    "samples": ("torch",),
}
# Errors a user can act on (module, class): the message says what is wrong and what to do.
# Looked up among the modules loaded so far, so tag and serve never import torch for them.
_USER_ERRORS = [
    *serving_cli.USER_ERRORS,
    ("pyxtask.config", "ConfigError"),
    ("pyxtask.data.corpora", "CorpusError"),
    ("pyxtask.data.corpora", "FetchError"),
    ("pyxtask.data.readers", "CorpusFormatError"),
    ("pyxtask.data.files", "FileTaskError"),
    ("pyxtask.export", "ExportError"),
    ("pyxtask.checkpoint", "CheckpointError"),
    ("pyxtask.distributed", "DistributedError"),
    ("pyxtask.sample_report", "SampleReportError"),
]

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    from pyxtask.bench import add_arguments  # noqa: PLC0415 -- tag and serve never need it

    parser = argparse.ArgumentParser(
        prog="pyxtask",
        description="Cross-task learning: prepare corpora, train with source tasks, export the "
        "target model, tag and serve with it.",
    )
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
    train.add_argument(
        "--dist-statistics",
        dest="dist_statistics",
        metavar="CHOICE",
        help="under torchrun: per-task statistics exact (T x P gradients summed, default) | "
        "cheap (each process's statistics summed)",
    )
    train.add_argument(
        "--dist-timeout",
        dest="dist_timeout",
        type=float,
        metavar="X",
        help="under torchrun: seconds a process waits for the others before the run fails "
        "(default 600)",
    )
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

    samples = commands.add_parser(
        "samples", help="a tawt-samples run's least and most trusted source examples, plots"
    )
    samples.add_argument("run_dir", metavar="RUN_DIR", help="a run of --method tawt-samples")
    samples.add_argument("--top", type=int, default=20, metavar="N", help="rows per end (20)")

    _similarity_cli.add_parser(commands)
    serving_cli.add_tag(commands)
    bench = commands.add_parser(
        "bench",
        help="time every method's step (and the peers') against the plain step; --ops: the ops",
    )
    add_arguments(bench)
    serving_cli.add_serve(commands)
    serving_cli.add_debug(parser, commands)
    return parser


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
    distributed = dict(base.get("distributed", {}))
    if args.dist_statistics is not None:
        distributed["statistics"] = args.dist_statistics
    if args.dist_timeout is not None:
        distributed["timeout"] = args.dist_timeout
    if distributed:
        base["distributed"] = distributed
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
    import json  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    from pyxtask.export import ExportError, export_run  # noqa: PLC0415
    from pyxtask.window_mlp import ENCODER  # noqa: PLC0415

    run_config = Path(args.run_dir) / "config.json"
    if run_config.is_file() and json.loads(run_config.read_text()).get("encoder") == ENCODER:
        raise ExportError(
            f"{args.run_dir}: encoder {ENCODER!r} is not exported: its word vectors cover only the "
            "run's own words; evaluate its best/ with pyxtask.models.MultiTaskModel.load"
        )
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
    from pyxtask.distributed import torchrun_environment  # noqa: PLC0415

    env = torchrun_environment()
    main_process = env is None or env["rank"] == 0  # under torchrun, rank 0 speaks
    if not main_process:
        import warnings  # noqa: PLC0415

        warnings.simplefilter("ignore")  # rank 0 already says it once
    result = run_experiment(
        config,
        resume=args.resume,
        progress=not args.quiet and main_process,
        log=_progress if main_process else lambda line: None,
    )
    if not main_process:
        return
    print(result.table())
    print(f"run folder: {config.output} (summary.json, metrics.jsonl, weights.csv, *.png, best/)")
    if config.method == "tawt-samples" and os.path.exists(f"{config.output}/sample_weights.pt"):
        from pyxtask.sample_report import write_report  # noqa: PLC0415

        write_report(config.output)
        print(f"sample weights: pyxtask samples {config.output} (sample_weights*.png, *.csv)")


def _samples(args: argparse.Namespace) -> None:
    from pyxtask import sample_report  # noqa: PLC0415

    if args.top < 1:
        raise ValueError(f"--top {args.top}: expected a number of rows >= 1")
    paths = sample_report.write_report(args.run_dir, args.top)
    print(sample_report.text_table(sample_report.load_sample_weights(args.run_dir), args.top))
    print("written: " + ", ".join(p.name for p in paths))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); return the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if serving_cli.command_of(argv) in serving_cli.COMMANDS:
        # The same code as pyxtask-serve's, and no torch-side parser (bench's options) built.
        return serving_cli.main(argv)
    return serving_cli.run_guarded(_parser().parse_args(argv), _run, _USER_ERRORS)


def _run(args: argparse.Namespace) -> int:
    if args.command == "tag":  # reached only when command_of could not tell (pyxtask --deb tag)
        return serving_cli.tag(args)
    if args.command == "serve":
        serving_cli.serve(args)
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
    elif args.command == "similarity":
        _similarity_cli.run(args)
    elif args.command == "samples":
        _samples(args)
    else:
        _data(args)
    return 0


def _data(args: argparse.Namespace) -> None:
    from pyxtask.data import corpora, files  # noqa: PLC0415

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


if __name__ == "__main__":
    sys.exit(main())
