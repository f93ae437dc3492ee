"""Run untrusted Python in a bubblewrap sandbox with no way out.

The sandbox is bubblewrap (``bwrap``, Debian package ``bubblewrap``), the tool Flatpak uses, not
namespace code of our own. Layers, outermost first (``isolation_report()`` lists them):

1. **Process**: a new session killed as a whole on timeout; stdin is /dev/null; the environment
   is rebuilt from scratch (PATH, HOME, LANG only); stdout/stderr are write-only descriptors of
   parent-owned files (the program cannot read back its output), kept up to ``max_output_bytes``.
2. **Unprivileged uid** (when the parent is root): bwrap itself runs as a uid of its own, unused
   by anything else, so the program owns no file of the host, cannot signal the parent, and
   RLIMIT_NPROC counts only this run's processes. Every process of that uid is killed afterwards.
3. **bwrap namespaces** (the command line is ``bwrap.py``'s): user (mapped to that uid only;
   nested user namespaces disabled), network (only its own loopback: no TCP, UDP or abstract Unix
   socket reaches the host), PID (our boot script is PID 1 and the program its child: when the
   program ends, every process inside dies), IPC (SysV objects die with the run), UTS,
   cgroup, and mount: the root is an empty read-only tmpfs holding only ``/usr`` (and the
   interpreter's prefix) read-only, a private ``/proc``, a minimal ``/dev``, and one private tmpfs
   of ``tmpfs_mb`` at ``/tmp`` (``/dev/shm`` points into it) with the work folder ``/tmp/work``.
   Nothing of the host's projects, homes, ``/etc`` or socket files is visible. The work folder's
   files are copied in by bwrap from memory file descriptors: the parent writes nothing on disk.
4. **seccomp** (x86-64 and arm64): SysV shm/semaphore/message queue creation (memory outside any
   rlimit), ``unshare``/``setns``, the mount API, keyrings, ``bpf``, ``perf_event_open``,
   ``userfaultfd`` and io_uring fail with EPERM; non-native ABIs are killed.
5. **rlimits** set before the program runs: RLIMIT_CPU, RLIMIT_AS = ``memory_mb - tmpfs_mb`` (so
   address space plus the tmpfs stay within ``memory_mb``), RLIMIT_NPROC, RLIMIT_FSIZE,
   RLIMIT_NOFILE, RLIMIT_CORE=0, and ``no_new_privs``.
6. **Python audit hook** refusing sockets: defense in depth only (ctypes bypasses it).

``namespaces="off"`` skips layers 3 and 4 (for machines where bwrap cannot run): the program
then sees the host's filesystem and network, and must be trusted not to try. Never chosen
automatically. What no layer covers (kernel exploits, kernel memory such as inodes during the
timeout, CPU contention) is listed in docs/security.md.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

from posttrain.rewards import bwrap
from posttrain.rewards.procs import _force_remove, _kill_uid, _killpg, _live_processes, _output_file, _read, _wait, _write_tree

_UID_BASE = 1_900_000_000  # far above system and container uid ranges
_uid_counter = itertools.count()
_uid_lock = threading.Lock()

_INSTALL_HINT = ("install bubblewrap (Debian/Ubuntu: apt-get install bubblewrap; Fedora: dnf install "
                 "bubblewrap), or pass namespaces='off' to accept a weaker sandbox that shares the host's "
                 "filesystem and network (see docs/security.md)")


class SandboxUnavailable(RuntimeError):
    """The sandbox cannot be set up on this machine; the message says why and what to do."""


# Runs first inside the sandbox, before the untrusted program. Passed with -c, so the sandbox
# needs no file of ours. It forks: the parent stays as a reaper (PID 1 of the namespace, which
# in-namespace signals cannot kill) and reports the program's exit status on a pipe, because a
# death by signal would otherwise reach us as a plain exit status; the child sets the limits and
# runs the program.
_BOOT = r"""
import json, os, resource, runpy, sys, traceback
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
os.closerange(3, 1 << 16)  # bwrap leaves the descriptors of the files it copied in open
if cfg["no_new_privs"]:  # bwrap sets it itself; importing ctypes costs a few ms a run
    # no_new_privs: setuid binaries (su, mount...) cannot give privileges back
    import ctypes
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
    memory_mb: int = 512            # address space (RLIMIT_AS) + the private tmpfs, together
    max_processes: int = 16         # RLIMIT_NPROC: processes of the sandbox uid (threads count)
    max_file_mb: int = 16           # RLIMIT_FSIZE: the largest file it may write, stdout included
    max_open_files: int = 64        # RLIMIT_NOFILE
    max_output_bytes: int = 1 << 20  # captured stdout/stderr kept by the parent
    tmpfs_mb: int = 64              # the private /tmp (work folder and /dev/shm included), out of memory_mb

    def __post_init__(self):
        if self.tmpfs_mb < 1 or self.memory_mb - self.tmpfs_mb < 64:
            raise ValueError(f"SandboxLimits: memory_mb ({self.memory_mb}) must exceed tmpfs_mb ({self.tmpfs_mb}) "
                             "by at least 64 (the interpreter's address space), and tmpfs_mb must be at least 1")


@dataclass
class SandboxResult:
    returncode: int | None   # negative: killed by that signal (as in subprocess)
    stdout: str
    stderr: str
    timed_out: bool
    duration_s: float
    layers: tuple[str, ...]  # the isolation layers this run used


def _check_files(files: dict[str, str]) -> None:
    """``files=`` keys must stay inside the work folder."""
    for name, text in files.items():
        if not isinstance(name, str) or not isinstance(text, str):
            raise TypeError(f"run_python: files maps relative paths to text, got {name!r}: {type(text).__name__}")
        parts = name.split("/")
        if name.startswith("/") or "\0" in name or any(p in ("", ".", "..") for p in parts):
            raise ValueError(f"run_python: files key {name!r} is not a relative path inside the work folder; "
                             "use a name like 'data/input.txt' (no leading '/', no '.' or '..' parts)")


@functools.lru_cache(maxsize=None)
def _interpreter(python: str) -> tuple[str, str]:
    """(the real interpreter binary, its prefix): a virtualenv's python is replaced by its base."""
    out = subprocess.run([python, "-I", "-c", "import os, sys; print(os.path.realpath(sys._base_executable));"
                          "print(os.path.realpath(sys.base_prefix))"],
                         capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"})
    if out.returncode != 0:
        raise OSError(f"{python} does not run: {out.stderr.strip()[-300:]}")
    exe, prefix = out.stdout.split("\n")[:2]
    return exe, prefix


def _new_uid() -> int:
    with _uid_lock:
        return _UID_BASE + (os.getpid() % 100_000) * 1000 + next(_uid_counter) % 1000


@dataclass(frozen=True)
class _Plan:
    python: str   # the real interpreter binary
    prefix: str   # its installation prefix, bound read-only inside bwrap
    bwrap: bool
    drop_uid: bool

    @property
    def layers(self) -> tuple[str, ...]:
        out = ["process-group", "clean-env", "tmp-cwd", "rlimits"]
        if self.drop_uid:
            out.append("unprivileged-uid")
        if self.bwrap:
            out += ["bwrap", "user-namespace", "no-nested-userns", "net-namespace", "pid-namespace",
                    "ipc-namespace", "mount-namespace", "read-only-root", "private-tmpfs"]
            if bwrap.has_seccomp():
                out.append("seccomp")
        return tuple(out)


def _run(plan: _Plan, program: str, files: dict[str, str], limits: SandboxLimits, block_sockets: bool,
         ) -> SandboxResult:
    uid = _new_uid() if plan.drop_uid else None
    files = {**files, "main.py": program}
    with contextlib.ExitStack() as cleanup:
        child_fds: list[int] = []  # inherited by the child, closed here as soon as it has started
        cleanup.callback(lambda: [os.close(fd) for fd in child_fds])  # if it never starts
        if plan.bwrap:
            workdir, cwd = bwrap.WORK_DIR, "/"
            file_fds = {name: _keep(child_fds, bwrap.memfd(name, text.encode())) for name, text in files.items()}
            seccomp = bwrap.seccomp_program()
            seccomp_fd = _keep(child_fds, bwrap.memfd("seccomp", seccomp)) if seccomp is not None else None
            wrapper = bwrap.command(plan.prefix, limits.tmpfs_mb, file_fds, seccomp_fd)
        else:
            workdir = cwd = tempfile.mkdtemp(prefix="posttrain-sandbox-")
            cleanup.callback(shutil.rmtree, workdir, onerror=_force_remove)
            _write_tree(workdir, files, uid)
            wrapper = []
        status_r, status_w = os.pipe()
        (out_r, out_w), (err_r, err_w) = _output_file(), _output_file()
        child_fds += [status_w, out_w, err_w]
        for fd in (status_r, out_r, err_r):
            cleanup.callback(os.close, fd)
        cfg = {"program": "main.py", "block_sockets": block_sockets, "status_fd": status_w,
               "no_new_privs": not plan.bwrap, "rlimits": _rlimits(limits, plan)}
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "LANG": "C.UTF-8",
               "PYTHONDONTWRITEBYTECODE": "1"}
        popen = {"user": uid, "group": uid, "extra_groups": []} if uid is not None else {}
        start = time.monotonic()
        try:
            proc = subprocess.Popen([*wrapper, plan.python, "-I", "-c", _BOOT, json.dumps(cfg)], cwd=cwd,
                                    env=env, stdin=subprocess.DEVNULL, stdout=out_w, stderr=err_w,
                                    start_new_session=True, pass_fds=child_fds, **popen)
        finally:
            for fd in child_fds:
                os.close(fd)
            child_fds.clear()
        try:
            timed_out = not _wait(proc, limits.timeout_s)
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


def _keep(fds: list[int], fd: int) -> int:
    fds.append(fd)
    return fd


def _rlimits(limits: SandboxLimits, plan: _Plan) -> dict[str, list[int]]:
    nproc = limits.max_processes + (2 if plan.bwrap else 1)  # + the reaper (+ bwrap's monitor)
    if os.geteuid() != 0:  # RLIMIT_NPROC counts every process of our own uid, not only the sandbox's
        nproc += _live_processes(os.getuid())
    cpu = limits.cpu_s if limits.cpu_s is not None else math.ceil(limits.timeout_s) + 1
    mem, fsize = (limits.memory_mb - limits.tmpfs_mb) << 20, limits.max_file_mb << 20
    return {"RLIMIT_CPU": [cpu, cpu + 1], "RLIMIT_AS": [mem, mem], "RLIMIT_NPROC": [nproc, nproc],
            "RLIMIT_FSIZE": [fsize, fsize], "RLIMIT_NOFILE": [limits.max_open_files] * 2, "RLIMIT_CORE": [0, 0]}


@functools.lru_cache(maxsize=None)
def _plan(python: str | None, namespaces: str, drop_uid: str) -> _Plan:
    """The configuration to use, checked by running it once (cached).

    With bwrap ("auto"/"on"), the interpreter is the first of ``sys.executable`` (its base, for a
    virtualenv) and ``/usr/bin/python3`` that runs inside; a prefix the sandbox uid cannot read
    (a pyenv under /root) is skipped. Nothing weaker is ever chosen silently.
    """
    root = os.geteuid() == 0
    use_bwrap = namespaces != "off"
    drop = {"auto": root, "on": True, "off": False}[drop_uid]
    if drop and not root:
        raise SandboxUnavailable("run_python: drop_uid='on' needs a root parent (it runs the sandbox as a fresh uid)")
    if use_bwrap and shutil.which("bwrap") is None:
        raise SandboxUnavailable(f"the code sandbox needs bubblewrap (bwrap), which is not on PATH: {_INSTALL_HINT}")
    pythons = [python] if python else list(dict.fromkeys(
        p for p in (sys.executable, "/usr/bin/python3", shutil.which("python3")) if p))
    tried = []
    for py in pythons:
        try:
            exe, prefix = _interpreter(py)
            plan = _Plan(exe, prefix, use_bwrap, drop)
            res = _run(plan, "print('sandbox-ok')", {}, SandboxLimits(timeout_s=20), False)
        except (OSError, subprocess.SubprocessError) as e:
            tried.append(f"{py}: {e}")
            continue
        if res.stdout.strip() == "sandbox-ok":
            return plan
        tried.append(f"{py}: exit status {res.returncode}: {res.stderr.strip()[-300:]}")
    hint = ("bwrap needs unprivileged user namespaces (sysctl user.max_user_namespaces > 0 and, on Debian "
            "kernels, kernel.unprivileged_userns_clone=1; in Docker, a seccomp profile allowing unshare). "
            f"Otherwise {_INSTALL_HINT.split(', or ', 1)[1]}") if use_bwrap else "check the interpreter"
    raise SandboxUnavailable("the code sandbox cannot be set up on this machine; tried:\n  " + "\n  ".join(tried)
                             + f"\n{hint}")


def isolation_report(python: str | None = None) -> dict:
    """Which layers the default sandbox uses here, and with which interpreter."""
    plan = _plan(python, "auto", "auto")
    return {"python": plan.python, "root": os.geteuid() == 0, "layers": list(plan.layers)}


def run_python(program: str, *, files: dict[str, str] | None = None, limits: SandboxLimits | None = None,
               python: str | None = None, namespaces: str = "auto", drop_uid: str = "auto",
               block_sockets: bool = True) -> SandboxResult:
    """Run the Python source ``program`` in the sandbox and return its exit status and output.

    ``files``: extra files (relative path inside the work folder -> text) written next to it.
    ``python``: the interpreter (default: ``sys.executable``'s base, else ``/usr/bin/python3``).
    ``namespaces``: ``"auto"`` or ``"on"`` (bwrap, required: ``SandboxUnavailable`` says how to
    get it), or ``"off"`` (no bwrap: a weaker sandbox that sees the host; see docs/security.md).
    ``drop_uid``: run as a fresh uid, ``"auto"`` (when root), ``"on"`` (require) or ``"off"``.
    """
    if namespaces not in ("auto", "on", "off") or drop_uid not in ("auto", "on", "off"):
        raise ValueError(f"run_python: namespaces and drop_uid take auto/on/off, got {namespaces!r}, {drop_uid!r}")
    files = dict(files or {})
    _check_files(files)
    plan = _plan(python, namespaces, drop_uid)
    return _run(plan, program, files, limits or SandboxLimits(), block_sockets)
