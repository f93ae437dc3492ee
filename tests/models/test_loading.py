import shutil

import pytest
import torch

import posttrain
from posttrain.models.loading import ModelLoadError
from posttrain.models.tiny import build_tiny_model


def test_loads_every_architecture(tiny_models, arch):
    model, tok = posttrain.load(tiny_models(arch), device="cpu")
    ids = torch.tensor([tok.encode("hello world")])
    assert model(input_ids=ids).logits.shape == (1, ids.shape[1], len(tok))
    assert tok.pad_token_id is not None and tok.chat_template


def test_bf16_and_gradient_checkpointing(tiny_models):
    model, _ = posttrain.load(tiny_models("llama"), dtype="bf16", gradient_checkpointing=True)
    assert next(model.parameters()).dtype == torch.bfloat16
    assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing


def test_refuses_pickle_weights_unless_allowed(tiny_models, tmp_path):
    from transformers import AutoModelForCausalLM

    src = tiny_models("qwen2")
    d = tmp_path / "pickled"
    shutil.copytree(src, d)
    m = AutoModelForCausalLM.from_pretrained(str(src))
    (d / "model.safetensors").unlink()
    torch.save(m.state_dict(), d / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="only pickle weights"):
        posttrain.load(d)
    model, _ = posttrain.load(d, allow_pickle=True)
    assert torch.equal(model.lm_head.weight, m.lm_head.weight)


def test_never_runs_remote_code_unless_asked(tiny_models, tmp_path):
    import json

    d = tmp_path / "remote"
    shutil.copytree(tiny_models("qwen2"), d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (d / "config.json").write_text(json.dumps(cfg))
    marker = tmp_path / "pwned"
    (d / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    try:
        posttrain.load(d)
    except Exception:
        pass  # refusing is fine; running the code is not
    assert not marker.exists()


def test_missing_or_incomplete_directories(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        posttrain.load(str(tmp_path / "absent"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        posttrain.load(tmp_path / "empty")


def test_loads_a_finished_adapter_run_with_its_base(tiny_models, tmp_path):
    import json

    from posttrain.cli import main

    data = tmp_path / "t.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i} +", "completion": f" {i + 1}"}) + "\n" for i in range(16)))
    out = tmp_path / "run"
    assert main(["sft", f"model={tiny_models('qwen2')}", f"data.train={data}", f"output_dir={out}",
                 "adapter.type=lora", "train.max_steps=3", "train.lr=1e-2", "train.progress=false"]) == 0
    model, _ = posttrain.load(out)
    from posttrain.models import adapters

    assert adapters.adapter_type(model) == "lora"
    base, _ = posttrain.load(tiny_models("qwen2"))
    ids = torch.tensor([[5, 6, 7, 8]])
    with adapters.disabled(model):
        assert torch.equal(model(input_ids=ids).logits, base(input_ids=ids).logits)
    assert not torch.equal(model(input_ids=ids).logits, base(input_ids=ids).logits)


def test_tiny_checkpoint_with_a_head_wider_than_its_tokenizer(tokenizer, tmp_path):
    # real checkpoints pad their vocabulary (Qwen2.5: 151,665 tokens, 151,936 rows); the bench uses this
    d = build_tiny_model("qwen2", tmp_path / "wide", tokenizer=tokenizer, vocab_size=len(tokenizer) + 100)
    model, tok = posttrain.load(str(d))
    assert model.get_output_embeddings().weight.shape[0] == len(tok) + 100
    ids = tok("hello world", return_tensors="pt")["input_ids"]
    assert model(input_ids=ids).logits.shape[-1] == len(tok) + 100
    with pytest.raises(ValueError, match="smaller than the tokenizer"):
        build_tiny_model("qwen2", tmp_path / "narrow", tokenizer=tokenizer, vocab_size=len(tokenizer) - 1)
