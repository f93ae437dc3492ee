"""The starting model of a run: loaded safely in fp32 master weights, with its adapter attached."""

from __future__ import annotations

import torch

from posttrain.config import RunConfig
from posttrain.engine.reference import Reference
from posttrain.models import adapters
from posttrain.models.loading import load, resolve_device


def load_for_training(cfg: RunConfig, device=None):
    """Load the starting model in fp32 master weights (bf16 runs use autocast) and attach the adapter.

    QLoRA loads and quantizes on the CPU, then moves the model: the device never holds the fp32
    decoder linears, so its loading peak is the NF4 model's, not the full-precision one's.
    """
    if not cfg.model:
        raise ValueError("no model given: set `model` (a local HF directory or a hub name)")
    device = resolve_device(device or cfg.train.device)
    quantized = cfg.adapter.type == "qlora"
    model, tok = load(cfg.model, dtype="fp32", device="cpu" if quantized else device, tokenizer=cfg.tokenizer,
                      trust_remote_code=cfg.trust_remote_code, allow_pickle=cfg.allow_pickle,
                      gradient_checkpointing=cfg.train.gradient_checkpointing)
    if cfg.adapter.type != "none":
        torch.manual_seed(cfg.train.seed)
        model = adapters.apply(model, cfg.adapter, tokenizer=tok)  # also continues from adapter.path
    else:
        model.requires_grad_(True)
    if quantized and device.type != "cpu":
        model.to(device)
    return model, tok


def starting_copy(cfg: RunConfig, device) -> torch.nn.Module:
    """A frozen copy of the run's starting weights, loaded from `cfg.model` again (also after a resume)."""
    ref, _ = load(cfg.model, dtype="fp32", device=str(device), trust_remote_code=cfg.trust_remote_code,
                  allow_pickle=cfg.allow_pickle)
    return ref.eval().requires_grad_(False)


def rl_reference(cfg: RunConfig):
    """The reference factory of the RL stages: the adapter-disabled policy for adapter runs, else a
    frozen copy of the starting checkpoint loaded from disk."""
    def make(policy) -> Reference:
        device = next(policy.parameters()).device
        return Reference(Reference.default_mode(cfg.adapter.type), policy, copy_from=lambda: starting_copy(cfg, device))

    return make
