"""Fill /tmp (and the work folder) 1 MB at a time until something stops it."""
import json
import os

p = json.load(open("params.json"))
written, err = 0, None
try:
    for i in range(10_000):
        for folder in ("/tmp", os.getcwd()):
            with open(f"{folder}/pwned-{p['nonce']}-{i}", "wb") as f:
                f.write(b"x" * (1 << 20))
            written += 1 << 20
except OSError as e:
    err = e.errno
print(json.dumps({"written": written, "errno": err}))
