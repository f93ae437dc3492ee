"""Disk full during a checkpoint: the run is marked failed, nothing half-written looks complete, and the
previous checkpoint is intact and resumable (bit-exact, as after a kill)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from posttrain.cli import main
from posttrain.engine.checkpoint import list_checkpoints

from .mounts import tmpfs


def _args(model, data, out):
    return [f"model={model}", f"data.train={data}", f"output_dir={out}", "train.max_steps=6", "train.save_every=2",
            "train.batch_size=4", "train.lr=1e-3", "train.seed=3", "train.progress=false", "data.max_length=48",
            "train.keep_last=1"]


def _rows(n):
    return "".join(json.dumps({"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                                            {"role": "assistant", "content": f"It is {2 * i}."}]}) + "\n"
                   for i in range(n))


@pytest.mark.faults  # three short runs, ~30 s: its own CI step (make test-faults)
def test_disk_full_during_checkpoint(tiny_models, tmp_path, capsys):
    import subprocess

    model = tiny_models("qwen2")
    data = tmp_path / "train.jsonl"
    data.write_text(_rows(32))
    full = tmp_path / "full"
    assert main(["sft", *_args(model, data, full)]) == 0
    last = list_checkpoints(full / "checkpoints")[-1]
    size = sum(f.stat().st_size for f in last.rglob("*") if f.is_file())
    assert size > 1_000_000

    # room for one checkpoint and a half: step-2 is written, step-4 runs out of space half-way
    with tmpfs(tmp_path / "fs", size=f"{int(size * 1.5) // 1024}k") as fs:
        out = fs / "run"
        assert main(["sft", *_args(model, data, out)]) == 2
        err = capsys.readouterr().err
        assert f"posttrain: error: could not write checkpoint {out / 'checkpoints' / 'step-4'}: the disk is full" in err
        assert f"the previous checkpoint {out / 'checkpoints' / 'step-2'} is intact" in err
        assert "Traceback" not in err
        m = json.loads((out / "manifest.json").read_text())
        assert m["status"] == "failed" and "the disk is full" in m["error"]
        # nothing half-written is left, so nothing can look complete
        assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2"]
        assert list_checkpoints(out / "checkpoints") == [out / "checkpoints" / "step-2"]
        assert not (out / "model").exists()

        subprocess.run(["mount", "-o", "remount,size=64m", str(fs)], check=True)  # space freed
        assert main(["sft", "--resume", *_args(model, data, out)]) == 0
        a, b = load_file(str(full / "model" / "model.safetensors")), load_file(str(out / "model" / "model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert json.loads((out / "manifest.json").read_text())["status"] == "completed"
