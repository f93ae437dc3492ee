"""The output head at loss positions: hidden states of the model body, then the chunked head of
`posttrain.losses.chunked`, so no stage holds more than one chunk of [tokens, vocab] logits."""

from __future__ import annotations

import inspect

from torch.nn.parallel import DistributedDataParallel


def takes_logits_to_keep(model) -> bool:
    """Whether the model's forward accepts `logits_to_keep` (transformers' *ForCausalLM classes do)."""
    # DistributedDataParallel's own forward takes *args, **kwargs and hides the model's signature
    inner = model.module if isinstance(model, DistributedDataParallel) else model
    return "logits_to_keep" in inspect.signature(type(inner).forward).parameters
