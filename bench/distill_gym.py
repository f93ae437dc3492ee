"""On-policy distillation on the gym: the GRPO-trained reasoning model teaches the reasoning-SFT model.

    python bench/distill_gym.py --student RUN/reasoning_unguarded/model --teacher RUN/grpo_unguarded/model \
        [--grpo-steps 4] [--grpo-train-s 482] [--grpo-total-steps 160] [--set train.max_steps=80 ...]

The distillation is the demo recipe's `distill` row (its settings read from the recipe; `--set`
overrides them). Measures the teacher's and the student's greedy reasoning accuracy on the same 200
held-out test problems (before and after), trains the student with the `distill` stage, and then, in
the same process and so under the same machine load, times `--grpo-steps` steps of GRPO with the
teacher's settings (the demo's `grpo_unguarded` row, forgetting guard off like the `distill` row)
from the same student. The issue's bar: accuracy >= 90% of the teacher's in <= 1/3 of the time
GRPO took to train the teacher, judged against GRPO's seconds per step measured here (the same
load) and, with `--grpo-train-s`, against the time the teacher's run took. Prints the
distillation's numbers as one JSON object, then all of them (with GRPO's timing) as another.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path


def accuracy(model_dir, n: int) -> float:
    from posttrain import gym
    from posttrain.models.loading import load

    model, tok = load(str(model_dir), device="cpu")
    return gym.task_accuracy(model, tok, task="reasoning", split="test", n=n)


def se(p: float, n: int) -> float:
    """The binomial standard error of an accuracy measured on n problems."""
    return math.sqrt(p * (1 - p) / n)


def _train_steps(run_dir: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("split") == "train"]


def timed(fn):
    """(result, wall seconds, CPU seconds of this process)."""
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def distill_run(a, out: Path):
    """The demo's `distill` row with this bench's student and teacher (and `--set` overrides)."""
    from posttrain.pipeline.demo import stage_overrides
    from posttrain.stages import distill, load_config

    row = [o for o in stage_overrides("distill") if not o.startswith("distill.teacher=")]
    cfg = load_config("distill", overrides=[
        f"model={a.student}", "data.train=gym:reasoning:train", f"output_dir={out}", *row,
        f"distill.teacher={a.teacher}", "train.progress=false", f"train.seed={a.seed}", *a.set])
    return distill.run(cfg), cfg


def grpo_run(a, out: Path, steps: int):
    """GRPO exactly as the demo's `grpo_unguarded` row trained the teacher (src/posttrain/gym/recipes/demo.yaml)."""
    from posttrain.pipeline.demo import stage_overrides
    from posttrain.stages import grpo, load_config

    cfg = load_config("grpo", overrides=[
        f"model={a.student}", "data.train=gym:reasoning:train", f"output_dir={out}", *stage_overrides("grpo_unguarded"),
        f"train.max_steps={steps}", "train.progress=false", "eval.guard=off"])
    return grpo.run(cfg)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--student", required=True, help="the reasoning-SFT model (the demo's `reasoning_unguarded` row)")
    ap.add_argument("--teacher", required=True, help="the GRPO-trained model (the demo's `grpo_unguarded` row)")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--n", type=int, default=200, help="held-out test problems")
    ap.add_argument("--grpo-steps", type=int, default=4, help="GRPO steps timed alongside (0: none)")
    ap.add_argument("--grpo-total-steps", type=int, default=160, help="the steps GRPO took to train the teacher")
    ap.add_argument("--grpo-train-s", type=float, default=None, help="the teacher's GRPO training time, if known")
    ap.add_argument("--skip-teacher", type=float, default=None, help="the teacher's accuracy, if already measured")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides of the demo's distill "
                    "row (train.max_steps=80, distill.divergence=jsd, data.eval=..., ...)")
    ap.add_argument("--out", default=None, help="keep the runs here (default: a temporary directory)")
    a = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)  # stable timings on a shared machine
    tmp = Path(a.out or tempfile.mkdtemp(prefix="bench-distill-"))
    res = {"bench": "distill_gym", "student": a.student, "teacher": a.teacher, "n": a.n, "set": a.set,
           "load_avg_start": os.getloadavg()}
    teacher = a.skip_teacher if a.skip_teacher is not None else accuracy(a.teacher, a.n)
    before = accuracy(a.student, a.n)
    (r, cfg), wall, cpu = timed(lambda: distill_run(a, tmp / "distill"))
    res.update(steps=cfg.train.max_steps, batch=cfg.train.batch_size, lr=cfg.train.lr, schedule=cfg.train.schedule,
               divergence=cfg.distill.divergence, temperature=cfg.distill.temperature)
    steps = _train_steps(r.output_dir)
    after = accuracy(r.model_dir, a.n)
    step_s = [s["step_time_s"] for s in steps]
    res.update(teacher_accuracy=teacher, student_before=before, student_after=after,
               accuracy_se=round(se(after, a.n), 3), fraction_of_teacher=round(after / teacher, 3),
               distill_wall_s=round(wall, 1), distill_cpu_s=round(cpu, 1), distill_train_s=round(sum(step_s), 1),
               distill_step_s_median=round(statistics.median(step_s), 3),
               final_divergence=steps[-1].get("divergence"), final_reward=steps[-1].get("reward"))
    print(json.dumps(res), flush=True)  # the distillation's numbers, before the GRPO timing
    if a.grpo_steps:
        g, gwall, gcpu = timed(lambda: grpo_run(a, tmp / "grpo", a.grpo_steps))
        gs = [s["step_time_s"] for s in _train_steps(g.output_dir)]
        grpo_total = statistics.median(gs) * a.grpo_total_steps
        res.update(grpo_step_s_median=round(statistics.median(gs), 3), grpo_steps_timed=len(gs),
                   grpo_cpu_s_per_step=round(gcpu / len(gs), 3),
                   grpo_train_s_estimate=round(grpo_total, 1),
                   time_fraction_same_load=round(sum(step_s) / grpo_total, 3))
    if a.grpo_train_s:
        res["time_fraction_vs_teacher_run"] = round(sum(step_s) / a.grpo_train_s, 3)
    res["load_avg_end"] = os.getloadavg()
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
