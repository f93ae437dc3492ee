"""unshare(CLONE_NEWUSER) through libc and through util-linux's unshare: more of the kernel exposed."""
import ctypes
import json
import subprocess

libc = ctypes.CDLL(None, use_errno=True)
rc = libc.unshare(0x10000000)  # CLONE_NEWUSER
err = ctypes.get_errno()
tool = subprocess.run(["unshare", "--user", "--map-root-user", "id", "-u"], capture_output=True, text=True)
print(json.dumps({"unshare": rc, "errno": err, "tool_rc": tool.returncode, "tool_out": tool.stdout.strip()}))
