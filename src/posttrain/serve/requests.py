"""What a request to the serving engine is, what it gets back, and incremental detokenization."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from posttrain.rollout import SamplingParams
from posttrain.serve.adapters import ServedAdapter


@dataclass
class TokenLogprob:
    token: int
    logprob: float
    top: list[tuple[int, float]]  # the `top` most likely tokens and their log-probs


@dataclass
class Delta:
    """What one request produced since its last delta; `finish_reason` is set on the last one."""

    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob]
    finish_reason: Optional[str] = None  # "stop" (EOS or stop string) | "length" | "cancelled" | "error"


@dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    adapter: Optional[ServedAdapter] = None
    logprobs: Optional[int] = None  # None: no log-probs; k: the token's and the top k
    stream: bool = False  # deltas after every token (else one delta at the end)
    ignore_eos: bool = False  # keep going past end-of-sequence tokens until max_new_tokens
    on_delta: Callable[[Delta], None] = lambda d: None  # called on the engine thread; must not block
    sink: Any = None  # the caller's own handle (the HTTP layer keeps its asyncio queue here)
    # filled in by the engine
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: Optional[str] = None
    cancelled: bool = False
    token_logprobs: list[TokenLogprob] = field(default_factory=list)
    _lp_sent: int = 0
    _generator: Optional[torch.Generator] = None
    _detok: Optional["_Detokenizer"] = None
    _sent: int = 0  # text characters already delivered

    def cancel(self) -> None:
        """Stop generating (a client disconnected); the row leaves the batch at the next step."""
        self.cancelled = True


class _Detokenizer:
    """Incremental decoding: text grows only by complete characters (a multi-byte character split
    over tokens decodes to U+FFFD until its last token arrives)."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.prefix = 0  # tokens[prefix:read] decode to the text already emitted from that window
        self.read = 0

    def step(self, tokens: list[int]) -> str:
        before = self.tok.decode(tokens[self.prefix:self.read], skip_special_tokens=True)
        after = self.tok.decode(tokens[self.prefix:], skip_special_tokens=True)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(tokens)
            return after[len(before):]
        return ""
