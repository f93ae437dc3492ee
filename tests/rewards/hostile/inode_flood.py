"""Create empty files as fast as possible: no byte counts against the tmpfs size."""
import json
import os
import time

p = json.load(open("params.json"))
start, n, err = time.monotonic(), 0, None
try:
    while time.monotonic() - start < 1.0:
        open(f"/tmp/pwned-{p['nonce']}-{n}", "w").close()
        n += 1
except OSError as e:
    err = e.errno
print(json.dumps({"files": n, "errno": err}))
