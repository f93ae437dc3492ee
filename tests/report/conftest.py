"""The make_run fixture: synthetic run directories (see report_runs.py)."""

import pytest
from .report_runs import write_run


@pytest.fixture
def make_run(tmp_path):
    def make(name="run", **kw):
        d = tmp_path / name
        return d, write_run(d, **kw)

    return make
