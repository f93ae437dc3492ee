"""Constitutional AI (Bai et al. 2022): critique and revision (SFT data) and AI-feedback comparisons (RLAIF).

Critique and revision, for each prompt: the model answers; a principle is drawn at random; the
model critiques its answer against it; then revises. The revision becomes an SFT row.

Comparisons, for each prompt: two answers are sampled; the model is asked which follows a random
principle better, and the answer is read from the log-probabilities of the two choice tokens
(" A" / " B") after the comparison prompt, never from generated text. Both orders are scored to
cancel position bias (Lee et al. 2023), and the pair becomes a preference row.

Every row keeps its provenance under `cai`: principle, model, templates, raw critique, log-probs.
"""

from __future__ import annotations

import random
from typing import Optional, Sequence

import torch

from posttrain.cai.constitution import Principle, principle_dict, templates_id
from posttrain.rollout import RolloutEngine, SamplingParams, completion_logprobs


def prompt_messages(row: dict) -> list[dict]:
    """The conversation to answer: `prompt` (text or messages) or `messages` before the last assistant turn."""
    if isinstance(row.get("prompt"), str):
        return [{"role": "user", "content": row["prompt"]}]
    if isinstance(row.get("prompt"), list):
        return list(row["prompt"])
    msgs = row.get("messages")
    if isinstance(msgs, list) and msgs:
        cut = max((i for i, m in enumerate(msgs) if m.get("role") == "assistant"), default=len(msgs))
        if cut > 0:
            return list(msgs[:cut])
    raise ValueError(f"a prompt row needs `prompt` (text or messages) or `messages`, got fields {sorted(row)}")


def _last_user(messages: list[dict]) -> str:
    return next((m["content"] for m in reversed(messages) if m.get("role") == "user"), "")


def _chat(tok, messages: list[dict], prefix: str = "") -> str:
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + prefix


def _generate(engine: RolloutEngine, texts: list[str], params: SamplingParams) -> list[str]:
    return [c.strip() for c in engine.generate(texts, params).completions]


def critique_and_revise(model, tokenizer, prompts: Sequence[dict], principles: Sequence[Principle], templates: dict, *,
                        model_name: str, seed: int = 0, max_new_tokens: int = 64, temperature: float = 0.0,
                        batch_size: int = 32, stats: Optional[dict] = None) -> list[dict]:
    """SFT rows `{"messages": [...prompt, revised answer], "cai": provenance}`, one per prompt.

    A prompt whose revision is empty gives no row (SFT cannot train on it); counted in `stats`.
    """
    rng = random.Random(seed)
    engine = RolloutEngine(model, tokenizer, batch_size=batch_size)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    convs = [prompt_messages(r) for r in prompts]
    drawn = [rng.choice(list(principles)) for _ in convs]
    answers = _generate(engine, [_chat(tokenizer, c) for c in convs], params)
    crit_req = [(p.critique or templates["critique"]).format(principle=p.text, prompt=_last_user(c), response=a)
                for p, c, a in zip(drawn, convs, answers)]
    crit_convs = [[*c, {"role": "assistant", "content": a}, {"role": "user", "content": q}]
                  for c, a, q in zip(convs, answers, crit_req)]
    critiques = _generate(engine, [_chat(tokenizer, c) for c in crit_convs], params)
    rev_req = [(p.revision or templates["revision"]).format(principle=p.text, prompt=_last_user(c), response=a,
                                                            critique=k)
               for p, c, a, k in zip(drawn, convs, answers, critiques)]
    rev_convs = [[*cc, {"role": "assistant", "content": k}, {"role": "user", "content": q}]
                 for cc, k, q in zip(crit_convs, critiques, rev_req)]
    revisions = _generate(engine, [_chat(tokenizer, c) for c in rev_convs], params)
    rows = []
    st = stats if stats is not None else {}
    st.update(prompts=len(convs), empty_revision=sum(not rv for rv in revisions))
    for i, (c, p, a, q, k, rq, rv) in enumerate(zip(convs, drawn, answers, crit_req, critiques, rev_req, revisions)):
        if not rv:
            continue
        rows.append({"messages": [*c, {"role": "assistant", "content": rv}],
                     "cai": {"kind": "critique_revision", "index": i, "principle": principle_dict(p), "model": model_name,
                             "initial_response": a, "critique_request": q, "critique": k, "revision_request": rq,
                             "revision": rv, "revised": rv != a, "templates": templates_id(templates),
                             "seed": seed, "sampling": {"temperature": temperature, "max_new_tokens": max_new_tokens}}})
    return rows


@torch.no_grad()
def choice_logprobs(model, tokenizer, prompt_texts: Sequence[str], choices: Sequence[str],
                    batch_size: int = 32) -> torch.Tensor:
    """log p(choice | prompt) summed over the choice's tokens, [len(prompt_texts), len(choices)].

    One forward pass per (prompt, choice) row through `posttrain.rollout.completion_logprobs`
    (prompt left-padded, choice right-padded), so multi-token choices are scored exactly too.
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    choice_ids = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in choices]
    rows = [(tokenizer(t, add_special_tokens=False)["input_ids"], ci) for t in prompt_texts for ci in choice_ids]
    device = next(model.parameters()).device
    out = []
    for s in range(0, len(rows), batch_size):
        chunk = rows[s:s + batch_size]
        P, C = max(len(p) for p, _ in chunk), max(len(c) for _, c in chunk)
        ids = torch.full((len(chunk), P + C), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        cmask = torch.zeros((len(chunk), C), dtype=torch.long)
        for r, (p, c) in enumerate(chunk):
            ids[r, P - len(p):P] = torch.tensor(p)
            ids[r, P:P + len(c)] = torch.tensor(c)
            mask[r, P - len(p):P + len(c)] = 1
            cmask[r, :len(c)] = 1
        batch = {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0),
                 "completion_mask": cmask}
        out.append(completion_logprobs(model, {k: v.to(device) for k, v in batch.items()}).sum(-1).float().cpu())
    return torch.cat(out).view(len(prompt_texts), len(choices))


def first_preferred(lp_order1: torch.Tensor, lp_order2: torch.Tensor) -> torch.Tensor:
    """P(answer 1 is better), averaged over both presentation orders, [N].

    With l = log p(choice | comparison prompt) and answer 1 shown as (A) in order 1, as (B) in order 2:

        p1 = exp(l1_A) / (exp(l1_A) + exp(l1_B))        (order 1: A = answer 1)
        p2 = exp(l2_B) / (exp(l2_A) + exp(l2_B))        (order 2: B = answer 1)
        P(answer 1 better) = (p1 + p2) / 2

    Args: lp_order1, lp_order2: [N, 2] log-probs of the choices (A, B).
    """
    p1 = torch.softmax(lp_order1, -1)[:, 0]
    p2 = torch.softmax(lp_order2, -1)[:, 1]
    return (p1 + p2) / 2


def compare_pairs(model, tokenizer, prompts: Sequence[dict], principles: Sequence[Principle], templates: dict, *,
                  model_name: str, seed: int = 0, max_new_tokens: int = 64, temperature: float = 1.0,
                  min_confidence: float = 0.0, batch_size: int = 32, stats: Optional[dict] = None) -> list[dict]:
    """Preference rows `{"prompt", "chosen", "rejected", "cai"}` from AI feedback on two sampled answers.

    Pairs whose two answers are identical or one empty are skipped; so are pairs whose confidence
    |2 P(answer 1 better) - 1| is below `min_confidence`. Counts go to `stats`.
    """
    if temperature <= 0:
        raise ValueError("compare_pairs samples two different answers: temperature must be > 0")
    rng = random.Random(seed)
    engine = RolloutEngine(model, tokenizer, batch_size=batch_size)
    convs = [prompt_messages(r) for r in prompts]
    ro = engine.generate([_chat(tokenizer, c) for c in convs],
                         SamplingParams(n=2, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed))
    samples = [c.strip() for c in ro.completions]
    drawn = [rng.choice(list(principles)) for _ in convs]
    texts = []
    for i, (c, p) in enumerate(zip(convs, drawn)):
        a1, a2 = samples[2 * i], samples[2 * i + 1]
        for a, b in ((a1, a2), (a2, a1)):
            q = templates["compare"].format(principle=p.text, prompt=_last_user(c), a=a, b=b)
            texts.append(_chat(tokenizer, [*c[:-1], {"role": "user", "content": q}],
                               templates["compare_prefix"].format(principle=p.text)))
    lp = choice_logprobs(model, tokenizer, texts, templates["choices"], batch_size=batch_size).view(len(convs), 2, 2)
    p_first = first_preferred(lp[:, 0], lp[:, 1])
    st = stats if stats is not None else {}
    st.update(prompts=len(convs), identical=0, empty=0, low_confidence=0, pairs=0)
    rows = []
    for i, (c, p) in enumerate(zip(convs, drawn)):
        a1, a2 = samples[2 * i], samples[2 * i + 1]
        if a1 == a2:
            st["identical"] += 1
            continue
        if not a1 or not a2:
            st["empty"] += 1
            continue
        pf = float(p_first[i])
        if abs(2 * pf - 1) < min_confidence:
            st["low_confidence"] += 1
            continue
        chosen, rejected = (a1, a2) if pf >= 0.5 else (a2, a1)
        rows.append({"prompt": c, "chosen": [{"role": "assistant", "content": chosen}],
                     "rejected": [{"role": "assistant", "content": rejected}],
                     "cai": {"kind": "rlaif", "index": i, "principle": principle_dict(p), "model": model_name,
                             "answers": [a1, a2], "p_first_better": round(pf, 6),
                             "confidence": round(abs(2 * pf - 1), 6), "choices": list(templates["choices"]),
                             "choice_logprobs": {"order_1": lp[i, 0].tolist(), "order_2": lp[i, 1].tolist()},
                             "compare_prompt": texts[2 * i], "templates": templates_id(templates), "seed": seed,
                             "sampling": {"temperature": temperature, "max_new_tokens": max_new_tokens}}})
        st["pairs"] += 1
    return rows
