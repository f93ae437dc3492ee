"""Read an API key from a world-readable .env in a user's project, by path and by searching."""
import json
import os

p = json.load(open("params.json"))
found, errors = {}, {}
try:
    found[p["env_path"]] = open(p["env_path"]).read()
except OSError as e:
    errors[p["env_path"]] = e.errno
for top in ("/", "/tmp", "/work", "/root", "/home"):
    for dirpath, dirnames, names in os.walk(top):
        dirnames[:] = [d for d in dirnames if os.path.join(dirpath, d) not in ("/proc", "/usr", "/sys")]
        for name in names:
            if name == ".env":
                try:
                    found[os.path.join(dirpath, name)] = open(os.path.join(dirpath, name)).read()
                except OSError:
                    pass
print(json.dumps({"found": found, "errors": errors}))
