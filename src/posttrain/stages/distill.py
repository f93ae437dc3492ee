"""Stage `distill`: on-policy distillation (Agarwal et al. 2024, "On-Policy Distillation of Language
Models", GKD): the student samples, the teacher scores the student's tokens.

Batch: `train.batch_size` prompts, one completion each, sampled from the student. Loss: at every
completion token, a divergence between the student's and the teacher's next-token distributions
(`posttrain.losses.distill_loss`: reverse KL by default, forward KL, or generalised JSD); one unit =
one completion token. Learning on its own samples is what fixes the student's own mistakes, where
SFT on the teacher's text (off-policy distillation, a pipeline recipe in docs/rl.md) only imitates.
Teacher and student must share one tokenizer. Held out (`data.eval`, every `train.eval_every`
steps): the divergence of the student's greedy completions, and their reward when
`distill.rewards` are set.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from posttrain.config import RunConfig, register_stage_schema
from posttrain.data.sources import read_records
from posttrain.engine.precision import autocast
from posttrain.engine.setup import load_for_training
from posttrain.engine.trainer import RolloutStage
from posttrain.losses.distill import DIVERGENCES, distill_loss
from posttrain.models.loading import load, resolve_device
from posttrain.rollout import RolloutEngine, SamplingParams, completion_logits
from posttrain.rollout.prompts import columns, prompt_data, prompt_text
from posttrain.rollout.session import RolloutSession
from posttrain.stages.common import RunResult, run_training
from posttrain.stages.rl_common import SamplingSection


class DistillSection(SamplingSection):
    teacher: str = Field("", description="The teacher: a HF directory, a finished run or a hub name; it must use "
                         "the student's tokenizer.")
    divergence: Literal[DIVERGENCES] = Field(
        "reverse_kl", description="Per-token divergence: reverse_kl KL(student || teacher) (mode-seeking; Gu et al. "
        "2024, MiniLLM), forward_kl KL(teacher || student) (Hinton et al. 2015), jsd (generalised JSD with "
        "weight beta; Agarwal et al. 2024, GKD).")
    beta: float = Field(0.5, gt=0, lt=1, description="The JSD's interpolation weight (jsd only; 0.5 = symmetric).")


class DistillConfig(RunConfig):
    stage: str = "distill"
    distill: DistillSection = Field(default_factory=DistillSection, description="Distillation options (docs/rl.md).")


register_stage_schema("distill", DistillConfig)


def check_same_tokenizer(student_tok, teacher_tok, teacher: str) -> None:
    """Raise ValueError, saying how they differ, unless both tokenizers map the same strings to the same ids."""
    s, t = student_tok.get_vocab(), teacher_tok.get_vocab()
    if s == t:
        return
    diff = next((w for w in sorted(s) if t.get(w) != s[w]), None) or next(w for w in sorted(t) if w not in s)
    raise ValueError(f"distill: the teacher {teacher!r} does not share the student's tokenizer ({len(s)} vs "
                     f"{len(t)} tokens; {diff!r} is {s.get(diff)} for the student and {t.get(diff)} for the "
                     "teacher). The teacher scores the student's token ids, so both need one tokenizer; for a "
                     "teacher with another tokenizer, distill off-policy (its generations as SFT data, docs/rl.md)")


class DistillStage(RolloutStage):
    name = "distill"
    steps_per_rollout = 1

    def __init__(self, cfg: DistillConfig, tokenizer):
        self.cfg, self.d, self.tokenizer = cfg, cfg.distill, tokenizer
        if not self.d.teacher:
            raise ValueError("distill: no teacher: set distill.teacher (a model directory or a finished run)")
        self.teacher, teacher_tok = load(self.d.teacher, dtype="fp32", device=resolve_device(cfg.train.device),
                                         trust_remote_code=cfg.trust_remote_code, allow_pickle=cfg.allow_pickle)
        check_same_tokenizer(tokenizer, teacher_tok, self.d.teacher)
        self.teacher.eval().requires_grad_(False)
        self.vocab = len(tokenizer)  # logits past the tokenizer are head padding: never sampled, never compared
        self.session = RolloutSession.for_run(tokenizer, self.d, cfg, n=1)
        self.rewards = self.d.reward_set() if self.d.rewards else None
        self.eval_rows = _rows(cfg.data.eval, tokenizer) if cfg.data.eval else []

    def rollout(self, model, batch: dict) -> list[list[dict]]:
        rows = batch["rows"]
        ro = self.session.sample(model, rows)
        metrics = {"completion_length": float(ro.completion_mask.sum(1).float().mean()),
                   "truncated_frac": float((~ro.finished).float().mean()), **self.session.metrics}
        if self.rewards is not None:
            r, rm = self.rewards(ro.prompts, ro.completions, columns(rows))
            metrics.update(reward=float(r.mean()), **rm)
        return self.session.steps(ro.batch(), len(ro), passes=1, minibatches=1,
                                  micro_batch_size=self.d.micro_batch_size, extra={"rollout_metrics": metrics})

    def _divergence(self, model, batch: dict):
        student = completion_logits(model, batch)[..., :self.vocab]
        with torch.no_grad():
            teacher = completion_logits(self.teacher, batch)[..., :self.vocab]
        return distill_loss(student, teacher, batch["completion_mask"], divergence=self.d.divergence,
                            beta=self.d.beta, temperature=self.d.temperature)

    def loss(self, model, batch: dict):
        loss, m = self._divergence(model, batch)
        return loss, {"divergence": m["divergence"], **batch["rollout_metrics"]}

    def num_loss_units(self, batch: dict) -> int:
        return int(batch["completion_mask"].sum())

    @torch.no_grad()
    def heldout(self, model, step: int) -> dict:
        """Greedy completions of the held-out prompts: their divergence from the teacher (and reward)."""
        if not self.eval_rows:
            return {}
        params = SamplingParams(max_new_tokens=self.d.max_new_tokens, temperature=0, stop=tuple(self.d.stop))
        ro = RolloutEngine(model, self.tokenizer).generate([r["_prompt"] for r in self.eval_rows], params)
        device = next(model.parameters()).device
        b = {k: v.to(device) for k, v in ro.batch().items()}
        with autocast(self.cfg.train.precision, device):
            _, m = self._divergence(model, b)
        out = {"heldout_divergence": m["divergence"]}
        if self.rewards is not None:
            r, _ = self.rewards(ro.prompts, ro.completions, columns(self.eval_rows))
            out["heldout_reward"] = float(r.mean())
        return out

    def state_dict(self) -> dict:
        return self.session.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.session.load_state_dict(state)


def _rows(src, tokenizer) -> list[dict]:
    return [{**rec.data, "_prompt": prompt_text(tokenizer, rec.data)}
            for s in (src if isinstance(src, list) else [src]) for rec in read_records(s, split="validation")]


def run(cfg: DistillConfig, *, resume: bool = False, model=None, tokenizer=None, **kw) -> RunResult:
    """Distil `distill.teacher` into `model` on the student's own samples of the `data.train` prompts."""
    if cfg.stage != "distill" or not isinstance(cfg, DistillConfig):
        raise ValueError(f"distill.run needs a distill config (load_config('distill', ...)), got stage {cfg.stage!r}")
    if model is None:
        model, tokenizer = load_for_training(cfg)
    stage = DistillStage(cfg, tokenizer)  # owns its held-out measure, built before training

    def data(c, tok):
        d = prompt_data(c, tok)
        d.evaluators.append(stage.heldout)
        return d

    return run_training(cfg, lambda tok: stage, data, resume=resume, model=model, tokenizer=tokenizer, **kw)
