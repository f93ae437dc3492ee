"""Kernel interfaces behind many exploits: keyrings, bpf, perf, userfaultfd, io_uring."""
import ctypes
import json
import platform

libc = ctypes.CDLL(None, use_errno=True)
numbers = {"x86_64": {"add_key": 248, "keyctl": 250, "bpf": 321, "perf_event_open": 298, "userfaultfd": 323,
                      "io_uring_setup": 425},
           "aarch64": {"add_key": 217, "keyctl": 219, "bpf": 280, "perf_event_open": 241, "userfaultfd": 282,
                       "io_uring_setup": 425}}[platform.machine()]
params = ctypes.create_string_buffer(128)
args = {"add_key": (b"user", b"pwned", b"x", 1, -3), "keyctl": (0, -3, 0, 0, 0), "bpf": (0, params, 48, 0, 0),
        "perf_event_open": (params, 0, -1, -1, 0), "userfaultfd": (0, 0, 0, 0, 0),
        "io_uring_setup": (4, params, 0, 0, 0)}
out = {}
for name, nr in numbers.items():
    rc = libc.syscall(nr, *args[name])
    out[name] = [rc, ctypes.get_errno()]
print(json.dumps(out))
