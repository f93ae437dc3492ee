"""Fold a LoRA/DoRA adapter into the base weights, and describe an adapter directory."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

from posttrain.models.adapters.lora import lora_layers
from posttrain.models.adapters.peft_format import (
    adapter_size_bytes, count_tensor_params, read_adapter, stored_kind, vllm_problems,
)
from posttrain.models.adapters.state import get_state, set_state
from posttrain.models.adapters.qlora import dequantize_linears
from posttrain.models.adapters.peft_format import load_adapter
from posttrain.models import loading  # module import: loading imports this package too


def merge(model, name: Optional[str] = None):
    """Return the plain HF model with adapter `name` (default: the active one) folded into its weights.

    W' = W + s·B·A for LoRA, m·(W + s·B·A)/||W + s·B·A|| for DoRA. An NF4 (QLoRA) base is
    dequantized first, so the merged model computes what the adapted model computed.
    Prompt and prefix tuning add inputs, not weight deltas, and cannot be merged.
    """
    st = get_state(model)
    if st is None:
        return model
    if st.kind in ("prompt", "prefix"):
        raise ValueError(f"{st.kind} tuning cannot be merged into the weights: it adds virtual tokens, not a weight "
                         "delta. Keep the adapter and load it with posttrain.load(model, adapter=DIR)")
    name = name or st.active[0]
    if name not in st.configs:
        raise ValueError(f"merge: no adapter named {name!r}; this model has {sorted(st.configs)}")
    dtype = model.get_input_embeddings().weight.dtype
    for path, layer in lora_layers(model).items():
        new = layer.merged_linear(name, dtype) if name in layer.adapters else layer.base_layer
        parent_name, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    dequantize_linears(model)
    set_state(model, None)
    model.requires_grad_(True)
    return model


def merge_to_dir(base: Union[str, Path], adapter: Union[str, Path], out_dir: Union[str, Path], *,
                 dtype: str = "fp32", trust_remote_code: bool = False) -> Path:
    """`posttrain merge --model BASE --adapter A --out DIR`: write a merged HF checkpoint (+ tokenizer)."""

    model, tok = loading.load(base, device="cpu", dtype=dtype, trust_remote_code=trust_remote_code)
    load_adapter(model, adapter)
    merge(model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    return out


def describe(adapter_dir: Union[str, Path]) -> dict:
    """Facts about an adapter directory for `posttrain adapters show`."""
    config, tensors, meta = read_adapter(adapter_dir)
    kind = stored_kind(config, meta)
    d = {
        "path": str(adapter_dir),
        "type": kind,
        "peft_type": config["peft_type"],
        "base_model": config.get("base_model_name_or_path"),
        "trainable_params": count_tensor_params(tensors),
        "size_bytes": adapter_size_bytes(adapter_dir),
    }
    if config["peft_type"] == "LORA":
        modules = {k.rsplit(".lora_", 1)[0] for k in tensors}
        d.update(rank=config.get("r"), alpha=config.get("lora_alpha"), rslora=bool(config.get("use_rslora")),
                 targets=config.get("target_modules"), num_modules=len(modules),
                 rank_pattern=config.get("rank_pattern") or {})
    else:
        d.update(num_virtual_tokens=config.get("num_virtual_tokens"), token_dim=config.get("token_dim"),
                 num_layers=config.get("num_layers"))
    why = vllm_problems(config, list(tensors))
    d["vllm_servable"] = not why
    d["vllm_reasons"] = why
    return d


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def format_description(d: dict) -> str:
    lines = [f"adapter      {d['path']}", f"type         {d['type']} ({d['peft_type']})"]
    if d.get("base_model"):
        lines.append(f"base model   {d['base_model']}")
    if "rank" in d:
        scale = "alpha/sqrt(r)" if d["rslora"] else "alpha/r"
        lines.append(f"rank         {d['rank']}  alpha {d['alpha']}  scaling {scale}")
        lines.append(f"targets      {d['targets']} ({d['num_modules']} modules)")
    else:
        lines.append(f"virtual tokens {d['num_virtual_tokens']}  token_dim {d['token_dim']}")
    lines.append(f"parameters   {d['trainable_params']:,}")
    lines.append(f"size         {_size(d['size_bytes'])}")
    if d["vllm_servable"]:
        lines.append("vLLM         servable")
    else:
        lines.append("vLLM         not servable: " + "; ".join(d["vllm_reasons"]))
    return "\n".join(lines)
