"""Adapters for the serving tests: built on the bundled base model with random non-zero weights."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from posttrain.config import AdapterConfig
from posttrain.gym import base_model_path
from posttrain.models import adapters as A


def make_adapter(out, kind: str, seed: int, **kw):
    """A `kind` adapter (lora | rslora | dora | prompt | prefix) whose weights all differ from the
    fresh initialisation, so it changes the model's output."""
    torch.manual_seed(seed)
    m = AutoModelForCausalLM.from_pretrained(str(base_model_path())).eval()
    cfg = {"lora": dict(type="lora", r=8), "rslora": dict(type="lora", r=16, rslora=True),
           "dora": dict(type="dora", r=4), "prompt": dict(type="prompt", num_virtual_tokens=4),
           "prefix": dict(type="prefix", num_virtual_tokens=3)}[kind]
    A.apply(m, AdapterConfig(**{**cfg, **kw}))
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05)
            elif "lora_magnitude_vector" in n:
                p.mul_(1 + 0.2 * torch.rand_like(p))
            elif "posttrain_prompt" in n:
                p.normal_(std=0.5)
    A.save(m, out)
    return out


@pytest.fixture(scope="session")
def served_adapters(tmp_path_factory):
    """name -> adapter directory: two LoRA (one rsLoRA), one DoRA, one prompt and one prefix adapter."""
    d = tmp_path_factory.mktemp("serve-adapters")
    kinds = {"lora-a": "lora", "lora-b": "rslora", "dora": "dora", "prompt": "prompt", "prefix": "prefix"}
    return {name: make_adapter(d / name, kind, seed) for seed, (name, kind) in enumerate(kinds.items())}
