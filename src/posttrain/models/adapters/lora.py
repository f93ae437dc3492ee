"""LoRA, rsLoRA and DoRA on linear layers.

LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"):
``y = W x + s · B A dropout(x)`` with A [r, in], B [out, r], W frozen. A starts
kaiming-uniform (a=√5) and B at zero, so a fresh adapter leaves the model unchanged.
The scale is ``s = alpha / r``; rsLoRA (Kalajdzievski 2023, "A Rank Stabilization
Scaling Factor for Fine-Tuning with LoRA") uses ``alpha / √r`` so that the update's
size does not shrink as the rank grows.

DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation") splits the
adapted weight into a magnitude vector m [out] and a direction:
``W' = m · (W + s B A) / ||W + s B A||_row``. Section 4.3 of the paper treats the
norm as a constant (detached) to save memory; we do the same, which is also what
PEFT does, so the two agree numerically.

A layer can hold several named adapters; the shared `AdapterState` says which
one is active, or which adapter each row of the batch uses (see multi.py).
"""

from __future__ import annotations

import math
import re
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from posttrain.models.adapters.state import AdapterState


class LoraWeights(nn.Module):
    """One adapter's weights for one linear layer. Attribute names follow PEFT's saved keys."""

    def __init__(self, in_features: int, out_features: int, *, r: int, alpha: float, dropout: float = 0.0,
                 rslora: bool = False, dora: bool = False, device=None, dtype=torch.float32):
        super().__init__()
        if r <= 0:
            raise ValueError(f"LoRA rank r must be positive, got {r}")
        self.r, self.alpha, self.rslora = r, float(alpha), rslora
        self.scaling = self.alpha / (math.sqrt(r) if rslora else r)
        self.lora_A = nn.Linear(in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(r, out_features, bias=False, device=device, dtype=dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_magnitude_vector = (
            nn.Parameter(torch.ones(out_features, device=device, dtype=dtype)) if dora else None
        )

    @property
    def is_dora(self) -> bool:
        return self.lora_magnitude_vector is not None

    def delta_weight(self) -> torch.Tensor:
        """s · B A, shape [out, in]."""
        return self.scaling * (self.lora_B.weight @ self.lora_A.weight)

    @torch.no_grad()
    def init_magnitude(self, base_weight: torch.Tensor) -> None:
        """m = ||W + s B A|| per output row, so that DoRA starts equal to the LoRA it wraps."""
        w = base_weight.to(self.lora_A.weight.dtype) + self.delta_weight()
        self.lora_magnitude_vector.copy_(torch.linalg.norm(w, dim=1))

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, layer: "LoraLinear") -> torch.Tensor:
        """The adapted output for inputs x whose base output (bias included) is base_out."""
        dt = self.lora_A.weight.dtype
        xd = self.dropout(x.to(dt))
        # scale the rank-r activation, not the [.., out] one: the same product, r/out of the multiplies
        lora_out = self.lora_B(self.lora_A(xd) * self.scaling)
        if not self.is_dora:
            return base_out + lora_out.to(base_out.dtype)
        weight = layer.dense_weight().to(dt)
        norm = torch.linalg.norm(weight + self.delta_weight().detach(), dim=1).detach()
        mag = (self.lora_magnitude_vector / norm).view(1, -1)
        if isinstance(self.dropout, nn.Identity):
            plain = base_out.to(dt)
            if layer.base_layer.bias is not None:
                plain = plain - layer.base_layer.bias.to(dt)
        else:
            # with dropout the direction term must see the same dropped input as the LoRA term
            plain = F.linear(xd, weight)
        return base_out + ((mag - 1) * plain + mag * lora_out).to(base_out.dtype)


class LoraLinear(nn.Module):
    """A frozen linear layer (`base_layer`, plain or NF4) plus named adapters."""

    def __init__(self, base_layer: nn.Module, state: AdapterState):
        super().__init__()
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        object.__setattr__(self, "state", state)  # shared, not a submodule

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def weight(self):
        return self.base_layer.weight

    @property
    def bias(self):
        return self.base_layer.bias

    def dense_weight(self) -> torch.Tensor:
        """The base weight as a plain tensor (NF4 is dequantized)."""
        deq = getattr(self.base_layer, "dequantized_weight", None)
        return deq() if deq is not None else self.base_layer.weight

    def add_adapter(self, name: str, **kw) -> LoraWeights:
        w = self.dense_weight()
        ad = LoraWeights(self.in_features, self.out_features, device=w.device, **kw)
        if ad.is_dora:
            ad.init_magnitude(w)
        self.adapters[name] = ad
        return ad

    def _lean(self) -> Optional[LoraWeights]:
        """The one active adapter when it is plain LoRA (no DoRA, no dropout) in the base's dtype on a
        plain linear base, every row using it; else None."""
        st = self.state
        if st.disabled or st.rows is not None or len(st.active) != 1 or type(self.base_layer) is not nn.Linear:
            return None
        ad = self.adapters[st.active[0]] if st.active[0] in self.adapters else None
        if ad is None or ad.is_dora or type(ad.dropout) is not nn.Identity \
                or ad.lora_A.weight.dtype != self.base_layer.weight.dtype:
            return None
        return ad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ad = self._lean()
        if ad is not None:
            # `LoraWeights.forward`'s ops in its order as bare functions (the lean sampling layers of
            # rollout/hf.py): the same numbers and gradients without five nested module calls
            out = F.linear(x, self.base_layer.weight, self.base_layer.bias)
            return out + F.linear(F.linear(x, ad.lora_A.weight) * ad.scaling, ad.lora_B.weight)
        out = self.base_layer(x)
        st = self.state
        if st.disabled or not len(self.adapters):
            return out
        if st.rows is None:
            for name in st.active:
                if name in self.adapters:
                    out = self.adapters[name](x, out, self)
            return out
        result = out
        for name, idx in st.rows:
            if name not in self.adapters:
                continue
            part = self.adapters[name](x[idx], out[idx], self)
            result = result.index_copy(0, idx, part)
        return result

    def merged_linear(self, name: str, dtype: Optional[torch.dtype] = None) -> nn.Linear:
        """A plain nn.Linear whose weight folds adapter `name` into the (dequantized) base weight."""
        ad = self.adapters[name]
        base = self.dense_weight()
        dtype = dtype or (base.dtype if base.dtype.is_floating_point else torch.float32)
        with torch.no_grad():
            w = base.to(ad.lora_A.weight.dtype) + ad.delta_weight()
            if ad.is_dora:
                w = (ad.lora_magnitude_vector / torch.linalg.norm(w, dim=1)).view(-1, 1) * w
            bias = self.base_layer.bias
            lin = nn.Linear(self.in_features, self.out_features, bias=bias is not None, device=base.device, dtype=dtype)
            lin.weight.copy_(w.to(dtype))
            if bias is not None:
                lin.bias.copy_(bias.to(dtype))
        lin.requires_grad_(False)
        return lin


def output_head_names(model) -> set[str]:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {n for n, m in model.named_modules() if head is not None and m is head}


def linear_names(model) -> list[str]:
    """Names of the plain linear layers an adapter may target (the output head excluded)."""
    heads = output_head_names(model)
    return [n for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and n not in heads and ".base_layer" not in n and ".adapters." not in n
            and not n.startswith("posttrain_prompt")]


def resolve_targets(model, targets: Union[str, list[str]]) -> list[str]:
    """Module paths selected by `targets`: 'all-linear', a list of names, or a regex (full match, as PEFT).

    A list entry matches a module whose path equals it or ends with '.' + it (so 'q_proj'
    selects every layer's q_proj).
    """
    names = linear_names(model)
    if targets == "all-linear":
        chosen = names
    elif isinstance(targets, str):
        try:
            pat = re.compile(targets)
        except re.error as e:
            raise ValueError(f"adapter.targets: {targets!r} is not a valid regex ({e})") from None
        chosen = [n for n in names if pat.fullmatch(n)]
    else:
        wanted = list(targets)
        chosen = [n for n in names if any(n == t or n.endswith("." + t) for t in wanted)]
    if not chosen:
        last = sorted({n.rsplit(".", 1)[-1] for n in names})
        raise ValueError(
            f"adapter.targets {targets!r} matched no linear layer of {type(model).__name__}; "
            f"its linear layers are named {last} (a string is a regex matched against full paths such as "
            f"{names[0] if names else '?'!r}; use a list for names)")
    return chosen


def target_names_for_config(paths: list[str]) -> list[str]:
    """The last-part names PEFT records in `target_modules`."""
    return sorted({p.rsplit(".", 1)[-1] for p in paths})


def wrap_layer(model, path: str, state: AdapterState) -> LoraLinear:
    mod = model.get_submodule(path)
    if isinstance(mod, LoraLinear):
        return mod
    parent_name, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    layer = LoraLinear(mod, state)
    setattr(parent, child, layer)
    return layer


def add_lora(model, state: AdapterState, name: str, paths: list[str], *, r: int, alpha: float,
             dropout: float = 0.0, rslora: bool = False, dora: bool = False, ranks: Optional[dict] = None,
             alphas: Optional[dict] = None) -> list[LoraLinear]:
    """Wrap each module in `paths` and add adapter `name` to it. `ranks`/`alphas` override per path."""
    layers = []
    for p in paths:
        layer = wrap_layer(model, p, state)
        layer.add_adapter(name, r=(ranks or {}).get(p, r), alpha=(alphas or {}).get(p, alpha), dropout=dropout,
                          rslora=rslora, dora=dora)
        layers.append(layer)
    return layers


def lora_layers(model) -> dict[str, LoraLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear)}
