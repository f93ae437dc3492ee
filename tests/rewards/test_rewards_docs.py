"""The runnable examples in docs/rewards.md run and their asserts hold (keeps the page honest)."""

import re
from pathlib import Path

import pytest

import posttrain.rewards

DOC = Path(__file__).resolve().parents[2] / "docs" / "rewards.md"
BLOCKS = re.findall(r"^`{3,4}python\n(.*?)^`{3,4}$", DOC.read_text(), flags=re.S | re.M)


def test_the_page_documents_every_public_name():
    text = DOC.read_text()
    missing = [n for n in posttrain.rewards.__all__ if not re.search(rf"\b{n}\b", text)]
    assert not missing, f"undocumented in docs/rewards.md: {missing}"


def test_examples_found():
    assert len(BLOCKS) == 8


@pytest.mark.parametrize("i", range(len(BLOCKS)))
def test_doc_example_runs(i):
    exec(compile(BLOCKS[i], f"docs/rewards.md[block {i}]", "exec"), {})
