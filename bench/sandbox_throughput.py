"""Code-reward sandbox throughput: N sandboxed test runs, W at a time (issue 16's target: 200 calls
with 8 in parallel in <= 10 s on 2 cores).

Each call is what the code reward does per completion: ``run_tests`` of a small solution against
three asserts, in the full bubblewrap sandbox. The sides (``bwrap``, and ``off``: no namespaces,
for the cost of the sandbox itself) alternate round by round in this one process; medians are
reported with the load average, since these machines are shared. Prints one JSON object. Usage:

    python bench/sandbox_throughput.py [--calls 200] [--workers 8] [--rounds 3] [--sides bwrap,off]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

from posttrain.rewards import isolation_report, run_tests

SOLUTION = "def add(a, b):\n    return a + b\n"
TESTS = ["assert add(2, 3) == 5", "assert add(-1, 1) == 0", "assert add(0, 0) == 0"]
NAMESPACES = {"bwrap": "auto", "off": "off"}


def one_round(calls: int, workers: int, namespaces: str) -> dict:
    def call(_):
        start = time.monotonic()
        report = run_tests(SOLUTION, TESTS, namespaces=namespaces)
        return time.monotonic() - start, report.passed

    usage, own = resource.getrusage(resource.RUSAGE_CHILDREN), resource.getrusage(resource.RUSAGE_SELF)
    start = time.monotonic()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(call, range(calls)))
    wall = time.monotonic() - start
    after, own_after = resource.getrusage(resource.RUSAGE_CHILDREN), resource.getrusage(resource.RUSAGE_SELF)
    # CPU of the sandboxes (bwrap, reaper, program; each waited for by its parent): what a busy
    # machine cannot hide, unlike the wall clock
    cpu = (after.ru_utime - usage.ru_utime) + (after.ru_stime - usage.ru_stime)
    parent = (own_after.ru_utime - own.ru_utime) + (own_after.ru_stime - own.ru_stime)
    latencies = sorted(t for t, _ in results)
    return {"wall_s": round(wall, 2), "calls_per_s": round(calls / wall, 1),
            "p50_call_s": round(latencies[len(latencies) // 2], 3),
            "p95_call_s": round(latencies[int(len(latencies) * 0.95)], 3),
            "child_cpu_ms_per_call": round(cpu / calls * 1000, 1),
            "parent_cpu_ms_per_call": round(parent / calls * 1000, 1),
            "all_passed": all(passed == len(TESTS) for _, passed in results)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sides", default="bwrap,off")
    a = parser.parse_args()
    sides = a.sides.split(",")
    unknown = [s for s in sides if s not in NAMESPACES]
    if unknown:
        parser.error(f"--sides: unknown {unknown}; choose from {sorted(NAMESPACES)}")
    for side in sides:  # warm up: the first call of each side probes the machine
        run_tests(SOLUTION, TESTS, namespaces=NAMESPACES[side])
    load_before = os.getloadavg()
    rounds = {side: [] for side in sides}
    for _ in range(a.rounds):
        for side in sides:
            rounds[side].append(one_round(a.calls, a.workers, NAMESPACES[side]))
    out = {"calls": a.calls, "workers": a.workers, "rounds": a.rounds, "cpus": os.cpu_count(),
           "load_avg_before": [round(x, 2) for x in load_before],
           "load_avg_after": [round(x, 2) for x in os.getloadavg()],
           "layers": isolation_report()["layers"], "sides": {}}
    for side, rs in rounds.items():
        out["sides"][side] = {"median_wall_s": statistics.median(r["wall_s"] for r in rs),
                              "median_calls_per_s": statistics.median(r["calls_per_s"] for r in rs),
                              "median_child_cpu_ms_per_call": statistics.median(r["child_cpu_ms_per_call"] for r in rs),
                              "median_parent_cpu_ms_per_call": statistics.median(r["parent_cpu_ms_per_call"] for r in rs),
                              "all_passed": all(r["all_passed"] for r in rs), "rounds": rs}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
