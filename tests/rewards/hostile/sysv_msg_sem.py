"""SysV message queues and semaphores: kernel memory outside every rlimit."""
import ctypes
import json

libc = ctypes.CDLL(None, use_errno=True)
out = {}
for name, call in (("msgget", lambda: libc.msgget(0, 0o1600)), ("semget", lambda: libc.semget(0, 250, 0o1600))):
    rc = call()
    out[name] = [rc, ctypes.get_errno()]
print(json.dumps(out))
