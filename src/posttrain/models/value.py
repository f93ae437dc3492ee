"""PPO's value model: a transformer trunk with a scalar head on every position.

The trunk is loaded from a checkpoint: the policy's starting model (a copy of the policy trunk)
or the reward model (a `*ForSequenceClassification` checkpoint, whose trunk already reads the
reward; its score head then initialises the value head). V(s_t), the value of the state before
completion token t, is read at the position whose logits predict token t.
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

import torch
from torch import nn


class ValueModel(nn.Module):
    def __init__(self, trunk: nn.Module, hidden_size: int):
        super().__init__()
        self.trunk = trunk
        self.head = nn.Linear(hidden_size, 1)
        nn.init.normal_(self.head.weight, std=1.0 / (hidden_size + 1) ** 0.5)
        nn.init.zeros_(self.head.bias)

    @classmethod
    def from_pretrained(cls, path: Union[str, Path], *, device: Union[str, torch.device] = "cpu",
                        trust_remote_code: bool = False, seed: int = 0) -> "ValueModel":
        """Trunk from `path` (a causal LM or a reward model); fp32, trainable."""
        from safetensors import safe_open
        from transformers import AutoConfig, AutoModel
        from transformers.utils import logging as hf_logging

        torch.manual_seed(seed)
        cfg = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        before = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # the LM / score head is unused by design
        try:
            trunk = AutoModel.from_pretrained(str(path), dtype=torch.float32, use_safetensors=True,
                                              trust_remote_code=trust_remote_code)
        finally:
            hf_logging.set_verbosity(before)
        vm = cls(trunk, cfg.hidden_size)
        weights = Path(path) / "model.safetensors"
        if weights.exists():
            with safe_open(str(weights), "pt") as f:
                if "score.weight" in f.keys():  # a reward model: start the values at its scores
                    with torch.no_grad():
                        vm.head.weight.copy_(f.get_tensor("score.weight").float())
        return vm.to(device).requires_grad_(True)

    def forward(self, input_ids, attention_mask, position_ids=None) -> torch.Tensor:
        """[B, T] value of every position."""
        h = self.trunk(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       use_cache=False).last_hidden_state
        return self.head(h).squeeze(-1).float()

    def completion_values(self, batch: dict) -> torch.Tensor:
        """[N, C] V(s_t) for each completion token t (0 on padding)."""
        C = batch["completion_mask"].shape[1]
        v = self(batch["input_ids"], batch["attention_mask"], batch.get("position_ids"))[:, -C - 1:-1]
        return torch.where(batch["completion_mask"].bool(), v, torch.zeros_like(v))


def attach_value_model(policy: nn.Module, value, name: str = "ppo_value", **from_pretrained) -> nn.Module:
    """Register a value model inside `policy` so the engine's one optimizer, gradient clipping and
    checkpoints cover both; the published policy (save_pretrained / adapter save) leaves it out.

    `value` is a ValueModel or a checkpoint path for `ValueModel.from_pretrained(value, **from_pretrained)`;
    a policy that already holds one under `name` is returned as it is."""
    if name in dict(policy.named_children()):
        return policy
    if not isinstance(value, ValueModel):
        value = ValueModel.from_pretrained(value, **from_pretrained)
    policy.add_module(name, value)
    keys = {f"{name}.{k}" for k in value.state_dict()}
    ignore = set(getattr(policy, "_keys_to_ignore_on_save", None) or ()) | keys
    policy._keys_to_ignore_on_save = sorted(ignore)
    return policy
