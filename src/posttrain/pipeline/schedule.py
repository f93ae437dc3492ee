"""Independent stages of a recipe at once: the stage graph, how many jobs, and the process pool.

A stage depends on its starting policy (`from`, or the previous policy stage) and on every stage its
config names as `${stages.NAME}`. Stages whose dependencies are done run at the same time, each in a
worker process of its own (fresh interpreter, `spawn`), longest remaining chain first:

    rank(s) = cost(s) + max(rank(c) for the stages c that depend on s)

with cost(s) the stage's `train.max_steps` (100 when unset, 1 for `stage: eval`), so a long chain
(reasoning SFT, then GRPO) starts before short side branches. A worker trains one stage at a time
with the same code as the sequential pipeline, so every stage gets the same key, the same seed and
the same result; lineage.json is written under a file lock (runner.Lineage).

`jobs: auto` is one job per GPU, or on a CPU two when the machine has two cores or more (each job
gets its share of the cores as torch threads, unless OMP_NUM_THREADS is set), never more than the
widest layer of the graph: a recipe that is one chain runs in the calling process as before.
"""

from __future__ import annotations

import os
import sys
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Callable, Optional, Union

# at most this many jobs on a CPU: beyond two, each job's share of the cores shrinks and a long
# stage left alone at the end runs on fewer threads than the machine has
CPU_JOBS = 2


def dependencies(specs, parents: dict[str, Optional[str]], refs: Callable) -> dict[str, set[str]]:
    """Each stage's prerequisites among `specs`: its starting policy and the stages it references."""
    names = {s.name for s in specs}
    return {s.name: {d for d in [parents[s.name], *refs(s.section)] if d in names} for s in specs}


def ranks(specs, deps: dict[str, set[str]], cost: Callable) -> dict[str, float]:
    """Longest remaining path from each stage to the end of the graph, in `cost` units."""
    children: dict[str, list[str]] = {s.name: [] for s in specs}
    for name, ds in deps.items():
        for d in ds:
            children[d].append(name)
    by_name = {s.name: s for s in specs}
    out: dict[str, float] = {}
    for s in reversed(specs):  # recipe order is a topological order: dependencies come first
        out[s.name] = cost(by_name[s.name]) + max((out[c] for c in children[s.name]), default=0.0)
    return out


def width(specs, deps: dict[str, set[str]]) -> int:
    """How many stages share a depth (longest chain of prerequisites): the most that could run at once."""
    depth: dict[str, int] = {}
    for s in specs:
        depth[s.name] = 1 + max((depth[d] for d in deps[s.name]), default=-1)
    counts: dict[int, int] = {}
    for d in depth.values():
        counts[d] = counts.get(d, 0) + 1
    return max(counts.values(), default=1)


def resolve_jobs(jobs: Union[int, str], graph_width: int) -> int:
    """`jobs` as a number: `auto` is one per GPU or up to CPU_JOBS on a CPU, capped by the graph's width."""
    if os.environ.get("WORLD_SIZE", "1") != "1":
        return 1  # under torchrun every rank runs the recipe in step with the others
    if jobs == "auto":
        import torch

        devices = torch.cuda.device_count() if torch.cuda.is_available() else min(CPU_JOBS, _cores())
        return max(1, min(devices, graph_width))
    return max(1, min(int(jobs), graph_width))


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _worker_init(n_jobs: int, counter) -> None:
    """A worker's share of the machine: its GPU (round robin), or its share of the cores as threads."""
    import torch

    with counter.get_lock():
        index = counter.value
        counter.value += 1
    if torch.cuda.is_available():
        torch.cuda.set_device(index % torch.cuda.device_count())
    elif "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, _cores() // n_jobs))
    if sys.stderr.isatty():  # each worker's progress bar on its own terminal line (tqdm reads TQDM_*)
        os.environ.setdefault("TQDM_POSITION", str(index % n_jobs))


def run_parallel(specs, deps: dict[str, set[str]], rank: dict[str, float], n_jobs: int,
                 job: Callable, args: Callable, on_done: Callable[[object, dict], None],
                 on_failed: Callable[[object, BaseException], None]) -> None:
    """Run `job(*args(spec))` for every spec in a pool of `n_jobs` processes, each once its
    dependencies have completed (`on_done(spec, entry)` is called in this process, in completion
    order). After a failure no new stage starts; the running ones finish, then the first failure is
    raised (`on_failed` records each)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    counter = ctx.Value("i", 0)
    pending = list(specs)
    done: set[str] = set()
    first: Optional[BaseException] = None
    with ProcessPoolExecutor(max_workers=n_jobs, mp_context=ctx, initializer=_worker_init,
                             initargs=(n_jobs, counter)) as pool:
        running: dict = {}
        while pending or running:
            if first is None:
                ready = sorted((s for s in pending if deps[s.name] <= done), key=lambda s: (-rank[s.name], s.index))
                for s in ready[:n_jobs - len(running)]:
                    running[pool.submit(job, *args(s))] = s
                    pending.remove(s)
            if not running:
                break
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in finished:
                s = running.pop(fut)
                try:
                    entry = fut.result()
                except BrokenProcessPool as e:  # the worker died (out of memory, a signal)
                    err = RuntimeError(f"the worker process running stage '{s.name}' died ({e}); run it with "
                                       "jobs: 1 to see the failure in this process")
                    on_failed(s, err)
                    first = first or err
                    continue
                except BaseException as e:  # noqa: BLE001 - re-raised below, after the running stages end
                    on_failed(s, e)
                    first = first or e
                    continue
                done.add(s.name)
                on_done(s, entry)
    if first is not None:
        raise first
