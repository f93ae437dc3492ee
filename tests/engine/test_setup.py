"""engine.setup.load_for_training: QLoRA quantizes on the CPU before the model reaches its device."""

import torch

from posttrain.models.adapters.qlora import NF4Linear
from posttrain.stages import load_config


def test_qlora_is_quantized_on_the_cpu_then_moved(tiny_models):
    """The target device here is `meta` (it holds no data, like a GPU that never sees the fp32
    weights): the NF4 codes can only come from quantizing on the CPU first."""
    from posttrain.engine.setup import load_for_training

    cfg = load_config("sft", None, [f"model={tiny_models('llama')}", "adapter.type=qlora", "data.train=x.jsonl"])
    model, _ = load_for_training(cfg, device="meta")
    nf4 = [m for m in model.modules() if isinstance(m, NF4Linear)]
    assert len(nf4) == 7 * model.config.num_hidden_layers
    assert {p.device.type for p in model.parameters()} == {"meta"}
    trained = [p for p in model.parameters() if p.requires_grad]
    assert trained and all(p.dtype == torch.float32 for p in trained)
    cpu, _ = load_for_training(cfg, device="cpu")
    assert {p.device.type for p in cpu.parameters()} == {"cpu"}
