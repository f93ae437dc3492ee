"""Look for the host's projects and homes: /work, /root, /home, /etc, the test's own directory."""
import json
import os

p = json.load(open("params.json"))
paths = ["/work", "/root", "/home", "/etc", "/var", "/run", "/srv", "/opt", "/mnt", "/sys", p["cwd"], p["project"]]
print(json.dumps({"root": sorted(os.listdir("/")), "visible": [q for q in paths if os.path.exists(q)]}))
