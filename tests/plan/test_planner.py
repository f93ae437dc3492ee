"""`posttrain plan`: the JSON it prints, its verdicts and its errors."""

import contextlib
import io
import json

import pytest

from posttrain.cli import main
from posttrain.plan.devices import DEVICES
from posttrain.plan.memory import CUDA_CONTEXT, NF4_BYTES_PER_WEIGHT, RunSpec, adapter_params
from posttrain.plan.shapes import read_shape
from posttrain.plan.speed import step_flops


def _run(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def llama7b(tmp_path_factory):
    """Llama-2-7B's config.json alone: the planner needs no weights."""
    from transformers import LlamaConfig

    d = tmp_path_factory.mktemp("llama-2-7b")
    LlamaConfig(vocab_size=32000, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=32, intermediate_size=11008).save_pretrained(d)
    return d


def test_json_output_and_wall_time(tiny_models, tmp_path):
    model = tiny_models("qwen2")
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(100)))
    rc, out, _ = _run(["plan", f"model={model}", f"data.train={data}", "train.batch_size=8", "--json"])
    assert rc == 0
    p = json.loads(out)
    assert {"peak_memory_bytes", "memory_breakdown", "tokens_per_s", "wall_time_s", "fits"} <= set(p)
    assert sum(p["memory_breakdown"].values()) == pytest.approx(p["train_peak_bytes"], abs=16)
    assert p["peak_memory_bytes"] == max(p["train_peak_bytes"], p["load_peak_bytes"])
    assert p["total_steps"] == 13  # ceil(100 rows / 8)
    assert p["wall_time_s"] == pytest.approx(13 * p["step_time_s"])
    assert p["fits"] is True and p["device"] == "cpu"


def test_seven_billion_verdicts(llama7b):
    shape = read_shape(llama7b)
    assert shape.total_params == 6_738_415_616  # Llama-2-7B's published count
    rc, out, _ = _run(["plan", f"model={llama7b}", "train.precision=bf16", "data.max_length=2048",
                       "train.batch_size=4", "--device", "L4-24GB", "--json"])
    p = json.loads(out)
    assert p["fits"] is False
    assert p["memory_breakdown"]["optimizer"] == 8 * shape.total_params  # AdamW's two fp32 moments
    assert p["fix"]["change"].startswith("adapter.type=qlora")
    assert p["fix"]["train_peak_bytes"] <= 0.95 * DEVICES["L4-24GB"].memory_bytes
    # QLoRA quantizes on the CPU before moving: the L4 never holds the 27 GB of fp32 weights
    assert p["fix"]["load_fits"] is True
    rc, out, _ = _run(["plan", f"model={llama7b}", "adapter.type=qlora", "train.precision=bf16", "data.max_length=2048",
                       "train.batch_size=4", "--device", "L4-24GB", "--json"])
    q = json.loads(out)
    nf4 = shape.linear_params * NF4_BYTES_PER_WEIGHT + (shape.total_params - shape.linear_params) * 4
    lora = q["memory_breakdown"]["adapter"]
    assert q["load_peak_bytes"] == int(nf4 + lora + CUDA_CONTEXT)  # 4.74 GiB, against 25.6 GiB of fp32 weights
    rc, out, _ = _run(["plan", f"model={llama7b}", "adapter.type=lora", "train.precision=bf16", "--device", "L4-24GB",
                       "--json"])
    assert json.loads(out)["load_peak_bytes"] == 4 * shape.total_params + CUDA_CONTEXT
    rc, out, _ = _run(["plan", f"model={llama7b}", "adapter.type=lora", "train.precision=bf16",
                       "train.gradient_checkpointing=true", "data.max_length=2048", "train.batch_size=4",
                       "--device", "A100-80GB", "--json"])
    assert json.loads(out)["fits"] is True


def test_flops_follow_six_n_t_for_full_fine_tuning(tiny_models):
    shape = read_shape(tiny_models("llama"))
    spec = RunSpec(batch_size=2, seq_len=64)
    f = step_flops(shape, spec)
    assert f.matmul == 6 * shape.linear_params * 128 + 8 * shape.hidden * shape.vocab * 2 * 63  # + head recompute
    spec = RunSpec(adapter="lora", batch_size=2, seq_len=64)
    # no weight gradients for the frozen base: 4 FLOPs per weight and token, LoRA's own 8
    assert step_flops(shape, spec).matmul == (4 * shape.linear_params * 128 + 6 * shape.hidden * shape.vocab * 2 * 63
                                              + 8 * adapter_params(shape, spec) * 128)


def test_clear_errors(tmp_path):
    rc, _, err = _run(["plan", f"model={tmp_path}"])
    assert rc == 2 and f"{tmp_path} has no config.json: the planner needs the model's Hugging Face config" in err
    rc, _, err = _run(["plan", f"model={tmp_path / 'nope'}"])
    assert rc == 2 and "model not found" in err
    (tmp_path / "config.json").write_text('{"model_type": "llama", "hidden_size": 8}')
    rc, _, err = _run(["plan", f"model={tmp_path}"])
    assert rc == 2 and "missing vocab_size, num_hidden_layers, num_attention_heads, intermediate_size" in err
    rc, _, err = _run(["plan", f"model={tmp_path}", "--device", "TPU"])
    assert rc == 2 and "unknown device 'TPU'; known: cpu, H100-80GB" in err


def test_dpo_reference_copy_and_the_adapter_fix(llama7b):
    rc, out, _ = _run(["plan", "--stage", "dpo", f"model={llama7b}", "train.precision=bf16",
                       "train.gradient_checkpointing=true", "data.max_length=1024", "train.batch_size=4",
                       "--device", "H100-80GB", "--json"])
    p = json.loads(out)
    b = p["memory_breakdown"]
    assert b["reference_model"] == b["weights"] == 4 * 6_738_415_616  # dpo.reference defaults to a copy
    assert p["fix"]["change"] == "adapter.type=lora"
    # with LoRA the reference is the adapter disabled: no second copy of the weights
    assert p["fix"]["train_peak_bytes"] < 2 * b["weights"]


def test_advise_errors():
    rc, _, err = _run(["advise", "data.train=x.jsonl", "--no-pilots"])
    assert rc == 2 and "no model given: set model=DIR" in err
