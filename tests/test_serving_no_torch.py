"""Serving without torch: ``import pyxtask.serving``, ``pyxtask tag`` and ``pyxtask serve`` load
no torch, transformers or compiled extension, and the ``pyxtask-serve`` wheel installs and
tags in a fresh environment that has none of them.

The first tests run the main venv's Python with an import hook that makes those modules
unimportable (as on a serving-only machine, and as a missing or stale ``pyxtask._C`` would);
the network test builds the wheel, installs it with its dependencies from the registry into a
new venv, and checks its tags equal the main venv's.
"""

import json
import os
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

from pyxtask.serving import Tagger
from tests._bundles import make_bundle

ROOT = Path(__file__).resolve().parents[1]
SERVE_DIST = ROOT / "packaging" / "pyxtask-serve"
SENTENCES = ["w1 w2 zq99x w3", "w5 w6 , w7 ."]

# Run first in every subprocess: importing a blocked module fails as if it were not installed
# (None in sys.modules: ModuleNotFoundError, and importlib.util.find_spec finds nothing).
PRELUDE = """
import sys
for name in sys.argv.pop(1).split(","):
    sys.modules[name] = None

def loaded_forbidden():
    return sorted(m for m, module in sys.modules.items() if module is not None and (
        m.split(".")[0] in ("torch", "transformers") or m in ("pyxtask._C", "pyxtask.bench")))
"""
# A serving machine has none of them; a training machine whose extension is missing or stale
# (which must not stop tagging) has torch and transformers, which must not be imported either.
NO_TORCH = "torch,transformers,pyxtask._C"
NO_EXTENSION = "pyxtask._C"


def run_blocked(code: str, blocked: str, *argv: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-c", PRELUDE + code, blocked, *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("serve-no-torch"), "token")[1]


@pytest.fixture(scope="module")
def sentences_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("inputs") / "in.txt"
    path.write_text("\n".join(SENTENCES) + "\n", encoding="utf-8")
    return path


def expected_labels(bundle):
    return [r.labels for r in Tagger(bundle).tag(SENTENCES)]


def jsonl_labels(text):
    return [json.loads(line)["labels"] for line in text.splitlines() if line.strip()]


@pytest.mark.parametrize("blocked", [NO_TORCH, NO_EXTENSION])
def test_tagger_and_tag_command_without_torch(bundle, sentences_file, tmp_path, blocked):
    out = tmp_path / "tags.jsonl"
    code = """
import json
from pyxtask.serving import Tagger
from pyxtask.cli import main
bundle, path, out = sys.argv[1:]
tagged = [r.labels for r in Tagger(bundle).tag(open(path).read().splitlines())]
status = main(["tag", bundle, path, "--quiet", "--output-format", "jsonl", "-o", out])
print(json.dumps({"tagged": tagged, "status": status, "forbidden": loaded_forbidden()}))
"""
    proc = run_blocked(code, blocked, str(bundle), str(sentences_file), str(out))
    result = json.loads(proc.stdout)
    assert result == {"tagged": expected_labels(bundle), "status": 0, "forbidden": []}
    assert jsonl_labels(out.read_text()) == expected_labels(bundle)


def test_help_and_server_app_without_torch(bundle):
    code = """
import contextlib, io, json
from fastapi.testclient import TestClient
from pyxtask.cli import main
from pyxtask.serving import Tagger
from pyxtask.serving.server import create_app
helps = {}
for command in ("tag", "serve"):
    with contextlib.redirect_stdout(io.StringIO()) as text:
        try:
            main([command, "--help"])
        except SystemExit as exit:
            helps[command] = (exit.code, text.getvalue().split("\\n")[0])
with TestClient(create_app(Tagger(sys.argv[1]))) as client:
    health = client.get("/healthz")
print(json.dumps({"helps": helps, "health": [health.status_code, health.json()],
                  "forbidden": loaded_forbidden()}))
"""
    result = json.loads(run_blocked(code, NO_TORCH, str(bundle)).stdout)
    assert result["helps"] == {
        "tag": [0, "usage: pyxtask tag [-h] [--format {text,conll,jsonl}]"],
        "serve": [0, "usage: pyxtask serve [-h] [--host HOST] [--port N] [--variant NAME]"],
    }
    assert result["health"] == [200, {"status": "ok"}]
    assert result["forbidden"] == []


def test_import_pyxtask_loads_submodules_on_first_use():
    # The torch side still works as attributes, and pyxtask.ops still registers the op library.
    code = """
import pyxtask
import pyxtask.serving
before = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "numpy", "onnxruntime"))
import pyxtask.ops, torch
assert callable(torch.ops.pyxtask.gram) and pyxtask.build_info()["openmp"] is True
assert {"ops", "data", "serving", "config", "build_info"} <= set(dir(pyxtask))
assert not hasattr(pyxtask, "no_such_module")
print(json.dumps({"before": before, "all": sorted(pyxtask.__all__)}))
"""
    proc = subprocess.run(
        [sys.executable, "-c", "import json, sys" + code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    api = ["build_info", "data", "gradients", "hessian", "metrics", "ops", "reference"]
    api += ["serving", "weighting"]
    assert json.loads(proc.stdout) == {"before": [], "all": sorted(api)}


# --------------------------------------------------------------------------------------------
# The pyxtask-serve wheel in a venv of its own


def pip(python: Path, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(python), "-m", "pip", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def registry_reachable(tmp_path: Path) -> bool:
    # The wheel's build backend comes from the registry: if it cannot be fetched, nothing can.
    argv = ["download", "--no-deps", "--no-cache-dir", "-d", str(tmp_path), "hatchling"]
    return pip(Path(sys.executable), *argv, timeout=120).returncode == 0


@pytest.fixture(scope="module")
def serve_venv(tmp_path_factory):
    """(the wheel, a fresh venv's bin folder with it installed from the registry)."""
    root = tmp_path_factory.mktemp("serve-venv")
    if not registry_reachable(root / "probe"):
        pytest.skip("the package registry cannot be reached")
    built = pip(Path(sys.executable), "wheel", "--no-deps", str(SERVE_DIST), "-w", str(root))
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = root.glob("pyxtask_serve-*.whl")
    venv.create(root / "venv", with_pip=True, system_site_packages=False)
    bin_dir = root / "venv" / ("Scripts" if os.name == "nt" else "bin")
    installed = pip(bin_dir / "python", "install", str(wheel))
    assert installed.returncode == 0, installed.stdout + installed.stderr
    return wheel, bin_dir


@pytest.mark.network
def test_wheel_ships_only_the_serving_package(serve_venv):
    wheel, _ = serve_venv
    names = [n for n in zipfile.ZipFile(wheel).namelist() if not n.startswith("pyxtask_serve-")]
    serving = sorted(p.name for p in (ROOT / "pyxtask" / "serving").glob("*.py"))
    expected = ["pyxtask/__init__.py", "pyxtask/_hashing.py", "pyxtask/py.typed"]
    assert sorted(names) == sorted(expected + [f"pyxtask/serving/{n}" for n in serving])


@pytest.mark.network
def test_serve_only_venv_has_no_torch_and_tags_the_same(serve_venv, bundle, sentences_file):
    _, bin_dir = serve_venv
    listed = pip(bin_dir / "python", "list", "--format", "json")
    packages = {p["name"].lower() for p in json.loads(listed.stdout)}
    assert "pyxtask-serve" in packages
    assert not packages & {"torch", "transformers", "pyxtask"}, packages
    jsonl = ["--output-format", "jsonl", "--quiet"]
    proc = subprocess.run(
        [str(bin_dir / "pyxtask"), "tag", str(bundle), str(sentences_file), *jsonl],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert jsonl_labels(proc.stdout) == expected_labels(bundle)


@pytest.mark.network
def test_serve_only_cli_names_what_it_lacks(serve_venv):
    _, bin_dir = serve_venv
    script = str(bin_dir / "pyxtask")
    helped = subprocess.run(
        [script, "serve", "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    assert helped.returncode == 0 and helped.stdout.startswith("usage: pyxtask serve")
    train = subprocess.run(
        [script, "train"], capture_output=True, text=True, timeout=60, check=False
    )
    assert train.returncode == 2
    assert train.stderr.startswith("error: pyxtask train is not part of pyxtask-serve")
