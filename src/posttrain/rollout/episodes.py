"""Multi-turn episodes: the policy talks to an environment, calls its tools, and is scored at the end.

An environment is anything with this shape (one object per episode; see docs/rl.md for a
complete one):

    class Environment(Protocol):
        tools: list[dict]                                   # OpenAI-style schemas offered to the model
        def reset(self, row: dict) -> list[dict]: ...       # the opening messages (system/user)
        def step(self, messages: list[dict], assistant_turn: dict) -> tuple[list[dict], float, bool]: ...

``step`` receives the conversation so far and the model's new turn, ``{"role": "assistant",
"content": text, "tool_calls": [{"type": "function", "function": {"name", "arguments"}}]}``
(``tool_calls`` only when the model made calls), executes the calls and returns the messages to
append (``{"role": "tool", "content": ...}`` results; ``"error": True`` marks a failed call), the
turn's reward and whether the episode is over. An environment that runs model-written code runs
it in the sandbox (`posttrain.rewards.run_python`), never in-process.

`run_episodes` plays a batch of episodes turn by turn on a `RolloutEngine`: every live episode's
history is one prompt of the next generation batch, so episodes of different lengths share
batches. The token sequence of an episode is kept exactly as sampled: the model's tokens, then
the environment's tokens, which are the chat template's rendering of the new messages (tool
results, the next generation prompt) after the assistant's end-of-turn marker. The model's
tokens carry the loss; the environment's carry none (``loss_mask``). An episode ends when the
environment says so, at ``max_turns``, when a turn hits ``max_new_tokens`` (no end-of-turn to
continue from), or when the history would pass ``max_length`` tokens.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
from dataclasses import dataclass, field
from typing import Callable, Optional, Protocol, Sequence

import torch

from posttrain.data.render import end_of_turn_marker
from posttrain.data.tools import prepare, render_prompt
from posttrain.rewards.tools import parse_tool_calls
from posttrain.rollout.engine import RolloutEngine
from posttrain.rollout.sampling import SamplingParams

_CALL_BLOCK = re.compile(r"<tool_call>.*?(?:</tool_call>|\Z)", re.DOTALL)

# parse_calls(text) -> [{"name": str, "arguments": dict}], raising ValueError on malformed call text
ParseCalls = Callable[[str], list[dict]]


def documented_calls(text: str) -> list[dict]:
    """The calls in `text` read by the documented parser (`posttrain.rewards.parse_tool_calls`,
    docs/tools.md: `<tool_call>` blocks or bare JSON); ToolCallParseError (a ValueError) when malformed."""
    return [c.to_dict() for c in parse_tool_calls(text)]


class Environment(Protocol):
    tools: list[dict]

    def reset(self, row: dict) -> list[dict]: ...

    def step(self, messages: list[dict], assistant_turn: dict) -> tuple[list[dict], float, bool]: ...


@dataclass
class Episodes:
    """A batch of finished episodes, ready for a training forward pass (`batch()`)."""

    messages: list[list[dict]]  # the whole conversation of each episode
    rewards: torch.Tensor  # [N] episode reward: the sum of its turns' rewards
    turn_rewards: list[list[float]]  # per episode, one reward per assistant turn
    prompt_ids: torch.Tensor  # [N, P] the opening prompt, left-padded
    prompt_mask: torch.Tensor  # [N, P]
    completion_ids: torch.Tensor  # [N, C] model and environment tokens after the prompt, right-padded
    completion_attention: torch.Tensor  # [N, C] 1 on every real token
    loss_mask: torch.Tensor  # [N, C] 1 on the model's tokens only
    logprobs: torch.Tensor  # [N, C] sampling-time policy log-probs of the model's tokens (0 elsewhere)
    turn_index: torch.Tensor  # [N, C] the assistant turn each model token belongs to, -1 elsewhere
    num_turns: list[int]
    tool_calls: list[int]  # parsed calls per episode (valid or not)
    malformed_calls: list[int]  # turns whose call text does not parse (bad JSON, no name...)
    invalid_calls: list[int]  # parsed calls that name an unknown tool or miss a required argument
    tool_errors: list[int]  # tool results the environment marked "error": True
    truncated: list[bool]  # ended by max_turns / max_new_tokens / max_length rather than by the environment
    group_size: int = 1
    time_s: float = 0.0

    def __len__(self) -> int:
        return len(self.messages)

    @property
    def finished(self) -> torch.Tensor:
        """[N] bool: ended by the environment (not by max_turns, max_new_tokens or max_length)."""
        return ~torch.tensor(self.truncated, dtype=torch.bool)

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.completion_ids], 1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.completion_attention], 1)

    def batch(self) -> dict:
        """Model inputs in the shape of `Rollout.batch()`: ``completion_mask`` is the loss mask."""
        am = self.attention_mask
        return {"input_ids": self.input_ids, "attention_mask": am, "position_ids": (am.cumsum(-1) - 1).clamp(min=0),
                "completion_mask": self.loss_mask, "logprobs": self.logprobs}

    def metrics(self) -> dict:
        n = max(1, len(self))
        attempts = sum(self.tool_calls) + sum(self.malformed_calls)
        turns = sum(self.num_turns)
        return {"episode_reward": float(self.rewards.mean()) if len(self) else 0.0,
                "turns_per_episode": turns / n,
                "tool_calls_per_episode": sum(self.tool_calls) / n,
                "invalid_call_rate": (sum(self.invalid_calls) + sum(self.malformed_calls)) / max(1, attempts),
                "tool_errors_per_episode": sum(self.tool_errors) / n,
                "reward_per_turn": float(self.rewards.sum()) / max(1, turns),
                "truncated_frac": sum(self.truncated) / n,
                "completion_length": float(self.loss_mask.sum()) / n,  # the model's tokens per episode
                "env_tokens_per_episode": float((self.completion_attention - self.loss_mask).sum()) / n}


@dataclass
class _Episode:
    env: Environment
    messages: list[dict]
    ids: list[int]  # everything after the opening prompt
    prompt: list[int]
    loss: list[int] = field(default_factory=list)
    logps: list[float] = field(default_factory=list)
    turn: list[int] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    calls: int = 0
    malformed: int = 0
    invalid: int = 0
    errors: int = 0
    truncated: bool = False
    done: bool = False


ENVIRONMENTS = {"gym:lookup": "posttrain.gym.lookup:LookupEnv"}


def resolve_environment(spec: str) -> Callable[[], Environment]:
    """The environment class (a no-argument factory) named by ``spec``: a registered name
    (``ENVIRONMENTS``: ``gym:lookup``) or ``module:Class``."""
    path = ENVIRONMENTS.get(spec, spec)
    mod, _, cls = path.partition(":")
    if not mod or not cls:
        raise ValueError(f"environment {spec!r}: give a registered name ({', '.join(ENVIRONMENTS)}) or 'module:Class'")
    try:
        return getattr(importlib.import_module(mod), cls)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"environment {spec!r}: cannot import it ({e})") from None


def _render(tokenizer, messages: list[dict], tools, generation_prompt: bool) -> str:
    if generation_prompt:
        return render_prompt(tokenizer, messages, tools)
    msgs, tls = prepare(tokenizer, messages, tools)
    return tokenizer.apply_chat_template(msgs, tools=tls, tokenize=False, add_generation_prompt=False)


def environment_text(tokenizer, before: list[dict], turn: dict, new: list[dict], tools) -> str:
    """The text the template writes after the assistant ``turn``'s end-of-turn marker: the ``new``
    messages and the next generation prompt. Raises ValueError for a template that rewrites history
    (the rendering with ``new`` does not extend the rendering without it)."""
    upto = _render(tokenizer, before + [turn], tools, False).rstrip()
    full = _render(tokenizer, before + [turn] + new, tools, True)
    marker = end_of_turn_marker(tokenizer)
    if not full.startswith(upto) or (marker and not upto.endswith(marker)):
        raise ValueError("episodes: the chat template does not render a conversation as an extension of its "
                         "earlier turns (it rewrites history), so the environment's tokens cannot be appended; "
                         "use a template with the prefix property (docs/rl.md)")
    return full[len(upto):]


def _tool_table(tools) -> dict[str, list[str]]:
    table = {}
    for t in tools or []:
        fn = t.get("function", t)
        table[fn["name"]] = list((fn.get("parameters") or {}).get("required") or [])
    return table


def _assistant_turn(text: str, parse_calls: ParseCalls, table: dict) -> tuple[dict, int, int, int]:
    """The assistant message for `text`, and its (parsed calls, malformed call texts, invalid calls)."""
    try:
        calls = parse_calls(text)
    except ValueError:
        return {"role": "assistant", "content": text}, 0, 1, 0
    if not calls:
        return {"role": "assistant", "content": text}, 0, 0, 0
    bad = sum(1 for c in calls if c["name"] not in table or any(k not in c["arguments"] for k in table[c["name"]]))
    turn = {"role": "assistant", "content": _CALL_BLOCK.sub("", text).strip(),
            "tool_calls": [{"type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
                           for c in calls]}
    return turn, len(calls), 0, bad


def run_episodes(engine: RolloutEngine, rows: Sequence[dict], make_env: Callable[[], Environment],
                 params: SamplingParams, *, parse_calls: ParseCalls = documented_calls, group_size: int = 1,
                 max_turns: int = 4, max_length: Optional[int] = None) -> Episodes:
    """Play ``group_size`` episodes per row (episode i * group_size + j is sample j of row i).

    ``params.n`` must be 1 (groups come from ``group_size``); when a seed is given, turn t samples
    with seed ``params.seed * 1_000_003 + t``, so consecutive seeds (rollouts) never share a turn's stream.
    """
    if params.n != 1:
        raise ValueError(f"run_episodes: params.n must be 1 (use group_size for several episodes per row), "
                         f"got {params.n}")
    if max_turns < 1:
        raise ValueError(f"run_episodes: max_turns must be >= 1, got {max_turns}")
    tok = engine.tokenizer
    eps: list[_Episode] = []
    for row in rows:
        for _ in range(group_size):
            env = make_env()
            msgs = list(env.reset(row))
            prompt = tok(render_prompt(tok, msgs, env.tools), add_special_tokens=False)["input_ids"]
            eps.append(_Episode(env, msgs, [], prompt))
    time_s = 0.0
    for t in range(max_turns):
        live = [e for e in eps if not e.done]
        if not live:
            break
        p = dataclasses.replace(params, seed=None if params.seed is None else (params.seed * 1_000_003 + t) % 2**63)
        ro = engine.generate([e.prompt + e.ids for e in live], p)
        time_s += ro.time_s
        for r, e in enumerate(live):
            L = int(ro.completion_mask[r].sum())
            e.ids += ro.completion_ids[r, :L].tolist()
            e.loss += [1] * L
            e.logps += ro.policy_logprobs[r, :L].tolist()
            e.turn += [t] * L
            table = _tool_table(e.env.tools)
            turn, calls, malformed, invalid = _assistant_turn(ro.completions[r], parse_calls, table)
            e.calls, e.malformed, e.invalid = e.calls + calls, e.malformed + malformed, e.invalid + invalid
            new, reward, done = e.env.step(list(e.messages), turn)
            e.rewards.append(float(reward))
            e.errors += sum(1 for m in new if m.get("error"))
            before = e.messages
            e.messages = before + [turn] + list(new)
            cut = ro.stop_reasons[r] == "length"
            if done or cut or t == max_turns - 1:
                e.done, e.truncated = True, cut or not done
                continue
            env_ids = tok(environment_text(tok, before, turn, list(new), e.env.tools),
                          add_special_tokens=False)["input_ids"]
            if max_length is not None and len(e.prompt) + len(e.ids) + len(env_ids) >= max_length:
                e.done, e.truncated = True, True
                continue
            e.ids += env_ids
            e.loss += [0] * len(env_ids)
            e.logps += [0.0] * len(env_ids)
            e.turn += [-1] * len(env_ids)
    return _collate(eps, engine.pad_id, group_size, time_s)


def _collate(eps: list[_Episode], pad_id: int, group_size: int, time_s: float) -> Episodes:
    N = len(eps)
    P = max(len(e.prompt) for e in eps)
    C = max(1, max(len(e.ids) for e in eps))
    pids = torch.full((N, P), pad_id, dtype=torch.long)
    pmask = torch.zeros((N, P), dtype=torch.long)
    cids = torch.full((N, C), pad_id, dtype=torch.long)
    catt = torch.zeros((N, C), dtype=torch.long)
    loss = torch.zeros((N, C), dtype=torch.long)
    lp = torch.zeros((N, C))
    turn = torch.full((N, C), -1, dtype=torch.long)
    for i, e in enumerate(eps):
        pids[i, P - len(e.prompt):] = torch.tensor(e.prompt, dtype=torch.long)
        pmask[i, P - len(e.prompt):] = 1
        L = len(e.ids)
        if L:
            cids[i, :L] = torch.tensor(e.ids, dtype=torch.long)
            catt[i, :L] = 1
            loss[i, :L] = torch.tensor(e.loss, dtype=torch.long)
            lp[i, :L] = torch.tensor(e.logps)
            turn[i, :L] = torch.tensor(e.turn, dtype=torch.long)
    return Episodes(messages=[e.messages for e in eps], rewards=torch.tensor([sum(e.rewards) for e in eps]),
                    turn_rewards=[e.rewards for e in eps], prompt_ids=pids, prompt_mask=pmask, completion_ids=cids,
                    completion_attention=catt, loss_mask=loss, logprobs=lp, turn_index=turn,
                    num_turns=[len(e.rewards) for e in eps], tool_calls=[e.calls for e in eps],
                    malformed_calls=[e.malformed for e in eps], invalid_calls=[e.invalid for e in eps],
                    tool_errors=[e.errors for e in eps], truncated=[e.truncated for e in eps],
                    group_size=group_size, time_s=time_s)
