"""Parameter-efficient adapters: LoRA, rsLoRA, DoRA, QLoRA, prompt tuning, prefix tuning.

The adapted model stays a normal HF causal LM (forward, loss, ``generate``); the
base is frozen and only adapter weights require grad. Adapters are saved and loaded
in PEFT's on-disk format, and `disabled(model)` runs the plain base, which is the
reference model of DPO/PPO/GRPO without a second copy in memory.
"""

from __future__ import annotations

from contextlib import contextmanager
from torch import nn

from posttrain.models.adapters.lora import add_lora, resolve_targets, target_names_for_config
from posttrain.models.adapters.merge import describe, format_description, merge, merge_to_dir
from posttrain.models.adapters.multi import adapter_names, load_adapters, select
from posttrain.models.adapters.peft_format import (
    AdapterFormatError, VLLM_RANKS, load_adapter, lora_config, read_adapter, save, vllm_problems,
)
from posttrain.models.adapters.state import AdapterState, get_state, set_state
from posttrain.models.adapters.prompt import add_prompt
from posttrain.models.adapters.qlora import quantize_linears

ADAPTER_TYPES = ("none", "lora", "dora", "qlora", "prompt", "prefix")


def apply(model, adapter_cfg, tokenizer=None):
    """Freeze `model` and add a trainable adapter described by an `AdapterConfig`; returns the model.

    With ``adapter_cfg.path`` the adapter starts from that PEFT-format directory (its own
    settings win; ``type: qlora`` still quantizes the base first).
    """
    kind = adapter_cfg.type
    if kind not in ADAPTER_TYPES:
        raise ValueError(f"adapter.type must be one of {ADAPTER_TYPES}, got {kind!r}")
    if kind == "none":
        if adapter_cfg.path:
            raise ValueError("adapter.path is set but adapter.type is 'none'; set adapter.type (e.g. lora)")
        return model
    if is_adapted(model):
        raise ValueError(f"the model already has a {adapter_type(model)} adapter; merge it first or load the base")
    model.requires_grad_(False)
    if adapter_cfg.path:
        load_adapter(model, adapter_cfg.path, trainable=True, quantize=True if kind == "qlora" else None)
        return model
    if kind in ("prompt", "prefix"):

        return add_prompt(model, kind, adapter_cfg.num_virtual_tokens, init_text=adapter_cfg.init_text,
                          tokenizer=tokenizer, projection=adapter_cfg.prefix_projection)
    paths = resolve_targets(model, adapter_cfg.targets)
    if kind == "qlora":

        quantize_linears(model)
    r = adapter_cfg.r
    alpha = adapter_cfg.alpha if adapter_cfg.alpha is not None else 2 * r
    dora = kind == "dora"
    st = AdapterState(kind=kind)
    set_state(model, st)
    add_lora(model, st, "default", paths, r=r, alpha=alpha, dropout=adapter_cfg.dropout,
             rslora=adapter_cfg.rslora, dora=dora)
    targets = adapter_cfg.targets
    saved_targets = target_names_for_config(paths) if targets == "all-linear" else targets
    st.configs["default"] = lora_config(r=r, alpha=alpha, dropout=adapter_cfg.dropout, targets=saved_targets,
                                        rslora=adapter_cfg.rslora, dora=dora)
    problems = vllm_problems(st.configs["default"], [])
    if problems:
        import warnings

        warnings.warn("this adapter will not be servable by vLLM: " + "; ".join(problems), stacklevel=2)
    return model


@contextmanager
def disabled(model):
    """Run the plain base inside the block (the frozen reference model); a no-op without an adapter."""
    st = get_state(model)
    if st is None:
        yield model
        return
    before = st.disabled
    st.disabled = True
    try:
        yield model
    finally:
        st.disabled = before


def is_adapted(model) -> bool:
    return get_state(model) is not None


def adapter_type(model) -> str:
    """`none`, `lora`, `dora`, `qlora`, `prompt` or `prefix`."""
    st = get_state(model)
    return "none" if st is None else st.kind


def trainable_parameters(model) -> list[nn.Parameter]:
    """The parameters that reach the optimizer: only the adapter's when one is applied."""
    return [p for p in model.parameters() if p.requires_grad]


def parameter_counts(model) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable": trainable, "total": total}


__all__ = [
    "apply", "save", "load_adapter", "disabled", "merge", "merge_to_dir", "describe", "format_description",
    "load_adapters", "select", "adapter_names", "trainable_parameters", "parameter_counts", "is_adapted",
    "adapter_type", "read_adapter", "vllm_problems", "AdapterFormatError", "VLLM_RANKS", "ADAPTER_TYPES",
    "AdapterState", "get_state", "set_state", "resolve_targets",
]
