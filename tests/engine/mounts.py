"""A small tmpfs mounted for one test (a full disk, a read-only directory); needs root."""

import contextlib
import os
import subprocess


@contextlib.contextmanager
def tmpfs(path, *, size: str = "1m", read_only: bool = False):
    """Mount a tmpfs of `size` at `path` for the block; skips the test (with the reason) when it cannot."""
    import pytest

    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs the suite as root)")
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if read_only else "")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)
