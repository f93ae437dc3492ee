"""Run untrusted Python in a separate, limited process.

Layers, outermost first (``isolation_report()`` says which ones work on this machine):

1. **Process**: a new session (process group) killed as a whole on timeout; stdin is /dev/null;
   the environment is rebuilt from scratch (PATH, HOME, LANG only), so no secrets are inherited;
   the working directory is a fresh temporary directory, deleted afterwards; stdout/stderr are
   write-only descriptors of parent-owned files (the program cannot read back its output), kept
   up to ``max_output_bytes``.
2. **rlimits**, set before the program runs: RLIMIT_CPU, RLIMIT_AS (memory), RLIMIT_NPROC
   (fork bombs), RLIMIT_FSIZE (file size, output included), RLIMIT_NOFILE, RLIMIT_CORE=0.
3. **Unprivileged uid** (when the parent is root): the child runs as a uid of its own, unused by
   anything else, so it cannot write or delete files it does not own, cannot signal the parent,
   cannot read other processes' environments, and RLIMIT_NPROC (ignored for root) counts only
   this run's processes. After the run every process of that uid is killed, which also catches
   children that left the process group with setsid().
4. **Namespaces** via util-linux ``unshare`` (when permitted): a network namespace with no
   interface up (any connection fails, loopback included), a PID namespace whose init is the
   sandbox (killing it kills every process inside; the parent's PID is not visible), and a
   mount namespace with a private /proc. Non-root parents use a user namespace to get these.
5. **Python audit hook** refusing to create sockets: defense in depth only, since ctypes or an
   ``exec`` of another binary bypasses it. Where layer 4 is unavailable, this is the only
   network barrier and it should not be trusted against a determined adversary.

What is not covered: disk filling through many files (only each file's size is limited), CPU
time of the machine during the timeout, and kernel exploits. Use a VM or gVisor for those.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

_UID_BASE = 1_900_000_000  # far above system and container uid ranges
_uid_counter = itertools.count()
_uid_lock = threading.Lock()

# Runs first inside the sandbox, before the untrusted program. Passed with -c so that an
# interpreter started as the unprivileged uid needs no readable file of ours. It forks: the
# parent stays as a reaper (PID 1 of the namespace, which in-namespace signals cannot kill) and
# reports the program's exit status on a pipe, because unshare 2.38 turns a child's death by
# signal into a plain exit status 1; the child sets the limits and runs the program.
_BOOT = r"""
import ctypes, json, os, resource, runpy, sys, traceback
cfg = json.loads(sys.argv[1])
status_fd = cfg["status_fd"]
child = os.fork()
if child:
    while True:
        pid, status = os.wait()
        if pid == child:
            os.write(status_fd, str(os.waitstatus_to_exitcode(status)).encode())
            os._exit(0)
os.close(status_fd)
# no_new_privs: setuid binaries (su, mount...) cannot give privileges back
ctypes.CDLL(None, use_errno=True).prctl(38, 1, 0, 0, 0)
for name, value in cfg["rlimits"].items():
    resource.setrlimit(getattr(resource, name), (value[0], value[1]))
os.umask(0o077)
if cfg["block_sockets"]:
    def _audit(event, args):
        if event == "socket.__new__" or event == "socket.connect" or event == "socket.bind":
            raise PermissionError("network access is disabled in the sandbox")
    sys.addaudithook(_audit)
sys.argv = [cfg["program"]]
sys.path.insert(0, os.getcwd())
try:
    runpy.run_path(cfg["program"], run_name="__main__")
except SystemExit:
    raise
except BaseException:
    traceback.print_exc()
    sys.exit(1)
"""


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits of one sandboxed run (all per run)."""

    timeout_s: float = 5.0          # wall clock; the whole process group is killed after it
    cpu_s: int | None = None        # RLIMIT_CPU; default ceil(timeout_s) + 1
    memory_mb: int = 512            # RLIMIT_AS (address space, so a little above resident memory)
    max_processes: int = 16         # RLIMIT_NPROC: processes of the sandbox uid (threads count)
    max_file_mb: int = 16           # RLIMIT_FSIZE: the largest file it may write, stdout included
    max_open_files: int = 64        # RLIMIT_NOFILE
    max_output_bytes: int = 1 << 20  # captured stdout/stderr kept by the parent


@dataclass
class SandboxResult:
    returncode: int | None   # negative: killed by that signal (as in subprocess)
    stdout: str
    stderr: str
    timed_out: bool
    duration_s: float
    layers: tuple[str, ...]  # the isolation layers this run used


def _unshare_prefix(root: bool) -> list[str] | None:
    exe = shutil.which("unshare")
    if exe is None:
        return None
    user = [] if root else ["--user", "--map-root-user"]
    return [exe, *user, "--net", "--pid", "--fork", "--kill-child", "--mount", "--mount-proc"]


def _new_uid() -> int:
    with _uid_lock:
        return _UID_BASE + (os.getpid() % 100_000) * 1000 + next(_uid_counter) % 1000


@dataclass(frozen=True)
class _Plan:
    python: str
    namespaces: bool
    drop_uid: bool

    @property
    def layers(self) -> tuple[str, ...]:
        out = ["process-group", "clean-env", "tmp-cwd", "rlimits"]
        if self.drop_uid:
            out.append("unprivileged-uid")
        if self.namespaces:
            out += ["net-namespace", "pid-namespace", "mount-namespace"]
        return tuple(out)


def _command(plan: _Plan, uid: int | None, cfg: dict) -> tuple[list[str], dict]:
    """argv and extra Popen arguments for one run."""
    tail = [plan.python, "-I", "-c", _BOOT, json.dumps(cfg)]
    popen: dict = {}
    if plan.namespaces:
        prefix = _unshare_prefix(os.geteuid() == 0)
        if plan.drop_uid:
            # namespaces need root; the uid is dropped inside them, just before Python starts
            prefix = prefix + [shutil.which("setpriv"), f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--no-new-privs"]
        return prefix + tail, popen
    if plan.drop_uid:
        popen = {"user": uid, "group": uid, "extra_groups": []}
    return tail, popen


def _live_processes(uid: int) -> int:
    """Processes of ``uid`` that are not zombies (zombies hold no resources but a pid)."""
    count = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            if os.stat(f"/proc/{pid}").st_uid != uid:
                continue
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                    count += 1
        except (OSError, IndexError):
            pass
    return count


def _kill_uid(uid: int, attempts: int = 50) -> None:
    """SIGKILL every process of ``uid``: kill(-1) from that uid reaches exactly those.

    Repeated until none is left, because a process forking while the signal sweeps the process
    list can leave a new child behind.
    """
    kill = shutil.which("kill")
    if kill is None:  # without it only the process group and the PID namespace clean up
        return
    for _ in range(attempts):
        subprocess.run([kill, "-KILL", "-1"], user=uid, group=uid, extra_groups=[],
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, env={}, timeout=10, check=False)
        if _live_processes(uid) == 0:
            return


def _run(plan: _Plan, program: str, files: dict[str, str], limits: SandboxLimits, block_sockets: bool,
         ) -> SandboxResult:
    root = os.geteuid() == 0
    uid = _new_uid() if plan.drop_uid else None
    workdir = tempfile.mkdtemp(prefix="posttrain-sandbox-")
    try:
        for name, text in {**files, "main.py": program}.items():
            path = os.path.join(workdir, name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
        if uid is not None:
            for dirpath, _, names in os.walk(workdir):
                for p in [dirpath, *(os.path.join(dirpath, n) for n in names)]:
                    os.chown(p, uid, uid)
        nproc = limits.max_processes + 1  # the reaper that waits for the program counts too
        if not root:  # RLIMIT_NPROC counts every process of our own uid, not only the sandbox's
            nproc += _live_processes(os.getuid())
        cpu = limits.cpu_s if limits.cpu_s is not None else math.ceil(limits.timeout_s) + 1
        mem, fsize = limits.memory_mb << 20, limits.max_file_mb << 20
        cfg = {"program": "main.py", "block_sockets": block_sockets, "rlimits": {
            "RLIMIT_CPU": [cpu, cpu + 1], "RLIMIT_AS": [mem, mem], "RLIMIT_NPROC": [nproc, nproc],
            "RLIMIT_FSIZE": [fsize, fsize], "RLIMIT_NOFILE": [limits.max_open_files] * 2,
            "RLIMIT_CORE": [0, 0]}}
        status_r, status_w = os.pipe()
        cfg["status_fd"] = status_w
        argv, popen = _command(plan, uid, cfg)
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "LANG": "C.UTF-8",
               "PYTHONDONTWRITEBYTECODE": "1"}
        out_r, out_w = _output_file()
        err_r, err_w = _output_file()
        start = time.monotonic()
        try:
            proc = subprocess.Popen(argv, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=out_w,
                                    stderr=err_w, start_new_session=True, pass_fds=(status_w,), **popen)
        except BaseException:
            for fd in (status_r, out_r, err_r):
                os.close(fd)
            raise
        finally:
            for fd in (status_w, out_w, err_w):
                os.close(fd)
        timed_out = False
        try:
            proc.wait(timeout=limits.timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            _killpg(proc.pid)
            proc.wait()
            if uid is not None:
                _kill_uid(uid)
        duration = time.monotonic() - start
        status = _read(status_r, 32)
        stdout, stderr = (_read(fd, limits.max_output_bytes) for fd in (out_r, err_r))
        returncode = None if timed_out else int(status) if status.lstrip("-").isdigit() else proc.returncode
        return SandboxResult(returncode, stdout, stderr, timed_out, duration,
                             plan.layers + (("socket-audit-hook",) if block_sockets else ()))
    finally:
        shutil.rmtree(workdir, onerror=_force_remove)


def _killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _output_file() -> tuple[int, int]:
    """A nameless file as (read fd for us, write-only fd for the child).

    Write-only, so the program cannot read back (and replay) what it or its harness printed;
    owned by us with mode 0600, so it cannot reopen it for reading through /proc/self/fd either.
    """
    fd, path = tempfile.mkstemp(prefix="posttrain-sandbox-out-")
    try:
        return fd, os.open(path, os.O_WRONLY | os.O_APPEND)
    finally:
        os.unlink(path)


def _read(fd: int, limit: int) -> str:
    """Up to ``limit`` bytes from the start of ``fd`` (a file or a finished pipe), then close it."""
    try:
        chunks, size = [], 0
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            os.lseek(fd, 0, os.SEEK_SET)
        os.set_blocking(fd, False)
        while size < limit:
            try:
                chunk = os.read(fd, min(1 << 16, limit - size))
            except BlockingIOError:
                break
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks).decode("utf-8", errors="replace")
    finally:
        os.close(fd)


def _force_remove(func, path, _exc_info):
    """rmtree error hook: the program may have made its files read-only; we own the tree, so fix it."""
    try:
        os.chmod(os.path.dirname(path), 0o700)
        os.chmod(path, 0o700)
        func(path)
    except OSError:
        pass


@functools.lru_cache(maxsize=None)
def _plan(python: str | None, namespaces: str, drop_uid: str) -> _Plan:
    """The strongest configuration that actually runs here, found by trying them (cached)."""
    root = os.geteuid() == 0
    pythons = [python] if python else list(dict.fromkeys(
        p for p in (sys.executable, "/usr/bin/python3", shutil.which("python3")) if p))
    ns_options = {"auto": [True, False], "on": [True], "off": [False]}[namespaces]
    uid_options = {"auto": [True, False] if root else [False], "on": [True], "off": [False]}[drop_uid]
    if _unshare_prefix(root) is None or (root and shutil.which("setpriv") is None):
        ns_options = [o for o in ns_options if not o] or ns_options
    tried = []
    for drop in uid_options:  # an unprivileged uid matters more than namespaces, so it wins ties
        for ns in ns_options:
            for py in pythons:
                plan = _Plan(py, ns, drop)
                try:
                    res = _run(plan, "print('sandbox-ok')", {}, SandboxLimits(timeout_s=20), False)
                except (OSError, subprocess.SubprocessError) as e:
                    tried.append(f"{plan}: {e}")
                    continue
                if res.stdout.strip() == "sandbox-ok":
                    return plan
                tried.append(f"{plan}: rc={res.returncode} {res.stderr.strip()[-200:]}")
    raise RuntimeError("no sandbox configuration works on this machine; tried:\n" + "\n".join(tried))


def isolation_report(python: str | None = None) -> dict:
    """Which layers the default sandbox uses here, and with which interpreter."""
    plan = _plan(python, "auto", "auto")
    return {"python": plan.python, "root": os.geteuid() == 0, "layers": list(plan.layers)}


def run_python(program: str, *, files: dict[str, str] | None = None, limits: SandboxLimits | None = None,
               python: str | None = None, namespaces: str = "auto", drop_uid: str = "auto",
               block_sockets: bool = True) -> SandboxResult:
    """Run the Python source ``program`` in the sandbox and return its exit status and output.

    ``files``: extra files (relative path -> text) written next to it. ``python``: the interpreter;
    by default the first of ``sys.executable``, ``/usr/bin/python3`` that the sandbox uid can run
    (a virtualenv under /root is unreadable to it). ``namespaces`` / ``drop_uid``: ``"auto"`` (use
    when they work), ``"on"`` (require), ``"off"`` (skip: for tests of the other layers).
    """
    if namespaces not in ("auto", "on", "off") or drop_uid not in ("auto", "on", "off"):
        raise ValueError(f"run_python: namespaces and drop_uid take auto/on/off, got {namespaces!r}, {drop_uid!r}")
    plan = _plan(python, namespaces, drop_uid)
    return _run(plan, program, files or {}, limits or SandboxLimits(), block_sockets)
