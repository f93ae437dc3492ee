"""Find the parent's secrets in the environment and in every /proc/<pid>/environ."""
import json
import os

p = json.load(open("params.json"))
found = [v for v in os.environ.values() if "hunter2" in v]
for pid in [d for d in os.listdir("/proc") if d.isdigit()] + [str(p["parent_pid"]), "self", "1"]:
    try:
        found += [x.decode() for x in open(f"/proc/{pid}/environ", "rb").read().split(b"\0") if b"hunter2" in x]
    except OSError:
        pass
print(json.dumps({"found": found, "env": sorted(os.environ)}))
