import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "default",
    max_examples=int(os.environ.get("PYXTASK_HYPOTHESIS_EXAMPLES", "40")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("default")

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def pytest_addoption(parser):
    parser.addoption(
        "--run-slow", action="store_true", help="also run the real-encoder (MiniLM) tests"
    )


def pytest_collection_modifyitems(config, items):
    # Real-encoder runs take minutes each: experiments, not smoke tests, so they are opt-in.
    if not config.getoption("--run-slow"):
        slow = pytest.mark.skip(reason="a real-encoder run: pass --run-slow")
        for item in items:
            if "slow" in item.keywords:
                item.add_marker(slow)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device on this machine")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "network: fetches from a package registry (skips offline)")
    config.addinivalue_line("markers", "slow: trains a real encoder for minutes (--run-slow)")


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param
