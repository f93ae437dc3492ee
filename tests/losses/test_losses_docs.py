"""The runnable examples in docs/losses.md run and their asserts hold (keeps the page honest)."""

import re
from pathlib import Path

import pytest

import posttrain.losses

DOC = Path(__file__).resolve().parents[2] / "docs" / "losses.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


def test_the_page_documents_every_public_name():
    text = DOC.read_text()
    missing = [n for n in posttrain.losses.__all__ if not re.search(rf"\b{n}\b", text)]
    assert not missing, f"undocumented in docs/losses.md: {missing}"


@pytest.mark.parametrize("i", range(len(BLOCKS)))
def test_doc_example_runs(i):
    exec(compile(BLOCKS[i], f"docs/losses.md[block {i}]", "exec"), {})
