"""engine.setup.load_for_training: QLoRA quantizes on the CPU before the model reaches its device."""

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from posttrain.models.adapters.qlora import NF4Linear
from posttrain.stages import load_config


class _TensorsOn(TorchDispatchMode):
    """Records (dtype, shape) of every tensor copied onto `device` (transformers also builds its empty
    model skeleton on `meta`, which this leaves out)."""

    def __init__(self, device: str):
        super().__init__()
        self.device, self.seen = device, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is not torch.ops.aten._to_copy.default:
            return out
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == self.device:
                self.seen.add((t.dtype, tuple(t.shape)))
        return out


def test_qlora_is_quantized_on_the_cpu_then_moved(tiny_models):
    """The device here is `meta` (it stands for a GPU): under QLoRA no fp32 decoder linear weight is
    ever created there, only NF4 codes; under LoRA every fp32 weight is."""
    from posttrain.engine.setup import load_for_training

    model_dir = tiny_models("llama")
    seen = {}
    for kind in ("qlora", "lora"):
        cfg = load_config("sft", None, [f"model={model_dir}", f"adapter.type={kind}", "data.train=x.jsonl"])
        with _TensorsOn("meta") as mode:
            model, _ = load_for_training(cfg, device="meta")
        seen[kind] = mode.seen
        assert {p.device.type for p in model.parameters()} == {"meta"}
        if kind == "qlora":
            assert len([m for m in model.modules() if isinstance(m, NF4Linear)]) == 7 * model.config.num_hidden_layers
    c = model.config
    mlp_weight = (torch.float32, (c.intermediate_size, c.hidden_size))
    assert mlp_weight in seen["lora"] and mlp_weight not in seen["qlora"]
    assert (torch.uint8, (c.intermediate_size * c.hidden_size // 2,)) in seen["qlora"]  # the 4-bit codes, two a byte


def test_qlora_from_released_pages_equals_quantizing_an_in_memory_copy(tiny_models):
    """Releasing each fp32 weight's file pages after quantizing changes nothing: logits and LoRA
    gradients equal those of the same model quantized from a copy of its weights in ordinary memory."""
    from posttrain.config import AdapterConfig
    from posttrain.engine.setup import load_for_training
    from posttrain.models import adapters
    from posttrain.models.loading import load

    model_dir = tiny_models("llama")
    cfg = load_config("sft", None, [f"model={model_dir}", "adapter.type=qlora", "data.train=x.jsonl",
                                    "train.device=cpu"])
    mapped, _ = load_for_training(cfg, device="cpu")
    copy, _ = load(model_dir, dtype="fp32", device="cpu")
    with torch.no_grad():
        for p in copy.parameters():
            p.data = p.data.clone()  # out of the mapped file: nothing to release
    torch.manual_seed(cfg.train.seed)
    copy = adapters.apply(copy, AdapterConfig(type="qlora"))
    ids = torch.randint(3, 400, (2, 16), generator=torch.Generator().manual_seed(0))
    outs = []
    for m in (mapped, copy):
        for p in m.parameters():
            if p.requires_grad:
                torch.nn.init.normal_(p, std=0.02, generator=torch.Generator().manual_seed(p.numel()))
        loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        outs.append((loss.detach(), [p.grad for p in m.parameters() if p.requires_grad]))
    assert torch.equal(outs[0][0], outs[1][0])
    assert all(torch.equal(a, b) for a, b in zip(outs[0][1], outs[1][1]))
