"""bench/plan_accuracy.py's GPU mode (`--device cuda`), checked on the CPU as far as a CPU can: the planner
side of every GPU configuration (from config.json only) and the mapping from a CUDA device name to the
planner's device table. The measurement itself needs a GPU (docs/advise.md)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import plan_accuracy  # noqa: E402

H100 = ("NVIDIA H100 80GB HBM3", 85_045_477_376)  # torch.cuda.get_device_name / total_memory on an H100 SXM
H200 = ("NVIDIA H200", 150_754_820_096)


def _config_only(work: Path) -> None:
    """The GPU shapes as config.json alone: the planner reads nothing else (no weights are built here)."""
    from posttrain.models.tiny import tiny_config

    for name, (arch, vocab, d, layers, heads, kv, f) in plan_accuracy.GPU_SHAPES.items():
        extra = {"head_dim": d // heads} if arch == "gemma" else {}
        tiny_config(arch, vocab, hidden=d, layers=layers, heads=heads, kv_heads=kv, intermediate=f, max_pos=4096,
                    **extra).save_pretrained(work / name)


def test_each_gpu_configuration_is_planned_for_an_h100_and_fits_it(tmp_path):
    from posttrain.plan.memory import RunSpec, estimate_memory
    from posttrain.plan.shapes import read_shape

    _config_only(tmp_path)
    assert len(plan_accuracy.GPU_CONFIGS) >= 12
    sizes = {read_shape(tmp_path / s).total_params for s in plan_accuracy.GPU_SHAPES}
    assert min(sizes) > 4.5e8 and max(sizes) > 1.1e9, sizes  # the shapes users train, not toys
    for i, (shape, adapter, seq, batch, ckpt, prec, _) in enumerate(plan_accuracy.GPU_CONFIGS):
        spec = {"shape": shape, "adapter": adapter, "seq_len": seq, "batch": batch, "ckpt": ckpt, "precision": prec,
                "device": "cuda", "device_name": H100[0], "device_memory_bytes": H100[1]}
        pred = plan_accuracy.predict(spec, tmp_path)
        assert pred["planner_device"] == "H100-80GB", pred
        # against torch.cuda.max_memory_allocated: the planner's peak without the CUDA context
        full = estimate_memory(read_shape(tmp_path / shape), RunSpec(
            adapter=adapter, batch_size=batch, seq_len=seq, precision=prec, gradient_checkpointing=ckpt))
        assert pred["predicted_peak_bytes"] == full.peak_bytes - full.breakdown["runtime"] == \
            full.peak_bytes - 512 * 2**20
        # every run fits one H100 with room for the allocator's fragmentation, so the GPU call cannot run out
        assert pred["predicted_peak_bytes"] < 0.8 * 80e9, (i, spec, pred["predicted_peak_bytes"] / 2**30)
        assert 0 < pred["predicted_step_s"] < 10, (i, pred)


@pytest.mark.parametrize("name,memory,expected", [
    (*H100, "H100-80GB"), (*H200, "H200"), ("NVIDIA A100-SXM4-40GB", 42_505_273_344, "A100-40GB"),
    ("NVIDIA A100-SXM4-80GB", 85_089_976_320, "A100-80GB"), ("NVIDIA L4", 23_580_639_232, "L4-24GB"),
    ("NVIDIA GeForce RTX 4090", 25_386_352_640, "RTX4090-24GB"), ("Tesla T4", 15_835_660_288, None),
])
def test_a_cuda_device_name_maps_to_the_planner_table(name, memory, expected):
    dev = plan_accuracy.gpu_device_for(name, memory)
    assert (dev.name if dev else None) == expected


def test_cuda_mode_without_a_gpu_says_so(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the refusal is for machines without one")
    with pytest.raises(SystemExit) as e:
        plan_accuracy.main(["--device", "cuda", "--work", str(tmp_path)])
    assert str(e.value).startswith(f"plan_accuracy: --device cuda, but torch {torch.__version__} sees no CUDA device")
