"""The hostile corpus: programs in tests/rewards/hostile/ that try to get out of the sandbox.

Each program does its attack and prints what it achieved as one JSON line; its case below then
asserts containment from the host's side wherever the host can observe it (a listener that
received nothing, a canary file unchanged, no SysV segment or /dev/shm file left), and from the
program's report (the exact errno) where only the inside can see it. After every case the parent
must be healthy: no process of the run left, no segment, no file named with the run's nonce
anywhere on the host, and the next sandboxed run works.

Marked ``sandbox`` (``make test-sandbox``, its own CI step). Skipped with the reason where the
sandbox cannot be set up, unless POSTTRAIN_REQUIRE_SANDBOX=1 (CI), which makes that a failure.
"""

import errno
import json
import os
import platform
import secrets
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from posttrain.rewards import SandboxLimits, isolation_report, run_python
from posttrain.rewards.sandbox import _UID_BASE, _plan

pytestmark = [pytest.mark.sandbox, pytest.mark.usefixtures("sandbox")]  # the fixture: tests/rewards/conftest.py
HOSTILE = Path(__file__).parent / "hostile"
FAST = SandboxLimits(timeout_s=3.0)
CASES = {}


def case(name, *, limits=FAST, block_sockets=True):
    """Register a case: a generator that yields the program's params, then receives (result, report)."""
    def register(fn):
        CASES[name] = (fn, limits, block_sockets)
        return fn
    return register




class Host:
    """The host side of a case: listeners, canaries, and the run's nonce."""

    def __init__(self, tmp_path: Path):
        self.tmp, self.nonce, self._stop = tmp_path, secrets.token_hex(6), []

    def listener(self, family=socket.AF_INET, kind=socket.SOCK_STREAM, address=("0.0.0.0", 0)):
        """A server recording what arrives; returns (its address, received()) where received()
        stops it and returns the payloads (anything sent during the run is in the backlog by then)."""
        server = socket.socket(family, kind)
        server.bind(address)
        if kind == socket.SOCK_STREAM:
            server.listen(8)
        server.settimeout(0.05)
        got, done = [], threading.Event()

        def serve():
            while True:
                try:
                    if kind == socket.SOCK_DGRAM:
                        got.append(server.recv(100))
                        continue
                    conn, _ = server.accept()
                except (socket.timeout, OSError):
                    if done.is_set():
                        return
                    continue
                conn.settimeout(1)
                got.append(conn.recv(100))
                conn.close()

        thread = threading.Thread(target=serve)
        thread.start()

        def received():
            done.set()
            thread.join()
            server.close()
            return got

        self._stop.append(received)
        return server.getsockname(), received

    def canary(self) -> Path:
        folder = self.tmp / "project"
        folder.mkdir(exist_ok=True)
        folder.chmod(0o777)
        path = folder / "canary.txt"
        path.write_text("alive")
        path.chmod(0o666)
        return path

    def close(self):
        for stop in self._stop:
            stop()


def host_addresses() -> list[str]:
    """127.0.0.1 and the host's own address on its default route, if it has one."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("10.255.255.255", 1))
        return ["127.0.0.1", probe.getsockname()[0]]
    except OSError:
        return ["127.0.0.1"]
    finally:
        probe.close()


NO_CONNECTION = {errno.ECONNREFUSED, errno.ENETUNREACH, errno.EHOSTUNREACH}


@case("unix_socket_file")
def _(h):
    (path), received = h.listener(socket.AF_UNIX, address=str(h.tmp / "service.sock"))
    os.chmod(path, 0o777)
    res, report = yield {"path": path}
    assert received() == []
    assert (report["connect"], report["errno"]) == (-1, errno.ENOENT)  # the socket file is not in its world


@case("unix_socket_abstract")
def _(h):
    name = f"posttrain-test-{h.nonce}"
    _, received = h.listener(socket.AF_UNIX, address="\0" + name)
    res, report = yield {"name": name}
    assert received() == []
    assert (report["connect"], report["errno"]) == (-1, errno.ECONNREFUSED)  # abstract names are per netns


@case("unix_socket_module", block_sockets=False)
def _(h):
    path, received = h.listener(socket.AF_UNIX, address=str(h.tmp / "service.sock"))
    os.chmod(path, 0o777)
    res, report = yield {"path": path}
    assert received() == [] and report["errno"] == errno.ENOENT


@case("host_dotenv")
def _(h):
    project = h.tmp / "project"
    project.mkdir()
    project.chmod(0o755)
    secret = f"sk-live-{h.nonce}"
    (project / ".env").write_text(f"OPENAI_API_KEY={secret}\n")
    (project / ".env").chmod(0o644)
    res, report = yield {"env_path": str(project / ".env")}
    assert secret not in res.stdout + res.stderr
    assert report == {"found": {}, "errors": {str(project / ".env"): errno.ENOENT}}


@case("host_projects")
def _(h):
    res, report = yield {"cwd": os.getcwd(), "project": str(h.tmp)}
    assert report["visible"] == []
    plan = _plan(None, "auto", "auto")
    allowed = {"bin", "sbin", "lib", "lib32", "lib64", "libx32", "usr", "proc", "dev", "tmp",
               plan.prefix.split("/")[1]}
    assert set(report["root"]) <= allowed and {"usr", "proc", "dev", "tmp"} <= set(report["root"])


@case("etc_shadow")
def _(h):
    res, report = yield {}
    assert set(report.values()) == {errno.ENOENT}  # no /etc at all


@case("sysv_shm", limits=SandboxLimits(timeout_s=5.0, memory_mb=512))
def _(h):
    res, report = yield {}
    assert report["segments"] == [[-1, errno.EPERM]] * 3  # seccomp: SysV memory no rlimit counts


@case("sysv_msg_sem")
def _(h):
    res, report = yield {}
    assert report == {"msgget": [-1, errno.EPERM], "semget": [-1, errno.EPERM]}


@case("dev_shm_fill", limits=SandboxLimits(timeout_s=5.0, memory_mb=512))
def _(h):
    res, report = yield {"nonce": h.nonce}
    # /dev/shm is the private tmpfs (64 MB of the 512): 4 files fit, the 5th hits ENOSPC
    assert report == {"written": 4 * (15 << 20), "errno": errno.ENOSPC}


@case("tmp_fill")
def _(h):
    res, report = yield {"nonce": h.nonce}
    assert report["errno"] == errno.ENOSPC and report["written"] <= FAST.tmpfs_mb << 20


@case("posix_shm_mmap", limits=SandboxLimits(timeout_s=5.0, memory_mb=512))
def _(h):
    res, report = yield {"nonce": h.nonce}
    assert report["child"] == -signal.SIGBUS  # the tmpfs has no page left to give


@case("unshare_user")
def _(h):
    res, report = yield {}
    assert (report["unshare"], report["errno"]) == (-1, errno.EPERM)
    assert report["tool_rc"] != 0 and report["tool_out"] == ""


@case("clone_newuser")
def _(h):
    res, report = yield {}
    assert (report["clone"], report["errno"], report["child"]) == (-1, errno.ENOSPC, None)  # --disable-userns


@case("infinite_loop", limits=SandboxLimits(timeout_s=1.0))
def _(h):
    res, report = yield {}
    assert res.timed_out and res.returncode is None and res.duration_s < 3.0  # 1 s + the kill, on a busy machine


@case("fork_bomb", limits=SandboxLimits(timeout_s=1.0, max_processes=8))
def _(h):
    peak, done = [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], len(our_sandbox_processes()))
            time.sleep(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        res, report = yield {}
    finally:
        done.set()
        sampler.join()
    assert res.timed_out and res.duration_s < 3.0  # it forks forever; the timeout ends it
    if os.geteuid() == 0:  # RLIMIT_NPROC: 8, + the reaper, bwrap's monitor and the sweep's helper
        assert 3 <= peak[0] <= 8 + 3


@case("alloc_20gb", limits=SandboxLimits(timeout_s=3.0, memory_mb=256))
def _(h):
    res, report = yield {}
    assert res.returncode == 1 and res.stderr.rstrip().endswith("MemoryError") and "allocated" not in res.stdout


@case("alloc_gradual", limits=SandboxLimits(timeout_s=5.0, memory_mb=256))
def _(h):
    res, report = yield {}
    assert res.returncode == 1 and res.stderr.rstrip().endswith("MemoryError")


@case("write_outside")
def _(h):
    canary = h.canary()
    res, report = yield {"canary": str(canary), "nonce": h.nonce}
    assert report["done"] == []
    assert canary.read_text() == "alive" and canary.stat().st_mode & 0o777 == 0o666


@case("delete_outside")
def _(h):
    canary = h.canary()
    res, report = yield {"canary": str(canary)}
    assert report["done"] == [] and canary.read_text() == "alive"


@case("env_secrets")
def _(h):
    os.environ["POSTTRAIN_TEST_SECRET"] = f"hunter2-{h.nonce}"
    try:
        res, report = yield {"parent_pid": os.getpid()}
    finally:
        del os.environ["POSTTRAIN_TEST_SECRET"]
    assert report["found"] == [] and h.nonce not in res.stdout
    assert report["env"] == ["HOME", "LANG", "PATH", "PWD", "PYTHONDONTWRITEBYTECODE"]  # PWD: bwrap's --chdir


@case("tcp_socket", block_sockets=False)
def _(h):
    (_, port), received = h.listener()
    res, report = yield {"hosts": host_addresses(), "port": port}
    assert received() == [] and set(report.values()) <= NO_CONNECTION


@case("tcp_ctypes")
def _(h):
    (_, port), received = h.listener()
    res, report = yield {"hosts": host_addresses(), "port": port}
    assert received() == [] and set(report.values()) <= NO_CONNECTION


@case("udp_ctypes")
def _(h):
    (_, port), received = h.listener(kind=socket.SOCK_DGRAM)
    res, report = yield {"hosts": host_addresses(), "port": port}
    time.sleep(0.1)
    assert received() == []  # loopback sends "succeed" into the sandbox's own loopback; nothing reaches us


@case("kill_parent")
def _(h):
    bystander = subprocess.Popen(["sleep", "30"])
    try:
        res, report = yield {"parent_pid": os.getpid(), "parent_pgid": os.getpgid(0), "bystander": bystander.pid}
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()
    # the PID namespace hides every outside process; its parent is the reaper, PID 1 of the
    # namespace, which ignores the signal (kill returns 0) and went on to report the exit status
    assert report == {"ppid": 0, "parent": errno.ESRCH, "pgid": errno.ESRCH, "bystander": errno.ESRCH}
    assert res.returncode == 0


@case("detached_process")
def _(h):
    res, report = yield {}
    assert report == {"left": True}  # it did detach; the health check finds nothing left


@case("ptrace_parent")
def _(h):
    res, report = yield {"parent_pid": os.getpid()}
    assert report == {"ptrace": -1, "errno": errno.ESRCH, "mem": errno.ENOENT}


@case("mount_escape")
def _(h):
    res, report = yield {}
    assert {tuple(v) for v in report.values()} == {(-1, errno.EPERM)}


@case("become_root")
def _(h):
    res, report = yield {}
    # uid 0 is not even mapped in the sandbox's user namespace
    assert report["uid"] != 0 and report["euid"] != 0 and report["setuid"] == errno.EINVAL
    assert report["su"][0] != 0 and report["su"][1] == ""
    assert report["CapEff"] == "0000000000000000" and report["NoNewPrivs"] == "1"


@case("kernel_surface")
def _(h):
    res, report = yield {}
    assert {tuple(v) for v in report.values()} == {(-1, errno.EPERM)}


@case("fd_snoop")
def _(h):
    res, report = yield {}
    assert report["fds"] == [0, 1, 2, 3]  # 3 is listdir's own
    assert report["readable"] == {"0": ""}  # /dev/null; stdout/stderr are write-only


@case("output_flood")
def _(h):
    res, report = yield {}
    assert len(res.stdout) == FAST.max_output_bytes
    assert "stopped: errno 27" in res.stderr  # RLIMIT_FSIZE (16 MB) on the parent's capture file


@case("inode_flood")
def _(h):
    res, report = yield {"nonce": h.nonce}
    # no byte counts against the tmpfs size: inodes are kernel memory, bounded by the time limit
    assert report["files"] > 1000


@case("privileged_syscalls")
def _(h):
    hostname = socket.gethostname()
    res, report = yield {}
    assert {tuple(v) for v in report.values()} == {(-1, errno.EPERM)}
    assert socket.gethostname() == hostname


@case("proc_view")
def _(h):
    res, report = yield {"parent_pid": os.getpid()}
    assert report["pids"][0] == 1 and len(report["pids"]) <= 3  # the reaper, the program (and listdir)
    assert not report["parent_visible"] and "python" in report["init"]  # PID 1 is the sandbox's own reaper


@case("dev_and_sys")
def _(h):
    res, report = yield {}
    assert report["dev"] == ["fd", "full", "null", "random", "shm", "urandom", "zero"] and not report["sys"]
    assert {report[p] for p in ("/dev/mem", "/dev/kmsg", "/dev/sda", "/dev/vda", "/dev/tty", "/dev/console",
                                "/dev/ptmx")} == {errno.ENOENT}


def host_state(nonce: str, tmp: Path) -> dict:
    """What a contained run must leave exactly as it found it."""
    shm = [line.split()[1] for line in Path("/proc/sysvipc/shm").read_text().splitlines()[1:]]
    marked = [str(p) for top in ("/tmp", "/dev/shm", "/var/tmp", os.getcwd(), str(tmp))
              for p in Path(top).glob(f"*{nonce}*")]
    return {"shm": set(shm), "marked": marked, "processes": our_sandbox_processes()}


def our_sandbox_processes() -> list[int]:
    """Live processes of this test process's sandbox uids (root only; a non-root sandbox runs as us)."""
    if os.geteuid() != 0:
        return []
    low = _UID_BASE + (os.getpid() % 100_000) * 1000
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if low <= os.stat(f"/proc/{pid}").st_uid < low + 1000:
                with open(f"/proc/{pid}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                        found.append(int(pid))
        except (OSError, IndexError):
            pass
    return found


def test_corpus_is_complete():
    """Every program has its case, and there are at least 25 (issue 16)."""
    assert sorted(p.stem for p in HOSTILE.glob("*.py")) == sorted(CASES)
    assert len(CASES) >= 25


@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_program_is_contained(name, tmp_path):
    fn, limits, block_sockets = CASES[name]
    host = Host(tmp_path)
    try:
        steps = fn(host)
        params = next(steps)
        before = host_state(host.nonce, tmp_path)
        res = run_python((HOSTILE / f"{name}.py").read_text(), files={"params.json": json.dumps(params)},
                         limits=limits, block_sockets=block_sockets)
        lines = [line for line in res.stdout.splitlines() if line.startswith("{")]
        report = json.loads(lines[-1]) if lines else None
        with pytest.raises(StopIteration):
            steps.send((res, report))
    finally:
        host.close()
    after = host_state(host.nonce, tmp_path)
    assert after["processes"] == [] and after["shm"] <= before["shm"] and after["marked"] == []
    assert run_python("print(6 * 7)", limits=FAST).stdout == "42\n"  # and the sandbox still works


@pytest.mark.parametrize("name", ["/tmp/pwned.py", "../pwned.py", "a/../../pwned.py", "a//b.py", "./x.py", ""])
def test_files_outside_the_work_folder_are_refused(name, tmp_path):
    before = sorted(Path("/tmp").glob("pwned*"))
    with pytest.raises(ValueError) as e:
        run_python("print(1)", files={name: "x"})
    assert str(e.value) == (f"run_python: files key {name!r} is not a relative path inside the work folder; "
                            "use a name like 'data/input.txt' (no leading '/', no '.' or '..' parts)")
    assert sorted(Path("/tmp").glob("pwned*")) == before


def test_files_inside_the_work_folder_arrive():
    res = run_python("import os\nprint(open('data/in.txt').read(), os.getcwd())", files={"data/in.txt": "hello"})
    assert res.stdout == "hello /tmp/work\n"


def test_arch_is_covered_by_seccomp():
    assert ("seccomp" in isolation_report()["layers"]) == (platform.machine() in ("x86_64", "aarch64"))
