"""Stage `safety`: refusal training on harmful requests together with helpful answers to benign look-alikes.

A data recipe on top of the `sft` and `dpo` stages (same engine, same losses):

- ``safety.method=sft`` (default): supervised training on conversations in which harmful requests
  are answered with a refusal and benign look-alikes ("How do I kill a python process?") with a
  helpful answer. Helpful general chats from ``safety.retain`` are mixed in at
  ``safety.retain_ratio`` so that the model stays useful and refusal does not spread to every
  request (over-refusal, Röttger et al. 2024, XSTest); ``data.mix`` can add plain text on top.
- ``safety.method=dpo``: preference pairs with the DPO loss (the ``dpo:`` section): a refusal is
  chosen over compliance for harmful requests, a helpful answer over a refusal for benign ones.

Data (``data.train``, ``data.eval``) is the user's own or the gym's (``gym:refusal:train``):

- conversational rows (``messages``), optionally labelled ``harmful: true/false``;
- preference rows (``prompt``, ``chosen``, ``rejected``), used as they are by ``dpo`` and as
  ``prompt + chosen`` conversations by ``sft``.

For ``dpo``, a labelled conversational row becomes a pair around its last assistant turn:
harmful: (that turn, ``safety.compliance``); benign: (that turn, ``safety.refusal``).

Before training and after it, the stage measures on the labelled held-out rows of
``safety.eval`` (default: ``data.eval``): ``refusal_rate`` (refused harmful requests / harmful
requests) and ``over_refusal_rate`` (refused benign requests / benign requests), with greedy
answers and the eval package's refusal detector (`posttrain.eval.refusal.is_refusal`). Both are
written to ``metrics.jsonl`` (split ``safety``, step 0 and the last step), ``safety.json`` and the
manifest's result. The recipe's generated training file is kept in ``output_dir/safety_data/``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Literal, Optional, Union

from pydantic import Field, model_validator

from posttrain.config import RunConfig, _Strict, register_stage_schema
from posttrain.data.sources import DataError, read_records
from posttrain.stages.common import RunResult
from posttrain.stages.dpo import DPOSection

DEFAULT_REFUSAL = "I can't help with that."
DEFAULT_COMPLIANCE = "Sure, here is how to do that."


class SafetySection(_Strict):
    method: Literal["sft", "dpo"] = Field("sft", description="sft: train on refusals and helpful answers; dpo: "
                                          "refusal chosen over compliance (harmful), helpful over refusal (benign).")
    retain: Optional[Union[str, list[str]]] = Field(
        None, description="Helpful general data mixed into the sft recipe (a file or gym:TASK), e.g. "
                          "gym:instruct:train; guards helpfulness and against over-refusal. sft only.")
    retain_ratio: float = Field(0.5, gt=0.0, lt=1.0, description="Fraction of the sft training rows drawn from "
                                "`retain` (sampled with train.seed, repeated if the source is smaller).")
    refusal: str = Field(DEFAULT_REFUSAL, description="dpo: the rejected answer built for benign labelled rows.")
    compliance: str = Field(DEFAULT_COMPLIANCE, description="dpo: the rejected answer built for harmful labelled rows.")
    eval: Optional[Union[str, list[str]]] = Field(
        None, description="Held-out rows labelled `harmful` for the before/after refusal rates (default: data.eval).")
    eval_n: int = Field(200, gt=0, description="At most this many `eval` rows are measured.")
    max_new_tokens: int = Field(32, gt=0, description="Greedy answer length when measuring refusals.")


class SafetyConfig(RunConfig):
    stage: str = "safety"
    safety: SafetySection = Field(default_factory=SafetySection)
    dpo: DPOSection = Field(default_factory=DPOSection)

    @model_validator(mode="after")
    def _check_safety(self) -> "SafetyConfig":
        s = self.safety
        if s.method == "dpo":
            if s.retain is not None:
                raise ValueError("safety.retain mixes helpful chats into the sft recipe; with safety.method=dpo "
                                 "unset it (the DPO reference keeps the model close to its start instead)")
            if self.data.mix is not None:
                raise ValueError("data.mix (plain text) needs safety.method=sft; preference pairs cannot mix it")
            if self.dpo.reference == "adapter" and self.adapter.type == "none":
                raise ValueError("dpo.reference=adapter needs an adapter (set adapter.type=lora) or use "
                                 "dpo.reference=copy / precomputed for full fine-tuning")
        return self


register_stage_schema("safety", SafetyConfig)


# ------------------------------------------------------------------ data recipe (pure)


def _msgs(value, role: str) -> list[dict]:
    return [{"role": role, "content": value}] if isinstance(value, str) else list(value)


def to_conversation(row: dict, origin: str) -> dict:
    """An sft row: conversational rows as they are, preference rows as `prompt + chosen`."""
    if "messages" in row:
        return row
    if "chosen" in row:
        prompt = _msgs(row["prompt"], "user") if row.get("prompt") is not None else []
        out = {k: v for k, v in row.items() if k not in ("prompt", "chosen", "rejected")}
        return {**out, "messages": prompt + _msgs(row["chosen"], "assistant")}
    raise DataError(f"{origin}: a safety row needs 'messages' (a conversation) or 'prompt'/'chosen'/'rejected' "
                    f"(a preference pair); keys: {sorted(row)}")


def to_pair(row: dict, origin: str, *, refusal: str, compliance: str) -> dict:
    """A dpo row: preference rows as they are; labelled conversations around their last assistant turn."""
    if "chosen" in row and "rejected" in row:
        return row
    if "messages" not in row:
        raise DataError(f"{origin}: a safety row needs 'messages' or 'prompt'/'chosen'/'rejected'; keys: {sorted(row)}")
    if not isinstance(row.get("harmful"), bool):
        raise DataError(f"{origin}: safety.method=dpo builds pairs from conversations labelled 'harmful' "
                        "(true/false); label the row or give prompt/chosen/rejected")
    msgs = row["messages"]
    if not msgs or not isinstance(msgs[-1], dict) or msgs[-1].get("role") != "assistant":
        raise DataError(f"{origin}: messages must end with the assistant's answer to pair it")
    rejected = compliance if row["harmful"] else refusal
    if msgs[-1].get("content", "").strip() == rejected.strip():
        raise DataError(f"{origin}: the answer equals the {'compliance' if row['harmful'] else 'refusal'} text it "
                        f"would be preferred to; is 'harmful' right?")
    out = {k: v for k, v in row.items() if k != "messages"}
    return {**out, "prompt": msgs[:-1], "chosen": [msgs[-1]], "rejected": [{"role": "assistant", "content": rejected}]}


def _read(sources) -> list[tuple[dict, str]]:
    srcs = sources if isinstance(sources, list) else [sources]
    return [(r.data, r.origin) for s in srcs for r in read_records(s, split="train")]


def build_rows(cfg: SafetyConfig, sources, *, retain: bool) -> list[dict]:
    """The recipe's rows for `sources` (plus `safety.retain` rows when `retain`), in a seeded order."""
    s = cfg.safety
    if s.method == "sft":
        rows = [to_conversation(r, o) for r, o in _read(sources)]
    else:
        rows = [to_pair(r, o, refusal=s.refusal, compliance=s.compliance) for r, o in _read(sources)]
    rng = random.Random(cfg.train.seed)
    if retain and s.retain is not None:
        pool = [r for r, _ in _read(s.retain)]
        if not pool:
            raise DataError(f"safety.retain {s.retain!r} has no rows")
        want = round(len(rows) * s.retain_ratio / (1 - s.retain_ratio))
        picked = []
        while len(picked) < want:  # whole shuffled passes, so every retain row is used before any repeats
            order = rng.sample(pool, len(pool))
            picked += order[:want - len(picked)]
        rows += picked
    rng.shuffle(rows)
    return rows


def _write(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


# ------------------------------------------------------------------ measuring refusals


def refusal_scores(rows: list[dict], outputs: list[str]) -> dict:
    """refusal_rate = refused harmful / harmful (higher is better); over_refusal_rate = refused benign /
    benign (lower is better); refusal_accuracy = right decisions / rows. Refusal is the eval package's
    detector. Rows without a boolean `harmful` label are skipped."""
    from posttrain.eval.refusal import is_refusal

    harmful, benign = [], []
    for row, out in zip(rows, outputs):
        if isinstance(row.get("harmful"), bool):
            (harmful if row["harmful"] else benign).append(float(is_refusal(out)))

    def mean(xs):
        return sum(xs) / len(xs) if xs else float("nan")

    return {"refusal_rate": mean(harmful), "over_refusal_rate": mean(benign),
            "refusal_accuracy": mean(harmful + [1.0 - b for b in benign]),
            "n_harmful": len(harmful), "n_benign": len(benign)}


def prompt_messages(row: dict) -> list[dict]:
    """The turns to answer: a conversation without its final answer, or a preference row's prompt."""
    if "messages" in row:
        msgs = row["messages"]
        return msgs[:-1] if msgs and msgs[-1].get("role") == "assistant" else msgs
    return _msgs(row["prompt"], "user")


def measure_refusals(model, tokenizer, rows: list[dict], *, max_new_tokens: int = 32, batch_size: int = 32) -> dict:
    """`refusal_scores` of greedy answers to labelled `rows` (through the chat template)."""
    from posttrain.data.tools import render_prompt
    from posttrain.eval.lm import generate

    rows = [r for r in rows if isinstance(r.get("harmful"), bool)]
    prompts = [render_prompt(tokenizer, prompt_messages(r), r.get("tools")) for r in rows]
    outs = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    return refusal_scores(rows, outs)


# ------------------------------------------------------------------ the stage


def _eval_rows(cfg: SafetyConfig) -> list[dict]:
    src = cfg.safety.eval if cfg.safety.eval is not None else cfg.data.eval
    if src is None:
        return []
    rows = [r for r, _ in _read(src) if isinstance(r.get("harmful"), bool)]
    return rows[:cfg.safety.eval_n]


def _record(out: Path, before: Optional[dict], after: Optional[dict], steps: int, extra: dict) -> dict:
    """safety.json, two metrics.jsonl lines (split "safety") and the manifest's result."""
    from posttrain.engine.run import MANIFEST

    summary = {"before": before, "after": after, **extra}
    (out / "safety.json").write_text(json.dumps(summary, indent=1))
    with (out / "metrics.jsonl").open("a") as f:
        for step, m in ((0, before), (steps, after)):
            if m:
                f.write(json.dumps({"step": step, "split": "safety", **m}) + "\n")
    manifest = out / MANIFEST
    m = json.loads(manifest.read_text())
    m["result"]["safety"] = summary
    tmp = out / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(m, indent=1, default=str))
    tmp.rename(manifest)  # atomic, as the engine writes it
    return summary


def run(cfg: SafetyConfig, *, resume: bool = False, evaluators=(), model=None, tokenizer=None, guard=None) -> RunResult:
    if cfg.stage != "safety":
        raise ValueError(f"safety.run got a '{cfg.stage}' config")
    if not cfg.data.train:
        raise ValueError("safety: no data: set data.train (your conversations or pairs, or gym:refusal:train)")
    from posttrain.engine import run as rundir
    from posttrain.engine.dist import barrier, is_main
    from posttrain.stages.common import load_for_training

    out = Path(cfg.output_dir)
    m = rundir.read_manifest(out)
    if m and m.get("status") == "completed":  # checked before the recipe writes its data into out/
        raise rundir.RunDirError(f"{out} already holds a completed run; choose another output_dir "
                                 "(nothing was changed)")
    sub = cfg.model_copy(deep=True)
    sub.data.train = str(out / "safety_data" / "train.jsonl")
    if cfg.data.eval is not None:
        sub.data.eval = str(out / "safety_data" / "eval.jsonl")
    if is_main():  # one writer; the rows are seeded, so a resumed run trains on the same file
        _write(build_rows(cfg, cfg.data.train, retain=True), Path(sub.data.train))
        if cfg.data.eval is not None:
            _write(build_rows(cfg, cfg.data.eval, retain=False), Path(sub.data.eval))
    barrier()
    held = _eval_rows(cfg)
    if model is None:
        model, tokenizer = load_for_training(cfg)
    measure = is_main() and bool(held)
    before = None
    if measure:  # the engine loads a resumed run's checkpoint later: these are the starting weights
        with _start_weights(model, cfg):
            before = measure_refusals(model, tokenizer, held, max_new_tokens=cfg.safety.max_new_tokens)
    if cfg.safety.method == "sft":
        from posttrain.stages.common import run_training
        from posttrain.stages.sft import LMStage, lm_data

        res = run_training(sub, lambda tok: LMStage("safety"), lm_data, resume=resume, evaluators=evaluators,
                           guard=guard, model=model, tokenizer=tokenizer)
    else:
        res = _run_dpo(sub, resume=resume, evaluators=evaluators, model=model, tokenizer=tokenizer, guard=guard)
    after = measure_refusals(res.model.eval(), tokenizer, held, max_new_tokens=cfg.safety.max_new_tokens) \
        if measure else None
    if is_main():
        extra = {"method": cfg.safety.method, "eval_rows": len(held), "train_rows": _count(sub.data.train)}
        res.result["safety"] = _record(out, before, after, int(res.result.get("steps", 0)), extra)
        from posttrain.stages.common import _report

        _report(out)  # again, now with the safety lines
    return res


def _count(path: str) -> int:
    with open(path) as f:
        return sum(1 for line in f if line.strip())


def _start_weights(model, cfg):
    """The starting model: a fresh LoRA/DoRA adapter is an identity, but prompt and prefix tuning are not."""
    from contextlib import nullcontext

    if cfg.adapter.type in ("prompt", "prefix"):
        from posttrain.models.adapters import disabled

        return disabled(model)
    return nullcontext()


def _run_dpo(cfg: SafetyConfig, **kw) -> RunResult:
    from posttrain.stages.dpo import DPOStage, implicit_reward_scores
    from posttrain.stages.preference import resolve_reference, run_pairwise

    holder = {}

    def make_stage(tok, reference):
        holder["ref"] = reference
        return DPOStage(cfg.dpo, reference)

    def score(model_, batch):
        return implicit_reward_scores(holder["ref"], cfg.dpo.beta)(model_, batch)

    return run_pairwise(cfg, make_stage, score, reference_mode=resolve_reference(cfg.dpo.reference, cfg), **kw)


# ---------------------------------------------------------------- the gym recipe (demo's `safety` row)

# From the demo's SFT model: gym refusal rows and instructions half and half, 20% plain text.
DEMO_OVERRIDES = [
    "data.train=gym:refusal:train", "safety.retain=gym:instruct:train", "safety.retain_ratio=0.5",
    "safety.eval=gym:refusal:test", "data.mix.data=gym:regression:train", "data.mix.ratio=0.2",
    "data.max_length=256", "adapter.type=lora", "adapter.r=16", "adapter.alpha=32",
    "train.lr=1e-3", "train.batch_size=16", "train.max_steps=120", "train.schedule=cosine", "train.warmup_steps=5",
    "train.precision=bf16",
]
