"""Pretrain the bundled base model from the gym's generated corpus.

    python scripts/pretrain_base_model.py [--out DIR] [--steps N] [--init DIR] [--segments]

Recipe (see docs/gym.md): a byte-level BPE tokenizer (1024 tokens, digits split one per token,
ChatML special tokens) trained on 30k documents of `documents(1)`; a 4-layer Qwen2 (hidden 192,
3 heads, 1 KV head, MLP 576, tied embeddings, 1.92M parameters); next-token loss on every token of
the framed document stream cut into 256-token rows; AdamW (0.9, 0.95), weight decay 0.1 on
matrices, linear warm-up then cosine decay to 10%; bf16 autocast on CPU; seed 0; fp32 weights
(7.5 MB). The bundled model is four invocations (each continues the previous one's output):

    S="nice -n -10 python scripts/pretrain_base_model.py --threads 1 --batch 16"
    $S --out /tmp/m1 --steps 680 --lr 2e-3                      # from scratch, documents(0)
    $S --out /tmp/m2 --init /tmp/m1 --steps 700 --lr 1.5e-3     # documents(2)
    $S --out /tmp/m3 --init /tmp/m2 --steps 300 --lr 1e-3 --warmup 10 --segments --data-seed 3
    $S --out src/posttrain/gym/base_model --init /tmp/m3 --steps 400 --lr 1e-3 --warmup 10 \
       --segments --data-seed 4                                  # documents(4, threads=True)
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from posttrain.gym.chat_template import CHAT_TEMPLATE  # noqa: E402
from posttrain.gym.corpus import documents, framed  # noqa: E402

STEPS = 680
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def train_tokenizer(docs: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    # one token per digit: numbers then share one embedding per digit, which is what lets a
    # small model learn column-wise arithmetic instead of memorising number tokens
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(docs, trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  bos_token=None, unk_token=None, additional_special_tokens=["<|im_start|>"])
    tok.chat_template = CHAT_TEMPLATE
    return tok


def token_rows(tok, docs, rows_needed: int, seq_len: int) -> torch.Tensor:
    ids: list[int] = []
    need = rows_needed * seq_len
    while len(ids) < need:
        batch = [framed(d) for d in itertools.islice(docs, 4096)]
        for enc in tok(batch, add_special_tokens=False)["input_ids"]:
            ids.extend(enc)
    return torch.tensor(ids[:need]).view(rows_needed, seq_len)


def train_phase(model, data: torch.Tensor, *, steps: int, batch: int, lr: float, warmup: int, name: str,
                save=None, save_every: int = 0) -> tuple[list, float, float]:
    """Next-token training on `data` rows: AdamW, linear warm-up, cosine decay to 10% of `lr`."""
    decay = [t for t in model.parameters() if t.dim() >= 2]
    no_decay = [t for t in model.parameters() if t.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95))

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        frac = (step - warmup) / max(1, steps - warmup)
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    log, t0, ema = [], time.time(), None
    model.train()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        x = data[step * batch:(step + 1) * batch]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema = loss.item() if ema is None else 0.9 * ema + 0.1 * loss.item()
        if step % 20 == 0 or step == steps - 1:
            rec = {"phase": name, "step": step, "loss": round(loss.item(), 4), "loss_ema": round(ema, 4),
                   "lr": lr_at(step), "elapsed_s": round(time.time() - t0, 1)}
            log.append(rec)
            print(json.dumps(rec), flush=True)
        if save and save_every and (step + 1) % save_every == 0 and step + 1 < steps:
            save(f"{name}-step-{step + 1}")
    return log, ema, time.time() - t0


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "src/posttrain/gym/base_model"))
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--lr", type=float, default=2e-3, help="peak lr")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init", default=None, help="continue from this saved model (and its tokenizer) instead "
                   "of starting from scratch; the corpus stream then uses seed + 2")
    p.add_argument("--segments", action="store_true", help="corpus with answers in their own segments "
                   "(documents(threads=True))")
    p.add_argument("--data-seed", type=int, default=None, help="corpus stream seed (default: seed, or seed + 2 with --init)")
    p.add_argument("--save-every", type=int, default=0, help="also save copies every N steps under OUT.ckpt/")
    a = p.parse_args(argv)

    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    if a.threads:
        torch.set_num_threads(a.threads)
    t0 = time.time()
    random.seed(a.seed)
    torch.manual_seed(a.seed)
    out = Path(a.out)

    def save(tag):
        _save(model, tok, Path(str(out) + ".ckpt") / tag, None)

    if a.init is None:
        tok = train_tokenizer([framed(d) for d in itertools.islice(documents(a.seed + 1), 30000)], a.vocab)
        cfg = Qwen2Config(vocab_size=len(tok), hidden_size=192, num_hidden_layers=4, num_attention_heads=3,
                          num_key_value_heads=1, intermediate_size=576, max_position_embeddings=1024,
                          tie_word_embeddings=True, rope_theta=10000.0,
                          pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None)
        model = Qwen2ForCausalLM(cfg)
        data = token_rows(tok, documents(a.seed if a.data_seed is None else a.data_seed, threads=a.segments),
                          a.steps * a.batch, a.seq_len)
    else:
        tok = AutoTokenizer.from_pretrained(a.init)
        model = Qwen2ForCausalLM.from_pretrained(a.init, dtype=torch.float32)
        data = token_rows(tok, documents(a.seed + 2 if a.data_seed is None else a.data_seed, threads=a.segments),
                          a.steps * a.batch, a.seq_len)
    log, ema, wall = train_phase(model, data, steps=a.steps, batch=a.batch, lr=a.lr, warmup=a.warmup,
                                 name="pretrain", save=save, save_every=a.save_every)
    info = {"seed": a.seed, "steps": a.steps, "batch": a.batch, "seq_len": a.seq_len, "lr": a.lr,
            "warmup": a.warmup, "segments": a.segments, "data_seed": a.data_seed, "torch_threads": torch.get_num_threads(), "vocab": len(tok),
            "params": sum(t.numel() for t in model.parameters()), "tokens": data.numel(),
            "final_loss_ema": round(ema, 4), "train_wall_s": round(wall, 1),
            "total_wall_s": round(time.time() - t0, 1), "log": log}
    if a.init is not None:
        prev = json.loads((Path(a.init) / "pretrain_log.json").read_text())
        info = {**info, "runs": prev.get("runs", [{k: v for k, v in prev.items() if k != "runs"}]) + [dict(info, init=a.init)]}
        info["total_wall_s"] = round(sum(r["total_wall_s"] for r in info["runs"]), 1)
        info["tokens"] = sum(r["tokens"] for r in info["runs"])
    _save(model, tok, out, info)
    print(f"saved {out}: {info['params'] / 1e6:.2f}M params, final loss (ema) {ema:.3f}, {info['total_wall_s']:.0f}s")


def _save(model, tok, out: Path, info) -> None:
    from transformers import GenerationConfig

    out.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(
        eos_token_id=[tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")],
        pad_token_id=tok.pad_token_id, do_sample=False)
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    if info is not None:
        (out / "pretrain_log.json").write_text(json.dumps(info, indent=1) + "\n")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
