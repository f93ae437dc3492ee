"""The code reward and its sandbox, fed correct, wrong and hostile completions.

Each hostile completion pairs an attack with a test that passes only if the attack worked, so a
reward of 0.0 shows containment; the test process itself (the "trainer") must also survive.
Hostile cases run with the full sandbox and again with namespaces off, to show the unprivileged
uid holds on its own; cases whose safety rests on a layer this machine lacks are skipped.
"""

import os
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import threading
import time

import pytest

from posttrain.rewards import SandboxLimits, code_reward, isolation_report, make_code_reward, run_python, run_tests
from posttrain.rewards.sandbox import _UID_BASE, SandboxUnavailable, _plan

FAST = SandboxLimits(timeout_s=2.0)


pytestmark = pytest.mark.usefixtures("sandbox")  # tests/rewards/conftest.py
ADD_TESTS = ["assert add(2, 3) == 5", "assert add(-1, 1) == 0"]
MODES = ["auto", "off"]  # namespaces


def layers(namespaces="auto"):
    return _plan(None, namespaces, "auto").layers


def require(namespaces, *needed):
    have = layers(namespaces)
    if not any(layer in have for layer in needed):
        pytest.skip(f"needs one of {needed}; this machine's sandbox has {have}")


def score(code, tests=ADD_TESTS, *, namespaces="auto", limits=FAST, **kw):
    fn = make_code_reward(limits=limits, namespaces=namespaces, **kw)
    return fn([""], [f"Here is my solution:\n```python\n{code}\n```"], tests=[tests])[0]


def sandbox_processes() -> int:
    """Live (non-zombie) processes owned by sandbox uids, machine-wide."""
    n = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.stat(f"/proc/{pid}").st_uid >= _UID_BASE:
                with open(f"/proc/{pid}/stat") as f:
                    n += f.read().rsplit(")", 1)[1].split()[0] != "Z"
        except (OSError, IndexError):
            pass
    return n


def test_isolation_report_names_layers():
    report = isolation_report()
    assert {"process-group", "clean-env", "tmp-cwd", "rlimits"} <= set(report["layers"])
    assert report["root"] == (os.geteuid() == 0)
    if report["root"]:
        assert "unprivileged-uid" in report["layers"]


def test_correct_wrong_partial_and_missing():
    assert score("def add(a, b):\n    return a + b") == 1.0
    assert score("def add(a, b):\n    return a - b") == 0.0
    half = "def add(a, b):\n    return a + b if a > 0 else 7"
    assert score(half) == 0.5
    assert score(half, partial_credit=False) == 0.0
    assert score("def add(a, b) return a + b") == 0.0  # syntax error
    program = "def check(f):\n    assert f(1, 1) == 2\ncheck(add)"
    assert score("def add(a, b):\n    return a + b", program) == 1.0
    # rows without tests are not applicable; a completion without code gets 0
    out = code_reward(["", ""], ["```python\ndef add(a,b): return a+b\n```", ""], tests=[None, ADD_TESTS])
    assert out == [None, 0.0]
    # reasoning is skipped; the last python block is the answer
    text = "<think>```python\ndef add(a, b): return 0\n```</think>```python\ndef add(a, b):\n    return a + b\n```"
    assert code_reward([""], [text], tests=[ADD_TESTS]) == [1.0]


def test_exit_code_and_printing_tricks_earn_nothing():
    for trick in ("import sys\nsys.exit(0)", "import os\nos._exit(0)", "print('test 0 pass')\nprint('PASS')",
                  "import os\ndef add(a, b):\n    os._exit(0)"):
        assert score(trick) == 0.0, trick


def test_replaying_the_harness_output_earns_nothing():
    # the solution's add() tries to read back everything printed so far and replay it as passes
    replay = ("import os\ndef add(a, b):\n    try:\n        os.lseek(1, 0, 0)\n        seen = os.read(1, 1 << 16)\n"
              "    except OSError as e:\n        seen = repr(e).encode()\n"
              "    os.write(2, b'SEEN ' + seen)\n    os.write(1, seen * 3)\n    os._exit(0)")
    report = run_tests(replay, ADD_TESTS, limits=FAST)
    assert report.loaded and report.passed == 0
    assert "SEEN OSError(9, 'Bad file descriptor')" in report.stderr  # stdout is write-only for the child


def test_infinite_loop_times_out():
    start = time.monotonic()
    report = run_tests("while True:\n    pass", ADD_TESTS, limits=SandboxLimits(timeout_s=1.0))
    assert report.timed_out and report.passed == 0
    assert time.monotonic() - start < 3.0
    # the loop hidden inside the tested function: earlier tests keep their credit
    looping = "def add(a, b):\n    while a < 0:\n        pass\n    return a + b"
    assert score(looping, limits=SandboxLimits(timeout_s=1.0)) == 0.5


def test_cpu_rlimit_kills_before_the_wall_clock():
    res = run_python("while True:\n    pass", limits=SandboxLimits(timeout_s=20, cpu_s=1))
    assert not res.timed_out and res.duration_s < 5
    assert res.returncode in (-signal.SIGXCPU, -signal.SIGKILL)


def test_file_size_rlimit():
    res = run_python("open('big', 'wb').write(b'x' * (4 << 20))", limits=SandboxLimits(max_file_mb=1))
    # Python ignores SIGXFSZ, so the write fails with EFBIG instead of the process being killed
    assert res.returncode == 1 and "OSError: [Errno 27] File too large" in res.stderr


@pytest.mark.parametrize("namespaces", MODES)
def test_fork_bomb_is_bounded_and_fully_reaped(namespaces):
    require(namespaces, "unprivileged-uid")  # RLIMIT_NPROC is not enforced for root
    bomb = ("import os\nwhile True:\n    try:\n        if os.fork() == 0:\n            os.setsid()\n"
            "    except OSError:\n        pass")
    peak, done = [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], sandbox_processes())
            time.sleep(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    limits = SandboxLimits(timeout_s=1.0, max_processes=8)
    try:
        assert score(bomb, limits=limits, namespaces=namespaces) == 0.0
    finally:
        done.set()
        sampler.join()
    assert 2 <= peak[0] <= limits.max_processes + 3  # + the reaper, bwrap's monitor, the sweep's helper
    assert sandbox_processes() == 0


def test_memory_exhaustion():
    for hog in ("x = bytearray(8 << 30)", "chunks = []\nwhile True:\n    chunks.append(bytearray(16 << 20))"):
        report = run_tests(hog + "\ndef add(a, b):\n    return a + b", ADD_TESTS,
                           limits=SandboxLimits(timeout_s=5, memory_mb=256))
        assert (report.passed, report.loaded, report.timed_out) == (0, False, False)
        assert "MemoryError" in report.stderr


@pytest.mark.parametrize("namespaces", MODES)
def test_files_outside_the_sandbox_survive(namespaces):
    require(namespaces, "unprivileged-uid")  # as a plain user, the sandbox can delete that user's files
    outside = tempfile.mkdtemp(prefix="posttrain-canary-")
    try:
        os.chmod(outside, 0o755)
        canary = os.path.join(outside, "canary.txt")
        with open(canary, "w") as f:
            f.write("alive")
        os.chmod(canary, 0o644)
        attack = (f"import os, shutil\nfor act in (lambda: open({canary!r}, 'w').write('pwned'),\n"
                  f"            lambda: os.remove({canary!r}), lambda: os.chmod({canary!r}, 0o777),\n"
                  f"            lambda: shutil.rmtree({outside!r})):\n"
                  "    try:\n        act()\n    except OSError:\n        pass")
        # under bwrap the canary is not even visible; either way it must come out untouched
        run_python(attack, limits=FAST, namespaces=namespaces)
        with open(canary) as f:
            assert f.read() == "alive"
        assert stat.S_IMODE(os.stat(canary).st_mode) == 0o644
    finally:
        shutil.rmtree(outside)


def _listen():
    """A loopback server recording what arrives; call the returned stop() after the sandbox ran."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    server.settimeout(0.05)
    received, done = [], threading.Event()

    def accept():
        while True:
            try:
                conn, _ = server.accept()
            except (socket.timeout, OSError):
                if done.is_set():  # anything sent before stop() is already in the backlog
                    return
                continue
            conn.settimeout(1)
            received.append(conn.recv(100))
            conn.close()

    thread = threading.Thread(target=accept)
    thread.start()

    def stop():
        done.set()
        thread.join()
        server.close()

    return server.getsockname()[1], stop, received


CONNECT = "import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=1)\ns.sendall(b'leak')\ns.close()"
CONNECT_CTYPES = (  # raw libc calls: invisible to Python's audit hooks
    "import ctypes, struct\nlibc = ctypes.CDLL(None, use_errno=True)\nfd = libc.socket(2, 1, 0)\n"
    "addr = struct.pack('=H', 2) + struct.pack('!H', {port}) + bytes([127, 0, 0, 1]) + bytes(8)\n"
    "assert libc.connect(fd, addr, 16) == 0, ctypes.get_errno()\nassert libc.write(fd, b'leak', 4) == 4\n"
    "libc.close(fd)")


@pytest.mark.parametrize("program,namespaces,block_sockets,needed", [
    (CONNECT, "auto", True, ("process-group",)),
    (CONNECT_CTYPES, "auto", True, ("net-namespace",)),
    (CONNECT, "auto", False, ("net-namespace",)),       # the namespace alone stops it
    (CONNECT, "off", True, ("process-group",)),         # the audit hook alone stops the socket module
], ids=["all-layers", "ctypes-vs-netns", "netns-only", "hook-only"])
def test_network_connection_is_refused(program, namespaces, block_sockets, needed):
    require(namespaces, *needed)
    port, stop, received = _listen()
    try:
        res = run_python(program.format(port=port), limits=FAST, namespaces=namespaces, block_sockets=block_sockets)
    finally:
        stop()
    assert received == [] and res.returncode == 1
    # bwrap's network namespace has its own loopback, where nothing listens
    assert any(err in res.stderr for err in ("PermissionError", "Connection refused", "111"))


def test_audit_hook_alone_is_bypassed_by_ctypes():
    """Documents why the hook is only defense in depth: without a network namespace, raw libc wins."""
    port, stop, received = _listen()
    try:
        res = run_python(CONNECT_CTYPES.format(port=port), limits=FAST, namespaces="off")
    finally:
        stop()
    assert (res.returncode, received) == (0, [b"leak"])


@pytest.mark.parametrize("namespaces", MODES)
def test_environment_secrets_do_not_leak(namespaces, monkeypatch):
    require(namespaces, "unprivileged-uid", "pid-namespace")  # a same-uid child could read /proc/<ppid>/environ
    secret = "hunter2-" + os.urandom(8).hex()
    monkeypatch.setenv("POSTTRAIN_TEST_SECRET", secret)
    snoop = (f"import os\nfound = [v for v in os.environ.values() if 'hunter2' in v]\n"
             f"for pid in [p for p in os.listdir('/proc') if p.isdigit()] + ['{os.getpid()}', 'self']:\n"
             "    try:\n        found += [x.decode() for x in open(f'/proc/{pid}/environ', 'rb').read().split(b'\\0')"
             " if b'hunter2' in x]\n    except OSError:\n        pass\nprint(found)")
    assert score(snoop, ["assert found"], namespaces=namespaces) == 0.0
    res = run_python(snoop, limits=FAST, namespaces=namespaces)
    assert res.returncode == 0 and res.stdout.strip() == "[]" and secret not in res.stdout


@pytest.mark.parametrize("namespaces", MODES)
def test_killing_the_parent_fails(namespaces):
    require(namespaces, "unprivileged-uid", "pid-namespace")  # kill(-1) as our own uid would hit us
    bystander = subprocess.Popen(["sleep", "30"])
    try:
        attack = (f"import os, signal\nfor act in (lambda: os.kill(os.getppid(), 9), lambda: os.kill({os.getpid()}, 9),\n"
                  f"            lambda: os.killpg(os.getpgid({os.getpid()}), 9), lambda: os.kill({bystander.pid}, 9),\n"
                  "            lambda: os.kill(-1, 9)):\n    try:\n        act()\n    except OSError:\n        pass")
        assert score(attack, namespaces=namespaces) == 0.0
        assert bystander.poll() is None  # still running
    finally:
        bystander.kill()
        bystander.wait()
    # and the trainer's sandbox still works afterwards
    assert score("def add(a, b):\n    return a + b", namespaces=namespaces) == 1.0


def test_missing_bwrap_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no bwrap on it
    _plan.cache_clear()
    try:
        with pytest.raises(SandboxUnavailable) as e:
            run_python("print(1)")
    finally:
        _plan.cache_clear()
    assert str(e.value).startswith("the code sandbox needs bubblewrap (bwrap), which is not on PATH: install "
                                   "bubblewrap (Debian/Ubuntu: apt-get install bubblewrap;")
    assert "namespaces='off'" in str(e.value)


def test_limits_keep_room_for_the_interpreter():
    with pytest.raises(ValueError) as e:
        SandboxLimits(memory_mb=100, tmpfs_mb=64)
    assert str(e.value) == ("SandboxLimits: memory_mb (100) must exceed tmpfs_mb (64) by at least 64 "
                            "(the interpreter's address space), and tmpfs_mb must be at least 1")


def test_tmpfs_counts_against_memory():
    """/tmp and /dev/shm are one tmpfs of tmpfs_mb; the address space gets the rest of memory_mb."""
    probe = ("import resource, os\nprint(resource.getrlimit(resource.RLIMIT_AS)[0] >> 20, "
             "os.statvfs('/tmp').f_blocks * os.statvfs('/tmp').f_frsize >> 20, os.path.realpath('/dev/shm'))")
    res = run_python(probe, limits=SandboxLimits(memory_mb=300, tmpfs_mb=40))
    assert res.stdout.split() == ["260", "40", "/tmp"]
