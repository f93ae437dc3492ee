"""Sampling settings and the next-token distribution they define.

The distribution a token is drawn from, at every step, is

    z' = z / temperature                      (temperature > 0)
    z'' = z' with every logit outside the top-k set to -inf                   (top_k > 0)
    z''' = z'' with every token outside the smallest set whose probability
           mass reaches top_p set to -inf (the most probable token always stays)  (top_p < 1)
    p = softmax(z''')

and the *sampling log-prob* of a drawn token y is log p(y). A training forward pass that
divides its logits by the same temperature computes log softmax(z')(y) instead: the two are
equal when top_k = 0 and top_p = 1, and otherwise differ by the log of the kept mass,
log sum_{v kept} softmax(z')_v <= 0. Greedy decoding (temperature 0) picks argmax z and
reports log softmax(z)(y).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch


@dataclass
class SamplingParams:
    """How to sample. Defaults follow the usual RL rollout settings (plain sampling at T=1)."""

    max_new_tokens: int = 64
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    n: int = 1  # completions per prompt (GRPO's G); the prompt is prefilled once and its cache shared
    stop: tuple[str, ...] = ()  # stop strings: the completion text ends before the first one
    stop_token_ids: Optional[tuple[int, ...]] = None  # None: the tokenizer's EOS, pad and end-of-turn tokens
    seed: Optional[int] = None
    extra: dict = field(default_factory=dict)  # backend-specific options (e.g. for vLLM)

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"SamplingParams.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"SamplingParams.temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"SamplingParams.top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.n < 1:
            raise ValueError(f"SamplingParams.n must be >= 1, got {self.n}")
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        self.stop = tuple(self.stop)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def process_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Apply temperature, top-k and top-p to next-token logits [B, V]; returns float32 logits [B, V]."""
    z = logits.float()
    if params.greedy:
        return z
    if params.temperature != 1.0:
        z = z / params.temperature
    if params.top_k and params.top_k < z.shape[-1]:
        kth = torch.topk(z, params.top_k, dim=-1).values[..., -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_z, order = torch.sort(z, dim=-1, descending=True)
        probs = torch.softmax(sorted_z, dim=-1)
        # drop a token when the mass *before* it already reaches top_p: the top token always stays
        drop_sorted = (probs.cumsum(-1) - probs) >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        z = z.masked_fill(drop, float("-inf"))
    return z


def sample_next(logits: torch.Tensor, params: SamplingParams,
                generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw one token per row.

    Returns (tokens [B], sampling log-probs [B], temperature-only log-probs [B]); the last is
    what a training forward pass at the same temperature recomputes (see the module docstring).
    """
    z = process_logits(logits, params)
    if params.greedy:
        tokens = z.argmax(-1)
        lp = torch.log_softmax(z, -1).gather(-1, tokens[:, None])[:, 0]
        return tokens, lp, lp
    logp = torch.log_softmax(z, -1)
    tokens = _inverse_cdf(logp.exp(), generator)
    lp = logp.gather(-1, tokens[:, None])[:, 0]
    if params.top_k == 0 and params.top_p == 1.0:
        return tokens, lp, lp
    zt = logits.float() / params.temperature
    lp_t = torch.log_softmax(zt, -1).gather(-1, tokens[:, None])[:, 0]
    return tokens, lp, lp_t


def _inverse_cdf(probs: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    """One draw per row by inverting the CDF with a single uniform: on CPU about 80x faster than
    torch.multinomial (which draws a random number per vocabulary entry) for a [128, 1024] batch."""
    cdf = probs.cumsum(-1)
    total = cdf[:, -1:]
    u = torch.rand(probs.shape[0], 1, device=probs.device, generator=generator)
    # strictly below the total, so the search never lands past the last token with mass; the first
    # index whose CDF *exceeds* the target always has p > 0
    target = torch.minimum(u * total, total * (1 - 1e-6))
    return torch.searchsorted(cdf, target, right=True)[:, 0].clamp(max=probs.shape[-1] - 1)
