"""The README's Python examples run as written (blocks marked ``<!-- test:python -->``)."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"<!-- test:python -->\s*```python\n(.*?)```", README.read_text(), re.S)


def test_readme_has_executable_examples():
    assert BLOCKS


@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_example_runs(code, capsys):
    exec(compile(code, str(README), "exec"), {})
    assert capsys.readouterr().out.strip()


TOML_BLOCKS = re.findall(r"<!-- test:toml -->\s*```toml\n(.*?)```", README.read_text(), re.S)


@pytest.mark.parametrize("text", TOML_BLOCKS, ids=[f"toml{i}" for i in range(len(TOML_BLOCKS))])
def test_readme_config_is_valid(text, tmp_path):
    from pyxtask.config import load_config

    path = tmp_path / "config.toml"
    path.write_text(text)
    config = load_config(path)  # every key known, every value in range
    assert config.target and config.sources


def test_readme_has_a_config_example():
    assert TOML_BLOCKS
