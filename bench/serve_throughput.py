"""Serving load test: `posttrain serve` with per-request adapters vs `transformers serve`, side by side.

    python bench/serve_throughput.py                    # 512 requests per run, 64 clients (~10 min, 2 cores)
    python bench/serve_throughput.py --requests 128 --hf-requests 64 --rounds 1   # a quick look

On the bundled base model, with 4 LoRA adapters (r=16 on every linear layer, random non-zero
weights, so each changes the answers):

1. `posttrain serve BASE --adapter a0=.. --adapter a1=.. --adapter a2=.. --adapter a3=..` in a child
   process; every (prompt, adapter) pair is first asked alone, one request at a time, for its
   single-request answer;
2. `--concurrency` clients (asyncio, one connection each) send `--requests` greedy chat requests,
   spread evenly over the 4 adapters in a shuffled order (`mixed`); then the same requests all to
   one adapter (`one_adapter`) and all to the base (`base_only`); these three alternate for
   `--rounds` rounds and medians are reported. Every mixed answer is compared with its
   single-request answer;
3. `transformers serve` (transformers' own OpenAI-compatible server) on adapter a0 merged into the
   base (it has no per-request adapters, so one model per server), with the same clients and
   concurrency on the first `--hf-requests` of the `one_adapter` requests, in its default mode and with
   `--continuous-batching`.

Throughput is completion tokens per second of wall time; latency is per request, end to end.
Every child process runs with `--threads` OpenMP threads. `uptime`'s load is recorded before and
after, since the machines this runs on are shared. Prints JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _httpx():
    try:  # the openai package's HTTP client: httpx2 in this project's registry, httpx upstream
        import httpx2
        return httpx2
    except ImportError:
        import httpx
        return httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def make_adapters(root: Path, k: int) -> list[Path]:
    import torch
    from transformers import AutoModelForCausalLM

    from posttrain.config import AdapterConfig
    from posttrain.gym import base_model_path
    from posttrain.models import adapters as A

    out = []
    for i in range(k):
        torch.manual_seed(100 + i)
        m = AutoModelForCausalLM.from_pretrained(str(base_model_path()))
        A.apply(m, AdapterConfig(type="lora", r=16))
        with torch.no_grad():
            for n, p in m.named_parameters():
                if "lora_B" in n:
                    p.normal_(std=0.02)
        out.append(A.save(m, root / f"a{i}"))
    return out


def prompts(n: int) -> list[list[dict]]:
    from posttrain.gym import load_task_rows

    rows = load_task_rows("instruct", "validation", n=n)
    out = []
    for r in rows:
        msgs = r.get("messages") or [{"role": "user", "content": r["prompt"]}]
        last_user = max(i for i, m in enumerate(msgs) if m["role"] == "user")
        out.append(msgs[:last_user + 1])
    return out


class Child:
    """A server in a child process, stopped with Ctrl-C (SIGINT) so that it drains."""

    def __init__(self, cmd: list[str], port: int, threads: int):
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
               "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        self.url = f"http://127.0.0.1:{port}"
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        httpx = _httpx()
        t0 = time.monotonic()
        while True:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"{cmd[:3]} exited: {self.log.read().decode()[-2000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() - t0 > 300:
                raise RuntimeError(f"{cmd[:3]} did not start in 300 s")
            time.sleep(0.5)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return -9


async def _run(url: str, jobs: list[tuple[str, list[dict]]], concurrency: int, max_tokens: int) -> dict:
    httpx = _httpx()

    results: list = [None] * len(jobs)
    queue: asyncio.Queue = asyncio.Queue()
    for i in range(len(jobs)):
        queue.put_nowait(i)

    async def client():
        async with httpx.AsyncClient(base_url=url, timeout=600) as h:
            while not queue.empty():
                i = queue.get_nowait()
                model, messages = jobs[i]
                t0 = time.perf_counter()
                try:
                    r = await h.post("/v1/chat/completions", json={
                        "model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0})
                    body = r.json()
                    ok = r.status_code == 200
                except Exception as e:  # counted as an error, reported with its text
                    ok, body = False, {"error": repr(e)}
                dt = time.perf_counter() - t0
                if ok:
                    results[i] = (dt, body["usage"]["completion_tokens"], body["choices"][0]["message"]["content"])
                else:
                    results[i] = (dt, 0, None, body)

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    lat = sorted(r[0] for r in results)
    tokens = sum(r[1] for r in results)
    errors = [r[3] for r in results if len(r) == 4]
    return {"requests": len(jobs), "errors": len(errors), "first_error": errors[0] if errors else None,
            "wall_s": round(wall, 2), "completion_tokens": tokens, "tokens_per_s": round(tokens / wall, 1),
            "requests_per_s": round(len(jobs) / wall, 2), "p50_s": round(statistics.median(lat), 3),
            "p99_s": round(lat[min(len(lat) - 1, int(0.99 * len(lat)))], 3),
            "answers": [r[2] for r in results]}


def run(url, jobs, concurrency, max_tokens) -> dict:
    return asyncio.run(_run(url, jobs, concurrency, max_tokens))


def summary(runs: list[dict]) -> dict:
    out = {k: runs[0][k] for k in ("requests", "completion_tokens")}
    out["errors"] = sum(r["errors"] for r in runs)
    for k in ("tokens_per_s", "requests_per_s", "p50_s", "p99_s", "wall_s"):
        out[k] = statistics.median(r[k] for r in runs)
        out[k + "_runs"] = [r[k] for r in runs]
    if any(r["first_error"] for r in runs):
        out["first_error"] = next(r["first_error"] for r in runs if r["first_error"])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=512)
    p.add_argument("--hf-requests", type=int, default=128)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--adapters", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--skip-hf", action="store_true")
    a = p.parse_args()

    from posttrain.gym import base_model_path
    from posttrain.models.adapters import merge_to_dir

    result = {"machine": {"cpus": os.cpu_count(), "threads_per_server": a.threads, "load_before": load_avg(),
                          "shared": True},
              "settings": {k: v for k, v in vars(a).items() if k != "skip_hf"}}
    base = str(base_model_path())
    work = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    adapter_dirs = make_adapters(work, a.adapters)
    names = [f"a{i}" for i in range(a.adapters)]
    n_prompts = max(1, a.requests // (2 * a.adapters))  # every (prompt, adapter) pair is asked twice
    ps = prompts(n_prompts)
    pairs = [(n, m) for m in range(len(ps)) for n in names]
    order = [pairs[i % len(pairs)] for i in range(a.requests)]
    random.Random(0).shuffle(order)
    mixed = [(n, ps[m]) for n, m in order]
    one = [("a0", ps[m]) for _, m in order]
    base_only = [("base", ps[m]) for _, m in order]

    port = free_port()
    cmd = [sys.executable, "-m", "posttrain", "serve", base, "--port", str(port), "--served-model-name", "base",
           "--max-batch", str(a.concurrency), "--log-level", "warning"]
    for n, d in zip(names, adapter_dirs):
        cmd += ["--adapter", f"{n}={d}"]
    server = Child(cmd, port, a.threads)
    try:
        t0 = time.perf_counter()
        single = {}
        for n, m in pairs:  # one request at a time: each pair's single-request answer
            single[(n, m)] = run(server.url, [(n, ps[m])], 1, a.max_tokens)["answers"][0]
        result["single_requests_s"] = round(time.perf_counter() - t0, 1)
        runs = {"mixed": [], "one_adapter": [], "base_only": []}
        for _ in range(a.rounds):
            for key, jobs in (("mixed", mixed), ("one_adapter", one), ("base_only", base_only)):
                r = run(server.url, jobs, a.concurrency, a.max_tokens)
                if key == "mixed":
                    r["equal_to_single"] = sum(ans == single[pair] for ans, pair in zip(r["answers"], order))
                runs[key].append(r)
        for key, rs in runs.items():
            result[f"posttrain_{key}"] = summary(rs)
        result["posttrain_mixed"]["equal_to_single"] = min(r["equal_to_single"] for r in runs["mixed"])
    finally:
        result["posttrain_exit_code"] = server.stop()

    if not a.skip_hf:
        merged = merge_to_dir(base, adapter_dirs[0], work / "a0-merged")
        hf_jobs = [(str(merged), ps[m]) for _, m in order][:a.hf_requests]
        hf_single = [single[("a0", m)] for _, m in order][:a.hf_requests]
        for mode, extra in (("default", []), ("continuous_batching", ["--continuous-batching"])):
            port = free_port()
            try:
                cli = str(Path(sys.executable).with_name("transformers"))
                hf = Child([cli, "serve", str(merged), "--port", str(port), "--device", "cpu", *extra], port,
                           a.threads)
            except RuntimeError as e:
                result[f"transformers_serve_{mode}"] = {"error": str(e)[-500:]}
                continue
            try:
                r = run(hf.url, hf_jobs, a.concurrency, a.max_tokens)
                r["equal_to_posttrain_single"] = sum(x == y for x, y in zip(r["answers"], hf_single))
                result[f"transformers_serve_{mode}"] = summary([r]) | {
                    "equal_to_posttrain_single": r["equal_to_posttrain_single"]}
            finally:
                hf.stop()
        best = max((v.get("tokens_per_s", 0) for k, v in result.items() if k.startswith("transformers_serve")),
                   default=0)
        if best:
            result["mixed_vs_best_transformers_serve"] = round(result["posttrain_mixed"]["tokens_per_s"] / best, 2)
    result["mixed_vs_base_only"] = round(result["posttrain_mixed"]["tokens_per_s"] /
                                         result["posttrain_base_only"]["tokens_per_s"], 2)
    result["machine"]["load_after"] = load_avg()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
