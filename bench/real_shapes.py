"""Training at real vocabulary shapes: the bundled body with a 151,936-row head (Qwen2's), batch 1,
1k / 4k / 16k tokens per step, gradient checkpointing on, LoRA r16 on every linear layer, fp32.

    python bench/real_shapes.py                          # sft, dpo, grpo at 1k, 4k, 16k (long on 2 cores)
    python bench/real_shapes.py --methods sft --tokens 1024,4096 --rounds 2
    python bench/real_shapes.py --quick                  # 512 tokens, one step each: a smoke run

Variants, each in its own process, alternated round by round:
- `posttrain`: the chunked head (`posttrain.models.head`: `position_nll` for SFT, `position_logps`
  for DPO's sequence log-probs and GRPO's token log-probs + entropy), in a minimal training step
  (forward, backward, AdamW). The stages do not call it yet (issue #15 is refactoring them), so
  this is the step they will run once wired, not `posttrain sft`.
- `posttrain_plain`: the stage paths before the chunked head, in the same minimal step: `target_nll`
  on `logits_to_keep` logits (SFT), cross-entropy of the logits at loss positions summed per
  sequence (DPO), the log-softmax of the last C + 1 positions' logits (GRPO; what
  rollout/logprobs.completion_logprobs did before it called the chunked head).
- `trl`: `SFTTrainer` / `DPOTrainer` + PEFT at TRL's defaults, except what must match: the same
  tokens (pre-tokenized rows), max_length, LoRA, steps and fp32 (TRL's default is bf16 autocast).
  GRPO: `GRPOTrainer.compute_loss` (its update: per-token log-probs + entropy through TRL's fused
  head, its default `dapo` loss) on the same completions, with AdamW, since its `train()` would
  also generate; generation is not what this measures.

Shapes: SFT one row of N tokens (loss on all but a 32-token prompt); DPO one pair, chosen and
rejected N/2 tokens each (32-token prompt); GRPO 4 completions of N/4 tokens (32-token prompt).
The model's weights are random (a fresh init; nothing downloaded).

Memory: `train_peak_mib` = peak RSS (ru_maxrss) − RSS just before the first step (model, optimizer
state not yet allocated, data): what training itself added. Every child runs under an address
space cap (`--cap-gib`, default 14) so that a variant that needs more fails with an out-of-memory
row instead of pushing the machine (shared with other users) into the OOM killer.
Speed: tokens / median step time over the steps after the first.
Prints one JSON: rows, ratios against TRL, and the memory slope per token of each variant.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VOCAB = 151_936
PROMPT = 32
GROUP = 4
LORA_R = 16


def make_model(out: Path, max_tokens: int) -> Path:
    """The bundled body's shape (Qwen2, d=192, 4 layers) with a 151,936-row tied head, random weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from posttrain import gym
    from posttrain.models.tiny import build_tokenizer

    body = AutoConfig.from_pretrained(gym.base_model_path())
    cfg = AutoConfig.for_model("qwen2", vocab_size=VOCAB, hidden_size=body.hidden_size,
                               num_hidden_layers=body.num_hidden_layers, num_attention_heads=body.num_attention_heads,
                               num_key_value_heads=body.num_key_value_heads, intermediate_size=body.intermediate_size,
                               max_position_embeddings=max(max_tokens, 1024) + 64, tie_word_embeddings=True)
    tok = build_tokenizer()
    cfg.pad_token_id, cfg.eos_token_id = tok.pad_token_id, tok.eos_token_id
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def _ids(n: int, seed: int) -> list[int]:
    import torch

    # ids the small tokenizer knows, so that TRL's pad/eos handling sees ordinary tokens
    return torch.randint(3, 400, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _digits(n: int, seed: int) -> str:
    """n tokens of text: ' d' (a space and a digit) is one token of the small tokenizer."""
    import random

    rng = random.Random(seed)
    return "".join(f" {rng.randint(0, 9)}" for _ in range(n))


def shapes(method: str, tokens: int, tok=None) -> dict:
    """The token ids of one step: the same for every variant."""
    if method == "sft":
        return {"prompt": _ids(PROMPT, 1), "completions": [_ids(tokens - PROMPT, 2)]}
    if method == "dpo":
        # TRL's DPOTrainer takes text only: the same texts, tokenized as it does (completion + EOS)
        half = tokens // 2
        texts = {"prompt": _digits(PROMPT, 1), "chosen": _digits(half - PROMPT - 1, 2),
                 "rejected": _digits(half - PROMPT - 1, 3)}
        eos = [tok.eos_token_id]
        return {"texts": texts, "prompt": tok(texts["prompt"]).input_ids,
                "completions": [tok(texts["chosen"]).input_ids + eos, tok(texts["rejected"]).input_ids + eos]}
    per = tokens // GROUP
    return {"prompt": _ids(PROMPT, 1), "completions": [_ids(per - PROMPT, 10 + g) for g in range(GROUP)]}


# ----------------------------------------------------------------------------- children

def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rows_batch(prompt: list[int], completions: list[list[int]]):
    """Rows prompt + completion, right-padded to one length; labels -100 on the prompt and padding."""
    import torch

    n = max(len(c) for c in completions) + len(prompt)
    ids = torch.zeros(len(completions), n, dtype=torch.long)
    attn = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, c in enumerate(completions):
        row = prompt + c
        ids[i, :len(row)] = torch.tensor(row)
        attn[i, :len(row)] = 1
        labels[i, len(prompt):len(row)] = torch.tensor(c)
    return ids, attn, labels


def child_posttrain(a, data: dict) -> dict:
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from posttrain.config import AdapterConfig
    from posttrain.losses.dpo import dpo_loss
    from posttrain.losses.policy import policy_loss
    from posttrain.losses.sft import next_token_targets, target_nll
    from posttrain.models import adapters
    from posttrain.models.head import position_logps, position_nll

    chunked = a.kind == "posttrain"
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    adapters.apply(model, AdapterConfig(type="lora", r=LORA_R))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model.train()
    opt = torch.optim.AdamW(adapters.trainable_parameters(model), lr=1e-4)
    ids, attn, labels = _rows_batch(data["prompt"], data["completions"])
    inputs = {"input_ids": ids, "attention_mask": attn}
    P = len(data["prompt"])

    def sft_loss():
        positions, targets = next_token_targets(labels)
        if chunked:
            loss_sum, n = position_nll(model, inputs, positions, targets)
        else:
            loss_sum, n = target_nll(model(**inputs, use_cache=False, logits_to_keep=positions).logits, targets)
        return loss_sum / n

    def seq_logps():
        positions, targets = next_token_targets(labels)
        if chunked:
            return position_logps(model, inputs, positions, targets)[0].sum(-1)
        # the pre-#20 path of engine/reference.forward_logps: [rows, K, V] logits at loss positions
        logits = model(**inputs, use_cache=False, logits_to_keep=positions).logits
        mask = targets != -100
        tok = -F.cross_entropy(logits[mask].float(), targets[mask], reduction="none")
        return torch.zeros(len(targets), dtype=tok.dtype).index_add(0, mask.nonzero()[:, 0], tok)

    def dpo_step_loss():
        with torch.no_grad(), adapters.disabled(model):
            ref = seq_logps()
        pol = seq_logps()
        return dpo_loss(pol[0:1], pol[1:2], ref[0:1], ref[1:2], beta=0.1)[0].mean()

    # GRPO: left-aligned prompt + completion rows; the completion is the last C positions' targets
    c_len = max(len(c) for c in data["completions"])
    comp_mask = (labels[:, P:] != -100).long()
    adv = torch.tensor([1.0, -1.0] * (GROUP // 2))

    def grpo_step_loss():
        if chunked:
            positions = torch.arange(P - 1, P + c_len - 1)
            logps, ent = position_logps(model, inputs, positions, labels[:, P:], with_entropy=True)
        else:  # the pre-#20 rollout/logprobs.completion_logprobs: [rows, C, V] logits, entropy detached
            logits = model(**inputs, use_cache=False, logits_to_keep=c_len + 1).logits[:, :-1].float()
            logp_all = torch.log_softmax(logits, -1)
            logps = logp_all.gather(-1, ids[:, -c_len:, None])[..., 0] * comp_mask
            with torch.no_grad():
                ent = -(logp_all.exp() * logp_all).sum(-1) * comp_mask
        return policy_loss("grpo", logps, logps.detach(), adv, comp_mask)[0]

    loss_fn = {"sft": sft_loss, "dpo": dpo_step_loss, "grpo": grpo_step_loss}[a.method]
    return _train_loop(lambda: loss_fn().backward(), opt, a.steps)


def _train_loop(step, opt, steps: int) -> dict:
    before = _rss_mib()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    return {"rss_before_mib": before, "peak_mib": _peak_mib(), "step_s": times}


def _peft_config():
    from peft import LoraConfig

    return LoraConfig(r=LORA_R, lora_alpha=2 * LORA_R, target_modules="all-linear", task_type="CAUSAL_LM")


def child_trl(a, data: dict) -> dict:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback

    out = tempfile.mkdtemp(prefix="trl-")
    common = dict(output_dir=out, per_device_train_batch_size=1, max_steps=a.steps, learning_rate=1e-4,
                  bf16=False, gradient_checkpointing=True, report_to=[], save_strategy="no", logging_steps=1,
                  use_cpu=True, dataloader_num_workers=0, seed=0)
    marks = {"t": []}

    class Clock(TrainerCallback):
        def on_train_begin(self, *args, **kw):
            marks["before"] = _rss_mib()

        def on_step_begin(self, *args, **kw):
            marks["t0"] = time.perf_counter()

        def on_step_end(self, *args, **kw):
            marks["t"].append(time.perf_counter() - marks["t0"])

    if a.method == "sft":
        from trl import SFTConfig, SFTTrainer

        row = data["prompt"] + data["completions"][0]
        ds = Dataset.from_list([{"input_ids": row, "completion_mask": [0] * PROMPT + [1] * (len(row) - PROMPT)}] * a.steps)
        cfg = SFTConfig(max_length=len(row), **common)
        tr = SFTTrainer(model=a.model, args=cfg, train_dataset=ds, peft_config=_peft_config(), callbacks=[Clock()])
    elif a.method == "dpo":
        from trl import DPOConfig, DPOTrainer

        ds = Dataset.from_list([data["texts"]] * a.steps)
        cfg = DPOConfig(max_length=len(data["prompt"]) + max(len(c) for c in data["completions"]), **common)
        tr = DPOTrainer(model=a.model, args=cfg, train_dataset=ds, peft_config=_peft_config(), callbacks=[Clock()])
    else:
        return _trl_grpo_update(a, data, common)
    tr.train()
    return {"rss_before_mib": marks["before"], "peak_mib": _peak_mib(), "step_s": marks["t"]}


def _trl_grpo_update(a, data: dict, common: dict) -> dict:
    import torch
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    c_len = max(len(c) for c in data["completions"])
    cfg = GRPOConfig(num_generations=GROUP, max_completion_length=c_len, **{**common, "per_device_train_batch_size": GROUP})
    ds = Dataset.from_list([{"prompt": "hi"}] * GROUP)
    tr = GRPOTrainer(model=a.model, reward_funcs=lambda completions, **kw: [0.0] * len(completions), args=cfg,
                     train_dataset=ds, peft_config=_peft_config())
    model = tr.model
    model.train()
    tr.current_gradient_accumulation_steps = 1  # set by train(), which this update-only run does not call
    ids, attn, labels = _rows_batch(data["prompt"], data["completions"])
    comp_mask = (labels[:, PROMPT:] != -100).long()
    inputs = {"prompt_ids": ids[:, :PROMPT], "prompt_mask": attn[:, :PROMPT], "completion_ids": ids[:, PROMPT:],
              "completion_mask": comp_mask, "advantages": torch.tensor([1.0, -1.0] * (GROUP // 2)),
              "num_items_in_batch": comp_mask.sum()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return _train_loop(lambda: tr.compute_loss(model, inputs).backward(), opt, a.steps)


def child_main(a) -> None:
    import torch

    torch.manual_seed(0)
    cap = int(a.cap_gib * 2 ** 30)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    from transformers import AutoTokenizer

    data = shapes(a.method, a.tokens, AutoTokenizer.from_pretrained(a.model))
    try:
        res = (child_trl if a.kind == "trl" else child_posttrain)(a, data)
    except (MemoryError, RuntimeError) as e:
        if "memory" not in str(e).lower() and not isinstance(e, MemoryError):
            raise
        res = {"oom": f"over the {a.cap_gib:g} GiB address-space cap: {str(e).splitlines()[0][:160]}",
               "peak_mib": _peak_mib()}
    print("RESULT " + json.dumps(res), flush=True)


# ----------------------------------------------------------------------------- parent

def run_child(kind: str, method: str, tokens: int, steps: int, model: Path, cap_gib: float) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "MKL_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
           "ACCELERATE_USE_CPU": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, __file__, "--child", kind, "--method", method, "--tokens", str(tokens), "--steps",
           str(steps), "--model", str(model), "--cap-gib", str(cap_gib)]
    t = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode != 0 or not lines:
        return {"error": (p.stderr or p.stdout).strip().splitlines()[-1][:300] if (p.stderr or p.stdout) else
                f"exit {p.returncode}", "wall_s": wall}
    res = json.loads(lines[-1][len("RESULT "):])
    res["wall_s"] = wall
    return res


def summarize(kind: str, method: str, tokens: int, runs: list[dict]) -> dict:
    row = {"variant": kind, "method": method, "tokens": tokens}
    ok = [r for r in runs if "step_s" in r]
    if not ok:
        row.update({k: runs[0][k] for k in ("oom", "error") if k in runs[0]})
        return row
    steady = [statistics.median(r["step_s"][1:] or r["step_s"]) for r in ok]
    step = statistics.median(steady)
    row.update({"train_peak_mib": round(statistics.median(r["peak_mib"] - r["rss_before_mib"] for r in ok), 1),
                "peak_rss_mib": round(statistics.median(r["peak_mib"] for r in ok), 1),
                "step_s": round(step, 3), "tokens_per_s": round(tokens / step, 1), "runs": len(ok)})
    return row


def slope(rows: list[dict], kind: str, method: str):
    """MiB per token of training-attributable peak memory, least squares over the token counts."""
    pts = [(r["tokens"], r["train_peak_mib"]) for r in rows
           if r["variant"] == kind and r["method"] == method and "train_peak_mib" in r]
    if len(pts) < 2:
        return None
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    return round(sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts), 4)


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--method", default="sft", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--methods", default="sft,dpo,grpo")
    ap.add_argument("--tokens", default="1024,4096,16384")
    ap.add_argument("--variants", default="posttrain,trl,posttrain_plain")
    ap.add_argument("--steps", type=int, default=0, help="steps per run (default: 3 at <=4k tokens, 2 above)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--cap-gib", type=float, default=14.0)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", help="also write the JSON here")
    a = ap.parse_args(argv)
    if a.child:
        a.kind, a.tokens = a.child, int(a.tokens)
        return child_main(a)
    tokens = [512] if a.quick else [int(t) for t in a.tokens.split(",")]
    methods, variants = a.methods.split(","), a.variants.split(",")
    result = {"machine": f"{os.cpu_count()} CPUs, 1 thread per process; shared with other users",
              "load_before": load_average(), "vocab": VOCAB, "lora_r": LORA_R, "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        model = make_model(Path(tmp) / "model", max(tokens))
        for n in tokens:
            steps = a.steps or (1 if a.quick else 3 if n <= 4096 else 2)
            for method in methods:
                runs = {v: [] for v in variants}
                for _ in range(a.rounds):
                    for v in variants:  # alternated: a load change hits every variant alike
                        runs[v].append(run_child(v, method, n, steps, model, a.cap_gib))
                        print(f"# {method} {n} {v}: {json.dumps(runs[v][-1])[:300]}", file=sys.stderr, flush=True)
                result["rows"] += [summarize(v, method, n, runs[v]) for v in variants]
    rows = result["rows"]
    result["vs_trl"] = []
    for r in rows:
        t = next((x for x in rows if x["variant"] == "trl" and x["method"] == r["method"]
                  and x["tokens"] == r["tokens"]), None)
        if r["variant"] != "trl" and t and "step_s" in r and "step_s" in t:
            result["vs_trl"].append({"variant": r["variant"], "method": r["method"], "tokens": r["tokens"],
                                     "memory_ratio": round(r["train_peak_mib"] / t["train_peak_mib"], 3),
                                     "speedup": round(t["step_s"] / r["step_s"], 3)})
    result["mib_per_token"] = {f"{v}/{m}": slope(rows, v, m) for v in variants for m in methods}
    result["load_after"] = load_average()
    print(json.dumps(result, indent=1))
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
