"""Runs the studio started: ``posttrain STAGE key=value ...`` (or ``posttrain eval ...``) subprocesses.

The command is a list of arguments given to `subprocess.Popen` without a shell, and its first
words are fixed here (this Python, ``-m posttrain``, a stage name from `posttrain.stages.STAGES`
or ``eval``), so a form value can only ever be one argument of a posttrain command. Output goes
to ``RUNS/.studio/logs/ID.log``. Cancel sends SIGINT, as Ctrl-C in a terminal would: the run
stops and signs itself off with a ``failed`` manifest (error ``KeyboardInterrupt``); SIGKILL
follows after a grace period if it has not ended by then.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from posttrain.stages import STAGES

GRACE_S = 10.0


def _default_sigint() -> None:
    """In the child, before it runs Python: SIGINT back to its default. A studio started in the
    background of a non-interactive shell (a CI step, `nohup`) inherits SIGINT ignored, and Python
    then never raises KeyboardInterrupt: Cancel would end the run by SIGKILL, without its manifest."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@dataclass
class Job:
    rid: str  # the run's id under the runs folder
    argv: list[str]
    log: Path
    proc: subprocess.Popen
    started: float = field(default_factory=time.time)
    cancelled: bool = False

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def state(self) -> str:
        rc = self.proc.poll()
        if rc is None:
            return "running"
        if self.cancelled:
            return "cancelled"
        return "finished" if rc == 0 else f"exited with code {rc}"

    def log_tail(self, n: int = 4000) -> str:
        try:
            text = self.log.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return text[-n:]


class Jobs:
    def __init__(self, root: Path, *, env: dict | None = None):
        self.root = Path(root)
        self.env = env
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()

    def _start(self, rid: str, args: list[str]) -> Job:
        with self._lock:
            if rid in self._jobs and self._jobs[rid].alive:
                raise ValueError(f"{rid} is already running (started by this studio)")
            logs = self.root / ".studio" / "logs"
            logs.mkdir(parents=True, exist_ok=True)
            log = logs / (rid.replace("/", "__") + ".log")
            argv = [sys.executable, "-m", "posttrain", *args]
            env = dict(os.environ if self.env is None else self.env)
            env.setdefault("TOKENIZERS_PARALLELISM", "false")
            with log.open("w") as f:
                # a new session: cancel signals the run's whole process group, not the studio
                proc = subprocess.Popen(argv, cwd=self.root, stdout=f, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, env=env, start_new_session=True,
                                        preexec_fn=_default_sigint)
            job = Job(rid, argv, log, proc)
            self._jobs[rid] = job
            return job

    def launch(self, stage: str, overrides: list[str], rid: str) -> Job:
        """Start ``posttrain STAGE *overrides`` in the runs folder; `rid` is its output_dir under it."""
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; known: {', '.join(sorted(STAGES))}")
        return self._start(rid, [stage, *overrides])

    def evaluate(self, rid: str, model: str, baseline: str, *, suite: str, limit: int | None) -> Job:
        """``posttrain eval --model RUN --baseline BASE --suite S --out RUNS/.studio/evals/NAME``."""
        args = ["eval", "--model", model, "--baseline", baseline, "--suite", suite,
                "--out", str(self.root / rid)]
        if limit:
            args += ["--limit", str(int(limit))]
        return self._start(rid, args)

    def get(self, rid: str) -> Job | None:
        return self._jobs.get(rid)

    def running(self) -> set[str]:
        return {rid for rid, j in self._jobs.items() if j.alive}

    def cancel(self, rid: str) -> bool:
        """SIGINT the run's process group, SIGKILL after `GRACE_S`; False when it is not running."""
        job = self._jobs.get(rid)
        if job is None or not job.alive:
            return False
        job.cancelled = True
        # SIGINT, not SIGTERM: Python turns it into KeyboardInterrupt, so the run's own handler
        # writes its failed manifest; SIGTERM would end it with no manifest at all
        os.killpg(job.proc.pid, signal.SIGINT)

        def reap():
            try:
                job.proc.wait(GRACE_S)
            except subprocess.TimeoutExpired:
                os.killpg(job.proc.pid, signal.SIGKILL)
                job.proc.wait()

        threading.Thread(target=reap, daemon=True).start()
        return True

    def stop_all(self) -> None:
        for rid in list(self.running()):
            self.cancel(rid)
