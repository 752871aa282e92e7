"""pytest-benchmark suites of the ops and the method steps (see ``benchmarks/README.md``).

``pytest benchmarks`` runs them; the root ``pytest`` never collects this folder (its
``testpaths`` is ``tests``). Options added here:

- ``--quick``: small sizes (the CI smoke run, with ``--benchmark-disable``).
- ``--torch-threads N``: ``torch.set_num_threads(N)`` (1 is steadier on shared cores).

Unless ``--benchmark-storage`` is given, saved runs go to
``benchmarks/results/pytest-benchmark/{full,quick}/`` (git-ignored), one folder per mode, so that
``--benchmark-compare`` (the latest saved run) always compares a run with one of the same sizes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

HERE = Path(__file__).resolve().parent

DEFAULT_STORAGE = "file://./.benchmarks"  # pytest-benchmark's own default


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("pyxtask benchmarks")
    group.addoption(
        "--quick",
        action="store_true",
        default=False,
        help="small sizes: ops at T=4, P=1e4; steps on the tiny BERT (2 x 128), 8 x 16 tokens",
    )
    group.addoption(
        "--torch-threads",
        type=int,
        default=None,
        help="torch.set_num_threads (default: torch's own)",
    )


@pytest.hookimpl(tryfirst=True)  # before pytest-benchmark's (trylast) opens the storage
def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("benchmark_storage", None) == DEFAULT_STORAGE:
        mode = "quick" if config.getoption("quick") else "full"
        folder = HERE / "results" / "pytest-benchmark" / mode
        config.option.benchmark_storage = f"file://{folder}"
    threads = config.getoption("torch_threads")
    if threads is not None:
        torch.set_num_threads(threads)


def pytest_benchmark_update_machine_info(
    config: pytest.Config, machine_info: dict[str, Any]
) -> None:
    """What a comparison should know about the run: a mismatch here makes pytest-benchmark warn."""
    import pyxtask

    machine_info["torch"] = torch.__version__
    machine_info["torch_num_threads"] = torch.get_num_threads()
    machine_info["pyxtask"] = pyxtask.__version__
    machine_info["pyxtask_build"] = str(pyxtask.build_info())
    machine_info["bench_mode"] = "quick" if config.getoption("quick") else "full"


@pytest.fixture(scope="session")
def quick(pytestconfig: pytest.Config) -> bool:
    return bool(pytestconfig.getoption("quick"))
