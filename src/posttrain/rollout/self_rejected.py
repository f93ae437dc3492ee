"""On-policy rejected answers: preference pairs whose rejected side is the model's own mistake.

Offline preference data pairs a good answer with a bad one that somebody else wrote, so DPO spends
most of its updates pushing down answers the model would never give. Iterative RPO (Pang et al.
2024, "Iterative Reasoning Preference Optimization") instead samples the current model, keeps
the samples that a verifier rejects, and pairs each with a correct answer. The pairs then target
exactly the errors the model makes.

`self_rejected_pairs` does this for rows that carry a chosen answer plus whatever columns the
reward function needs (the gym's preference rows carry `answer` and `check`). A sample counts as
a mistake when the reward scores it <= `threshold` (None, "not applicable", never does). Empty
samples are skipped, since an empty answer cannot be a training target.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from posttrain.data.sources import read_records
from posttrain.engine.dist import is_distributed, rank
from posttrain.rewards.sets import resolve_reward
from posttrain.rollout.engine import RolloutEngine
from posttrain.rollout.prompts import prompt_text
from posttrain.rollout.sampling import SamplingParams

NOT_COLUMNS = ("prompt", "chosen", "rejected", "messages")


@dataclass
class SelfRejectedStats:
    rows: int = 0
    samples: int = 0
    wrong: int = 0
    empty: int = 0
    pairs: int = 0

    def as_dict(self) -> dict:
        return {"self_rejected_rows": self.rows, "self_rejected_samples": self.samples,
                "self_rejected_wrong": self.wrong, "self_rejected_empty": self.empty,
                "self_rejected_pairs": self.pairs,
                "self_rejected_error_rate": round(self.wrong / max(1, self.samples), 4)}


def _as_turn(text: str, like) -> object:
    # the rejected side takes the chosen side's form: a message list or plain text
    return [{"role": "assistant", "content": text}] if isinstance(like, list) else text


def self_rejected_pairs(model, tokenizer, rows: Sequence[dict], reward: Callable, *, samples: int = 4,
                        temperature: float = 1.0, max_new_tokens: int = 64, threshold: float = 0.0,
                        seed: int = 0, per_row: int = 1, model_name: str = "") -> tuple[list[dict], dict]:
    """Sample `samples` answers per row; pair each row's `chosen` with up to `per_row` rejected samples.

    Args:
        rows: preference rows (`prompt`, `chosen`, optional `rejected`) plus the reward's columns.
        reward: f(prompts, completions, **columns) -> list[float | None], the GRPO reward signature.
    Returns:
        (pairs, stats): pairs are ordinary preference rows with provenance (`source: "self"`, the
        sample's `reward`, `model`), stats counts rows, samples, mistakes and pairs.
    """
    for i, r in enumerate(rows):
        if "chosen" not in r or "prompt" not in r:
            raise ValueError(f"self-rejected pairs: row {i} needs 'prompt' and 'chosen' (keys: {sorted(r)})")
    stats = SelfRejectedStats(rows=len(rows))
    if not rows:
        return [], stats.as_dict()
    prompts = [prompt_text(tokenizer, r) for r in rows]
    was = model.training
    model.eval()
    try:
        ro = RolloutEngine(model, tokenizer).generate(
            prompts, SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, n=samples, seed=seed))
    finally:
        model.train(was)
    cols = {k: [r.get(k) for r in rows for _ in range(samples)] for k in rows[0] if k not in NOT_COLUMNS}
    scores = reward([p for p in prompts for _ in range(samples)], ro.completions, **cols)
    if len(scores) != len(ro.completions):
        raise ValueError(f"self-rejected pairs: the reward returned {len(scores)} values for "
                         f"{len(ro.completions)} samples")
    pairs = []
    stats.samples = len(ro.completions)
    for i, r in enumerate(rows):
        taken = 0
        for j in range(samples):
            text, s = ro.completions[i * samples + j].strip(), scores[i * samples + j]
            if s is None or s > threshold:
                continue
            stats.wrong += 1
            if not text:
                stats.empty += 1
                continue
            if taken < per_row:
                taken += 1
                extra = {k: v for k, v in r.items() if k not in NOT_COLUMNS}
                pairs.append({"prompt": r["prompt"], "chosen": r["chosen"], "rejected": _as_turn(text, r["chosen"]),
                              **extra, "source": "self", "reward": float(s), "model": model_name})
    stats.pairs = len(pairs)
    return pairs, stats.as_dict()


def write_jsonl(rows: Sequence[dict], path: Path) -> Path:
    """Write rows atomically (a temporary file renamed into place): no half-written data file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    tmp.replace(path)
    return path



def self_rejected_source(model, tokenizer, sources: Sequence[str], o, *, out: Path, seed: int, model_name: str,
                         resume: bool = False) -> Path:
    """Sample the starting model on the rows of `sources`, write the self-rejected pairs to `out`
    (with `out`.stats.json) and return the file; a resumed run reuses the file instead of sampling again.

    `o` is DPO's `self_rejected` section (samples, reward, threshold, temperature, max_new_tokens, per_row).
    Under torchrun every rank samples the same pairs (same seed); only rank 0 writes the run's copy.
    """
    if resume and out.exists():
        return out
    rows = [rec.data for s in sources for rec in read_records(s, split="train")]
    pairs, stats = self_rejected_pairs(model, tokenizer, rows, resolve_reward(o.reward)[1], samples=o.samples,
                                       temperature=o.temperature, max_new_tokens=o.max_new_tokens,
                                       threshold=o.threshold, seed=seed, per_row=o.per_row, model_name=model_name)
    if not pairs:
        raise ValueError(f"dpo.self_rejected: the reward accepted all {stats['self_rejected_samples']} samples; "
                         "there is nothing to reject (lower the threshold or raise the temperature)")
    main = (rank() if is_distributed() else int(os.environ.get("RANK", "0"))) == 0
    if not main:
        out = Path(tempfile.mkdtemp(prefix="posttrain-self-rejected-")) / out.name
    write_jsonl(pairs, out)
    if main:
        out.with_suffix(".stats.json").write_text(json.dumps(stats, indent=1) + "\n")
    print(f"dpo.self_rejected: {stats['self_rejected_pairs']} pairs from {stats['self_rejected_wrong']} rejected "
          f"of {stats['self_rejected_samples']} samples -> {out}", file=sys.stderr, flush=True)
    return out
