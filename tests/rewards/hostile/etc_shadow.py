"""Read the host's password hashes and identity files."""
import json

out = {}
for path in ("/etc/shadow", "/etc/passwd", "/etc/hostname", "/etc/hosts", "/etc/machine-id"):
    try:
        out[path] = open(path).read()
    except OSError as e:
        out[path] = e.errno
print(json.dumps(out))
