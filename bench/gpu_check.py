"""GPU check: posttrain against TRL (+PEFT) on a Qwen2-0.5B-shaped model built locally (random
weights, nothing downloaded), one JSON with tokens/s, MFU and peak CUDA memory per row.

    bash bench/gpu_check.sh                       # one H100/H200, about 3-5 minutes (limit 8)
    python bench/gpu_check.py --tiny              # CPU smoke run of every row (a tiny model, seconds)
    python bench/gpu_check.py --rows sft_lora,dpo_lora

Rows (each run by posttrain, then by TRL, alternated; every row starts from the same fresh model):
- `sft_full`, `sft_lora`: 8 rows × 2,048 tokens per step, loss on every token but a 64-token prompt.
  posttrain: `posttrain.models.head.position_nll` (chunked head) in a minimal step (bf16 autocast,
  fp32 master weights, fused AdamW, no gradient checkpointing: posttrain's defaults). TRL:
  `SFTTrainer` at its defaults (bf16, gradient checkpointing on) on the same pre-tokenized rows.
- `dpo_lora`: 4 pairs, chosen and rejected 1,024 tokens each (128-token prompt); the reference is
  the policy with its adapter disabled on both sides. posttrain: `position_logps`; TRL: `DPOTrainer`.
- `grpo_generation`: 16 prompts × 8 samples, 128-token prompts, 256 new tokens each (no early
  stop). posttrain: `RolloutEngine` (hf backend); TRL's default generation path is transformers'
  `model.generate` (no vLLM), which is what its row runs.
- `grpo_update`: the same 128 completions, 8 micro-batches of 16 rows, one optimizer step.
  posttrain: `position_logps` with entropy + `policy_loss("grpo")`; TRL: `GRPOTrainer.compute_loss`
  (its fused head, its default loss).

MFU = model FLOPs per token × tokens/s / the bf16 matmul peak measured in the same run (8192³, best
of 5). Model FLOPs per token: 6N (full), 4N (LoRA: no weight gradients of the frozen base), 2N
(generation, the update's frozen reference passes are not counted), plus causal attention
6·L·d·T (training) or 2·L·d·T (generation), N counting the tied head once.
`peak_mem_gib` = torch.cuda.max_memory_allocated during the row's steps (reset before each row).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

QWEN2_05B = dict(vocab_size=151_936, hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, intermediate_size=4864, max_position_embeddings=32_768,
                 tie_word_embeddings=True, rope_theta=1_000_000.0)
TINY = dict(vocab_size=1024, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, max_position_embeddings=1024, tie_word_embeddings=True)
ROWS = ("sft_full", "sft_lora", "dpo_lora", "grpo_generation", "grpo_update")


class Shapes:
    def __init__(self, tiny: bool):
        s = 1 if tiny else 0
        self.sft_batch, self.sft_len, self.sft_prompt = (2, 64, 8) if s else (8, 2048, 64)
        self.dpo_pairs, self.dpo_len, self.dpo_prompt = (2, 32, 8) if s else (4, 1024, 128)
        self.prompts, self.group, self.gen_prompt, self.gen_new = (2, 2, 8, 8) if s else (16, 8, 128, 256)
        self.micro = 2 if s else 16
        self.warmup, self.steps = (1, 1) if s else (2, 5)


# ----------------------------------------------------------------------------- helpers

def sync(dev):
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize()


def reset_peak(dev):
    import torch

    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(dev):
    import torch

    return round(torch.cuda.max_memory_allocated() / 2 ** 30, 2) if dev.type == "cuda" else None


def matmul_peak(dev, tiny: bool) -> float:
    """bf16 FLOP/s of one large matmul, best of 5."""
    import torch

    n = 512 if tiny else 8192
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    best = float("inf")
    for _ in range(5):
        sync(dev)
        t = time.perf_counter()
        a @ b
        sync(dev)
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def build_model(cfg_kw: dict, dev, tok):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("qwen2", **cfg_kw)
    cfg.pad_token_id, cfg.eos_token_id = tok.pad_token_id, tok.eos_token_id
    torch.manual_seed(0)
    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    return model


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())  # the tied head once


def ids(n: int, seed: int, vocab: int = 400) -> list[int]:
    import torch

    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def digits(n: int, seed: int) -> str:
    import random

    rng = random.Random(seed)
    return "".join(f" {rng.randint(0, 9)}" for _ in range(n))  # ' d' is one token of the small tokenizer


def rows_batch(prompts: list[list[int]], completions: list[list[int]], dev):
    """Right-padded rows prompt + completion; labels -100 on prompt and padding."""
    import torch

    n = max(len(p) + len(c) for p, c in zip(prompts, completions))
    input_ids = torch.zeros(len(prompts), n, dtype=torch.long)
    attn = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, -100)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        input_ids[i, :len(p) + len(c)] = torch.tensor(p + c)
        attn[i, :len(p) + len(c)] = 1
        labels[i, len(p):len(p) + len(c)] = torch.tensor(c)
    return input_ids.to(dev), attn.to(dev), labels.to(dev)


def timed_steps(step, dev, warmup: int, steps: int) -> float:
    for _ in range(warmup):
        step()
    sync(dev)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        sync(dev)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def lora_peft():
    from peft import LoraConfig

    return LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")


# ----------------------------------------------------------------------------- data per row

def sft_rows(sh: Shapes):
    return [(ids(sh.sft_prompt, 100 + i), ids(sh.sft_len - sh.sft_prompt, 200 + i)) for i in range(sh.sft_batch)]


def dpo_texts(sh: Shapes):
    c = sh.dpo_len - sh.dpo_prompt - 1
    return [{"prompt": digits(sh.dpo_prompt, 300 + i), "chosen": digits(c, 400 + i), "rejected": digits(c, 500 + i)}
            for i in range(sh.dpo_pairs)]


def gen_prompts(sh: Shapes):
    return [ids(sh.gen_prompt, 600 + i) for i in range(sh.prompts)]


# ----------------------------------------------------------------------------- posttrain side

def _posttrain_model(a, sh, dev, tok, lora: bool):
    import torch

    from posttrain.config import AdapterConfig
    from posttrain.models import adapters

    model = build_model(a.cfg, dev, tok)
    if lora:
        adapters.apply(model, AdapterConfig(type="lora", r=16))
    model.config.use_cache = False
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=dev.type == "cuda")
    return model, opt


def posttrain_sft(a, sh, dev, tok, lora: bool) -> float:
    import torch

    from posttrain.losses.sft import next_token_targets
    from posttrain.models.head import position_nll

    model, opt = _posttrain_model(a, sh, dev, tok, lora)
    rows = sft_rows(sh)
    input_ids, attn, labels = rows_batch([p for p, _ in rows], [c for _, c in rows], dev)
    positions, targets = next_token_targets(labels)

    def step():
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            loss_sum, n = position_nll(model, {"input_ids": input_ids, "attention_mask": attn}, positions, targets)
        (loss_sum / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return timed_steps(step, dev, sh.warmup, sh.steps)


def posttrain_dpo(a, sh, dev, tok) -> float:
    import torch

    from posttrain.losses.dpo import dpo_loss
    from posttrain.losses.sft import next_token_targets
    from posttrain.models import adapters
    from posttrain.models.head import position_logps

    model, opt = _posttrain_model(a, sh, dev, tok, True)
    texts = dpo_texts(sh)
    eos = [tok.eos_token_id]
    prompts = [tok(t["prompt"]).input_ids for t in texts] * 2
    comps = [tok(t["chosen"]).input_ids + eos for t in texts] + [tok(t["rejected"]).input_ids + eos for t in texts]
    input_ids, attn, labels = rows_batch(prompts, comps, dev)
    positions, targets = next_token_targets(labels)
    inputs = {"input_ids": input_ids, "attention_mask": attn}
    k = len(texts)

    def seq_logps():
        return position_logps(model, inputs, positions, targets)[0].sum(-1)

    def step():
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            with torch.no_grad(), adapters.disabled(model):
                ref = seq_logps()
            pol = seq_logps()
            loss = dpo_loss(pol[:k], pol[k:], ref[:k], ref[k:], beta=0.1)[0].mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return timed_steps(step, dev, sh.warmup, sh.steps)


def posttrain_generation(a, sh, dev, tok) -> float:
    import torch

    from posttrain.config import AdapterConfig
    from posttrain.models import adapters
    from posttrain.rollout import RolloutEngine, SamplingParams

    model = build_model(a.cfg, dev, tok)
    adapters.apply(model, AdapterConfig(type="lora", r=16))
    model.eval()
    engine = RolloutEngine(model, tok, batch_size=sh.prompts * sh.group)
    params = SamplingParams(max_new_tokens=sh.gen_new, temperature=1.0, n=sh.group, seed=0, stop_token_ids=())
    prompts = gen_prompts(sh)
    engine.generate(prompts[:1], SamplingParams(max_new_tokens=4, stop_token_ids=()))  # warm-up
    with torch.autocast(dev.type, dtype=torch.bfloat16):
        ro = engine.generate(prompts, params)
    return ro.time_s, ro.num_tokens


def posttrain_grpo_update(a, sh, dev, tok) -> float:
    import torch

    from posttrain.losses.policy import policy_loss
    from posttrain.models.head import position_logps

    model, opt = _posttrain_model(a, sh, dev, tok, True)
    n = sh.prompts * sh.group
    prompts = gen_prompts(sh)
    input_ids, attn, labels = rows_batch([prompts[i // sh.group] for i in range(n)],
                                         [ids(sh.gen_new, 700 + i) for i in range(n)], dev)
    P = sh.gen_prompt
    positions = torch.arange(P - 1, P + sh.gen_new - 1, device=dev)
    comp_mask = (labels[:, P:] != -100).long()
    adv = torch.tensor([1.0, -1.0] * (n // 2), device=dev)

    def step():
        for s in range(0, n, sh.micro):
            mb = slice(s, s + sh.micro)
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                logps, _ = position_logps(model, {"input_ids": input_ids[mb], "attention_mask": attn[mb]},
                                          positions, labels[mb, P:], with_entropy=True)
                loss = policy_loss("grpo", logps, logps.detach(), adv[mb], comp_mask[mb])[0]
            (loss * (sh.micro / n)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return timed_steps(step, dev, sh.warmup, sh.steps)


# ----------------------------------------------------------------------------- TRL side

def _trl_common(a, sh, dev, batch: int) -> dict:
    return dict(output_dir=tempfile.mkdtemp(prefix="trl-"), per_device_train_batch_size=batch,
                max_steps=sh.warmup + sh.steps, learning_rate=1e-5, report_to=[], save_strategy="no",
                logging_steps=1, use_cpu=dev.type != "cuda", bf16=True, dataloader_num_workers=0, seed=0)


def _clock():
    from transformers import TrainerCallback

    times = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t)

    return Clock(), times


def _steady(times: list[float], sh: Shapes) -> float:
    return statistics.median(times[sh.warmup:] or times)


def trl_sft(a, sh, dev, tok, lora: bool) -> float:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    rows = [{"input_ids": p + c, "completion_mask": [0] * len(p) + [1] * len(c)} for p, c in sft_rows(sh)]
    ds = Dataset.from_list(rows * (sh.warmup + sh.steps))
    clock, times = _clock()
    cfg = SFTConfig(max_length=sh.sft_len, **_trl_common(a, sh, dev, sh.sft_batch))
    tr = SFTTrainer(model=build_model(a.cfg, dev, tok), args=cfg, train_dataset=ds, processing_class=tok,
                    peft_config=lora_peft() if lora else None, callbacks=[clock])
    tr.train()
    return _steady(times, sh)


def trl_dpo(a, sh, dev, tok) -> float:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    ds = Dataset.from_list(dpo_texts(sh) * (sh.warmup + sh.steps))
    clock, times = _clock()
    cfg = DPOConfig(max_length=sh.dpo_len, **_trl_common(a, sh, dev, sh.dpo_pairs))
    tr = DPOTrainer(model=build_model(a.cfg, dev, tok), args=cfg, train_dataset=ds, processing_class=tok,
                    peft_config=lora_peft(), callbacks=[clock])
    tr.train()
    return _steady(times, sh)


def trl_generation(a, sh, dev, tok):
    import torch
    from peft import get_peft_model

    model = get_peft_model(build_model(a.cfg, dev, tok), lora_peft()).eval()
    prompts = torch.tensor(gen_prompts(sh), device=dev)
    kw = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, num_return_sequences=sh.group,
              max_new_tokens=sh.gen_new, min_new_tokens=sh.gen_new, pad_token_id=tok.pad_token_id)
    with torch.inference_mode(), torch.autocast(dev.type, dtype=torch.bfloat16):
        model.generate(prompts[:1], **{**kw, "max_new_tokens": 4, "min_new_tokens": 4})  # warm-up
        sync(dev)
        t = time.perf_counter()
        out = model.generate(prompts, attention_mask=torch.ones_like(prompts), **kw)
        sync(dev)
    return time.perf_counter() - t, int(out[:, prompts.shape[1]:].numel())


def trl_grpo_update(a, sh, dev, tok) -> float:
    import torch
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    n = sh.prompts * sh.group
    common = _trl_common(a, sh, dev, sh.micro)
    cfg = GRPOConfig(num_generations=sh.group, max_completion_length=sh.gen_new,
                     gradient_accumulation_steps=n // sh.micro, **common)
    tr = GRPOTrainer(model=build_model(a.cfg, dev, tok), reward_funcs=lambda completions, **kw: [0.0] * len(completions),
                     args=cfg, train_dataset=Dataset.from_list([{"prompt": "hi"}] * n), peft_config=lora_peft(),
                     processing_class=tok)
    model = tr.model
    model.train()
    tr.current_gradient_accumulation_steps = n // sh.micro  # set by train(), which this update-only run skips
    prompts = gen_prompts(sh)
    p = torch.tensor([prompts[i // sh.group] for i in range(n)], device=dev)
    c = torch.tensor([ids(sh.gen_new, 700 + i) for i in range(n)], device=dev)
    adv = torch.tensor([1.0, -1.0] * (n // 2), device=dev)
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-5, fused=dev.type == "cuda")

    def step():
        for s in range(0, n, sh.micro):
            mb = slice(s, s + sh.micro)
            inputs = {"prompt_ids": p[mb], "prompt_mask": torch.ones_like(p[mb]), "completion_ids": c[mb],
                      "completion_mask": torch.ones_like(c[mb]), "advantages": adv[mb],
                      "num_items_in_batch": torch.tensor(n * sh.gen_new, device=dev)}
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                loss = tr.compute_loss(model, inputs)
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return timed_steps(step, dev, sh.warmup, sh.steps)


# ----------------------------------------------------------------------------- main

def run_row(name: str, side: str, a, sh: Shapes, dev, tok, peak: float, counts: dict) -> dict:
    import torch

    reset_peak(dev)
    t0 = time.perf_counter()
    L, d = a.cfg["num_hidden_layers"], a.cfg["hidden_size"]
    N = counts["params"]
    if name.startswith("sft"):
        lora = name == "sft_lora"
        fn = posttrain_sft if side == "posttrain" else trl_sft
        step_s = fn(a, sh, dev, tok, lora)
        tokens, T = sh.sft_batch * sh.sft_len, sh.sft_len
        per_tok = (4 if lora else 6) * N + 6 * L * d * T
    elif name == "dpo_lora":
        step_s = (posttrain_dpo if side == "posttrain" else trl_dpo)(a, sh, dev, tok)
        tokens, T = 2 * sh.dpo_pairs * sh.dpo_len, sh.dpo_len
        per_tok = 4 * N + 6 * L * d * T
    elif name == "grpo_generation":
        step_s, tokens = (posttrain_generation if side == "posttrain" else trl_generation)(a, sh, dev, tok)
        T = sh.gen_prompt + sh.gen_new
        per_tok = 2 * N + 2 * L * d * T
    else:
        step_s = (posttrain_grpo_update if side == "posttrain" else trl_grpo_update)(a, sh, dev, tok)
        tokens, T = sh.prompts * sh.group * (sh.gen_prompt + sh.gen_new), sh.gen_prompt + sh.gen_new
        per_tok = 4 * N + 6 * L * d * T
    tps = tokens / step_s
    row = {"row": name, "side": side, "tokens": tokens, "time_s": round(step_s, 4), "tokens_per_s": round(tps, 1),
           "mfu": round(per_tok * tps / peak, 4), "peak_mem_gib": peak_gib(dev),
           "wall_s": round(time.perf_counter() - t0, 1)}
    print("# " + json.dumps(row), file=sys.stderr, flush=True)
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return row


def main(argv=None) -> dict:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="a tiny model on CPU: a smoke run of the whole script")
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--sides", default="posttrain,trl")
    ap.add_argument("--out", help="also write the JSON here")
    a = ap.parse_args(argv)
    rows = a.rows.split(",")
    bad = [r for r in rows if r not in ROWS]
    if bad:
        ap.error(f"--rows: unknown {', '.join(bad)}; choose from {', '.join(ROWS)}")
    dev = torch.device("cuda" if torch.cuda.is_available() and not a.tiny else "cpu")
    if dev.type == "cpu" and not a.tiny:
        ap.error("no CUDA device: run on a GPU machine, or pass --tiny for the CPU smoke run")
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    from posttrain.models.tiny import build_tokenizer

    a.cfg = TINY if a.tiny else QWEN2_05B
    sh = Shapes(a.tiny)
    tok = build_tokenizer()
    peak = matmul_peak(dev, a.tiny)
    counts = {"params": n_params(build_model(a.cfg, "meta", tok))}
    result = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "torch": torch.__version__,
              "model": "qwen2-0.5b-shaped (random)" if not a.tiny else "tiny qwen2 (random)",
              "params": counts["params"], "bf16_matmul_peak_tflops": float(f"{peak / 1e12:.4g}"), "rows": []}  # 4 digits: a CPU's is ~0.1
    t0 = time.perf_counter()
    for name in rows:
        for side in a.sides.split(","):
            result["rows"].append(run_row(name, side, a, sh, dev, tok, peak, counts))
    result["speedup_vs_trl"] = {}
    for name in rows:
        by = {r["side"]: r for r in result["rows"] if r["row"] == name}
        if "posttrain" in by and "trl" in by:
            result["speedup_vs_trl"][name] = round(by["posttrain"]["tokens_per_s"] / by["trl"]["tokens_per_s"], 3)
    result["total_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(result, indent=1))
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
