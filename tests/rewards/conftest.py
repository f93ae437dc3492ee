"""The sandbox tests skip, with the reason, where bubblewrap cannot run (unless POSTTRAIN_REQUIRE_SANDBOX=1)."""

import os

import pytest

from posttrain.rewards import isolation_report
from posttrain.rewards.sandbox import SandboxUnavailable


@pytest.fixture(scope="module")
def sandbox():
    """The isolation report of this machine's sandbox; skips the module where bwrap cannot run."""
    try:
        return isolation_report()
    except SandboxUnavailable as e:
        if os.environ.get("POSTTRAIN_REQUIRE_SANDBOX") == "1":
            raise
        pytest.skip(f"the sandbox cannot be set up here: {e}")
