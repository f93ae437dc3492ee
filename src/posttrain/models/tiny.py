"""Tiny random checkpoints in real architectures' shapes, and a small tokenizer.

Nothing can be downloaded on air-gapped machines, so tests, benchmarks and
examples build their own checkpoints with ``save_pretrained``: the same files a
hub model has (config.json, model.safetensors, tokenizer.json, a chat template),
just small and random.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import torch

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

ARCHS = ("llama", "qwen2", "mistral", "gemma")

_DEFAULT_CORPUS = (
    "The quick brown fox jumps over the lazy dog. Post-training turns a next-token predictor into an assistant. "
    "user assistant system tool What is 2 + 3? The answer is 5. Hello, how can I help you today? "
    "Reverse the word apple: elppa. Numbers 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20. "
    "{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}} [INST] [/INST] <start_of_turn> <end_of_turn> "
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|> <|eot_id|> model "
)


def build_tokenizer(
    out_dir: Optional[Union[str, Path]] = None,
    *,
    vocab_size: int = 512,
    corpus: Optional[list[str]] = None,
    chat_template: str = CHATML_TEMPLATE,
):
    """A byte-level BPE tokenizer trained on `corpus`, with ChatML special tokens and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(corpus or [_DEFAULT_CORPUS] * 4, trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
        additional_special_tokens=["<|im_start|>"],
    )
    tok.chat_template = chat_template
    if out_dir is not None:
        tok.save_pretrained(str(out_dir))
    return tok


def tiny_config(arch: str, vocab_size: int, *, hidden: int = 64, layers: int = 2, heads: int = 4,
                kv_heads: int = 2, intermediate: int = 128, max_pos: int = 512, **extra):
    """A small config of a real architecture. Grouped-query attention by default (kv_heads < heads)."""
    from transformers import AutoConfig

    if arch not in ARCHS:
        raise ValueError(f"unknown architecture '{arch}'; choose from {ARCHS}")
    kw = dict(
        vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, intermediate_size=intermediate, max_position_embeddings=max_pos,
        tie_word_embeddings=arch == "gemma",
    )
    if arch == "gemma":
        kw["head_dim"] = hidden // heads
    kw.update(extra)
    return AutoConfig.for_model(arch, **kw)


def build_tiny_model(
    arch: str,
    out_dir: Union[str, Path],
    *,
    tokenizer=None,
    seed: int = 0,
    vocab_size: Optional[int] = None,
    **config_kw,
):
    """Save a random `arch` checkpoint plus tokenizer into `out_dir`; returns the path.

    `vocab_size` widens the embedding and output head beyond the tokenizer (real checkpoints pad
    theirs, e.g. Qwen2.5: 151,665 tokens, 151,936 rows); the default is the tokenizer's size.
    """
    from transformers import AutoModelForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = tokenizer or build_tokenizer()
    if vocab_size is not None and vocab_size < len(tok):
        raise ValueError(f"vocab_size={vocab_size} is smaller than the tokenizer ({len(tok)} tokens)")
    cfg = tiny_config(arch, vocab_size or len(tok), **config_kw)
    cfg.pad_token_id = tok.pad_token_id
    cfg.eos_token_id = tok.eos_token_id
    cfg.bos_token_id = tok.bos_token_id
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    return out
