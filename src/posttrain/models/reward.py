"""Reward models: a causal LM's transformer with a scalar head that reads the last real token.

The model is transformers' own ``*ForSequenceClassification`` class with ``num_labels=1``, so a
saved reward model loads with ``AutoModelForSequenceClassification.from_pretrained`` and with
``posttrain.load`` (which detects the architecture). ``config.pad_token_id`` is set from the
tokenizer, because that class finds the last real token as the last non-pad one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

import torch

from posttrain.models.loading import ModelLoadError, load_tokenizer, resolve_device, resolve_model_dir


def reward_model_from_lm(path: Union[str, Path], *, device: str = "auto", tokenizer=None,
                         trust_remote_code: bool = False, seed: int = 0):
    """(reward model, tokenizer) from a causal LM checkpoint (or an existing reward model).

    The transformer weights come from `path`; the scalar head is new (seeded) unless `path` is
    already a reward model. Weights are fp32 (bf16 runs use autocast).
    """
    from transformers import AutoModelForSequenceClassification

    src = resolve_model_dir(path)
    if not (src / "config.json").exists():
        raise ModelLoadError(f"{src} is not a Hugging Face model directory (no config.json)")
    tok = load_tokenizer(tokenizer or src, trust_remote_code=trust_remote_code)
    from transformers.utils import logging as hf_logging

    torch.manual_seed(seed)
    before = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "lm_head unexpected, score missing" is the point of the conversion
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            str(src), num_labels=1, dtype=torch.float32, use_safetensors=True, trust_remote_code=trust_remote_code)
    finally:
        hf_logging.set_verbosity(before)
    model.config.pad_token_id = tok.pad_token_id
    return model.to(resolve_device(device)), tok


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B] index of the last position whose mask is 1 (works for left and right padding)."""
    T = attention_mask.shape[-1]
    pos = torch.arange(T, device=attention_mask.device).expand_as(attention_mask)
    return (pos * (attention_mask != 0)).argmax(-1)


def reward_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[B] scalar rewards: the head applied to the hidden state of each row's last real token."""
    # through the model's own forward: a DDP or FSDP2 wrapper acts on that call only (calling the
    # transformer body directly would skip DDP's gradient sync and FSDP2's parameter all-gather)
    out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, output_hidden_states=True)
    hidden = out.hidden_states[-1]
    last = last_token_index(attention_mask)
    picked = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    return getattr(model, "module", model).score(picked).squeeze(-1).float()
