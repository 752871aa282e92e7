"""`pyxtask bench` end to end on a tiny encoder: the table, the JSON, the chart, the errors."""

import json

import pytest

from pyxtask.cli import main

TINY = ["--encoder", "tiny", "--batch", "2", "--seq", "8", "--warmup", "0", "--reps", "2"]


def test_bench_writes_every_row_with_ratios_memory_and_a_chart(tmp_path, capsys):
    only = "equal,mgda,mgda/bf16-buffer,tawt-step,tawt-step/buffer,fixed,tawt-update"
    assert main(["bench", *TINY, "--only", only, "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "bench.json").read_text())
    rows = {r["name"]: r for r in results["results"]}
    assert list(rows) == ["plain", "fixed", "tawt-step", "tawt-step/buffer", "equal", "mgda",
                          "mgda/bf16-buffer", "tawt-update"]  # fmt: skip
    for name, row in rows.items():
        assert row["error"] is None, (name, row["error"])
        assert len(row["samples_s"]) == 2 and row["ratio"] > 0, name
        assert row["peak_bytes"] is not None and row["peak_bytes"] >= 0, name
    assert rows["plain"]["ratio"] == 1.0
    assert results["workload"]["num_tasks"] == 4 and results["workload"]["encoder"] == "tiny"
    effect = results["bf16_buffer_effect"]["mgda"]
    assert 0 <= effect["direction_change"] < 0.05  # bf16 rounding, not a different answer
    assert (tmp_path / "bench.png").stat().st_size > 10_000
    table = capsys.readouterr().out
    assert "x plain" in table and "mgda/bf16-buffer" in table


def test_bench_runs_a_peer_on_its_own_model(tmp_path):
    pytest.importorskip("torchjd")
    only = "mgda,torchjd:mgda/autojac,torchjd:upgrad/autogram"
    assert main(["bench", *TINY, "--only", only, "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "bench.json").read_text())
    rows = {r["name"]: r for r in results["results"]}
    assert rows["torchjd:mgda/autojac"]["error"] is None
    assert rows["torchjd:upgrad/autogram"]["error"] is None
    speedups = {s["peer"]: s for s in results["peer_speedups"]}
    assert speedups["torchjd:mgda/autojac"]["method"] == "mgda"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--only", "nope"], "--only: unknown contenders ['nope']"),
        (["--tasks", "0"], "--tasks must be between 1 and 64"),
        (["--dtype", "bf16"], "--dtype bf16: bf16 autocast is for GPUs"),
    ],
)
def test_bench_bad_options_are_one_line(tmp_path, capsys, args, message):
    assert main(["bench", *TINY, *args, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1]
    assert "Traceback" not in "\n".join(err)


def test_bench_list_names_every_registered_method(capsys):
    from pyxtask.methods import method_names

    assert main(["bench", "--list"]) == 0
    listed = capsys.readouterr().out.split()
    assert set(method_names()) <= set(listed)
    assert "plain" in listed and "naive" in listed
