"""A missing or stale extension must fail at import (of pyxtask.ops, which everything that
uses the ops imports; `import pyxtask` itself loads nothing) with a message that says how to
rebuild (never a silent fall-back to Python)."""

import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def import_in(tree: Path) -> subprocess.CompletedProcess:
    # -S: no site hooks, so an editable install of the real checkout can't shadow the copy.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree), *site.getsitepackages()])}
    return subprocess.run(
        [sys.executable, "-S", "-c", "import pyxtask.ops"],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )


def copy_tree(tmp_path: Path, with_extension: bool) -> Path:
    tree = tmp_path / "checkout"
    shutil.copytree(
        ROOT / "pyxtask",
        tree / "pyxtask",
        ignore=None if with_extension else shutil.ignore_patterns("_C*.so"),
    )
    shutil.copytree(ROOT / "csrc", tree / "csrc")
    return tree


def test_missing_extension_says_how_to_rebuild(tmp_path):
    res = import_in(copy_tree(tmp_path, with_extension=False))
    assert res.returncode != 0
    assert "pyxtask._C is missing or does not load" in res.stderr
    assert "pip install --no-build-isolation -e ." in res.stderr


def test_stale_extension_says_how_to_rebuild(tmp_path):
    tree = copy_tree(tmp_path, with_extension=True)
    assert import_in(tree).returncode == 0
    with open(tree / "csrc" / "ops" / "gram.cpp", "a") as f:
        f.write("\n// edited after the build\n")
    res = import_in(tree)
    assert res.returncode != 0
    assert "pyxtask._C is stale" in res.stderr and "pip install --no-build-isolation" in res.stderr
