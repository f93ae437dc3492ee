"""Rollout tokens/s against transformers' `model.generate` on the same batch and settings.

    python bench/rollout_throughput.py [--model DIR] [--prompts 32] [--n 4] [--max-new 112] [--repeats 2]

Both sides get the same left-padded prompts, the same sampling settings (temperature 1, n samples
per prompt, the same stop ids), run under inference mode on the same threads; the best of
`--repeats` runs is kept. The model is the gym's bundled base when present (prompts from the
reasoning task), else a tiny random Qwen2. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch


def _setup(model_dir):
    from posttrain.models.loading import load

    if model_dir is None:
        try:
            from posttrain import gym

            model_dir = gym.base_model_path()
        except (FileNotFoundError, ImportError):
            from posttrain.models.tiny import build_tiny_model, build_tokenizer

            model_dir = build_tiny_model("qwen2", tempfile.mkdtemp(), tokenizer=build_tokenizer(), hidden=128,
                                         layers=4)
    model, tok = load(model_dir, device="cpu")
    return model.eval(), tok, str(model_dir)


def _prompts(tok, k: int) -> list[str]:
    try:
        from posttrain import gym

        rows = gym.load_task_rows("reasoning", "validation", n=k)
        return [gym.chat_prompt(tok, r) for r in rows]
    except Exception:
        base = ["Hello, how can I", "The quick brown fox", "What is 2 + 3? The answer", "Numbers 0 1 2 3"]
        return [base[i % 4] * (1 + i % 3) for i in range(k)]


def bench_generate(model, tok, prompts, n, max_new, stop_ids) -> tuple[float, int]:
    enc = tok(prompts, padding=True, padding_side="left", return_tensors="pt")
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**enc, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, num_return_sequences=n,
                             max_new_tokens=max_new, eos_token_id=stop_ids, pad_token_id=tok.pad_token_id)
    dt = time.perf_counter() - t0
    gen = out[:, enc["input_ids"].shape[1]:]
    # count tokens up to and including the first stop id, as the rollout engine does
    tokens = 0
    for row in gen.tolist():
        for t in row:
            tokens += 1
            if t in stop_ids:
                break
    return dt, tokens


def main(argv=None) -> dict:
    from posttrain.rollout import RolloutEngine, SamplingParams, default_stop_ids

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--max-new", type=int, default=112)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads for both sides (1 gives stable timings "
                    "on a shared machine; 0 = torch's default)")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model, tok, where = _setup(a.model)
    prompts = _prompts(tok, a.prompts)
    stop_ids = default_stop_ids(tok)
    engine = RolloutEngine(model, tok, batch_size=a.prompts * a.n)
    params = SamplingParams(max_new_tokens=a.max_new, temperature=1.0, n=a.n, seed=0)
    engine.generate(prompts[:2], SamplingParams(max_new_tokens=4))  # warm-up
    hf_best, ours_best = None, None
    for _ in range(a.repeats):
        dt, toks = bench_generate(model, tok, prompts, a.n, a.max_new, stop_ids)
        if hf_best is None or toks / dt > hf_best["tokens_per_s"]:
            hf_best = {"time_s": round(dt, 3), "tokens": toks, "tokens_per_s": round(toks / dt, 1)}
        ro = engine.generate(prompts, params)
        if ours_best is None or ro.tokens_per_s > ours_best["tokens_per_s"]:
            ours_best = {"time_s": round(ro.time_s, 3), "tokens": ro.num_tokens,
                         "tokens_per_s": round(ro.tokens_per_s, 1)}
    result = {"bench": "rollout_throughput", "model": where, "prompts": a.prompts, "n": a.n,
              "max_new_tokens": a.max_new, "threads": torch.get_num_threads(),
              "model_generate": hf_best, "rollout_engine": ours_best,
              "speedup": round(ours_best["tokens_per_s"] / hf_best["tokens_per_s"], 2)}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
