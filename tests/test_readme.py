"""The Python examples of the README and of ``docs/`` run as written (blocks marked
``<!-- test:python -->``; a block that ends with ``# expected`` comments prints that)."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]
PATTERN = r"<!-- test:python -->\s*```python\n(.*?)```"
BLOCKS = [(doc, code) for doc in DOCS for code in re.findall(PATTERN, doc.read_text(), re.S)]


def test_readme_and_docs_have_executable_examples():
    assert {doc.name for doc, _ in BLOCKS} >= {"README.md", "architecture.md"}


@pytest.mark.parametrize(
    ("doc", "code"), BLOCKS, ids=[f"{doc.stem}-{i}" for i, (doc, _) in enumerate(BLOCKS)]
)
def test_example_runs(doc, code, capsys):
    exec(compile(code, str(doc), "exec"), {})
    out = capsys.readouterr().out.strip()
    assert out
    # A block whose last lines are "# ..." comments after a print shows what it prints.
    expected = [line[2:] for line in code.rstrip().splitlines()[-1:] if line.startswith("# ")]
    if expected and doc.name != "README.md":
        assert out.splitlines()[-1] == expected[0]


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
