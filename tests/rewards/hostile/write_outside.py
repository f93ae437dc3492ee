"""Write, chmod and create files outside the work folder: system paths and a host canary."""
import json
import os

p = json.load(open("params.json"))
targets = ["/pwned", "/usr/pwned", "/usr/bin/python3", "/etc/pwned", "/dev/pwned", "/proc/sys/kernel/hostname",
           p["canary"], os.path.join(os.path.dirname(p["canary"]), f"pwned-{p['nonce']}")]
done = []
for path in targets:
    try:
        with open(path, "a") as f:
            f.write("pwned")
        done.append(path)
    except OSError:
        pass
    try:
        os.chmod(path, 0o777)
        done.append("chmod " + path)
    except OSError:
        pass
print(json.dumps({"done": done}))
