"""Host-wide settings and devices: hostname, clock, reboot, swap, a block device node."""
import ctypes
import json

libc = ctypes.CDLL(None, use_errno=True)


class Timeval(ctypes.Structure):
    _fields_ = [("sec", ctypes.c_long), ("usec", ctypes.c_long)]


out = {}
for name, call in (("sethostname", lambda: libc.sethostname(b"pwned", 5)),
                   ("settimeofday", lambda: libc.settimeofday(ctypes.byref(Timeval(0, 0)), None)),
                   ("reboot", lambda: libc.reboot(0)),  # LINUX_REBOOT_CMD_CAD_OFF: harmless if it worked
                   ("swapoff", lambda: libc.swapoff(b"/dev/null")),
                   ("mknod sda", lambda: libc.mknod(b"/tmp/sda", 0o60600, 0x800))):  # S_IFBLK, device 8:0
    try:
        rc = call()
    except AttributeError:  # a libc without that wrapper
        continue
    out[name] = [rc, ctypes.get_errno()]
print(json.dumps(out))
