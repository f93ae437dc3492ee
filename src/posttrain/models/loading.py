"""Load a causal LM and its tokenizer from a local Hugging Face directory or a hub name.

Safe by default: a checkpoint's own Python code never runs unless
``trust_remote_code=True``, and pickle weights (``*.bin``) are refused unless
``allow_pickle=True`` because unpickling can execute arbitrary code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Union

import torch
from posttrain.models import adapters
from posttrain.models.hardware import native_bf16, warn_slow_bf16


class ModelLoadError(RuntimeError):
    """A model that cannot be loaded; the message names the directory or file and what to do."""


_DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
}


def resolve_dtype(dtype: Union[str, torch.dtype, None]) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise ModelLoadError(f"unknown dtype '{dtype}'; use one of {sorted(_DTYPES)}") from None


def resolve_device(device: Union[str, torch.device, None] = "auto") -> torch.device:
    if device in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    return torch.device(device)


def resolve_model_dir(name: Union[str, Path]) -> Path:
    """A finished posttrain run directory points at its final model; anything else is used as given."""
    p = Path(name)
    if p.is_dir() and not (p / "config.json").exists():
        manifest = p / "manifest.json"
        if manifest.exists():
            m = _read_json(manifest, "the run's manifest")
            if m.get("status") != "completed":
                raise ModelLoadError(f"{p} is a posttrain run that did not complete (status: {m.get('status')}); "
                                     "resume it with --resume, or load one of its checkpoints")
            return p / m.get("model_dir", "model")
        if (p / "model" / "config.json").exists():
            raise ModelLoadError(f"{p} has no manifest.json: the run did not finish, so its model is not trusted")
    return p


def _read_json(path: Path, what: str) -> dict:
    """A JSON object from `path`, or a `ModelLoadError` naming the file (truncated downloads are common)."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        at = f" at line {e.lineno} column {e.colno}" if isinstance(e, json.JSONDecodeError) else ""
        raise ModelLoadError(f"{path}: {what} is damaged or truncated (not valid JSON{at}); download or save it "
                             "again") from None
    if not isinstance(doc, dict):
        raise ModelLoadError(f"{path}: {what} must be a JSON object, got {type(doc).__name__}")
    return doc


def check_safetensors(path: Path) -> None:
    """Raise `ModelLoadError` naming `path` if a safetensors file is truncated or its header is damaged.

    Reads the header only (8-byte length, then JSON with each tensor's byte range), so a file cut
    short by an interrupted copy is caught before the loader reports it without the path.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        header = f.read(n) if 0 < n <= size - 8 else b""
    try:
        meta = json.loads(header)
        end = max((int(v["data_offsets"][1]) for k, v in meta.items() if k != "__metadata__"), default=0)
    except (ValueError, TypeError, KeyError, IndexError):
        raise ModelLoadError(f"{path}: not a readable safetensors file (damaged or truncated header, "
                             f"{size} bytes); download or save the model again") from None
    if 8 + n + end > size:
        raise ModelLoadError(f"{path}: truncated ({size} bytes, its header describes {8 + n + end}); download or "
                             "save the model again")


def _check_weights(path: Path, allow_pickle: bool) -> None:
    if not path.is_dir():
        return
    for f in sorted(path.glob("*.safetensors")):
        check_safetensors(f)
    has_safe = any(path.glob("*.safetensors"))
    has_pickle = any(path.glob("*.bin")) or any(path.glob("*.pt")) or any(path.glob("*.pth"))
    if not has_safe and has_pickle and not allow_pickle:
        raise ModelLoadError(
            f"{path} holds only pickle weights (.bin/.pt), which can run code when loaded. "
            "Convert them to safetensors, or pass allow_pickle=True if you trust the source."
        )
    if not has_safe and not has_pickle:
        raise ModelLoadError(f"{path} has no weights (*.safetensors)")


def load_tokenizer(name: Union[str, Path], *, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    if Path(name).is_dir():
        for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (Path(name) / f).is_file():
                _read_json(Path(name) / f, "a tokenizer file")
    try:
        tok = AutoTokenizer.from_pretrained(str(name), trust_remote_code=trust_remote_code)
    except OSError as e:
        if Path(name).exists():
            raise ModelLoadError(f"could not load the tokenizer from {name}: {e}") from None
        raise ModelLoadError(_unreachable(str(name))) from None
    except ValueError as e:  # a damaged tokenizer file (JSONDecodeError is one)
        raise ModelLoadError(f"could not load the tokenizer from {name}: {str(e).splitlines()[0]}") from None
    if tok.pad_token_id is None:
        # a pad token is needed for batching; the EOS token is the usual stand-in and never trained as padding
        tok.pad_token = tok.eos_token
    return tok


def load(
    model: Union[str, Path],
    adapter: Optional[Union[str, Path]] = None,
    *,
    dtype: Union[str, torch.dtype, None] = "fp32",
    device: Union[str, torch.device, None] = "auto",
    tokenizer: Optional[Union[str, Path]] = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    gradient_checkpointing: bool = False,
    attn_implementation: Optional[str] = "sdpa",
):
    """Load ``(model, tokenizer)``.

    Args:
        model: a local directory (config.json + safetensors + tokenizer files), a finished
            posttrain run directory, or a hub name (needs network access).
        adapter: an adapter directory (PEFT format) to attach.
        dtype: ``fp32`` | ``bf16`` | ``fp16`` or a torch dtype.
        device: ``auto`` picks CUDA when available.
        trust_remote_code: allow the checkpoint's own Python code to run.
        allow_pickle: allow ``.bin`` pickle weights.
        gradient_checkpointing: trade compute for activation memory in training.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    src = resolve_model_dir(model)
    if adapter is None and (src / "adapter_config.json").exists() and not (src / "config.json").exists():
        # a finished adapter run (or an adapter directory): load its base, then the adapter
        base = _adapter_base(src)
        return load(base, adapter=src, dtype=dtype, device=device, tokenizer=tokenizer or src,
                    trust_remote_code=trust_remote_code, allow_pickle=allow_pickle,
                    gradient_checkpointing=gradient_checkpointing, attn_implementation=attn_implementation)
    local = src.exists()
    if local:
        if not src.is_dir():
            raise ModelLoadError(f"model {src} is a file; give the model's directory (config.json + *.safetensors)")
        if not (src / "config.json").exists():
            raise ModelLoadError(f"{src} is not a Hugging Face model directory (no config.json)")
        _read_json(src / "config.json", "the model config")
        _check_weights(src, allow_pickle)
    elif str(model).startswith((".", "/", "~")):
        raise ModelLoadError(f"model directory not found: {model}; give a directory with config.json and "
                             "*.safetensors (or a finished posttrain run)")
    name = str(src) if local else str(model)
    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    except OSError as e:
        if local:
            raise ModelLoadError(f"could not load model '{model}': {e}") from None
        raise ModelLoadError(_unreachable(str(model))) from None
    kind = _model_kind(config)
    kwargs = dict(
        dtype=resolve_dtype(dtype),
        trust_remote_code=trust_remote_code,
        use_safetensors=None if allow_pickle else True,
    )
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        if kind == "reward":
            from transformers import AutoModelForSequenceClassification

            m = AutoModelForSequenceClassification.from_pretrained(name, **kwargs)
        else:
            m = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    except OSError as e:
        raise ModelLoadError(f"could not load model '{model}': {e}") from None
    target = resolve_device(device)
    m.to(target)
    if kwargs["dtype"] == torch.bfloat16 and not native_bf16(target):
        warn_slow_bf16(str(target), "bf16 weights", "Load in fp32 (dtype='fp32', --dtype fp32) for speed on this machine.")
    if gradient_checkpointing:
        # transformers 5 renamed it; older releases only have the gradient_* name
        if hasattr(m, "activation_checkpointing_enable"):
            m.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        m.config.use_cache = False
    tok_src = tokenizer or (src if (not local or _has_tokenizer(src)) else None)
    if tok_src is None:
        raise ModelLoadError(f"{src} has no tokenizer files; pass tokenizer=...")
    tok = load_tokenizer(tok_src, trust_remote_code=trust_remote_code)
    if adapter is not None:

        m = adapters.load_adapter(m, adapter)
    return m, tok


def _unreachable(name: str) -> str:
    return (f"model '{name}' is not a local directory, and the hub could not be reached or has no such model "
            f"(offline?). Download it first (huggingface-cli download {name} --local-dir DIR) and pass model=DIR, "
            "or give a local directory with config.json and *.safetensors")


def _adapter_base(adapter_dir: Path) -> str:
    """The base model an adapter was trained on: the run's manifest, else the adapter's own config."""
    manifest = adapter_dir.parent / "manifest.json"
    if manifest.exists():
        base = _read_json(manifest, "the run's manifest").get("base_model")
        if base:
            return base
    base = _read_json(adapter_dir / "adapter_config.json", "the adapter config").get("base_model_name_or_path")
    if not base:
        raise ModelLoadError(f"{adapter_dir} is an adapter without a recorded base model; pass model=BASE, adapter=DIR")
    return base


def _has_tokenizer(p: Path) -> bool:
    return any((p / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))


def _model_kind(config) -> str:
    archs = getattr(config, "architectures", None) or []
    if any(a.endswith("ForSequenceClassification") for a in archs):
        return "reward"
    return "causal"
