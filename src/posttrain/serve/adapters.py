"""The adapters a server holds, and LoRA for a batch whose rows use different adapters.

LoRA, rsLoRA and DoRA adapters are loaded with `posttrain.models.adapters.load_adapter`
(PEFT format), so each wrapped linear layer keeps every adapter's own A and B. For serving,
each layer also keeps them side by side, K adapters of ranks r_k in R = Σ r_k columns:

    A [in, R] (each block s_k · A_k^T),  B [R, out] (each block B_k^T),  owner [R],  g [K+1, out]
    h = (x A) ⊙ [owner == k]          (row of adapter k keeps its own r_k columns, exact zeros elsewhere)
    y = W x + (g[k] - 1) · W x + g[k] · h B

which is LoRA (``g = 1``) or DoRA with the norm taken as a constant (``g = m / ||W + sBA||``,
as in `models/adapters/lora.py`); rows on the plain base (k = 0) own no column. Two matmuls
and a mask per layer serve any mix of adapters, where `models/adapters/multi.py`'s `select`
slices, computes and scatters once per distinct adapter, and a per-row gather of A and B
(Punica's BGMV on GPUs) copied about 1 MB per row per step on the bundled model, which
made mixed batches slower on CPU than the extra R/r multiply-adds of computing every
adapter's x A.

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
    """Which LoRA adapter each row of the next forward uses (None: no LoRA at all)."""

    def __init__(self):
        self.ids: Optional[torch.Tensor] = None  # [B] long, 0 = plain base
        self._keep: dict[int, torch.Tensor] = {}

    def set(self, ids: Optional[torch.Tensor]) -> None:
        self.ids, self._keep = ids, {}

    def keep(self, owner: torch.Tensor, dtype) -> torch.Tensor:
        """[B, 1, R] 1 where column r belongs to the row's adapter; built once per forward per layout."""
        mask = self._keep.get(id(owner))
        if mask is None:
            mask = self._keep[id(owner)] = (self.ids[:, None] == owner[None, :]).to(dtype)[:, None, :]
        return mask


class _Stacks:
    """One layer's adapters side by side; a forward hook adds each row's own adapter update."""

    def __init__(self, layer: LoraLinear, names: list[str], rows: RowAdapters, layouts: dict):
        self.rows = rows
        w = layer.dense_weight()
        dt = w.dtype if w.dtype.is_floating_point else torch.float32
        a_blocks, b_blocks, owner = [], [], []
        g = torch.ones(len(names) + 1, layer.out_features, dtype=dt, device=w.device)
        self.dora = False
        with torch.no_grad():
            for k, name in enumerate(names, start=1):
                ad = layer.adapters[name] if name in layer.adapters else None
                if ad is None:
                    continue
                a_blocks.append((ad.lora_A.weight * ad.scaling).t().to(dt))
                b_blocks.append(ad.lora_B.weight.t().to(dt))
                owner += [k] * ad.r
                if ad.is_dora:
                    self.dora = True
                    norm = torch.linalg.norm(w.to(dt) + ad.delta_weight().to(dt), dim=1)
                    g[k] = ad.lora_magnitude_vector.to(dt) / norm
        self.A = torch.cat(a_blocks, 1) if a_blocks else None  # [in, R]: every adapter's s·A^T, side by side
        self.B = torch.cat(b_blocks, 0) if b_blocks else None  # [R, out]
        # [R]: the adapter each column belongs to; layers with the same layout share one tensor (and one mask)
        self.owner = layouts.setdefault(tuple(owner), torch.tensor(owner, device=w.device))
        self.g = g[:, None, :]  # [K+1, 1, out], broadcast over positions
        self.bias = layer.base_layer.bias

    def __call__(self, module, inputs, out):
        ids = self.rows.ids
        if ids is None or self.A is None:
            return None
        x = inputs[0]
        # every row goes through all adapters' A (R = sum of ranks columns, cheap), then each row keeps
        # only its own adapter's columns: exact zeros elsewhere, so B adds that adapter's update only
        keep = self.rows.keep(self.owner, self.A.dtype)
        delta = ((x.to(self.A.dtype) @ self.A) * keep @ self.B).to(out.dtype)
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
        layouts: dict = {}
        for layer in lora_layers(self.model).values():
            self._hooks.append(layer.register_forward_hook(_Stacks(layer, names, self.rows, layouts)))


def adapter_name_from_path(path) -> str:
    return Path(path).name
