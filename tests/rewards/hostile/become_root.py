"""Become root: setuid(0), a setuid binary, and the capabilities the process holds."""
import json
import os
import subprocess

out = {"uid": os.getuid(), "euid": os.geteuid()}
try:
    os.setuid(0)
    out["setuid"] = 0
except OSError as e:
    out["setuid"] = e.errno
su = subprocess.run(["su", "-c", "id -u"], capture_output=True, text=True, stdin=subprocess.DEVNULL)
out["su"] = [su.returncode, su.stdout.strip()]
out["CapEff"] = [line.split()[1] for line in open("/proc/self/status") if line.startswith("CapEff")][0]
out["NoNewPrivs"] = [line.split()[1] for line in open("/proc/self/status") if line.startswith("NoNewPrivs")][0]
print(json.dumps(out))
