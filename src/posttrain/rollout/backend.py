"""The backend contract: token ids in, sampled token ids and their log-probs out.

A backend only samples. Tokenizing, stop-string trimming of the text, result tensors and
timing live in `RolloutEngine`, so a new backend (vLLM on a GPU, say) implements one method:

    generate(prompt_ids, params, *, stop_ids, adapters=None) -> GeneratedIds

and must honour every `SamplingParams` field, return output row i*n + j for sample j of
prompt i, include the token that ended a row (EOS / stop id, or the last token of a stop
string) in `tokens`, and report per-token log-probs of the *sampling* distribution (after
temperature, top-k, top-p) in `logprobs` and under temperature alone in `policy_logprobs`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol

from posttrain.rollout.sampling import SamplingParams

STOP_REASONS = ("eos", "stop", "length")


@dataclass
class GeneratedIds:
    tokens: list[list[int]]
    logprobs: list[list[float]]
    policy_logprobs: list[list[float]]
    stop_reasons: list[str]  # one of STOP_REASONS per row

    @classmethod
    def empty(cls, rows: int) -> "GeneratedIds":
        return cls([[] for _ in range(rows)], [[] for _ in range(rows)], [[] for _ in range(rows)],
                   ["length"] * rows)


class Backend(Protocol):
    name: str

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams, *, stop_ids: list[int],
                 adapters: Optional[list[str]] = None) -> GeneratedIds: ...


BACKENDS = {"hf": "posttrain.rollout.hf:HFBackend"}


def make_backend(name: str, model, tokenizer, **kw) -> Backend:
    """Instantiate a registered backend by name (`hf`; `vllm` can register itself here)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown rollout backend {name!r}; available: {', '.join(sorted(BACKENDS))}")
    import importlib

    mod, _, cls = BACKENDS[name].partition(":")
    return getattr(importlib.import_module(mod), cls)(model, tokenizer, **kw)
