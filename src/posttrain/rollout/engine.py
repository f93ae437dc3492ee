"""`RolloutEngine`: prompts in, completions with token ids, log-probs and masks out.

    engine = RolloutEngine(model, tokenizer)
    ro = engine.generate(prompts, SamplingParams(n=4, temperature=1.0, max_new_tokens=64))
    ro.completions        # n * len(prompts) strings; row i*n + j is sample j of prompt i
    ro.input_ids, ro.attention_mask, ro.position_ids   # prompt (left-padded) + completion (right-padded)
    ro.completion_mask    # [N, C] 1 on generated tokens (the EOS / stop token included)
    ro.logprobs           # [N, C] sampling log-probs; ro.policy_logprobs: temperature only
    ro.tokens_per_s
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch

from posttrain.rollout.backend import Backend, make_backend
from posttrain.rollout.sampling import SamplingParams


def default_stop_ids(tokenizer) -> list[int]:
    """EOS, pad and the chat end-of-turn tokens that the tokenizer knows."""
    ids = {tokenizer.eos_token_id, tokenizer.pad_token_id}
    for t in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<end_of_turn>"):
        i = tokenizer.convert_tokens_to_ids(t)
        if isinstance(i, int) and i != tokenizer.unk_token_id:
            ids.add(i)
    return sorted(i for i in ids if i is not None)


@dataclass
class Rollout:
    """One batch of sampled completions, ready for scoring and for a training forward pass."""

    prompts: list[str]  # one per row (repeated n times)
    completions: list[str]  # decoded, special tokens skipped, cut before the first stop string
    prompt_ids: torch.Tensor  # [N, P] left-padded
    prompt_mask: torch.Tensor  # [N, P]
    completion_ids: torch.Tensor  # [N, C] right-padded with pad_id
    completion_mask: torch.Tensor  # [N, C]
    logprobs: torch.Tensor  # [N, C] log-prob of each sampled token under the sampling distribution
    policy_logprobs: torch.Tensor  # [N, C] the same under temperature alone (what training recomputes)
    stop_reasons: list[str]  # "eos" | "stop" | "length" (hit max_new_tokens)
    group_size: int = 1
    adapters: Optional[list[str]] = None
    time_s: float = 0.0
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.completions)

    @property
    def finished(self) -> torch.Tensor:
        """[N] bool: the row ended on its own (EOS or stop string) rather than at the length limit."""
        return torch.tensor([r != "length" for r in self.stop_reasons])

    @property
    def num_tokens(self) -> int:
        return int(self.completion_mask.sum())

    @property
    def tokens_per_s(self) -> float:
        return self.num_tokens / max(self.time_s, 1e-9)

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.completion_ids], 1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.completion_mask], 1)

    @property
    def position_ids(self) -> torch.Tensor:
        return (self.attention_mask.cumsum(-1) - 1).clamp(min=0)

    def batch(self, rows: Optional[Sequence[int]] = None) -> dict:
        """Model inputs for the training forward pass (all rows, or `rows`)."""
        b = {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "position_ids": self.position_ids,
             "completion_mask": self.completion_mask, "logprobs": self.policy_logprobs}
        if rows is not None:
            idx = torch.as_tensor(list(rows), dtype=torch.long)
            b = {k: v[idx] for k, v in b.items()}
        return b


class RolloutEngine:
    """Samples completions from `model` through a backend (`hf` by default)."""

    def __init__(self, model, tokenizer, *, backend: Union[str, Backend] = "hf", batch_size: int = 64,
                 **backend_options):
        """`backend_options` go to the backend's constructor (the hf backend: `merge_adapter`)."""
        self.model = model
        self.tokenizer = tokenizer
        self.backend = make_backend(backend, model, tokenizer, batch_size=batch_size, **backend_options) \
            if isinstance(backend, str) else backend
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def generate(self, prompts: Sequence[Union[str, list[int]]], params: Optional[SamplingParams] = None, *,
                 adapters: Optional[Union[str, Sequence[str]]] = None) -> Rollout:
        """Sample `params.n` completions for every prompt (raw text with special tokens, or token ids).

        `adapters`: one LoRA adapter name for all prompts, or one per prompt (`"none"` = the plain
        base); rows with different adapters share the batch.
        """
        params = params or SamplingParams()
        if not prompts:
            raise ValueError("rollout: no prompts given")
        names = self._adapter_names(adapters, len(prompts))
        prompt_ids = [list(p) if not isinstance(p, str) else self.tokenizer(p, add_special_tokens=False)["input_ids"]
                      for p in prompts]
        stop_ids = (list(params.stop_token_ids) if params.stop_token_ids is not None
                    else default_stop_ids(self.tokenizer))
        t0 = time.perf_counter()
        raw = self.backend.generate(prompt_ids, params, stop_ids=stop_ids, adapters=names)
        dt = time.perf_counter() - t0
        n = params.n
        texts = [p if isinstance(p, str) else self.tokenizer.decode(p) for p in prompts]
        rows_prompt = [prompt_ids[i // n] for i in range(len(raw.tokens))]
        P = max(len(p) for p in rows_prompt)
        C = max(1, max(len(t) for t in raw.tokens))
        N = len(raw.tokens)
        pids = torch.full((N, P), self.pad_id, dtype=torch.long)
        pmask = torch.zeros((N, P), dtype=torch.long)
        cids = torch.full((N, C), self.pad_id, dtype=torch.long)
        cmask = torch.zeros((N, C), dtype=torch.long)
        lp = torch.zeros((N, C))
        lpt = torch.zeros((N, C))
        completions = []
        for r, (p, toks) in enumerate(zip(rows_prompt, raw.tokens)):
            pids[r, P - len(p):] = torch.tensor(p, dtype=torch.long)
            pmask[r, P - len(p):] = 1
            L = len(toks)
            if L:
                cids[r, :L] = torch.tensor(toks, dtype=torch.long)
                cmask[r, :L] = 1
                lp[r, :L] = torch.tensor(raw.logprobs[r])
                lpt[r, :L] = torch.tensor(raw.policy_logprobs[r])
            completions.append(self._text(toks, params.stop))
        return Rollout(prompts=[texts[i // n] for i in range(N)], completions=completions, prompt_ids=pids,
                       prompt_mask=pmask, completion_ids=cids, completion_mask=cmask, logprobs=lp,
                       policy_logprobs=lpt, stop_reasons=list(raw.stop_reasons), group_size=n,
                       adapters=None if names is None else [names[i // n] for i in range(N)], time_s=dt,
                       meta={"backend": self.backend.name})

    def _text(self, toks: list[int], stops: tuple[str, ...]) -> str:
        text = self.tokenizer.decode(toks, skip_special_tokens=True)
        cut = min((text.find(s) for s in stops if s in text), default=-1)
        return text[:cut] if cut >= 0 else text

    @staticmethod
    def _adapter_names(adapters, n_prompts: int) -> Optional[list[str]]:
        if adapters is None:
            return None
        if isinstance(adapters, str):
            return [adapters] * n_prompts
        names = list(adapters)
        if len(names) != n_prompts:
            raise ValueError(f"rollout: {len(names)} adapter names for {n_prompts} prompts; give one per prompt")
        return names
