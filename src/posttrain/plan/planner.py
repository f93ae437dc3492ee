"""`posttrain plan`: a run's peak memory, speed and wall time before it starts, and what to change if it
does not fit. Reads the model's config.json only; no weights are loaded.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

from posttrain.plan.devices import Device
from posttrain.plan.memory import MemoryEstimate, RunSpec, estimate_memory, trainable_params
from posttrain.plan.shapes import LINEAR_NAMES, ModelShape, PlanError, read_shape
from posttrain.plan.speed import UTILISATION, step_time

PAIR_STAGES = ("dpo", "orpo", "simpo", "reward", "kto")  # a row is a chosen and a rejected sequence
RL_STAGES = ("grpo", "ppo")
HEADROOM = 0.95  # keep 5% of the device free for fragmentation


def spec_from_config(cfg, *, device: Device, gpus: int = 1, loss_fraction: Optional[float] = None) -> RunSpec:
    """A RunSpec from a validated RunConfig (any stage). Rows are taken at `data.max_length` (the worst case)."""
    stage = cfg.stage
    t, a = cfg.train, cfg.adapter
    seqs = 2 if stage in PAIR_STAGES else 1
    reference = "none"
    rollout_rows = rollout_len = 0
    if stage in PAIR_STAGES and stage in ("dpo", "kto"):
        section = getattr(cfg, stage, None)
        chosen = getattr(section, "reference", None)
        reference = chosen or ("adapter" if a.type != "none" else "copy")
    if stage in RL_STAGES:
        section = getattr(cfg, stage)
        gens = getattr(section, "num_generations", 1)
        rollout_rows = t.batch_size * gens
        rollout_len = cfg.data.max_length + section.max_new_tokens
        if stage == "ppo" or getattr(section, "beta", 0.0) > 0:
            reference = "adapter" if a.type != "none" else "copy"
    distributed = "none"
    if gpus > 1:
        distributed = {"auto": "ddp", "none": "ddp"}.get(t.distributed, t.distributed)
    return RunSpec(
        adapter=a.type, r=a.r, num_virtual_tokens=a.num_virtual_tokens, targets=_targets(a.targets),
        batch_size=t.batch_size * (1 if stage not in RL_STAGES else getattr(getattr(cfg, stage), "num_generations", 1)),
        seq_len=cfg.data.max_length + (rollout_len - cfg.data.max_length if stage in RL_STAGES else 0),
        loss_fraction=1.0 if loss_fraction is None else loss_fraction, grad_accum=t.grad_accum,
        precision=t.precision, gradient_checkpointing=t.gradient_checkpointing, sequences_per_row=seqs,
        reference=reference, rollout_rows=rollout_rows, rollout_len=rollout_len, gpus=gpus,
        distributed=distributed, cpu_offload=t.cpu_offload, device_kind=device.kind,
        packed=bool(cfg.data.packing or cfg.data.padding_free))


def _targets(targets) -> Optional[tuple[str, ...]]:
    """LoRA targets as the decoder's linear names; None for all-linear (a regex: all-linear, said in the docs)."""
    if targets == "all-linear" or isinstance(targets, str):
        return None
    names = tuple(t for t in targets if t in LINEAR_NAMES)
    unknown = [t for t in targets if t not in LINEAR_NAMES]
    if unknown:
        raise PlanError(f"adapter.targets: the planner knows the decoder linears {', '.join(LINEAR_NAMES)}; "
                        f"got {', '.join(unknown)}")
    return names


@dataclass
class Plan:
    model: str
    shape: ModelShape
    spec: RunSpec
    device: Device
    memory: MemoryEstimate
    step_time_s: float
    tokens_per_step: int
    total_steps: Optional[int]
    fits: bool
    fix: Optional[dict]

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step / self.step_time_s

    @property
    def wall_time_s(self) -> Optional[float]:
        return None if self.total_steps is None else self.total_steps * self.step_time_s

    def to_json(self) -> dict:
        m = self.memory
        return {
            "model": self.model, "device": self.device.name, "gpus": self.spec.gpus,
            "peak_memory_bytes": int(m.peak_bytes), "train_peak_bytes": int(m.train_peak_bytes),
            "load_peak_bytes": int(m.load_peak_bytes), "peak_phase": m.peak_phase,
            "memory_breakdown": {k: int(v) for k, v in m.breakdown.items()},
            "device_memory_bytes": self.device.memory_bytes,
            "fits": self.fits, "fix": self.fix,
            "params": {"total": self.shape.total_params, "trainable": trainable_params(self.shape, self.spec)},
            "step_time_s": self.step_time_s, "tokens_per_s": self.tokens_per_s,
            "total_steps": self.total_steps, "wall_time_s": self.wall_time_s,
            "utilisation": UTILISATION[self.device.kind], "device_source": self.device.source,
        }


def fits(mem: MemoryEstimate, device: Device) -> bool:
    return mem.peak_bytes <= HEADROOM * device.memory_bytes


def _alternatives(spec: RunSpec) -> list[tuple[str, str, RunSpec]]:
    """(group, what to change, spec) in the order the verdict considers them: same method first."""
    out = []
    if not spec.gradient_checkpointing:
        out.append(("same", "train.gradient_checkpointing=true", dataclasses.replace(spec, gradient_checkpointing=True)))
    b = spec.batch_size
    while b > 1:
        b //= 2
        accum = spec.grad_accum * math.ceil(spec.batch_size / b)
        out.append(("same", f"train.batch_size={b} train.grad_accum={accum}",
                    dataclasses.replace(spec, batch_size=b, grad_accum=accum)))
        out.append(("same", f"train.batch_size={b} train.grad_accum={accum} train.gradient_checkpointing=true",
                    dataclasses.replace(spec, batch_size=b, grad_accum=accum, gradient_checkpointing=True)))
    if spec.gpus > 1 and spec.distributed != "fsdp":
        out.append(("same", "train.distributed=fsdp", dataclasses.replace(spec, distributed="fsdp")))
    if spec.gpus > 1:
        out.append(("same", "train.distributed=fsdp train.cpu_offload=true",
                    dataclasses.replace(spec, distributed="fsdp", cpu_offload=True)))
    # with an adapter the default reference is the adapter disabled, not a second copy
    ref = "adapter" if spec.reference == "copy" else spec.reference
    for kind in ("lora", "qlora"):
        if spec.adapter in ("none", "lora", "dora") and kind != spec.adapter:
            out.append(("method", f"adapter.type={kind}", dataclasses.replace(spec, adapter=kind, reference=ref)))
            b = spec.batch_size
            while True:
                accum = spec.grad_accum * math.ceil(spec.batch_size / b)
                micro = f" train.batch_size={b} train.grad_accum={accum}" if b != spec.batch_size else ""
                out.append(("method", f"adapter.type={kind} train.gradient_checkpointing=true{micro}",
                            dataclasses.replace(spec, adapter=kind, gradient_checkpointing=True, batch_size=b,
                                                grad_accum=accum, reference=ref)))
                if b == 1:
                    break
                b //= 2
    return out


def cheapest_fix(shape: ModelShape, spec: RunSpec, device: Device) -> Optional[dict]:
    """The alternative whose training fits with the shortest step time, same method preferred over a
    method change. `load_fits` says whether loading fits too (posttrain loads fp32 weights onto the
    device first, except under QLoRA, which quantizes on the CPU first)."""
    found = []
    for group, change, alt in _alternatives(spec):
        mem = estimate_memory(shape, alt)
        if mem.train_peak_bytes <= HEADROOM * device.memory_bytes:
            found.append((group != "same", step_time(shape, alt, device), change, mem))
    if not found:
        return None
    _, t, change, mem = min(found, key=lambda x: (x[0], x[1]))
    return {"change": change, "peak_memory_bytes": int(mem.peak_bytes), "train_peak_bytes": int(mem.train_peak_bytes),
            "step_time_s": t, "load_fits": fits(mem, device)}


def plan(cfg, device: Device, *, gpus: int = 1, rows: Optional[int] = None,
         loss_fraction: Optional[float] = None) -> Plan:
    """Estimate a run. `rows`: training examples (for the number of steps); None leaves wall time open
    unless `train.max_steps` is set."""
    if not cfg.model:
        raise PlanError("no model given: set `model` (a local HF directory)")
    if gpus < 1:
        raise PlanError(f"--gpus must be at least 1, got {gpus}")
    shape = read_shape(cfg.model)
    spec = spec_from_config(cfg, device=device, gpus=gpus, loss_fraction=loss_fraction)
    mem = estimate_memory(shape, spec)
    t = step_time(shape, spec, device)
    tokens = spec.batch_size * spec.sequences_per_row * spec.seq_len * spec.grad_accum * gpus
    total = cfg.train.max_steps
    if total is None and rows is not None:
        per_step = cfg.train.batch_size * cfg.train.grad_accum * gpus
        total = max(1, math.ceil(cfg.train.epochs * rows / per_step))
    ok = fits(mem, device)
    return Plan(str(cfg.model), shape, spec, device, mem, t, tokens, total, ok,
                None if ok else cheapest_fix(shape, spec, device))


def _gib(x: float) -> str:
    return f"{x / 2**30:8.2f} GiB"


def format_plan(p: Plan) -> str:
    s, sp, m = p.shape, p.spec, p.memory
    lines = [f"model      {p.model}: {s.arch}, {s.total_params / 1e6:.1f}M parameters "
             f"(d={s.hidden}, layers={s.layers}, heads={s.heads}/{s.kv_heads}, vocab={s.vocab})",
             f"run        adapter={sp.adapter} precision={sp.precision} batch={sp.batch_size}x{sp.sequences_per_row} "
             f"seq={sp.seq_len} accum={sp.grad_accum} checkpointing={sp.gradient_checkpointing} "
             f"distributed={sp.distributed} x{sp.gpus}",
             f"device     {p.device.name} ({p.device.memory_bytes / 2**30:.1f} GiB)", "",
             f"memory at the peak ({m.peak_phase.replace('_', ' ')}):"]
    for k, v in m.breakdown.items():
        if v:
            lines.append(f"  {k:<24}{_gib(v)}")
    lines += [f"  {'training peak':<24}{_gib(m.train_peak_bytes)}",
              f"  {'loading peak':<24}{_gib(m.load_peak_bytes)}  ("
              + ("NF4 weights: quantized on the CPU, then moved" if sp.adapter == "qlora" and sp.device_kind != "cpu"
                 else "fp32 weights on the device before sharding") + ")",
              f"  {'peak':<24}{_gib(m.peak_bytes)}", "",
              f"speed      {p.step_time_s:.3g} s/step, {p.tokens_per_s:,.0f} tokens/s"]
    if p.wall_time_s is not None:
        lines.append(f"wall time  {p.total_steps} steps, {p.wall_time_s / 3600:.2f} h")
    if p.fits:
        lines.append(f"verdict    fits ({m.peak_bytes / p.device.memory_bytes:.0%} of the device)")
    elif p.fix:
        lines.append(f"verdict    does not fit; cheapest change: {p.fix['change']} "
                     f"(training peak {p.fix['train_peak_bytes'] / 2**30:.2f} GiB, {p.fix['step_time_s']:.3g} s/step)")
        if not p.fix["load_fits"]:
            lines.append(f"           but loading still needs {p.fix['peak_memory_bytes'] / 2**30:.2f} GiB: posttrain "
                         "loads fp32 weights onto the device before sharding")
    else:
        lines.append("verdict    does not fit, and no single change here makes it fit: use more devices "
                     "(--gpus N with train.distributed=fsdp) or a smaller model")
    if m.load_peak_bytes > HEADROOM * p.device.memory_bytes >= m.train_peak_bytes:
        lines.append("note       only loading does not fit: posttrain loads fp32 weights onto the device first")
    return "\n".join(lines)
