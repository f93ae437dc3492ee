"""Prompt tuning and prefix tuning.

Prompt tuning (Lester et al. 2021, "The Power of Scale for Parameter-Efficient
Prompt Tuning") prepends n learned embeddings to the input. They start from the
embeddings of a text, of tokens sampled from the vocabulary (the paper's better
default), or at random.

Prefix tuning (Li & Liang 2021, "Prefix-Tuning") prepends n learned key/value pairs
to the attention of every layer; we put them in the model's KV cache before the
first real token. With grouped-query attention a layer has num_key_value_heads KV
heads, so each position holds 2·layers·kv_heads·head_dim numbers. Optimising them
directly is unstable, so the paper reparameterises them through an MLP
(`projection=True`); only its output is saved, as PEFT does.

Both work as forward hooks on the HF model, so `model(...)` and `model.generate`
keep their usual signature: the virtual positions are added to the attention mask
and position ids, labels get -100 there, and prompt tuning's logits come back for
the real tokens only (a `logits_to_keep` tensor of positions is shifted past the
virtual tokens, so the output head still runs only where the loss needs it).
Packed batches (4-D masks) are refused: a prompt per packed example would need a
mask this module does not build.
"""

from __future__ import annotations

import inspect
import math
from typing import Optional

import torch
from torch import nn

from posttrain.models.adapters.state import AdapterState, get_state, set_state

ENCODER_ATTR = "posttrain_prompt"


class PromptEncoder(nn.Module):
    """n virtual tokens of width `out_dim`, optionally produced by an MLP from narrower embeddings."""

    def __init__(self, n: int, out_dim: int, *, projection: bool = False, token_dim: int = 0, hidden: int = 0):
        super().__init__()
        self.n = n
        if projection:
            self.embedding = nn.Embedding(n, token_dim)
            self.transform = nn.Sequential(nn.Linear(token_dim, hidden), nn.Tanh(), nn.Linear(hidden, out_dim))
        else:
            self.embedding = nn.Embedding(n, out_dim)
            self.transform = None

    def forward(self) -> torch.Tensor:
        w = self.embedding.weight
        return w if self.transform is None else self.transform(w)


def kv_geometry(config) -> tuple[int, int, int]:
    """(num_layers, kv_heads, head_dim) of a decoder config."""
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, kv, head_dim


def _peft_config(model, kind: str, n: int, init: str, init_text: Optional[str], tokenizer) -> dict:
    cfg = model.config
    layers, kv, head_dim = kv_geometry(cfg)
    base = {"task_type": "CAUSAL_LM", "inference_mode": True, "num_virtual_tokens": n, "num_layers": layers,
            "num_transformer_submodules": 1}
    if kind == "prompt":
        tok_name = getattr(tokenizer, "name_or_path", None) or getattr(cfg, "_name_or_path", None) or None
        if init == "TEXT" and not tok_name:
            init = "RANDOM"  # PEFT refuses TEXT without a tokenizer path; the weights are what matter
        return {**base, "peft_type": "PROMPT_TUNING", "token_dim": cfg.hidden_size,
                "num_attention_heads": cfg.num_attention_heads, "prompt_tuning_init": init,
                "prompt_tuning_init_text": init_text if init == "TEXT" else None, "tokenizer_name_or_path": tok_name}
    # PEFT describes a GQA prefix by its KV heads: token_dim = head_dim * kv_heads
    return {**base, "peft_type": "PREFIX_TUNING", "token_dim": kv * head_dim, "num_attention_heads": kv,
            "encoder_hidden_size": cfg.hidden_size, "prefix_projection": False}


def _init_prompt(enc: PromptEncoder, model, init: str, init_text: Optional[str], tokenizer) -> None:
    emb = model.get_input_embeddings().weight
    n = enc.n
    with torch.no_grad():
        if init == "TEXT":
            ids = tokenizer(init_text, add_special_tokens=False)["input_ids"]
            if not ids:
                raise ValueError("adapter.init_text tokenizes to nothing; give a non-empty text")
            ids = (ids * math.ceil(n / len(ids)))[:n]  # repeat the text to fill n tokens, as PEFT does
            enc.embedding.weight.copy_(emb[torch.tensor(ids, device=emb.device)])
        elif init == "SAMPLE_VOCAB":
            ids = torch.randint(0, emb.shape[0], (n,), device=emb.device)
            enc.embedding.weight.copy_(emb[ids])
        else:
            nn.init.normal_(enc.embedding.weight, std=float(emb.std()))


def add_prompt(model, kind: str, n: int, *, init: Optional[str] = None, init_text: Optional[str] = None,
               tokenizer=None, projection: bool = False):
    """Add trainable prompt (`kind='prompt'`) or prefix (`kind='prefix'`) tuning to a frozen model.

    init (prompt tuning): 'text' (needs init_text and tokenizer), 'vocab' (sampled token
    embeddings) or 'random'; default 'text' when init_text is given, else 'vocab'.
    """
    if kind not in ("prompt", "prefix"):
        raise ValueError(f"kind must be 'prompt' or 'prefix', got {kind!r}")
    if get_state(model) is not None:
        raise ValueError("the model already has an adapter")
    init = (init or ("text" if init_text else "vocab")).upper()
    init = {"VOCAB": "SAMPLE_VOCAB"}.get(init, init)
    if init not in ("TEXT", "SAMPLE_VOCAB", "RANDOM"):
        raise ValueError(f"prompt init must be text, vocab or random, got {init.lower()!r}")
    if init == "TEXT" and (tokenizer is None or not init_text):
        raise ValueError("prompt tuning from text needs adapter.init_text and a tokenizer")
    model.requires_grad_(False)
    cfg = model.config
    emb = model.get_input_embeddings().weight
    if kind == "prompt":
        if projection:
            raise ValueError("adapter.prefix_projection applies to prefix tuning only (type: prefix)")
        enc = PromptEncoder(n, cfg.hidden_size)
        _init_prompt(enc, model, init, init_text, tokenizer)
    else:
        layers, kv, head_dim = kv_geometry(cfg)
        enc = PromptEncoder(n, layers * 2 * kv * head_dim, projection=projection, token_dim=kv * head_dim,
                            hidden=cfg.hidden_size)
        init = "RANDOM"
    enc.to(device=emb.device, dtype=torch.float32 if emb.dtype in (torch.float16, torch.bfloat16) else emb.dtype)
    _attach(model, kind, enc)
    get_state(model).configs["default"] = _peft_config(model, kind, n, init, init_text, tokenizer)
    return model


def load_prompt(model, config: dict, tensor: torch.Tensor, kind: str, *, trainable: bool, where: str) -> None:
    layers, kv, head_dim = kv_geometry(model.config)
    want = model.config.hidden_size if kind == "prompt" else layers * 2 * kv * head_dim
    if tensor.dim() != 2 or tensor.shape[1] != want:
        raise ValueError(f"{where}: prompt_embeddings has shape {tuple(tensor.shape)}, but this model needs "
                         f"[num_virtual_tokens, {want}] for {kind} tuning; was it trained on another model?")
    if config.get("num_transformer_submodules", 1) != 1:
        raise ValueError(f"{where}: num_transformer_submodules={config['num_transformer_submodules']} "
                         "(encoder-decoder adapters) is not supported")
    emb = model.get_input_embeddings().weight
    enc = PromptEncoder(tensor.shape[0], want).to(device=emb.device, dtype=torch.float32)
    with torch.no_grad():
        enc.embedding.weight.copy_(tensor)
    enc.requires_grad_(trainable)
    _attach(model, kind, enc)
    get_state(model).configs["default"] = dict(config)


def prompt_tensor(model) -> torch.Tensor:
    """The virtual tokens as saved: after the projection MLP, [n, width]."""
    with torch.no_grad():
        return getattr(model, ENCODER_ATTR)().float()


def _attach(model, kind: str, enc: PromptEncoder) -> None:
    model.add_module(ENCODER_ATTR, enc)
    st = AdapterState(kind=kind)
    set_state(model, st)
    cache_key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    st.hooks.append(model.register_forward_pre_hook(_make_pre_hook(kind, cache_key), with_kwargs=True))
    if kind == "prompt":
        st.hooks.append(model.register_forward_hook(_trim_logits, with_kwargs=True))


def prefix_key_values(prefix: torch.Tensor, config) -> torch.Tensor:
    """The saved prefix [n, layers·2·kv·hd] as keys and values [layers·2, kv, n, hd].

    Layer i's key is row 2i and its value row 2i+1 (PEFT's layout).
    """
    layers, kv, head_dim = kv_geometry(config)
    return prefix.view(prefix.shape[0], layers * 2, kv, head_dim).permute(1, 2, 0, 3)


def _prefix_cache(model, enc: PromptEncoder, batch: int, cache):
    from transformers import DynamicCache

    layers = model.config.num_hidden_layers
    dtype = model.get_input_embeddings().weight.dtype
    pkv = prefix_key_values(enc().to(dtype), model.config)
    cache = cache if cache is not None else DynamicCache(config=model.config)
    for i in range(layers):
        k = pkv[2 * i].unsqueeze(0).expand(batch, -1, -1, -1)
        v = pkv[2 * i + 1].unsqueeze(0).expand(batch, -1, -1, -1)
        cache.update(k, v, i)
    return cache


def _make_pre_hook(kind: str, cache_key: str):
    def hook(model, args, kwargs):
        st = get_state(model)
        if st is None or st.disabled:
            return None
        kwargs = dict(kwargs)
        if args:
            if len(args) > 1:
                raise TypeError(f"{kind} tuning: pass the model's inputs by keyword "
                                "(input_ids=..., attention_mask=...)")
            kwargs["input_ids"] = args[0]
        enc: PromptEncoder = getattr(model, ENCODER_ATTR)
        n = enc.n
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() != 2:
            raise ValueError(f"{kind} tuning does not support packed batches (a {mask.dim()}-D attention mask was "
                             "passed); set data.packing: false, or use a LoRA adapter")
        if kind == "prefix" and model.training and any(getattr(m, "gradient_checkpointing", False)
                                                       for m in model.modules()):
            # transformers drops the KV cache inside checkpointed layers, which would silently lose the prefix
            raise ValueError("prefix tuning cannot train with gradient checkpointing (transformers drops the KV "
                             "cache in checkpointed layers); set train.gradient_checkpointing: false")
        cache = kwargs.pop("cache", None)
        if cache is None:
            cache = kwargs.pop("past_key_values", None)
        if cache is not None and not hasattr(cache, "get_seq_length"):
            raise TypeError(f"{kind} tuning needs a transformers Cache object, got {type(cache).__name__}")
        past = cache.get_seq_length() if cache is not None else 0
        ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
        x = ids if ids is not None else embeds
        batch, length = x.shape[0], x.shape[1]
        if mask is not None:
            kwargs["attention_mask"] = torch.cat([mask.new_ones(batch, n), mask], dim=1)
        pos = kwargs.get("position_ids")
        if past == 0 and kind == "prompt":
            if embeds is None:
                embeds = model.get_input_embeddings()(ids)
            prompts = enc().to(embeds.dtype).unsqueeze(0).expand(batch, -1, -1)
            kwargs["inputs_embeds"], kwargs["input_ids"] = torch.cat([prompts, embeds], dim=1), None
            if pos is not None:
                virtual = torch.arange(n, device=pos.device, dtype=pos.dtype).expand(batch, n)
                kwargs["position_ids"] = torch.cat([virtual, pos + n], dim=1)
            labels = kwargs.get("labels")
            if labels is not None:
                kwargs["labels"] = torch.cat([labels.new_full((batch, n), -100), labels], dim=1)
            keep = kwargs.get("logits_to_keep")
            if torch.is_tensor(keep):  # positions of the real tokens: shift them past the virtual ones
                kwargs["logits_to_keep"] = keep + n
                st.trim = None
            else:  # an int keeps the last positions, which are real tokens; trim the rest away
                st.trim = length
        else:
            if pos is not None:
                kwargs["position_ids"] = pos + n
            if past == 0:  # prefix tuning: the prefix goes into the cache before the first real token
                cache = _prefix_cache(model, enc, batch, cache)
        if cache is not None:
            kwargs[cache_key] = cache
        return (), kwargs

    return hook


def _trim_logits(model, args, kwargs, output):
    st = get_state(model)
    if st is None or st.trim is None:
        return None
    keep, st.trim = st.trim, None
    logits = getattr(output, "logits", None)
    if logits is not None:
        # drop the virtual positions; with logits_to_keep only the last positions are there anyway
        output.logits = logits[:, logits.shape[1] - min(keep, logits.shape[1]):]
    return output
