"""Connect to a Unix socket file the host listens on, through raw libc (invisible to audit hooks)."""
import ctypes
import json

p = json.load(open("params.json"))
libc = ctypes.CDLL(None, use_errno=True)
fd = libc.socket(1, 1, 0)  # AF_UNIX, SOCK_STREAM
path = p["path"].encode()
addr = (1).to_bytes(2, "little") + path + b"\0"
rc = libc.connect(fd, addr, len(addr))
err = ctypes.get_errno()
sent = libc.write(fd, b"leak", 4) if rc == 0 else -1
print(json.dumps({"connect": rc, "errno": err, "sent": sent}))
