"""Synthetic run directories for tests/report: metrics from closed-form curves, written like the engine writes them."""

import json
import math


def write_run(path, *, steps=100, eval_every=20, loss0=2.5, lr=1e-4, corrupt_tail=False, status="completed"):
    """A run dir with train loss/lr/grad_norm every step and eval loss + gym metrics every ``eval_every`` steps.

    Returns the rows written, so tests compare against what went in.
    """
    path.mkdir(parents=True, exist_ok=True)
    rows = []
    for s in range(1, steps + 1):
        rows.append({
            "step": s,
            "split": "train",
            "loss": round(loss0 * math.exp(-s / 40) + 0.4, 6),
            "lr": lr * 0.5 * (1 + math.cos(math.pi * s / steps)),
            "tokens_per_s": 5000 + s,
            "grad_norm": 1.0 / math.sqrt(s),
            "time": round(1.8e9 + 0.5 * s, 3),  # wall clock, as the engine logs it
        })
        if s % eval_every == 0:
            rows.append({"step": s, "split": "eval", "loss": round(loss0 * math.exp(-s / 50) + 0.5, 6)})
            rows.append({"step": s, "split": "eval", "task_accuracy": round(min(1.0, s / steps), 4),
                         "regression_score": round(0.95 - 0.0001 * s, 4)})
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if corrupt_tail:
        text += '{"step": %d, "split": "train", "lo' % (steps + 1)  # killed mid-write
    (path / "metrics.jsonl").write_text(text)
    (path / "config.yaml").write_text(f"stage: sft\noptim:\n  lr: {lr}\n  name: <adamw>\n")
    if status is not None:
        (path / "manifest.json").write_text(json.dumps({"status": status, "versions": {"torch": "2.x"}}))
    return rows


DEMO_SUMMARY = {
    "base": {"task_accuracy": 0.0617, "regression_score": 0.9412, "eval_loss": 2.75},
    "sft": {"task_accuracy": 0.9383, "regression_score": 0.9331, "eval_loss": 0.5, "train_time_s": 41},
}
