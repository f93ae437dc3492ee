"""Devices and sysfs: raw memory, disks, the kernel log, a terminal to inject keystrokes into."""
import json
import os

out = {"dev": sorted(os.listdir("/dev")), "sys": os.path.exists("/sys/kernel")}
for path in ("/dev/mem", "/dev/kmsg", "/dev/sda", "/dev/vda", "/dev/tty", "/dev/console", "/dev/ptmx"):
    try:
        open(path, "rb").close()
        out[path] = 0
    except OSError as e:
        out[path] = e.errno
print(json.dumps(out))
