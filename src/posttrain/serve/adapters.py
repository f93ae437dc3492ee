"""The adapters a server holds, and LoRA for a batch whose rows use different adapters.

LoRA, rsLoRA and DoRA adapters are loaded with `posttrain.models.adapters.load_adapter`
(PEFT format), so each wrapped linear layer keeps every adapter's own A and B. For serving,
each layer also keeps them stacked, with adapter 0 all zeros for rows on the plain base:

    A [K+1, in, r_max] (scale s folded in),  B [K+1, r_max, out],  g [K+1, out]
    y = W x + (g[k] - 1) · W x + g[k] · (x A[k]) B[k]      for a row using adapter k

which is LoRA (``g = 1``) or DoRA with the norm taken as a constant (``g = m / ||W + sBA||``,
as in `models/adapters/lora.py`). One gather and two batched matmuls per layer serve any mix
of adapters, as Punica's BGMV does (Chen et al. 2023, "Punica: Multi-Tenant LoRA Serving"),
instead of one slice-compute-scatter per adapter (`models/adapters/multi.py`'s `select`),
whose cost grows with the number of distinct adapters in the batch. Ranks below r_max are
zero-padded, which adds exact zeros.

Prompt and prefix tuning add virtual tokens instead of weights; they are kept here as
tensors and the engine puts them in front of each of their requests (prompt embeddings in
the prefill, prefix keys and values in the KV cache).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from posttrain.models.adapters.lora import LoraLinear, lora_layers
from posttrain.models.adapters.peft_format import load_adapter, read_adapter, stored_kind
from posttrain.models.adapters.prompt import kv_geometry, prefix_key_values
from posttrain.models.adapters.state import get_state

LORA_KINDS = ("lora", "dora", "qlora")


@dataclass
class ServedAdapter:
    name: str
    path: str
    kind: str  # lora | dora | qlora | prompt | prefix
    prompt: Optional[torch.Tensor] = None  # prompt tuning: [n, hidden]
    prefix: Optional[torch.Tensor] = None  # prefix tuning: [layers·2, kv, n, head_dim]
    retired: bool = False  # being unloaded: no new requests

    @property
    def num_virtual_tokens(self) -> int:
        t = self.prompt if self.prompt is not None else self.prefix
        if t is None:
            return 0
        return t.shape[0] if self.prompt is not None else t.shape[2]


class RowAdapters:
    """Which stacked LoRA adapter each row of the next forward uses (None: no LoRA at all)."""

    def __init__(self):
        self.ids: Optional[torch.Tensor] = None  # [B] long, 0 = plain base


class _Stacks:
    """One layer's adapters stacked for gathering; a forward hook adds their update."""

    def __init__(self, layer: LoraLinear, names: list[str], rows: RowAdapters):
        self.rows = rows
        w = layer.dense_weight()
        dt = w.dtype if w.dtype.is_floating_point else torch.float32
        present = [layer.adapters[n] if n in layer.adapters else None for n in names]
        r_max = max((a.r for a in present if a is not None), default=1)
        k = len(names) + 1
        self.A = torch.zeros(k, layer.in_features, r_max, dtype=dt, device=w.device)
        self.B = torch.zeros(k, r_max, layer.out_features, dtype=dt, device=w.device)
        g = torch.ones(k, layer.out_features, dtype=dt, device=w.device)
        self.dora = False
        with torch.no_grad():
            for i, ad in enumerate(present, start=1):
                if ad is None:
                    continue
                self.A[i, :, :ad.r] = (ad.lora_A.weight * ad.scaling).t().to(dt)
                self.B[i, :ad.r] = ad.lora_B.weight.t().to(dt)
                if ad.is_dora:
                    self.dora = True
                    norm = torch.linalg.norm(w.to(dt) + ad.delta_weight().to(dt), dim=1)
                    g[i] = ad.lora_magnitude_vector.to(dt) / norm
        self.g = g[:, None, :]  # [K+1, 1, out], broadcast over positions
        self.bias = layer.base_layer.bias

    def __call__(self, module, inputs, out):
        ids = self.rows.ids
        if ids is None:
            return None
        x = inputs[0]
        delta = torch.bmm(torch.bmm(x.to(self.A.dtype), self.A[ids]), self.B[ids]).to(out.dtype)
        if not self.dora:
            return out + delta
        plain = out if self.bias is None else out - self.bias
        g = self.g[ids].to(out.dtype)
        return out + (g - 1) * plain + g * delta


class AdapterSet:
    """The adapters loaded on one base model, by name."""

    def __init__(self, model):
        self.model = model
        self.rows = RowAdapters()
        self.adapters: dict[str, ServedAdapter] = {}
        self._hooks: list = []

    @property
    def lora_names(self) -> list[str]:
        return [n for n, a in self.adapters.items() if a.kind in LORA_KINDS]

    def lora_index(self, name: Optional[str]) -> int:
        """The stack index of a LoRA adapter (0: none)."""
        if name is None or self.adapters[name].kind not in LORA_KINDS:
            return 0
        return self.lora_names.index(name) + 1

    def load(self, name: str, path) -> ServedAdapter:
        if name in self.adapters:
            raise ValueError(f"an adapter named {name!r} is already loaded (from {self.adapters[name].path})")
        config, tensors, meta = read_adapter(path)
        kind = stored_kind(config, meta)
        if kind in LORA_KINDS:
            # quantize=False: a QLoRA adapter is served over the full-precision base that every other
            # adapter shares, rather than quantizing that base for everyone
            load_adapter(self.model, path, name=name, quantize=False)
            served = ServedAdapter(name, str(path), kind)
        else:
            served = self._virtual(name, path, kind, config, tensors["prompt_embeddings"])
        self.adapters[name] = served
        self._restack()
        return served

    def unload(self, name: str) -> None:
        served = self.adapters.pop(name)
        if served.kind in LORA_KINDS:
            for layer in lora_layers(self.model).values():
                if name in layer.adapters:
                    del layer.adapters[name]
            get_state(self.model).configs.pop(name, None)
        self._restack()

    def _virtual(self, name, path, kind, config, tensor) -> ServedAdapter:
        cfg = self.model.config
        emb = self.model.get_input_embeddings().weight
        layers, kv, head_dim = kv_geometry(cfg)
        want = cfg.hidden_size if kind == "prompt" else layers * 2 * kv * head_dim
        if tensor.dim() != 2 or tensor.shape[1] != want:
            raise ValueError(f"{path}: prompt_embeddings has shape {tuple(tensor.shape)}, but this model needs "
                             f"[num_virtual_tokens, {want}] for {kind} tuning; was it trained on another model?")
        if config.get("num_transformer_submodules", 1) != 1:
            raise ValueError(f"{path}: num_transformer_submodules={config['num_transformer_submodules']} "
                             "(encoder-decoder adapters) is not supported")
        t = tensor.to(device=emb.device, dtype=emb.dtype)
        if kind == "prompt":
            return ServedAdapter(name, str(path), kind, prompt=t)
        return ServedAdapter(name, str(path), kind, prefix=prefix_key_values(t, cfg).contiguous())

    def _restack(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        st = get_state(self.model)
        if st is None:
            return
        # the wrapped layers run their plain base; the stacks below add every row's own update
        st.disabled = True
        names = self.lora_names
        if not names:
            return
        for layer in lora_layers(self.model).values():
            self._hooks.append(layer.register_forward_hook(_Stacks(layer, names, self.rows)))


def adapter_name_from_path(path) -> str:
    return Path(path).name
