"""Code rewards: run the completion's program against the row's unit tests in the sandbox.

The row's ``tests`` column holds either a list of test snippets (``"assert add(2, 3) == 5"``),
each run separately so partial credit is possible, or one string (a whole test program, one
test). The solution and the tests run in one sandboxed interpreter: the solution is executed
first (as module ``solution``, so ``if __name__ == "__main__":`` blocks do not run), then each
test in the solution's namespace.

Verdicts travel back as HMACs of ``"test i pass"`` / ``"test i fail"`` under a random key that
the harness reads and deletes before the solution runs (it precomputes every verdict line and
drops the key), so exit-code tricks (``sys.exit(0)``, ``os._exit(0)``), printing "PASS", or
reading back and replaying earlier output earn nothing. A solution written to dig the
precomputed pass lines out of the interpreter's memory could still forge results, since it
shares the process with its tests; the sandbox bounds what it can do, not what it can claim.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from posttrain.rewards.base import after_thinking, column, completion_text
from posttrain.rewards.sandbox import SandboxLimits, run_python

_FENCE = re.compile(r"```[ \t]*(?P<lang>[\w+-]*)[ \t]*\n(?P<code>.*?)```", re.DOTALL)
_PY_LANGS = {"", "python", "py", "python3"}

_HARNESS = r"""
import hashlib, hmac, json, os, sys, traceback

def _harness():
    write = os.write  # bound now: the solution may replace os.write or print
    with open(".token") as f:
        token = f.read().encode()
    os.remove(".token")
    with open(".tests.json") as f:
        tests = json.load(f)
    os.remove(".tests.json")
    # every verdict line is precomputed, so the solution cannot intercept the key through hmac
    mark = {msg: hmac.new(token, msg.encode(), hashlib.sha256).hexdigest()[:32] for msg in
            ["load ok"] + [f"test {i} {v}" for i in range(len(tests)) for v in ("pass", "fail")]}
    del token
    with open("solution.py") as f:
        source = f.read()
    namespace = {"__name__": "solution", "__builtins__": __builtins__}
    try:
        exec(compile(source, "solution.py", "exec"), namespace)
    except BaseException:
        traceback.print_exc()
        return
    write(1, ("\n" + mark["load ok"] + "\n").encode())
    for i, test in enumerate(tests):
        try:
            exec(compile(test, f"test_{i}", "exec"), namespace)
            verdict = "pass"
        except BaseException:
            traceback.print_exc()
            verdict = "fail"
        write(1, ("\n" + mark[f"test {i} {verdict}"] + "\n").encode())

_harness()
"""


def _mark(token: str, msg: str) -> str:
    return hmac.new(token.encode(), msg.encode(), hashlib.sha256).hexdigest()[:32]


def extract_code(text, *, think_tag: str = "think") -> str | None:
    """The program in a completion: the last ```python (or unlabelled) fenced block after the
    reasoning block, or the whole answer when it has no fence; None for an unclosed reasoning block."""
    body = after_thinking(completion_text(text), think_tag)
    if body is None:
        return None
    blocks = [m.group("code") for m in _FENCE.finditer(body) if m.group("lang").lower() in _PY_LANGS]
    return blocks[-1] if blocks else body


@dataclass
class TestReport:
    passed: int
    total: int
    loaded: bool        # the solution itself ran without raising
    timed_out: bool
    returncode: int | None
    stderr: str

    @property
    def fraction(self) -> float:
        return self.passed / self.total if self.total else 0.0


def run_tests(code: str, tests, *, limits: SandboxLimits | None = None, **sandbox_kwargs) -> TestReport:
    """Run ``code`` then each of ``tests`` (a list of snippets, or one test program) in the sandbox."""
    test_list = [tests] if isinstance(tests, str) else list(tests)
    if not all(isinstance(t, str) for t in test_list):
        raise TypeError("run_tests: tests must be a string or a list of strings")
    token = secrets.token_hex(16)
    files = {"solution.py": code, ".tests.json": json.dumps(test_list), ".token": token}
    res = run_python(_HARNESS, files=files, limits=limits, **sandbox_kwargs)
    lines = set(res.stdout.split())
    loaded = _mark(token, "load ok") in lines
    passed = {i for i in range(len(test_list))
              if _mark(token, f"test {i} pass") in lines and _mark(token, f"test {i} fail") not in lines}
    return TestReport(len(passed) if loaded else 0, len(test_list), loaded, res.timed_out, res.returncode,
                      res.stderr[-2000:])


def make_code_reward(*, limits: SandboxLimits | None = None, partial_credit: bool = True,
                     max_workers: int = 2, **sandbox_kwargs):
    """A reward function over the ``tests`` column: the fraction of tests passed
    (``partial_credit=True``) or 1.0 only when all pass. Rows without tests get None; a
    completion without code, or one that times out, crashes or breaks a limit, gets 0.0 for the
    tests it did not pass. ``max_workers`` sandboxes run at a time."""

    def code_reward(prompts, completions, *, tests=None, **_columns) -> list[float | None]:
        n = len(completions)
        rows = column({"tests": tests} if tests is not None else {}, "tests", n, reward="code_reward")
        if rows is None:
            return [None] * n

        def score(i: int) -> float | None:
            if rows[i] is None:
                return None
            code = extract_code(completions[i])
            if not code or not code.strip():
                return 0.0
            report = run_tests(code, rows[i], limits=limits, **sandbox_kwargs)
            return report.fraction if partial_credit else float(report.passed == report.total)

        with ThreadPoolExecutor(max_workers=max(1, max_workers)) as pool:
            return list(pool.map(score, range(n)))

    return code_reward


code_reward = make_code_reward()
code_reward.__doc__ = "Fraction of the row's ``tests`` passed by the completion's code (see make_code_reward)."
