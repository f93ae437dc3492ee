"""What PPO and GRPO share: prompt data, sampling settings, reward functions, the reference model.

RL stages plug into the one engine through `rollout(model, prompt_batch) -> list[list[dict]]`:
the engine hands a batch of prompts, the stage samples and scores it, and returns the micro-
batches of every optimizer step that this rollout feeds (iterations x minibatches).
"""

from __future__ import annotations

import importlib
import math
from contextlib import contextmanager
from typing import Callable, Literal, Optional, Sequence, Union

import torch
from pydantic import Field

from posttrain.config import _Strict
from posttrain.engine.trainer import TrainData

PROMPT_KEYS = ("prompt", "messages")


class SamplingSection(_Strict):
    """Rollout settings shared by `ppo` and `grpo` (see posttrain.rollout.SamplingParams)."""

    max_new_tokens: int = Field(64, gt=0, description="Completion length limit (tokens).")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature; the loss uses the same one.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    top_k: int = Field(0, ge=0, description="Keep the k most likely tokens (0 = off).")
    stop: list[str] = Field(default_factory=list, description="Stop strings (the completion text ends before them).")
    rollout_batch_size: int = Field(64, gt=0, description="Rows per generation batch inside the rollout engine.")
    backend: str = Field("hf", description="Rollout backend (`hf`; others register in posttrain.rollout.BACKENDS).")
    micro_batch_size: int = Field(16, gt=0, description="Rows per forward/backward pass of the update (memory knob; "
                                                       "does not change the result).")
    rewards: list[str] = Field(default_factory=list, description="Reward functions: built-in names "
                               "(posttrain.rewards.REWARDS) or 'module:function'.")
    reward_weights: Optional[list[float]] = Field(None, description="One weight per reward function (default 1 each).")


# ------------------------------------------------------------------ data


def prompt_text(tokenizer, row: dict) -> str:
    """The generation prompt of a row: a `prompt` string as is, or chat messages through the template.

    A conversational row (`messages`) whose last turn is the assistant's is prompted with the
    turns before it, so SFT data can be reused as RL prompts.
    """
    if isinstance(row.get("prompt"), str):
        return row["prompt"]
    msgs = row.get("prompt") if isinstance(row.get("prompt"), list) else row.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ValueError(f"row has no prompt: give a 'prompt' (text or messages) or 'messages'; keys: {sorted(row)}")
    if msgs[-1].get("role") == "assistant" and "prompt" not in row:
        msgs = msgs[:-1]
    from posttrain.data.tools import render_prompt  # tools in the template's way, or the documented fallback

    return render_prompt(tokenizer, msgs, row.get("tools"))


def prompt_data(cfg, tokenizer) -> TrainData:
    """RL data: rows with a prompt; every other column is handed to the reward functions."""
    from posttrain.data.sources import read_records

    if not cfg.data.train:
        raise ValueError(f"{cfg.stage}: no prompts: set data.train (a file, a list of files, or gym:TASK)")

    def read(src, split):
        srcs = src if isinstance(src, list) else [src]
        rows = []
        for s in srcs:
            for rec in read_records(s, split=split):
                if not any(k in rec.data for k in PROMPT_KEYS):
                    raise ValueError(f"{rec.origin}: no 'prompt' or 'messages' column to prompt the policy with")
                rows.append({**rec.data, "_prompt": prompt_text(tokenizer, rec.data)})
        return rows

    train = read(cfg.data.train, "train")
    if cfg.data.limit:
        train = train[:cfg.data.limit]
    if len(train) < cfg.train.batch_size:
        raise ValueError(f"{cfg.stage}: {len(train)} prompts is fewer than train.batch_size={cfg.train.batch_size}")
    return TrainData(train=train, collate=lambda rows: {"rows": list(rows)},
                     stats={"prompts": len(train)})


def columns(rows: list[dict]) -> dict[str, list]:
    """Dataset columns for reward functions: every key except the prompt fields."""
    keys = [k for k in rows[0] if k not in ("_prompt",)]
    return {k: [r.get(k) for r in rows] for k in keys if k not in ("prompt",)}


# ------------------------------------------------------------------ rewards


def resolve_reward(spec: Union[str, Callable]) -> tuple[str, Callable]:
    """A reward function from a built-in name, 'module:function', 'gym:TASK' (the task's verifier) or a callable."""
    if callable(spec):
        return getattr(spec, "__name__", "reward"), spec
    if spec.startswith("gym:"):
        from posttrain import gym

        return f"gym_{spec[4:]}", gym.verifier_reward(spec[4:])
    if ":" in spec:
        mod, _, fn = spec.partition(":")
        try:
            return fn, getattr(importlib.import_module(mod), fn)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"reward {spec!r}: cannot import it ({e})") from None
    from posttrain.rewards import get_reward

    return spec, get_reward(spec)


class RewardSet:
    """Several reward functions with weights: r = sum_k w_k r_k over the applicable ones (None skipped).

    A row for which no function applies scores 0 and is counted in `reward_none`.
    """

    def __init__(self, specs: Sequence[Union[str, Callable]], weights: Optional[Sequence[float]] = None):
        self.fns = [resolve_reward(s) for s in specs]
        if weights is not None and len(weights) != len(self.fns):
            raise ValueError(f"reward_weights has {len(weights)} values for {len(self.fns)} reward functions")
        self.weights = [1.0] * len(self.fns) if weights is None else [float(w) for w in weights]

    def __len__(self) -> int:
        return len(self.fns)

    def __call__(self, prompts: list, completions: list[str], cols: dict) -> tuple[torch.Tensor, dict]:
        total = [0.0] * len(completions)
        applied = [False] * len(completions)
        metrics: dict[str, float] = {}
        for (name, fn), w in zip(self.fns, self.weights):
            vals = fn(prompts, completions, **cols)
            if len(vals) != len(completions):
                raise ValueError(f"reward {name!r} returned {len(vals)} values for {len(completions)} completions")
            got = [float(v) for v in vals if v is not None]
            if any(not math.isfinite(v) for v in got):
                raise ValueError(f"reward {name!r} returned a non-finite value")
            metrics[f"reward/{name}"] = sum(got) / len(got) if got else float("nan")
            for i, v in enumerate(vals):
                if v is not None:
                    total[i] += w * float(v)
                    applied[i] = True
        metrics["reward_none"] = float(sum(not a for a in applied))
        return torch.tensor(total), metrics


# ------------------------------------------------------------------ reference model


def load_reference(cfg, model):
    """The frozen reference policy: the adapter-disabled base when training an adapter (no copy),
    otherwise a fresh frozen copy of `cfg.model` (the starting weights, also after a resume)."""
    if cfg.adapter.type != "none":
        return None
    from posttrain.models.loading import load

    ref, _ = load(cfg.model, dtype="fp32", device=str(next(model.parameters()).device),
                  trust_remote_code=cfg.trust_remote_code, allow_pickle=cfg.allow_pickle)
    return ref.eval().requires_grad_(False)


@contextmanager
def reference_of(model, ref):
    """Run the reference inside the block: `ref` if given, else `model` with its adapter disabled."""
    if ref is not None:
        yield ref
        return
    from posttrain.models.adapters import disabled

    with disabled(model):
        yield model


# ------------------------------------------------------------------ batching


def minibatch_indices(n_rows: int, minibatches: int, generator: torch.Generator) -> list[torch.Tensor]:
    """A random split of the rollout's rows into `minibatches` near-equal parts."""
    if minibatches > n_rows:
        raise ValueError(f"{minibatches} minibatches for a rollout of {n_rows} rows; lower the minibatch count")
    perm = torch.randperm(n_rows, generator=generator)
    return [p for p in torch.tensor_split(perm, minibatches)]


def micro_batches(tensors: dict, rows: torch.Tensor, size: int, extra: Optional[dict] = None) -> list[dict]:
    """Cut `rows` of the per-row tensors into micro-batches of at most `size` rows, trimming the
    columns that are padding in every row of a micro-batch (prompt left padding, completion tail)."""
    out = []
    for part in torch.split(rows, size):
        b = {k: v[part] for k, v in tensors.items()}
        am, cm = b["attention_mask"], b["completion_mask"]
        C = cm.shape[1]
        keep_c = int(cm.any(0).nonzero().max()) + 1 if cm.any() else 1
        P = am.shape[1] - C
        first = int(am[:, :P].any(0).nonzero().min()) if am[:, :P].any() else 0
        seq = list(range(first, P)) + list(range(P, P + keep_c))
        idx = torch.tensor(seq)
        for k in ("input_ids", "attention_mask", "position_ids"):
            b[k] = b[k][:, idx]
        for k, v in list(b.items()):
            if k not in ("input_ids", "attention_mask", "position_ids") and v.dim() == 2 and v.shape[1] == C:
                b[k] = v[:, :keep_c]
        b["num_real_tokens"] = int(b["attention_mask"].sum())
        if extra:
            b.update(extra)
        out.append(b)
    return out


def autocast_for(cfg, device):
    if cfg.train.precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    from contextlib import nullcontext

    return nullcontext()


Aggregation = Literal["grpo", "dr_grpo", "dapo"]
