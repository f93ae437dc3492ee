"""Model-agnostic forgetting measures: drift from the base, and general-text perplexity change.

Neither needs a task with answers, so both work on any causal LM checkpoint, offline.

**Drift** is KL(base ‖ tuned) per token, measured where the base model is at home: on its own
greedy continuations of a bundled set of general prompts (`eval/prompts/general.jsonl`, 300 rows
we wrote: instructions, questions, code, arithmetic and chat, each in a plain-text and a chat
form). The base's continuations and its next-token distributions at every continuation position
are computed once per base model and cached; each check is then one teacher-forced forward of the
tuned model. For memory, the cache keeps the base's `top_k` most likely tokens per position and
lumps the rest of the vocabulary into one "tail" bucket, and KL is taken between those k + 1
bucket probabilities:

    KL_k(p ‖ q) = Σ_{i in top-k(p)} p_i (log p_i − log q_i) + p_tail (log p_tail − log q_tail)

with p_tail = 1 − Σ p_i and q_tail = 1 − Σ q_i over the same k ids. Merging outcomes never
increases a KL divergence (the data-processing inequality), so KL_k is a lower bound on the full
KL, equal to it when k covers the vocabulary (`tests/eval/test_drift.py` pins both); with k = 64
it was 99.0-99.2% of the full KL on three calibration runs of the bundled model (docs/eval.md). The reported value is
the mean over continuation tokens, in nats, with the standard error over prompts.

**Perplexity change** is ppl(tuned) / ppl(base) − 1 on held-out general text: the user's
`data.mix` data when given, else `eval/prompts/general_text.jsonl` (212 short paragraphs we
wrote). Positive means the tuned model finds general text less likely than the base did.

    ref = drift_reference(model, tokenizer)           # the base: adapters disabled; cached
    drift(model, ref)  -> {"drift_kl": 0.031, "drift_kl_stderr": 0.002, "drift_tokens": 9420, ...}
    text = text_reference(model, tokenizer)           # the base's perplexity on general text
    perplexity_change(model, text) -> {"general_ppl": 21.4, "general_ppl_base": 20.9, "general_ppl_change": 0.024}

The cache lives in `$POSTTRAIN_CACHE/drift/` (default `~/.cache/posttrain/drift/`), one
safetensors file per key; the key hashes the base weights' fingerprint (shapes and a strided sample
of every tensor), the tokenizer's vocabulary and chat template, the prompt file and the settings, so
a different base model, template or prompt set never reuses a stale entry.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from posttrain.models import adapters
from posttrain.rollout import RolloutEngine, SamplingParams

PROMPTS_DIR = Path(__file__).parent / "prompts"
GENERAL_PROMPTS = PROMPTS_DIR / "general.jsonl"
GENERAL_TEXT = PROMPTS_DIR / "general_text.jsonl"
CACHE_VERSION = 1


def cache_dir() -> Path:
    """Where base-model references are cached: `$POSTTRAIN_CACHE/drift`, default `~/.cache/posttrain/drift`."""
    root = os.environ.get("POSTTRAIN_CACHE") or Path.home() / ".cache" / "posttrain"
    return Path(root) / "drift"


# ---------------------------------------------------------------- prompts


def load_prompts(path: Union[str, Path] = GENERAL_PROMPTS) -> list[dict]:
    """The rows of a prompt file: {"id", "kind", "form": "plain", "prompt"} or {..., "form": "chat", "messages"}."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {n}: not JSON ({e.msg})") from None
            if row.get("form") == "chat" and not isinstance(row.get("messages"), list):
                raise ValueError(f"{path} line {n}: a chat row needs a 'messages' list")
            if row.get("form") != "chat" and not isinstance(row.get("prompt"), str):
                raise ValueError(f"{path} line {n}: a plain row needs a 'prompt' string")
            rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no prompts")
    return rows


def encode_prompts(tokenizer, rows: Sequence[dict]) -> list[list[int]]:
    """Token ids per prompt: plain rows as text (with the tokenizer's BOS if it adds one), chat rows
    through the chat template with the generation prompt. Chat rows are skipped without a template."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    out = []
    for row in rows:
        if row.get("form") == "chat":
            if not has_template:
                continue
            text = tokenizer.apply_chat_template(row["messages"], tokenize=False, add_generation_prompt=True)
            out.append(list(tokenizer(text, add_special_tokens=False)["input_ids"]))
        else:
            out.append(list(tokenizer(row["prompt"], add_special_tokens=True)["input_ids"]))
    return [ids for ids in out if ids]


def subset(rows: Sequence[dict], n: Optional[int]) -> list[dict]:
    """`n` rows spread evenly over the file (every kind and both forms keep their share); all when n is None."""
    rows = list(rows)
    if n is None or n >= len(rows):
        return rows
    if n < 1:
        raise ValueError(f"the number of drift prompts must be >= 1, got {n}")
    return [rows[math.floor(i * len(rows) / n)] for i in range(n)]


# ---------------------------------------------------------------- fingerprints and the cache


def fingerprint(model, tokenizer) -> str:
    """A cheap content hash of the weights the model runs with (adapters disabled), and the tokenizer.

    Hashing every byte of a 7B checkpoint takes minutes; shapes plus 4,096 strided values of each
    tensor tell apart any two checkpoints that training or a different download could produce.
    """
    h = hashlib.sha256()
    skip: set = set()
    if adapters.is_adapted(model):  # the adapter's own weights are not part of the base
        ids = {id(p) for p in adapters.trainable_parameters(model)}
        skip = {n for n, p in model.named_parameters() if id(p) in ids}
    for name, t in model.state_dict(keep_vars=True).items():
        if name in skip:
            continue
        packed = getattr(t, "quantized_data", None)  # an NF4 (QLoRA) weight: sample its 4-bit codes
        flat = (packed if packed is not None else t).detach().reshape(-1)
        step = max(1, flat.numel() // 4096)
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(flat[::step][:4096].float().cpu().numpy().tobytes())
    vocab = tokenizer.get_vocab()
    h.update(json.dumps(sorted(vocab.items())[:: max(1, len(vocab) // 4096)]).encode())
    h.update(str(len(vocab)).encode())
    h.update((getattr(tokenizer, "chat_template", None) or "").encode())
    return h.hexdigest()


def _file_hash(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def reference_key(base_fingerprint: str, rows: Sequence[dict], max_new_tokens: int, top_k: int) -> str:
    """The cache key of a base's reference on these prompt rows with these settings."""
    settings = {"v": CACHE_VERSION, "max_new_tokens": max_new_tokens, "top_k": top_k,
                "prompts": hashlib.sha256(json.dumps(list(rows), sort_keys=True).encode()).hexdigest()}
    return hashlib.sha256((base_fingerprint + json.dumps(settings, sort_keys=True)).encode()).hexdigest()[:32]


def is_cached(base_fingerprint: str, rows: Sequence[dict], max_new_tokens: int, top_k: int) -> bool:
    """Whether the reference of these rows is in the cache (without reading it)."""
    return (cache_dir() / f"{reference_key(base_fingerprint, rows, max_new_tokens, top_k)}.safetensors").exists()


# ---------------------------------------------------------------- the drift reference


@dataclass
class DriftReference:
    """The base model's continuations and its top-k next-token distributions on them.

    sequences[r] = prompt + continuation token ids; n_cont[r] continuation tokens at the end.
    Positions are flattened over rows in order: for row r, the n_cont[r] positions that predict
    its continuation tokens. topk_ids / topk_logp: [positions, k]; tail_logp: [positions]
    (log of the base's probability outside the top k; -inf when k covers everything).
    """

    sequences: list[list[int]]
    n_cont: list[int]
    topk_ids: torch.Tensor
    topk_logp: torch.Tensor
    tail_logp: torch.Tensor
    key: str = ""
    meta: dict = field(default_factory=dict)


def _batches(n: int, size: int):
    for s in range(0, n, size):
        yield range(s, min(s + size, n))


def _continuation_logp(model, sequences: Sequence[list[int]], n_cont: Sequence[int], rows, pad_id: int):
    """Log-softmax of the model at the positions that predict each row's continuation: a list of [n_cont, V]."""
    device = next(model.parameters()).device
    width = max(len(sequences[i]) for i in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, i in enumerate(rows):
        ids[r, :len(sequences[i])] = torch.tensor(sequences[i])
        mask[r, :len(sequences[i])] = 1
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
    out = []
    for r, i in enumerate(rows):
        L, c = len(sequences[i]), n_cont[i]
        out.append(F.log_softmax(logits[r, L - c - 1:L - 1].float(), dim=-1))  # position t predicts t+1
    return out


def _pad_id(tokenizer) -> int:
    for t in (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id):
        if t is not None:
            return t
    return 0


@torch.inference_mode()
def build_drift_reference(model, tokenizer, *, prompts: Optional[Sequence[dict]] = None,
                          n_prompts: Optional[int] = None,
                          max_new_tokens: int = 32, top_k: int = 64, batch_size: int = 16,
                          generation_batch_size: int = 64, cache: bool = True,
                          prompts_path: Union[str, Path] = GENERAL_PROMPTS,
                          base_fingerprint: Optional[str] = None) -> DriftReference:
    """The base's greedy continuations and top-k distributions (from the cache when present).

    The base is `model` with its adapters disabled (`models.adapters.disabled`), so a LoRA run's
    reference is the frozen checkpoint underneath, and a full fine-tune's is the starting weights.
    The continuations are sampled `generation_batch_size` prompts at a time (the guard's 64 prompts in
    one batch: 1.10 s instead of 1.60 s in batches of 16 on the bundled model, the same tokens); the
    top-k forwards run `batch_size` rows at a time, as every later check does. `base_fingerprint`:
    `fingerprint(model, tokenizer)` when the caller has it already (the guard builds its reference in
    pieces, and a full fine-tune's weights have moved from the base by then).
    """
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    rows = subset(prompts if prompts is not None else load_prompts(prompts_path), n_prompts)
    key = reference_key(base_fingerprint or fingerprint(model, tokenizer), rows, max_new_tokens, top_k)
    path = cache_dir() / f"{key}.safetensors"
    if cache and path.exists():
        ref = _load(path)
        if ref is not None:
            return ref
    was = model.training
    model.eval()
    try:
        with adapters.disabled(model):
            prompt_ids = encode_prompts(tokenizer, rows)
            if not prompt_ids:
                raise ValueError("no drift prompts could be encoded (empty prompts, or only chat rows and no "
                                 "chat template)")
            engine = RolloutEngine(model, tokenizer, batch_size=generation_batch_size)
            ro = engine.generate(prompt_ids, SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, seed=0))
            sequences, n_cont = [], []
            for r, p in enumerate(prompt_ids):
                c = int(ro.completion_mask[r].sum())
                if c == 0:
                    continue
                sequences.append(p + ro.completion_ids[r, :c].tolist())
                n_cont.append(c)
            ids, lps, tails = [], [], []
            for rows_b in _batches(len(sequences), batch_size):
                for lp in _continuation_logp(model, sequences, n_cont, list(rows_b), _pad_id(tokenizer)):
                    k = min(top_k, lp.shape[-1])
                    top = lp.topk(k, dim=-1)
                    ids.append(top.indices.to(torch.int32).cpu())
                    lps.append(top.values.cpu())
                    tails.append(_log1mexp(torch.logsumexp(top.values, dim=-1)).cpu())
    finally:
        model.train(was)
    if not sequences:  # every continuation was empty (the base ends each prompt at once): nothing to compare on
        ids, lps, tails = [torch.zeros((0, top_k), dtype=torch.int32)], [torch.zeros((0, top_k))], [torch.zeros(0)]
    ref = DriftReference(sequences, n_cont, torch.cat(ids), torch.cat(lps), torch.cat(tails), key=key,
                         meta={"n_prompts": len(sequences), "max_new_tokens": max_new_tokens, "top_k": top_k})
    if cache:
        _save(ref, path)
    return ref


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − e^x) for x <= 0, stable near 0 (Mächler 2012); -inf at x = 0."""
    x = x.clamp(max=0.0)
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _save(ref: DriftReference, path: Path) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    lengths = torch.tensor([len(s) for s in ref.sequences], dtype=torch.int64)
    flat = torch.tensor([t for s in ref.sequences for t in s], dtype=torch.int64)
    tensors = {"lengths": lengths, "tokens": flat, "n_cont": torch.tensor(ref.n_cont, dtype=torch.int64),
               "topk_ids": ref.topk_ids.contiguous(), "topk_logp": ref.topk_logp.contiguous(),
               "tail_logp": ref.tail_logp.contiguous()}
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    save_file(tensors, str(tmp), metadata={"key": ref.key, "meta": json.dumps(ref.meta)})
    os.replace(tmp, path)  # atomic: a concurrent reader sees the old file or the whole new one


def _load(path: Path) -> Optional[DriftReference]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            t = {k: f.get_tensor(k) for k in f.keys()}
            md = f.metadata() or {}
    except Exception:  # a truncated or foreign file: rebuild rather than fail the run
        return None
    seqs, pos = [], 0
    for n in t["lengths"].tolist():
        seqs.append(t["tokens"][pos:pos + n].tolist())
        pos += n
    return DriftReference(seqs, t["n_cont"].tolist(), t["topk_ids"], t["topk_logp"], t["tail_logp"],
                          key=md.get("key", ""), meta=json.loads(md.get("meta", "{}")))


def bucket_kl(p_topk_logp: torch.Tensor, p_tail_logp: torch.Tensor, q_logp_at_topk: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) per position over the k top-p tokens plus one bucket for the rest of the vocabulary.

    p_topk_logp, q_logp_at_topk: [N, k] log-probs of the same token ids under p and q;
    p_tail_logp: [N] log of p's mass outside them. Returns [N], >= 0.
    """
    p = p_topk_logp.exp()
    head = (p * (p_topk_logp - q_logp_at_topk)).sum(-1)
    # float32 sums of the top-k probabilities can round to 1: keep the logs finite, and drop a tail
    # below 1e-6 (its term is then below 1e-6 · 60 nats; 0 · log(0 / q) = 0 in the limit)
    q_tail = _log1mexp(torch.logsumexp(q_logp_at_topk, dim=-1)).clamp(min=-60.0)
    p_tail = p_tail_logp.exp()
    tail = torch.where(p_tail > 1e-6, p_tail * (p_tail_logp.clamp(min=-60.0) - q_tail), torch.zeros_like(p_tail))
    return (head + tail).clamp(min=0.0)


@torch.inference_mode()
def prompt_kl(model, ref: DriftReference, *, batch_size: int = 16, pad_id: int = 0) -> list[tuple[float, int]]:
    """(sum of KL(base ‖ model) over its continuation tokens, their count) for each prompt of `ref`."""
    was = model.training
    model.eval()
    out = []
    offsets = [0]
    for c in ref.n_cont:
        offsets.append(offsets[-1] + c)
    try:
        for rows in _batches(len(ref.sequences), batch_size):
            rows = list(rows)
            for i, lp in zip(rows, _continuation_logp(model, ref.sequences, ref.n_cont, rows, pad_id)):
                a, b = offsets[i], offsets[i + 1]
                ids = ref.topk_ids[a:b].to(lp.device).long()
                kl = bucket_kl(ref.topk_logp[a:b].to(lp.device), ref.tail_logp[a:b].to(lp.device), lp.gather(-1, ids))
                out.append((float(kl.sum()), b - a))
    finally:
        model.train(was)
    return out


def summarize_kl(per_prompt: Sequence[tuple[float, int]]) -> dict:
    """{"drift_kl": mean over tokens, "drift_kl_stderr": SE over prompts, "drift_kl_max_prompt": the largest
    per-prompt mean, "drift_tokens", "drift_prompts"} of `prompt_kl`'s (sum, tokens) pairs."""
    means = [s / n for s, n in per_prompt]
    n = len(means)
    if not n:
        raise ValueError("no drift prompts to summarize")
    tokens = sum(t for _, t in per_prompt)
    mean_p = sum(means) / n
    se = math.sqrt(sum((x - mean_p) ** 2 for x in means) / (n - 1) / n) if n > 1 else 0.0
    return {"drift_kl": sum(s for s, _ in per_prompt) / max(tokens, 1), "drift_kl_stderr": se,
            "drift_kl_max_prompt": max(means), "drift_tokens": tokens, "drift_prompts": n}


def drift(model, ref: DriftReference, *, batch_size: int = 16, pad_id: int = 0) -> dict:
    """KL(base ‖ model) per continuation token on the reference, in nats (`summarize_kl`'s keys)."""
    return summarize_kl(prompt_kl(model, ref, batch_size=batch_size, pad_id=pad_id))
