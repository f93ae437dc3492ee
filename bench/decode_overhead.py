"""How much of a decode step is transformers' module overhead? The bundled Qwen2 model decodes greedily
through `model(...)` (what the rollout engine calls) and through a hand-written step that runs the
same ops in the same order (embedding, the causal mask from transformers' `create_causal_mask`, RoPE,
per layer RMSNorm / q,k,v / `apply_rotary_pos_emb` / `cache.update` / transformers' own sdpa function /
o_proj / RMSNorm / SwiGLU, the final norm and the head at the last position) without the module calls.

    python bench/decode_overhead.py [--rows 64 16 4] [--prompt 40] [--tokens 48] [--repeats 10]

Prints one JSON line per row count: whether the greedy tokens and the last logits are bitwise equal,
the median decode time of each side (sides alternated, one process) and their ratio, with the load
average. Measured numbers: docs/benchmarks.md, "Rollout generation at 64 and 128 sequences".
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import create_causal_mask
from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

import posttrain
from posttrain import gym


def _rms(norm, h):
    dtype = h.dtype
    h = h.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return norm.weight * h.to(dtype)


def lean_step(model, ids, attention_mask, position_ids, cache):
    """One decode step of a Qwen2/Llama-shaped model as bare ops (the logits of the last position)."""
    m = model.model
    h = F.embedding(ids, m.embed_tokens.weight, m.embed_tokens.padding_idx)
    mask = create_causal_mask(config=m.config, inputs_embeds=h, attention_mask=attention_mask, cache=cache,
                              position_ids=position_ids)
    cos, sin = m.rotary_emb(h, position_ids)
    for layer in m.layers:
        a, mlp = layer.self_attn, layer.mlp
        x = _rms(layer.input_layernorm, h)
        shape = (*x.shape[:-1], -1, a.head_dim)
        q = F.linear(x, a.q_proj.weight, a.q_proj.bias).view(shape).transpose(1, 2)
        k = F.linear(x, a.k_proj.weight, a.k_proj.bias).view(shape).transpose(1, 2)
        v = F.linear(x, a.v_proj.weight, a.v_proj.bias).view(shape).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        k, v = cache.update(k, v, a.layer_idx)
        o, _ = sdpa_attention_forward(a, q, k, v, mask, dropout=0.0, scaling=a.scaling, sliding_window=a.sliding_window)
        h = h + F.linear(o.reshape(*x.shape[:-1], -1).contiguous(), a.o_proj.weight, a.o_proj.bias)
        x = _rms(layer.post_attention_layernorm, h)
        h = h + F.linear(mlp.act_fn(F.linear(x, mlp.gate_proj.weight)) * F.linear(x, mlp.up_proj.weight),
                         mlp.down_proj.weight)
    return F.linear(_rms(m.norm, h)[:, -1:], model.lm_head.weight)[:, -1]


def decode(model, ids, mask, tokens: int, lean: bool):
    P = ids.shape[1]
    pos = (mask[:, :P].cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        logits = model(input_ids=ids, attention_mask=mask[:, :P], position_ids=pos, cache=cache, use_cache=True,
                       logits_to_keep=1).logits[:, -1]
        nxt, out = pos[:, -1] + 1, []
        t0 = time.perf_counter()
        for t in range(tokens):
            tok = logits.argmax(-1)
            out.append(tok)
            args = (tok[:, None], mask[:, :P + t + 1], nxt[:, None], cache)
            logits = lean_step(model, *args) if lean else model(
                input_ids=args[0], attention_mask=args[1], position_ids=args[2], cache=cache, use_cache=True).logits[:, -1]
            nxt = nxt + 1
        return torch.stack(out, 1), logits, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[64, 16, 4])
    ap.add_argument("--prompt", type=int, default=40)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=10)
    a = ap.parse_args()
    model, _ = posttrain.load(str(gym.base_model_path()))
    model.eval()
    for rows in a.rows:
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(5, model.config.vocab_size, (rows, a.prompt), generator=g)
        mask = torch.ones(rows, a.prompt + a.tokens, dtype=torch.long)
        for r in range(rows):  # left padding of 0-6 tokens, as in a batch of prompts of different lengths
            mask[r, : r % 7] = 0
        (t_hf, l_hf, _), (t_lean, l_lean, _) = decode(model, ids, mask, a.tokens, False), decode(model, ids, mask, a.tokens, True)
        times = {False: [], True: []}
        for i in range(a.repeats):
            for lean in ((False, True) if i % 2 == 0 else (True, False)):
                times[lean].append(decode(model, ids, mask, a.tokens, lean)[2])
        hf, lean = statistics.median(times[False]), statistics.median(times[True])
        print(json.dumps({"rows": rows, "prompt": a.prompt, "tokens": a.tokens, "same_tokens": torch.equal(t_hf, t_lean),
                          "same_logits_bitwise": torch.equal(l_hf, l_lean), "hf_s": round(hf, 4), "lean_s": round(lean, 4),
                          "speedup": round(hf / lean, 3), "threads": torch.get_num_threads(),
                          "load_avg": [round(x, 2) for x in os.getloadavg()]}), flush=True)


if __name__ == "__main__":
    main()
