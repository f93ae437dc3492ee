"""Rollouts: batched sampling with a KV cache and per-token log-probs (see docs/rl.md).

    from posttrain.rollout import RolloutEngine, SamplingParams
    ro = RolloutEngine(model, tokenizer).generate(prompts, SamplingParams(n=4, max_new_tokens=64))
"""

from posttrain.rollout.backend import BACKENDS, STOP_REASONS, Backend, GeneratedIds, make_backend
from posttrain.rollout.engine import Rollout, RolloutEngine, default_stop_ids
from posttrain.rollout.logprobs import completion_logits, completion_logprobs
from posttrain.rollout.sampling import SamplingParams, process_logits, sample_next

__all__ = ["BACKENDS", "STOP_REASONS", "Backend", "GeneratedIds", "Rollout", "RolloutEngine", "SamplingParams",
           "completion_logits", "completion_logprobs", "default_stop_ids", "make_backend", "process_logits",
           "sample_next"]
