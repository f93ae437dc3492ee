"""A merged HF checkpoint -> one GGUF file for llama.cpp / Ollama, written with the `gguf` package.

    write_gguf("exported/", "exported/model-q8_0.gguf", "q8_0")

Supported: the architectures that both llama.cpp and transformers' GGUF loader read with our
tensor layout, `llama` (Llama 2/3, and `mistral` checkpoints, which llama.cpp reads as llama) and
`qwen2`. Tensor names come from gguf-py's own name map (`get_tensor_name_map`), so they are the
names llama.cpp's converter writes. Two details follow llama.cpp's `convert_hf_to_gguf.py`:

- llama's q/k projections are permuted from HF's rotary layout (two halves) to GGML's
  (interleaved pairs); transformers undoes it when it loads the file;
- norms, biases and other 1-D tensors stay float32; matrices are float16 (`f16`) or Q8_0 blocks
  of 32 (`q8_0`, when the row length is a multiple of 32, else float16).

The tokenizer is written as GGML's `gpt2` (byte-level BPE: tokens, types, merges) from the
checkpoint's `tokenizer.json`, with the BOS/EOS/pad ids and the chat template.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

TYPES = ("f16", "q8_0")
ARCHS = {"llama": "LLAMA", "mistral": "LLAMA", "qwen2": "QWEN2"}


class GGUFExportError(ValueError):
    """A checkpoint that cannot be written as GGUF; the message says why and what works."""


def write_gguf(model_dir, path, outtype: str = "f16") -> Path:
    """Write the HF checkpoint in `model_dir` (config.json, *.safetensors, tokenizer.json) as GGUF at `path`."""
    try:
        import gguf  # optional dependency: pip install 'posttrain[gguf]'
    except ImportError:
        raise GGUFExportError("GGUF export needs the gguf package: pip install 'posttrain[gguf]'") from None
    from safetensors.numpy import load_file

    if outtype not in TYPES:
        raise GGUFExportError(f"unknown GGUF type '{outtype}'; choose one of {', '.join(TYPES)}")
    src = Path(model_dir)
    cfg = json.loads((src / "config.json").read_text())
    kind = cfg.get("model_type")
    if kind not in ARCHS:
        raise GGUFExportError(f"{src}: GGUF export supports {', '.join(ARCHS)} checkpoints, not '{kind}'; convert "
                              "this one with llama.cpp's convert_hf_to_gguf.py")
    arch = getattr(gguf.MODEL_ARCH, ARCHS[kind])
    n_layers, n_head = cfg["num_hidden_layers"], cfg["num_attention_heads"]
    n_kv = cfg.get("num_key_value_heads") or n_head
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_head

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(out), gguf.MODEL_ARCH_NAMES[arch])
    w.add_name(cfg.get("_name_or_path") or src.name)
    w.add_context_length(cfg.get("max_position_embeddings", 2048))
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(n_layers)
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(float(_rope_theta(cfg)))
    w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
    w.add_vocab_size(cfg["vocab_size"])
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if outtype == "f16" else gguf.LlamaFileType.MOSTLY_Q8_0)
    _add_tokenizer(w, src, kind, cfg["vocab_size"])

    names = gguf.get_tensor_name_map(arch, n_layers)
    tensors = {}
    for f in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    if "lm_head.weight" not in tensors:  # tied embeddings: write the head too, so every reader finds one
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
    for hf_name, t in tensors.items():
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise GGUFExportError(f"{src}: no GGUF name for tensor '{hf_name}'")
        data = t.astype(np.float32)
        if kind in ("llama", "mistral") and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            data = _permute(data, n_head, n_kv if "k_proj" in hf_name else n_head)
        _add_tensor(w, gguf, name, data, outtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def _rope_theta(cfg: dict) -> float:
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    return cfg.get("rope_theta") or rope.get("rope_theta") or 10000.0


def _permute(w: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """HF's rotary layout (first half, second half) -> GGML's interleaved pairs, as llama.cpp's converter does."""
    n = n_head_kv
    return w.reshape(n, 2, w.shape[0] // n // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _add_tensor(w, gguf, name: str, data: np.ndarray, outtype: str) -> None:
    if data.ndim < 2:
        w.add_tensor(name, data)
        return
    if outtype == "q8_0" and data.shape[-1] % 32 == 0:
        q = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0)
        w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        return
    w.add_tensor(name, data.astype(np.float16))


def _add_tokenizer(w, src: Path, kind: str, vocab_size: int) -> None:
    path = src / "tokenizer.json"
    if not path.exists():
        raise GGUFExportError(f"{src}: GGUF export needs tokenizer.json (a fast tokenizer)")
    tok = json.loads(path.read_text(encoding="utf-8"))
    model = tok["model"]
    if model.get("type") != "BPE":
        raise GGUFExportError(f"{src}: GGUF export writes byte-level BPE tokenizers; this one is "
                              f"{model.get('type')} (use llama.cpp's converter)")
    vocab = dict(model["vocab"])
    special = {}
    for a in tok.get("added_tokens", []):
        vocab[a["content"]] = a["id"]
        special[a["id"]] = a.get("special", False)
    size = max(vocab_size, max(vocab.values()) + 1)
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [gguf_type("unused")] * size
    for text, i in vocab.items():
        tokens[i] = text
        types[i] = gguf_type("control" if special.get(i) else "user" if i in special else "normal")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2" if kind == "qwen2" else "llama-bpe")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    cfg_path = src / "tokenizer_config.json"
    tcfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
    for key, add in (("bos_token", w.add_bos_token_id), ("eos_token", w.add_eos_token_id),
                     ("pad_token", w.add_pad_token_id)):
        text = tcfg.get(key)
        text = text.get("content") if isinstance(text, dict) else text
        if text in vocab:
            add(vocab[text])
    template = src / "chat_template.jinja"
    chat = template.read_text() if template.exists() else tcfg.get("chat_template")
    if isinstance(chat, str):
        w.add_chat_template(chat)


def gguf_type(name: str) -> int:
    """GGML's token types: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte."""
    return {"normal": 1, "unknown": 2, "control": 3, "user": 4, "unused": 5, "byte": 6}[name]
