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
from contextlib import nullcontext
from pathlib import Path
from typing import Literal, Optional, Union

from pydantic import Field, model_validator

from posttrain.config import RunConfig, Section, register_stage_schema
from posttrain.data.safety import DEFAULT_COMPLIANCE, DEFAULT_REFUSAL, build_rows, read_rows, write_rows
from posttrain.engine import run as rundir
from posttrain.engine.dist import barrier, is_main
from posttrain.engine.setup import load_for_training
from posttrain.eval.refusal import measure_refusals
from posttrain.models.adapters import disabled
from posttrain.stages.common import FinalMeasures, RunResult, run_training
from posttrain.stages.dpo import DPOSection, DPOStage
from posttrain.stages.preference import check_reference, resolve_reference, run_pairwise
from posttrain.stages.sft import LMStage, lm_data


class SafetySection(Section):
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
    stage: str = Field("safety", description="The stage this config is for (set by the command).")
    safety: SafetySection = Field(default_factory=SafetySection, description="The safety recipe (docs/safety.md).")
    dpo: DPOSection = Field(default_factory=DPOSection, description="DPO options for safety.method=dpo.")

    @model_validator(mode="after")
    def _check_safety(self) -> "SafetyConfig":
        s = self.safety
        if s.method == "dpo":
            if s.retain is not None:
                raise ValueError("safety.retain mixes helpful chats into the sft recipe; with safety.method=dpo "
                                 "unset it (the DPO reference keeps the model close to its start instead)")
            if self.data.mix is not None:
                raise ValueError("data.mix (plain text) needs safety.method=sft; preference pairs cannot mix it")
            check_reference("dpo.reference", self.dpo.reference, self.adapter.type)
        return self


register_stage_schema("safety", SafetyConfig)


def run(cfg: SafetyConfig, *, resume: bool = False, model=None, tokenizer=None, **kw) -> RunResult:
    if cfg.stage != "safety":
        raise ValueError(f"safety.run got a '{cfg.stage}' config")
    if not cfg.data.train:
        raise ValueError("safety: no data: set data.train (your conversations or pairs, or gym:refusal:train)")
    out = rundir.claim(cfg, resume)  # before the recipe writes its data into output_dir
    sub = cfg.model_copy(deep=True)
    sub.data.train = str(out / "safety_data" / "train.jsonl")
    if cfg.data.eval is not None:
        sub.data.eval = str(out / "safety_data" / "eval.jsonl")
    train_rows = 0
    if is_main():  # one writer; the rows are seeded, so a resumed run trains on the same file
        train_rows = write_rows(build_rows(cfg.safety, cfg.data.train, retain=True, seed=cfg.train.seed),
                                Path(sub.data.train))
        if cfg.data.eval is not None:
            write_rows(build_rows(cfg.safety, cfg.data.eval, retain=False, seed=cfg.train.seed), Path(sub.data.eval))
    barrier()
    src = cfg.safety.eval if cfg.safety.eval is not None else cfg.data.eval
    held = [r for r, _ in read_rows(src) if isinstance(r.get("harmful"), bool)][:cfg.safety.eval_n] if src else []
    if model is None:
        model, tokenizer = load_for_training(cfg)
    before = None
    if held and is_main():
        # the engine loads a resumed run's checkpoint later: these are the starting weights; a fresh
        # LoRA/DoRA adapter is an identity, but prompt and prefix tuning are not
        with disabled(model) if cfg.adapter.type in ("prompt", "prefix") else nullcontext():
            before = measure_refusals(model, tokenizer, held, max_new_tokens=cfg.safety.max_new_tokens)

    def after_training(model_, result) -> FinalMeasures:
        after = measure_refusals(model_.eval(), tokenizer, held, max_new_tokens=cfg.safety.max_new_tokens) \
            if held else None
        summary = {"before": before, "after": after, "method": cfg.safety.method, "eval_rows": len(held),
                   "train_rows": train_rows}
        (out / "safety.json").write_text(json.dumps(summary, indent=1))
        lines = [{"step": step, "split": "safety", **m} for step, m in ((0, before), (result["steps"], after)) if m]
        return FinalMeasures(result=summary, metrics=lines)

    if cfg.safety.method == "sft":
        return run_training(sub, lambda tok: LMStage("safety"), lm_data, resume=resume, model=model,
                            tokenizer=tokenizer, after_training=after_training, **kw)
    return run_pairwise(sub, lambda ref: DPOStage(sub, ref), reference_mode=resolve_reference(sub.dpo.reference, sub),
                        resume=resume, model=model, tokenizer=tokenizer, after_training=after_training, **kw)
