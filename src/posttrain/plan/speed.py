"""Step time from the FLOPs of a step, a device's peak throughput and bandwidth, and utilisation factors.

FLOPs of one optimizer step (Kaplan et al. 2020, "Scaling Laws for Neural Language Models", sec. 2.1:
2 FLOPs per weight per token forward, twice that backward):

- each decoder matmul: 2·P·T forward; backward 2·P·T for the input gradient (always: every method
  back-propagates to the first layer) and 2·P·T for the weight gradient (trainable weights only);
- the output head at the N loss positions only: 2·d·V·N forward, 2·d·V·N again in backward (the
  chunked head recomputes its logits), 2·d·V·N to its input, 2·d·V·N for its weight when trained;
- causal attention: 2·2·T²·h·e/2 per row and layer forward, 2.5x that backward (flash backward);
- LoRA: 2·r·(in+out) per target per token forward, three times that backward;
- gradient checkpointing repeats the decoder's forward during backward.

Time = matmul FLOPs / (peak · u_matmul) + attention FLOPs / (peak · u_attention)
     + bytes streamed / bandwidth (the AdamW update: 28 bytes per trainable weight;
       NF4 dequantization: 2.5 bytes per weight per use, three uses per step with checkpointing, two without).
The utilisation factors on the CPU are calibrated on part of bench/plan_accuracy.py's runs;
on GPUs they are not measured here and come from published model-FLOPs utilisation (see docs/advise.md).
"""

from __future__ import annotations

from dataclasses import dataclass

from posttrain.plan.devices import Device
from posttrain.plan.memory import RunSpec, adapter_params, trainable_params
from posttrain.plan.shapes import ModelShape

# fraction of peak reached; CPU values calibrated by bench/plan_accuracy.py (calibration half of the runs)
UTILISATION = {
    "cpu": {"matmul": 0.88, "attention": 0.88, "stream": 0.5},  # one factor fitted (bench/plan_accuracy.py)
    "gpu": {"matmul": 0.40, "attention": 0.30, "stream": 0.7},
}


@dataclass
class StepFlops:
    matmul: float
    attention: float
    streamed_bytes: float

    @property
    def total(self) -> float:
        return self.matmul + self.attention


def step_flops(s: ModelShape, spec: RunSpec) -> StepFlops:
    """FLOPs of one micro-batch's forward and backward (multiply by grad_accum for an optimizer step)."""
    T, N = spec.tokens, spec.loss_tokens
    weight_grad = 2 if spec.trains_base else 0
    recompute = 2 if spec.gradient_checkpointing else 0
    decoder = (2 + 2 + weight_grad + recompute) * s.linear_params * T
    # the chunked head (losses/chunked.py) recomputes each chunk's logits in backward: 2 more per weight
    recompute_head = 0 if spec.distributed == "fsdp" else 2
    head = (2 + recompute_head + 2 + weight_grad) * s.hidden * s.vocab * N
    lora = 0.0
    if spec.adapter in ("lora", "qlora", "dora"):
        lora = (8 + (2 if spec.gradient_checkpointing else 0)) * adapter_params(s, spec) * T
    attn_fwd = 2 * spec.rows * spec.row_len ** 2 * s.heads * s.head_dim * s.layers  # 2 matmuls x 2 FLOPs / 2 causal
    attention = attn_fwd * (1 + 2.5 + (1 if spec.gradient_checkpointing else 0))
    nf4 = 0.0
    if spec.adapter == "qlora":
        nf4 = (3 if spec.gradient_checkpointing else 2) * 2.5 * s.linear_params
    return StepFlops(decoder + head + lora, attention, nf4)


def step_time(s: ModelShape, spec: RunSpec, device: Device, utilisation: dict | None = None) -> float:
    """Seconds per optimizer step (all micro-batches and the optimizer update)."""
    u = utilisation or UTILISATION[device.kind]
    peak = device.peak_flops(spec.precision)
    f = step_flops(s, spec)
    micro = f.matmul / (peak * u["matmul"]) + f.attention / (peak * u["attention"]) \
        + f.streamed_bytes / (device.bandwidth * u["stream"])
    n = spec.gpus if spec.distributed == "fsdp" else 1
    update = 28 * trainable_params(s, spec) / n / (device.bandwidth * u["stream"])
    return spec.grad_accum * micro + update
