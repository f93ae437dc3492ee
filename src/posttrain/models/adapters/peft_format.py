"""PEFT's on-disk adapter format: `adapter_config.json` + `adapter_model.safetensors`.

Tensor keys are the module paths of the plain HF model prefixed with
``base_model.model.``: ``...q_proj.lora_A.weight`` [r, in], ``...lora_B.weight``
[out, r], DoRA's ``...lora_magnitude_vector`` [out] (no ``.weight``); prompt and
prefix tuning save a single ``prompt_embeddings`` tensor. Files written here load
with ``peft.PeftModel.from_pretrained`` and files written by PEFT load here.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any, Optional, Union

import torch

from posttrain.models.adapters.lora import add_lora, lora_layers
from posttrain.models.adapters.state import AdapterState, get_state, set_state
from posttrain.models.adapters.prompt import load_prompt, prompt_tensor
from posttrain.models.adapters.qlora import quantize_linears

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
# safetensors metadata key that records what PEFT's config cannot say (e.g. that the base was NF4)
META_KIND = "posttrain_adapter_type"
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


class AdapterFormatError(ValueError):
    pass


def vllm_problems(config: dict, keys: list[str]) -> list[str]:
    """Reasons vLLM would refuse this adapter (empty when it can serve it)."""
    why = []
    kind = config.get("peft_type")
    if kind != "LORA":
        return [f"vLLM serves LoRA adapters only, this is {kind}"]
    if config.get("use_dora"):
        why.append("DoRA (use_dora=true) is not supported by vLLM")
    if config.get("bias", "none") != "none":
        why.append(f"bias={config.get('bias')!r}; vLLM needs bias='none'")
    if config.get("modules_to_save"):
        why.append(f"modules_to_save={config.get('modules_to_save')} (vLLM loads lora_A/lora_B only)")
    ranks = {int(config.get("r", 0))} | {int(v) for v in (config.get("rank_pattern") or {}).values()}
    bad = sorted(r for r in ranks if r not in VLLM_RANKS)
    if bad:
        why.append(f"rank {bad} is not one of vLLM's max_lora_rank values {list(VLLM_RANKS)}")
    other = sorted({k for k in keys if not any(s in k for s in (".lora_A.", ".lora_B.", ".lora_embedding_A",
                                                                   ".lora_embedding_B"))})
    if other:
        why.append(f"{len(other)} tensors other than lora_A/lora_B, e.g. {other[0]}")
    return why


def lora_state_dict(model, name: str = "default") -> dict[str, torch.Tensor]:
    out = {}
    for path, layer in lora_layers(model).items():
        if name not in layer.adapters:
            continue
        ad = layer.adapters[name]
        out[f"{PREFIX}{path}.lora_A.weight"] = ad.lora_A.weight
        out[f"{PREFIX}{path}.lora_B.weight"] = ad.lora_B.weight
        if ad.is_dora:
            out[f"{PREFIX}{path}.lora_magnitude_vector"] = ad.lora_magnitude_vector
    return out


def save(model, out_dir: Union[str, Path], *, name: str = "default") -> Path:
    """Write adapter `name` of `model` in PEFT format; warns when vLLM could not serve it."""
    from safetensors.torch import save_file

    st = get_state(model)
    if st is None:
        raise AdapterFormatError("save: this model has no adapter (call adapters.apply or load_adapter first)")
    if name not in st.configs:
        raise AdapterFormatError(f"save: no adapter named {name!r}; this model has {sorted(st.configs)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = dict(st.configs[name])
    config["base_model_name_or_path"] = getattr(model.config, "_name_or_path", None) or None
    if st.kind in ("prompt", "prefix"):

        tensors = {"prompt_embeddings": prompt_tensor(model)}
    else:
        tensors = lora_state_dict(model, name)
        why = vllm_problems(config, list(tensors))
        if why:
            warnings.warn(f"adapter saved to {out} cannot be served by vLLM: " + "; ".join(why), stacklevel=2)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt", META_KIND: st.kind})
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out


def read_adapter(path: Union[str, Path]) -> tuple[dict, dict[str, torch.Tensor], dict[str, str]]:
    """(config, tensors, safetensors metadata) of an adapter directory."""
    from safetensors import safe_open

    p = Path(path)
    if not (p / CONFIG_FILE).exists():
        raise AdapterFormatError(f"{p} is not an adapter directory: {CONFIG_FILE} is missing")
    if not (p / WEIGHTS_FILE).exists():
        hint = " (adapter_model.bin is pickle; convert it to safetensors)" if (p / "adapter_model.bin").exists() else ""
        raise AdapterFormatError(f"{p}: {WEIGHTS_FILE} is missing{hint}")
    config = json.loads((p / CONFIG_FILE).read_text())
    if "peft_type" not in config:
        raise AdapterFormatError(f"{p / CONFIG_FILE} has no 'peft_type'")
    with safe_open(str(p / WEIGHTS_FILE), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata() or {}
    return config, tensors, meta


def stored_kind(config: dict, meta: dict) -> str:
    kinds = {"PROMPT_TUNING": "prompt", "PREFIX_TUNING": "prefix"}
    if config["peft_type"] in kinds:
        return kinds[config["peft_type"]]
    if config["peft_type"] != "LORA":
        raise AdapterFormatError(f"adapter type {config['peft_type']} is not supported (LORA, PROMPT_TUNING, "
                                 "PREFIX_TUNING are)")
    if meta.get(META_KIND) == "qlora":
        return "qlora"
    return "dora" if config.get("use_dora") else "lora"


def _module_paths(tensors: dict[str, torch.Tensor], where: str) -> dict[str, dict[str, torch.Tensor]]:
    """Group LoRA tensors by module path: {path: {"lora_A": .., "lora_B": .., "magnitude": ..}}."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        if not key.startswith(PREFIX):
            raise AdapterFormatError(f"{where}: unexpected tensor key {key!r} (PEFT keys start with {PREFIX!r})")
        rest = key[len(PREFIX):]
        for suffix, slot in ((".lora_A.weight", "lora_A"), (".lora_B.weight", "lora_B"),
                             (".lora_magnitude_vector", "magnitude"), (".lora_magnitude_vector.weight", "magnitude")):
            if rest.endswith(suffix):
                groups.setdefault(rest[: -len(suffix)], {})[slot] = t
                break
        else:
            raise AdapterFormatError(f"{where}: tensor {key!r} is not supported (only lora_A, lora_B and DoRA "
                                     "magnitude; no modules_to_save, biases or embedding LoRA)")
    return groups


def lora_config(*, r: int, alpha: float, dropout: float, targets, rslora: bool, dora: bool) -> dict[str, Any]:
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "inference_mode": True,
        "r": r, "lora_alpha": alpha, "lora_dropout": dropout, "target_modules": targets,
        "bias": "none", "use_rslora": rslora, "use_dora": dora, "modules_to_save": None,
        "fan_in_fan_out": False, "init_lora_weights": True,
    }


def load_lora(model, config: dict, tensors: dict, kind: str, *, name: str, where: str,
              trainable: bool) -> None:
    if config.get("fan_in_fan_out"):
        raise AdapterFormatError(f"{where}: fan_in_fan_out=true (GPT-2 Conv1D layers) is not supported")
    if config.get("bias", "none") != "none":
        raise AdapterFormatError(f"{where}: bias={config['bias']!r} is not supported; only 'none'")
    groups = _module_paths(tensors, where)
    modules = dict(model.named_modules())
    for path, g in groups.items():
        if path not in modules:
            raise AdapterFormatError(f"{where}: the adapter targets {path!r}, which this model does not have "
                                     f"({type(model).__name__}); was it trained on another architecture?")
        if "lora_A" not in g or "lora_B" not in g:
            raise AdapterFormatError(f"{where}: {path} has no lora_A/lora_B pair")
    st = get_state(model)
    if st is None:
        st = AdapterState(kind=kind, active=[name])
        set_state(model, st)
    r, alpha = int(config.get("r", 8)), float(config.get("lora_alpha", 8))
    rank_pat, alpha_pat = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}

    def pattern(pat, path, default):
        # PEFT's rank_pattern/alpha_pattern keys match a path suffix
        for k, v in pat.items():
            if path == k or path.endswith("." + k):
                return v
        return default

    paths = sorted(groups)
    add_lora(model, st, name, paths, r=r, alpha=alpha, dropout=float(config.get("lora_dropout", 0.0)),
             rslora=bool(config.get("use_rslora")), dora=bool(config.get("use_dora")),
             ranks={p: int(pattern(rank_pat, p, groups[p]["lora_A"].shape[0])) for p in paths},
             alphas={p: float(pattern(alpha_pat, p, alpha)) for p in paths})
    for path in paths:
        ad = model.get_submodule(path).adapters[name]
        g = groups[path]
        with torch.no_grad():
            for slot, param in (("lora_A", ad.lora_A.weight), ("lora_B", ad.lora_B.weight),
                                ("magnitude", ad.lora_magnitude_vector)):
                if param is None:
                    continue
                t = g.get(slot)
                if t is None or tuple(t.shape) != tuple(param.shape):
                    raise AdapterFormatError(f"{where}: {path}.{slot} has shape "
                                             f"{None if t is None else tuple(t.shape)}, expected {tuple(param.shape)}")
                param.copy_(t.to(param.dtype))
        ad.requires_grad_(trainable)
    cfg = dict(config)
    cfg.setdefault("r", r)
    st.configs[name] = cfg


def load_adapter(model, path: Union[str, Path], *, name: str = "default", trainable: bool = False,
                 quantize: Optional[bool] = None):
    """Attach the PEFT-format adapter in `path` to the plain HF `model` and return it.

    The base stays frozen; the adapter is frozen too unless `trainable`. An adapter
    trained with QLoRA is put back on an NF4 base (the weights it was trained against)
    unless quantize=False.
    """
    config, tensors, meta = read_adapter(path)
    kind = stored_kind(config, meta)
    st = get_state(model)
    if st is not None and (st.kind in ("prompt", "prefix") or kind in ("prompt", "prefix")):
        raise AdapterFormatError(f"{path}: this model already has a {st.kind} adapter; only LoRA adapters combine")
    if st is None:
        model.requires_grad_(False)
    if kind in ("prompt", "prefix"):

        load_prompt(model, config, tensors["prompt_embeddings"], kind, trainable=trainable, where=str(path))
        return model
    if st is None and (quantize is True or (kind == "qlora" and quantize is not False)):

        quantize_linears(model)
    if quantize is True:
        kind = "qlora"
    load_lora(model, config, tensors, kind, name=name, where=str(path), trainable=trainable)
    return model


def adapter_size_bytes(path: Union[str, Path]) -> int:
    return sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file())


def count_tensor_params(tensors: dict[str, torch.Tensor]) -> int:
    return sum(math.prod(t.shape) for t in tensors.values())


__all__ = ["save", "load_adapter", "read_adapter", "vllm_problems", "AdapterFormatError"]
