"""GGUF files written with the gguf package, loaded back with transformers' GGUF loader: same logits."""

import pytest
import torch

pytest.importorskip("gguf")

from transformers import AutoModelForCausalLM  # noqa: E402

from posttrain.export.gguf import GGUFExportError, write_gguf  # noqa: E402

IDS = torch.tensor([[1, 5, 9, 33, 70, 2, 8, 100, 3, 4, 250, 17]])
# measured on the tiny checkpoints (max |logit| about 0.6): f16 2.4e-4, q8_0 7.4e-3
TOLERANCE = {"f16": 1e-3, "q8_0": 2e-2}


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_gguf_round_trip_matches_the_hf_logits(arch, tiny_models, tmp_path):
    d = tiny_models(arch)
    ref = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    with torch.no_grad():
        want = ref(IDS).logits
    sizes = {}
    for kind, tol in TOLERANCE.items():
        path = write_gguf(d, tmp_path / f"model-{kind}.gguf", kind)
        sizes[kind] = path.stat().st_size
        back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
        with torch.no_grad():
            got = back(IDS).logits
        err = (got - want).abs().max().item()
        assert err <= tol, (kind, err)
        assert err > 0  # really quantized: not the same float32 weights
        assert back.config.num_hidden_layers == ref.config.num_hidden_layers
    assert sizes["q8_0"] < 0.6 * sizes["f16"]


def test_unsupported_architectures_and_types_are_clear_errors(tiny_models, tmp_path):
    with pytest.raises(GGUFExportError, match=r"GGUF export supports llama, mistral, qwen2 checkpoints, not 'gemma'; "
                                              r"convert this one with llama.cpp's convert_hf_to_gguf.py"):
        write_gguf(tiny_models("gemma"), tmp_path / "x.gguf")
    with pytest.raises(GGUFExportError, match="unknown GGUF type 'q4_k'; choose one of f16, q8_0"):
        write_gguf(tiny_models("qwen2"), tmp_path / "x.gguf", "q4_k")
