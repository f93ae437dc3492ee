"""The runnable examples in docs/tools.md and docs/safety.md run and their asserts hold."""

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[2] / "docs"


def blocks(name):
    return re.findall(r"^```python\n(.*?)^```$", (DOCS / name).read_text(), flags=re.S | re.M)


@pytest.mark.parametrize("name,count", [("tools.md", 3), ("safety.md", 1)])
def test_doc_examples_run_in_order(name, count):
    found = blocks(name)
    assert len(found) == count
    ns: dict = {}
    for i, code in enumerate(found):  # later blocks reuse names defined by earlier ones, as a reader would
        exec(compile(code, f"docs/{name}[block {i}]", "exec"), ns)
