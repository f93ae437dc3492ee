"""Process plumbing of the code sandbox (posttrain.rewards.sandbox): waiting on a child, killing a
sandbox uid's processes, the child's output file, and the work folder on the host."""

from __future__ import annotations

import os
import select
import shutil
import signal
import stat
import subprocess
import tempfile

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
    list can leave a new child behind. With bwrap the PID namespace already took them all.
    """
    kill = shutil.which("kill")
    for _ in range(attempts):
        if _live_processes(uid) == 0 or kill is None:
            return
        subprocess.run([kill, "-KILL", "-1"], user=uid, group=uid, extra_groups=[],
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, env={}, timeout=10, check=False)

def _wait(proc: subprocess.Popen, timeout: float) -> bool:
    """Wait up to ``timeout`` s for ``proc``; False on timeout. A pidfd wakes us the moment it
    exits, where ``Popen.wait(timeout)`` polls with sleeps of up to 50 ms (a third of a run)."""
    try:
        pidfd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):  # Python < 3.9 or Linux < 5.3
        try:
            proc.wait(timeout=timeout)
            return True
        except subprocess.TimeoutExpired:
            return False
    try:
        return bool(select.select([pidfd], [], [], timeout)[0])
    finally:
        os.close(pidfd)

def _write_tree(workdir: str, files: dict[str, str], uid: int | None) -> None:
    """The work folder on the host, for namespaces='off' (keys already checked by _check_files)."""
    for name, text in files.items():
        path = os.path.join(workdir, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    if uid is not None:
        for dirpath, _, names in os.walk(workdir):
            for p in [dirpath, *(os.path.join(dirpath, n) for n in names)]:
                os.chown(p, uid, uid)

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
    """Up to ``limit`` bytes from the start of ``fd`` (a file or a finished pipe)."""
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

def _force_remove(func, path, _exc_info):
    """rmtree error hook: the program may have made its files read-only; we own the tree, so fix it."""
    try:
        os.chmod(os.path.dirname(path), 0o700)
        os.chmod(path, 0o700)
        func(path)
    except OSError:
        pass
