"""40 MB on stdout: the parent must not hold all of it, nor the disk all of it."""
import os
import sys

chunk = b"y" * (1 << 20)
for _ in range(40):
    try:
        os.write(1, chunk)
    except OSError as e:
        sys.stderr.write(f"stopped: errno {e.errno}\n")
        break
