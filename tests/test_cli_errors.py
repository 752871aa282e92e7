"""A user's mistake anywhere in the command line is one ``error:`` line, never a traceback.

Training runs here are tiny (the random ``tiny`` encoder, 16 target sentences of a fake
corpus, 4 steps an epoch) and run in-process through :func:`pyxtask.cli.main`.
"""

import ast
import json
import pickle
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pyxtask import cli
from pyxtask.data import corpora
from pyxtask.data.corpora import _core
from pyxtask.data.readers import read_word_tag
from pyxtask.export import OPSETS, ExportError, export_run
from pyxtask.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
REMEDY = "delete it and run again with --resume to start the run over, or point --output elsewhere"
STEPS = 2 * 4  # 2 epochs of ceil(16 / 4) steps
INTERRUPT_AT = 6  # the step the first run is interrupted in: its checkpoint is at step 5


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A registered fake corpus ``clierr.pos`` (28 sentences: 16 train, 6 dev, 6 test)."""
    root = tmp_path_factory.mktemp("clierr")
    rng = random.Random(0)
    lines = [
        " ".join(f"w{i}/{'AB'[i % 2]}" for i in (rng.randrange(20) for _ in range(6)))
        for _ in range(28)
    ]
    archive = root / "clierr-1.0.txt"
    archive.write_text("\n".join(lines) + "\n", encoding="utf-8")

    def convert(path: Path):
        sentences = list(read_word_tag(path))
        return {
            "train": {"pos": sentences[:16]},
            "dev": {"pos": sentences[16:22]},
            "test": {"pos": sentences[22:]},
        }

    source = corpora.Source(
        "clierr==1.0", archive.name, corpora.sha256_file(archive), True, "x.txt"
    )
    registered = corpora.register(
        corpora.Corpus("clierr", "fake", "CC0", source, {"pos": "token"}, convert, "in order")
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(
            _core,
            "_default_fetcher",
            lambda s, folder: corpora.copy_verified(archive, s.sha256, folder),
        )
        mp.setenv("PYXTASK_CACHE", str(root / "cache"))
        yield registered
    corpora.unregister("clierr")


def train_args(output, *extra):
    return [
        "train",
        *("--target", "clierr.pos", "--target-size", "16", "--paradigm", "single"),
        *("--method", "fixed", "--encoder", "tiny", "--epochs", "2", "--batch-size", "4"),
        *("--max-length", "32", "--device", "cpu", "--checkpoint-every", "1"),
        *("--output", str(output), *extra),
    ]


def counting_steps(monkeypatch, stop_at=None):
    """Count the trainer's optimizer steps; Ctrl-C in step ``stop_at``."""
    step = Trainer._step
    calls = []

    def counted(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == stop_at:
            raise KeyboardInterrupt
        return step(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "_step", counted)
    return calls


@pytest.fixture(scope="module")
def interrupted(corpus, tmp_path_factory):
    """A run stopped by Ctrl-C in step 6: config.json, logs and the checkpoint of step 5."""
    run = tmp_path_factory.mktemp("interrupted") / "run"
    with pytest.MonkeyPatch.context() as mp:
        counting_steps(mp, stop_at=INTERRUPT_AT)
        assert cli.main(train_args(run, "--quiet")) == 130
    saved = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert saved["global_step"] == INTERRUPT_AT - 1
    return run


def one_error_line(capsys):
    printed = capsys.readouterr()
    assert "Traceback" not in printed.err
    lines = printed.err.strip().splitlines()
    # Progress lines may come first (what the run loads); the error ends it, once.
    assert [line.startswith("error: ") for line in lines].count(True) == 1, printed.err
    assert lines[-1].startswith("error: "), printed.err
    return lines[-1]


# --------------------------------------------------------------------------------------------
# 1. A checkpoint that cannot be resumed from


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


UNREADABLE = "cannot be read, it is truncated, corrupted or not a checkpoint"
CORRUPTIONS = {
    "empty": (lambda p: p.write_bytes(b""), "empty file, not a checkpoint"),
    "truncated": (_truncate, f"{UNREADABLE} (PytorchStreamReader failed reading zip archive"),
    "random bytes": (
        lambda p: p.write_bytes(random.Random(1).randbytes(4096)),
        f"{UNREADABLE} (invalid load key",
    ),
    "foreign torch file": (
        lambda p: torch.save({"a": 1}, p),
        "not a pyxtask training checkpoint (no phase, epoch, sampler, optimizer, ...)",
    ),
    "foreign pickle": (
        lambda p: p.write_bytes(pickle.dumps({"a": 1})),
        f"{UNREADABLE} (Invalid magic number; corrupt file?)",
    ),
    "foreign weights": (
        lambda p: torch.save(
            {**torch.load(p, weights_only=False), "model": {"w": torch.zeros(2)}}, p
        ),
        "its model does not fit this run's (Missing key(s) in state_dict: ",
    ),
}


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_bad_checkpoint_is_one_error_line_and_nothing_is_lost(interrupted, tmp_path, capsys, kind):
    run = tmp_path / "run"
    shutil.copytree(interrupted, run)
    spoil, what = CORRUPTIONS[kind]
    spoil(run / "checkpoint.pt")
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert cli.main(train_args(run, "--resume", "--quiet")) == 1
    line = one_error_line(capsys)
    assert line.startswith(f"error: {run / 'checkpoint.pt'}: {what}"), line
    assert line.endswith(f"; {REMEDY}")
    after = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert after == before  # the checkpoint and the logs are as they were


def test_the_remedy_for_a_bad_checkpoint_works(interrupted, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(interrupted, run)
    (run / "checkpoint.pt").write_bytes(b"")
    assert cli.main(train_args(run, "--resume", "--quiet")) == 1
    (run / "checkpoint.pt").unlink()  # what the error says to do
    assert cli.main(train_args(run, "--resume", "--quiet")) == 0
    assert json.loads((run / "summary.json").read_text())["steps"] == STEPS


# --------------------------------------------------------------------------------------------
# 2. --resume where there is no run


@pytest.mark.parametrize("exists", [True, False])
def test_resume_of_a_folder_without_a_run_is_an_error(corpus, tmp_path, capsys, exists):
    run = tmp_path / "empty"
    if exists:
        run.mkdir()
    assert cli.main(train_args(run, "--resume", "--quiet")) == 1
    assert one_error_line(capsys) == (
        f"error: --resume: {run} holds no run (no checkpoint); drop --resume to start a new run"
    )
    assert run.exists() == exists
    assert not exists or not any(run.iterdir())


# --------------------------------------------------------------------------------------------
# 3. A moved or copied run folder resumes; 8. no progress bars in a log


def test_copied_run_folder_resumes_where_it_stopped(interrupted, tmp_path, capsys, monkeypatch):
    copy = tmp_path / "elsewhere" / "run"
    shutil.copytree(interrupted, copy)
    original = {p: p.read_bytes() for p in interrupted.rglob("*") if p.is_file()}
    calls = counting_steps(monkeypatch)
    capsys.readouterr()
    assert cli.main(train_args(copy, "--resume")) == 0  # bars on, as a user runs it
    printed = capsys.readouterr()
    assert len(calls) == STEPS - (INTERRUPT_AT - 1)  # continued, not started again
    summary = json.loads((copy / "summary.json").read_text())
    assert summary["steps"] == STEPS
    assert json.loads((copy / "config.json").read_text())["output"] == str(copy)
    assert f"run folder: {copy}" in printed.out
    assert {p: p.read_bytes() for p in interrupted.rglob("*") if p.is_file()} == original
    # stderr is not a terminal here: no bar (no carriage-return redraws, no rates).
    assert "\r" not in printed.err and "it/s" not in printed.err, printed.err
    assert "Loading weights" not in printed.err


def test_resume_with_another_setting_is_still_an_error(interrupted, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(interrupted, run)
    assert cli.main(train_args(run, "--resume", "--quiet", "--lr", "1e-3")) == 1
    line = one_error_line(capsys)
    assert line == (
        f"error: {run / 'config.json'} differs from this config; a run resumes only with the "
        "configuration it was started with"
    )


# --------------------------------------------------------------------------------------------
# 4. --opset: only what works is accepted


def test_unsupported_opset_is_one_error_line(tmp_path, capsys):
    assert cli.main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "b"), "--opset", "9"])
    assert one_error_line(capsys) == "error: --opset 9: supported opsets are 10-20 (default 17)"
    assert not (tmp_path / "b").exists()
    with pytest.raises(ExportError, match=r"--opset 21: supported opsets are 10-20"):
        export_run(tmp_path / "run", tmp_path / "b", opset=21)


def test_help_advertises_the_supported_opsets():
    (action,) = [a for a in cli._parser()._subparsers._actions if a.dest == "command"]
    help_text = action.choices["export"].format_help()
    assert f"ONNX opset, {OPSETS[0]}-{OPSETS[-1]} (default 17)" in " ".join(help_text.split())


@pytest.fixture(scope="module")
def finished(interrupted, tmp_path_factory):
    run = tmp_path_factory.mktemp("finished") / "run"
    shutil.copytree(interrupted, run)
    assert cli.main(train_args(run, "--resume", "--quiet")) == 0
    return run


@pytest.mark.parametrize("opset", [OPSETS[0], OPSETS[-1]])
def test_the_advertised_opsets_export(finished, tmp_path, capsys, opset):
    bundle = tmp_path / f"op{opset}"
    argv = ["export", str(finished), "--out", str(bundle), "--opset", str(opset)]
    assert cli.main([*argv, "--no-torchscript", "--no-measure"]) == 0
    assert f"opset {opset})" in capsys.readouterr().out
    assert json.loads((bundle / "manifest.json").read_text())["opset"] == opset
    # stderr is not a terminal here: the tagger's bar stays off.
    assert cli.main(["tag", str(bundle), str(_one_sentence(tmp_path))]) == 0
    printed = capsys.readouterr()
    assert printed.out.strip() and "\r" not in printed.err and "sentences/s" not in printed.err


def _one_sentence(tmp_path):
    path = tmp_path / "in.txt"
    path.write_text("w1 w2 w3\n", encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------
# 5. Training dependencies missing


_WITHOUT_TORCH = """
import sys
sys.modules["torch"] = None
from pyxtask.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("command", ["train", "export"])
def test_without_torch_train_and_export_say_what_to_install(tmp_path, command):
    argv = ["train"] if command == "train" else ["export", str(tmp_path), "--out", "b"]
    proc = subprocess.run(
        [sys.executable, "-c", _WITHOUT_TORCH, *argv],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith(
        f"error: pyxtask {command} needs torch and transformers, and torch cannot be imported ("
    )
    assert proc.stderr.rstrip().endswith("; install: pip install torch transformers")


def test_without_transformers_train_says_what_to_install(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    assert cli.main(["train", "--target", "clierr.pos"]) == 1
    line = one_error_line(capsys)
    assert line.startswith("error: pyxtask train needs torch and transformers, and transformers")
    assert line.endswith("; install: pip install torch transformers")


# --------------------------------------------------------------------------------------------
# 6. Unexpected exceptions: one line, the traceback with --debug


def _raise(exc):
    def run_experiment(*args, **kwargs):
        raise exc

    return run_experiment


BUG = ["train", "--target", "clierr.pos", "--paradigm", "single", "--method", "fixed"]


def test_unexpected_exception_is_one_line(capsys, monkeypatch):
    monkeypatch.setattr("pyxtask.experiment.run_experiment", _raise(ZeroDivisionError("a\n b")))
    assert cli.main(BUG) == 1
    assert one_error_line(capsys) == (
        "error: ZeroDivisionError: a b (run with --debug for the traceback)"
    )


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_prints_the_traceback(capsys, monkeypatch, where):
    monkeypatch.setattr("pyxtask.experiment.run_experiment", _raise(ZeroDivisionError("boom")))
    argv = ["--debug", *BUG] if where == "before" else [*BUG, "--debug"]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):")
    assert err.rstrip().endswith("ZeroDivisionError: boom")
    assert "--debug" not in err


def test_a_missing_module_is_named(capsys, monkeypatch):
    missing = ModuleNotFoundError("No module named 'matplotlib'", name="matplotlib.pyplot")
    monkeypatch.setattr("pyxtask.experiment.run_experiment", _raise(missing))
    assert cli.main(BUG) == 1
    assert one_error_line(capsys) == (
        "error: pyxtask train needs matplotlib (No module named 'matplotlib')"
    )


def test_debug_shows_the_traceback_of_a_user_error_too(capsys):
    assert cli.main(["--debug", "train", "--paradigm", "x"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):")
    assert err.rstrip().splitlines()[-1].startswith("error: flags: paradigm = 'x'")


def test_keyboard_interrupt_stays_as_it_was(capsys, monkeypatch):
    monkeypatch.setattr("pyxtask.experiment.run_experiment", _raise(KeyboardInterrupt()))
    assert cli.main(BUG) == 130
    assert capsys.readouterr().err == "interrupted\n"


# --------------------------------------------------------------------------------------------
# 7. Metavars name the value


def _help(*command):
    parser = cli._parser()
    for name in command:
        (action,) = [a for a in parser._subparsers._actions if a.dest in ("command", "action")]
        parser = action.choices[name]
    return parser.format_help()


VALUE_NAMES = {"TASK", "TASKS", "N", "X", "T", "NAME", "NAMES", "CHOICE", "DIR", "FILE"}
VALUE_NAMES |= {"DEVICE", "HOST", "KEY=VALUE", "CONFIG", "RUN_DIR", "BUNDLE"}


@pytest.mark.parametrize(
    "command", [("train",), ("export",), ("tag",), ("data", "prepare"), ("bench",), ("serve",)]
)
def test_metavars_name_the_value(command):
    text = _help(*command)
    usage = text.split("\n\n")[0]
    metavars = set(re.findall(r"\b([A-Z][A-Z_=]*)\b", usage))
    assert metavars <= VALUE_NAMES, metavars - VALUE_NAMES
    assert "SET_" not in text


def test_train_help_names_tasks_and_folders():
    text = " ".join(_help("train").split())
    for shown in ("--target TASK", "--sources TASKS", "--output DIR", "--cache DIR", "[CONFIG]"):
        assert shown in text


# --------------------------------------------------------------------------------------------
# 8. Progress bars: off when stderr is not a terminal


def test_every_progress_bar_is_off_when_stderr_is_not_a_terminal():
    # tqdm shows a bar unless told: each one must pass disable= (None: off when not a tty).
    bare = []
    for path in sorted((REPO / "pyxtask").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            is_bar = isinstance(node, ast.Call) and getattr(node.func, "id", None) == "tqdm"
            if is_bar and not any(k.arg == "disable" for k in node.keywords):
                bare.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not bare
