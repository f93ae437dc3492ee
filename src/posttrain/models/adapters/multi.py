"""Several LoRA adapters on one base, chosen per row of a batch.

One base model in memory serves many adapters: each LoRA layer holds every
adapter's A and B, and for a batch whose rows use different adapters it adds each
adapter's update only to its own rows (``none`` rows get the plain base). Nothing is
merged, so switching costs nothing and a mixed batch gives the same numbers as
running each adapter alone.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Union

import torch

from posttrain.models.adapters.state import get_state
from posttrain.models.adapters.peft_format import load_adapter

NONE = "none"


def load_adapters(model, adapters: dict[str, Union[str, Path]]):
    """Load LoRA/DoRA adapters under the given names; the first one becomes active."""
    if not adapters:
        raise ValueError("load_adapters: give at least one {name: directory}")
    for name, path in adapters.items():
        if name == NONE:
            raise ValueError(f"load_adapters: {NONE!r} is reserved for the plain base; rename that adapter")
        st = get_state(model)
        if st is not None and name in st.configs:
            raise ValueError(f"load_adapters: an adapter named {name!r} is already loaded")
        load_adapter(model, path, name=name)
        if get_state(model).kind in ("prompt", "prefix"):
            raise ValueError(f"load_adapters: {path} is a {get_state(model).kind} adapter; only LoRA adapters "
                             "can be mixed per row")
    get_state(model).active = [next(iter(adapters))]
    return model


def adapter_names(model) -> list[str]:
    st = get_state(model)
    return [] if st is None else list(st.configs)


@contextmanager
def select(model, names: Union[str, list[str]]):
    """Use adapter `names[i]` for row i of every batch inside the block (`none` = plain base).

    A single name switches the whole batch. Batches inside the block must have
    len(names) rows (generate with num_return_sequences>1 changes that and is refused).
    """
    st = get_state(model)
    if st is None or st.kind in ("prompt", "prefix"):
        raise ValueError("select: the model has no LoRA adapters; load them with load_adapters(model, {...})")
    known = set(st.configs)
    wanted = [names] if isinstance(names, str) else list(names)
    unknown = sorted({n for n in wanted if n != NONE and n not in known})
    if unknown:
        raise ValueError(f"select: unknown adapter(s) {unknown}; loaded: {sorted(known)} (or {NONE!r})")
    saved = (st.active, st.rows, st.disabled)
    handle = None
    try:
        if isinstance(names, str):
            st.active, st.rows, st.disabled = ([] if names == NONE else [names]), None, False
        else:
            device = next(model.parameters()).device
            rows = []
            for n in dict.fromkeys(wanted):
                if n != NONE:
                    idx = torch.tensor([i for i, w in enumerate(wanted) if w == n], device=device)
                    rows.append((n, idx))
            st.rows, st.disabled = rows, False
            handle = _install_batch_check(model, len(wanted))
        yield model
    finally:
        st.active, st.rows, st.disabled = saved
        if handle is not None:
            handle.remove()


def _install_batch_check(model, n_rows: int):
    def check(module, args, kwargs):
        x = kwargs.get("input_ids", args[0] if args else None)
        if x is None:
            x = kwargs.get("inputs_embeds")
        if x is not None and x.shape[0] != n_rows:
            raise ValueError(f"select: {n_rows} adapter names were given but the batch has {x.shape[0]} rows")

    return model.register_forward_pre_hook(check, with_kwargs=True)
