"""Held-out multi-turn episodes: the mean episode reward of greedy play against an environment.

    from posttrain.eval.episodes import episode_eval, lookup_eval
    lookup_eval(model, tokenizer, n=200)   # gym:lookup test split -> {"episode_reward": ..., "invalid_call_rate": ...}
"""

from __future__ import annotations

from typing import Callable, Sequence

from posttrain import gym
from posttrain.gym.lookup import MAX_TURNS, LookupEnv
from posttrain.rollout import RolloutEngine, SamplingParams
from posttrain.rollout.episodes import Environment, run_episodes


def episode_eval(model, tokenizer, rows: Sequence[dict], make_env: Callable[[], Environment], *, max_turns: int = 4,
                 max_new_tokens: int = 64, max_length: int | None = None, batch_size: int = 64) -> dict:
    """Greedy episodes, one per row: `Episodes.metrics()` (episode_reward is the mean reward; for a
    0/1 final reward it is the success rate)."""
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0)
    eps = run_episodes(RolloutEngine(model, tokenizer, batch_size=batch_size), list(rows), make_env, params,
                       max_turns=max_turns, max_length=max_length)
    return eps.metrics()


def lookup_eval(model, tokenizer, *, split: str = "test", n: int = 200, seed: int = 0) -> dict:
    """`episode_eval` on gym:lookup (`episode_reward` = the fraction of questions answered right)."""
    rows = gym.load_task_rows("lookup", split, n=n, seed=seed)
    return episode_eval(model, tokenizer, rows, LookupEnv, max_turns=MAX_TURNS, max_new_tokens=48, max_length=1024)


def lookup_success(model, tokenizer, *, split: str = "test", n: int = 200) -> dict:
    """The demo's `lookup` columns: held-out episode success and invalid-call rate (greedy)."""
    m = lookup_eval(model, tokenizer, split=split, n=n)
    return {"lookup_success": m["episode_reward"], "invalid_call_rate": m["invalid_call_rate"]}
