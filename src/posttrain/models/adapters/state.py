"""The per-model adapter state that every adapter layer and hook reads.

One small object is shared by reference between the model and all of its
adapter layers, so switching the adapter off (the reference model of DPO/PPO/GRPO)
or choosing an adapter per row is one attribute write, not a walk over modules.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch

STATE_ATTR = "_posttrain_adapter_state"


@dataclass
class AdapterState:
    kind: str  # lora | dora | qlora | prompt | prefix
    configs: dict[str, dict[str, Any]] = field(default_factory=dict)  # adapter name -> PEFT-style settings
    active: list[str] = field(default_factory=lambda: ["default"])
    disabled: bool = False
    # per-row selection: (adapter name, row indices) pairs; None means every row uses `active`
    rows: Optional[list[tuple[str, torch.Tensor]]] = None
    hooks: list[Any] = field(default_factory=list)
    # prompt tuning: how many real positions the current forward returns logits for
    trim: Optional[int] = None


def get_state(model) -> Optional[AdapterState]:
    # a DistributedDataParallel wrapper hides its module's attributes: without this, `disabled(ddp_model)`
    # would silently run the adapted policy as the DPO/PPO/GRPO reference
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        model = model.module
    return getattr(model, STATE_ATTR, None)


def set_state(model, state: Optional[AdapterState]) -> None:
    # stored through object.__setattr__ so nn.Module does not try to register it
    object.__setattr__(model, STATE_ATTR, state)
