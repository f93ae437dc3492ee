"""The socket module's AF_UNIX, with the audit hook off: only the filesystem view stops it."""
import json
import socket

p = json.load(open("params.json"))
try:
    s = socket.socket(socket.AF_UNIX)
    s.connect(p["path"])
    s.sendall(b"leak")
    out = {"errno": 0}
except OSError as e:
    out = {"errno": e.errno}
print(json.dumps(out))
