"""`train.precision: auto`: bf16 only where the device has bf16 matrix kernels, and the choice is recorded."""

import json
import logging

import torch
import yaml

from posttrain.cli import main
from posttrain.engine.precision import native_bf16, resolve_precision
from posttrain.models.hardware import warn_slow_bf16
from posttrain.plan.devices import cpu_device


def test_auto_follows_the_cpus_kernels_and_explicit_choices_are_kept(caplog):
    native = native_bf16("cpu")
    # oneDNN's bf16 kernels need AVX512 (BW/VL/DQ) or better: none on an AVX2-only CPU
    cap = torch.backends.cpu.get_cpu_capability()
    if cap in ("DEFAULT", "AVX2"):
        assert not native
    elif cap == "AVX512" and torch.backends.mkldnn.is_available():
        assert native
    assert resolve_precision("auto", "cpu") == ("bf16" if native else "fp32")
    assert resolve_precision("auto", torch.device("meta")) == "fp32"
    assert resolve_precision("fp32", "cpu") == "fp32"
    warn_slow_bf16.cache_clear()  # once per process: an earlier test may have had it
    with caplog.at_level(logging.WARNING, logger="posttrain.models.hardware"):
        assert resolve_precision("bf16", "cpu") == "bf16"
    warned = [r.getMessage() for r in caplog.records if "no bf16 matrix kernels" in r.getMessage()]
    assert bool(warned) == (not native), warned
    if warned:
        assert "train.precision=bf16 on cpu" in warned[0] and cap in warned[0]
    # the adviser's CPU rates follow the same test
    dev = cpu_device(threads=1, memory_bytes=1)
    assert (dev.bf16_flops > dev.fp32_flops) == native


def test_loading_bf16_weights_warns_where_they_are_slow(tiny_models, caplog):
    from posttrain.models.loading import load

    warn_slow_bf16.cache_clear()
    with caplog.at_level(logging.WARNING, logger="posttrain.models.hardware"):
        model, _ = load(tiny_models("llama"), dtype="bf16", device="cpu")
    assert next(model.parameters()).dtype == torch.bfloat16
    warned = [r.getMessage() for r in caplog.records if "bf16 weights on cpu" in r.getMessage()]
    assert bool(warned) == (not native_bf16("cpu")), warned


def _chat(i):
    return {"messages": [{"role": "user", "content": f"Say {i}."}, {"role": "assistant", "content": f"{i}."}]}


def test_auto_trains_exactly_as_the_precision_it_resolves_to(tiny_models, tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(_chat(i)) + "\n" for i in range(16)))
    runs = {}
    expected = resolve_precision("auto", "cpu")
    for prec in ("auto", expected):
        out = tmp_path / prec
        assert main(["sft", f"model={tiny_models('qwen2')}", f"data.train={train}", f"output_dir={out}",
                     "train.max_steps=3", "train.batch_size=4", "data.max_length=64", "train.progress=false",
                     f"train.precision={prec}"]) == 0
        assert yaml.safe_load((out / "config.yaml").read_text())["train"]["precision"] == expected
        runs[prec] = [json.loads(l)["loss"] for l in (out / "metrics.jsonl").read_text().splitlines()
                      if json.loads(l).get("split") == "train"]
    assert len(runs["auto"]) == 3 and runs["auto"] == runs[expected]
