"""The bubblewrap command line of one sandboxed run: namespaces, the filesystem view, the seccomp filter.

``sandbox.py`` decides what runs and with which limits; this module says what the program's world
looks like. See the layers in ``sandbox.py``'s docstring and the threat model in docs/security.md.
"""

from __future__ import annotations

import os
import platform
import shutil
import struct

WORK_DIR = "/tmp/work"  # the program's cwd and HOME, on the private tmpfs

# seccomp: syscalls that fail with EPERM. SysV IPC objects hold memory that no rlimit counts
# (issue 16: 3 x 200 MB of shm under a 512 MB limit); the rest is kernel attack surface a test
# program never needs. Numbers from asm/unistd_64.h and asm-generic/unistd.h.
DENIED = ("shmget", "semget", "msgget", "unshare", "setns", "mount", "umount2", "pivot_root", "open_tree",
          "move_mount", "fsopen", "fsconfig", "fsmount", "fspick", "mount_setattr", "keyctl", "add_key",
          "request_key", "bpf", "perf_event_open", "userfaultfd", "io_uring_setup", "io_uring_enter",
          "io_uring_register")
_SYSCALLS = {
    # machine: (AUDIT_ARCH, first number of a foreign ABI sharing the arch (x32), numbers of DENIED)
    "x86_64": (0xC000003E, 0x40000000, (29, 64, 68, 272, 308, 165, 166, 155, 428, 429, 430, 431, 432, 433, 442,
                                        250, 248, 249, 321, 298, 323, 425, 426, 427)),
    "aarch64": (0xC00000B7, None, (194, 190, 186, 97, 268, 40, 39, 41, 428, 429, 430, 431, 432, 433, 442,
                                   219, 217, 218, 280, 241, 282, 425, 426, 427)),
}


def has_seccomp(machine: str | None = None) -> bool:
    return (machine or platform.machine()) in _SYSCALLS


def seccomp_program(machine: str | None = None) -> bytes | None:
    """A classic-BPF seccomp filter (``struct sock_filter[]``, what ``bwrap --seccomp FD`` reads):
    a foreign architecture or ABI is killed, ``DENIED`` fails with EPERM, the rest is allowed.
    None on an architecture whose numbers are not listed here."""
    machine = machine or platform.machine()
    if machine not in _SYSCALLS:
        return None
    arch, foreign, numbers = _SYSCALLS[machine]
    LD, JEQ, JGE, RET = 0x20, 0x15, 0x35, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ|K, BPF_JMP|JGE|K, BPF_RET|K
    ALLOW, KILL, EPERM = 0x7FFF0000, 0x80000000, 0x00050000 | 1
    checks = ([(JGE, foreign)] if foreign is not None else []) + [(JEQ, n) for n in numbers]
    prog = [(LD, 0, 0, 4), (JEQ, 1, 0, arch), (RET, 0, 0, KILL), (LD, 0, 0, 0)]  # arch, then syscall nr
    deny = len(prog) + len(checks) + 1  # index of "ret EPERM", right after "ret ALLOW"
    for op, k in checks:
        prog.append((op, deny - (len(prog) + 1), 0, k))  # jump offsets count from the next instruction
    prog += [(RET, 0, 0, ALLOW), (RET, 0, 0, EPERM)]
    return b"".join(struct.pack("=HBBI", *ins) for ins in prog)


def root_view(prefix: str) -> list[str]:
    """The read-only filesystem: /usr, the /bin, /lib... of a merged-/usr system (as symlinks) or
    of a split one (read-only), and the interpreter's prefix when it lives outside /usr."""
    args = ["--ro-bind", "/usr", "/usr"]
    for d in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(d):
            args += ["--symlink", os.readlink(d), d]
        elif os.path.isdir(d):
            args += ["--ro-bind", d, d]
    if prefix != "/usr" and not prefix.startswith("/usr/"):
        args += ["--ro-bind", prefix, prefix]
    return args


def command(prefix: str, tmpfs_mb: int, file_fds: dict[str, int], seccomp_fd: int | None) -> list[str]:
    """bwrap and its arguments, up to the ``--`` before the interpreter.

    ``file_fds``: work-folder path -> a readable descriptor bwrap copies into the tmpfs.
    Every namespace is new; nested user namespaces are disabled (``--disable-userns``); the
    program's process is PID 1's child (``--as-pid-1``: our boot script is PID 1, so the
    namespace, and every process in it, ends with it); ``/`` and ``/dev`` are read-only; one
    tmpfs of ``tmpfs_mb`` is ``/tmp``, ``/dev/shm`` and the work folder together.
    """
    argv = [shutil.which("bwrap"), "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent",
            "--new-session", "--as-pid-1", *root_view(prefix), "--proc", "/proc", "--tmpfs", "/dev"]
    for dev in ("null", "zero", "full", "random", "urandom"):
        argv += ["--dev-bind", f"/dev/{dev}", f"/dev/{dev}"]
    argv += ["--symlink", "/proc/self/fd", "/dev/fd", "--symlink", "/tmp", "/dev/shm",
             "--size", str(tmpfs_mb << 20), "--perms", "1777", "--tmpfs", "/tmp", "--dir", WORK_DIR]
    for name, fd in file_fds.items():
        argv += ["--file", str(fd), f"{WORK_DIR}/{name}"]
    if seccomp_fd is not None:
        argv += ["--seccomp", str(seccomp_fd)]
    return argv + ["--chdir", WORK_DIR, "--remount-ro", "/dev", "--remount-ro", "/", "--"]


def memfd(name: str, data: bytes) -> int:
    """A nameless in-memory file holding ``data``, positioned at its start, inheritable (bwrap reads it)."""
    fd = os.memfd_create(name, 0)
    os.write(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd
