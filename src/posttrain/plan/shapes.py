"""A decoder's shape from its `config.json` alone (no weights), and its parameter counts.

Works for the Llama, Qwen2, Mistral and Gemma families (and any config with the same
keys); a multimodal wrapper's `text_config` is read when the top level has no `hidden_size`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union


class PlanError(ValueError):
    """Input the planner cannot use; the message says what and where."""


LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")


@dataclass(frozen=True)
class ModelShape:
    """The numbers that set a decoder's memory and FLOPs.

    hidden d, layers L, heads h, kv_heads k (grouped-query attention when k < h), head_dim e,
    intermediate f (gated MLP: gate, up, down), vocab V, tied input/output embeddings.
    """

    arch: str
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    tied: bool
    qkv_bias: bool = False

    # ---- parameter counts (elements)
    @property
    def attn_linear(self) -> int:
        """q [h·e, d], k and v [k·e, d], o [d, h·e] (+ q/k/v biases for Qwen2)."""
        d, he, ke = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        bias = (he + 2 * ke) if self.qkv_bias else 0
        return d * he + 2 * d * ke + he * d + bias

    @property
    def mlp_linear(self) -> int:
        return 3 * self.hidden * self.intermediate

    @property
    def layer_linear(self) -> int:
        return self.attn_linear + self.mlp_linear

    @property
    def linear_params(self) -> int:
        """Every linear weight of the decoder layers (the ones LoRA `all-linear` and NF4 touch)."""
        return self.layers * self.layer_linear

    @property
    def linear_weights(self) -> int:
        """The decoder's linear weight matrices alone (no biases): what autocast copies to bf16."""
        return self.layers * sum(i * o for i, o in self.linear_shapes())

    @property
    def norm_params(self) -> int:
        return self.layers * 2 * self.hidden + self.hidden

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def head_params(self) -> int:
        return 0 if self.tied else self.vocab * self.hidden

    @property
    def total_params(self) -> int:
        return self.linear_params + self.norm_params + self.embedding_params + self.head_params

    def linear_shapes(self, names: Optional[Sequence[str]] = None) -> list[tuple[int, int]]:
        """(in, out) of the linears of one layer: q, k, v, o, gate, up, down (or those in `names`)."""
        d, he, ke, f = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        shapes = dict(zip(LINEAR_NAMES, [(d, he), (d, ke), (d, ke), (he, d), (d, f), (d, f), (f, d)]))
        return [shapes[n] for n in (LINEAR_NAMES if names is None else names)]


def shape_from_config(cfg: dict, where: str = "config.json") -> ModelShape:
    if "hidden_size" not in cfg and isinstance(cfg.get("text_config"), dict):
        cfg = cfg["text_config"]
    missing = [k for k in _REQUIRED if cfg.get(k) is None]
    if missing:
        raise PlanError(f"{where}: not a decoder config the planner knows: missing {', '.join(missing)}")
    heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    arch = str(cfg.get("model_type", "unknown"))
    return ModelShape(
        arch=arch, vocab=int(cfg["vocab_size"]), hidden=hidden, layers=int(cfg["num_hidden_layers"]), heads=heads,
        kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or hidden // heads), intermediate=int(cfg["intermediate_size"]),
        tied=bool(cfg.get("tie_word_embeddings", arch == "gemma")),
        qkv_bias=bool(cfg.get("attention_bias", arch == "qwen2")),
    )


def read_shape(model: Union[str, Path]) -> ModelShape:
    """The shape of a local HF model directory (or a finished run's model), from config.json only."""
    p = Path(model)
    if p.is_dir() and not (p / "config.json").exists():
        # a finished posttrain run points at its model directory
        manifest = p / "manifest.json"
        if manifest.exists():
            p = p / json.loads(manifest.read_text()).get("model_dir", "model")
        elif (p / "model" / "config.json").exists():
            p = p / "model"
    cfg_path = p / "config.json" if p.is_dir() else p
    if not cfg_path.exists():
        if not p.exists():
            raise PlanError(f"model not found: {model} (the planner reads a local directory's config.json; "
                            "download the config first for a hub model)")
        raise PlanError(f"{p} has no config.json: the planner needs the model's Hugging Face config")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise PlanError(f"{cfg_path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise PlanError(f"{cfg_path}: expected a JSON object")
    return shape_from_config(cfg, str(cfg_path))
