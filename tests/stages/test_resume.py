"""A run killed with SIGKILL and resumed ends with the same weights as an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time

import torch
from safetensors.torch import load_file

from posttrain.cli import main


def _chat_rows(n):
    rows = []
    for i in range(n):
        a, b = i % 17, (i * 7) % 13
        rows.append({"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                                  {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]})
    return rows


def _args(model, data, out):
    return [f"model={model}", f"data.train={data}", f"output_dir={out}", "train.max_steps=24",
            "train.save_every=4", "train.batch_size=4", "train.lr=1e-3", "train.seed=3", "train.progress=false",
            "data.max_length=64", "train.keep_last=3"]


def _weights(run):
    return load_file(str(run / "model" / "model.safetensors"))


def _train_losses(run):
    return [(r["step"], r["loss"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if r["split"] == "train"]


def test_kill_and_resume_matches_uninterrupted(tiny_models, tmp_path):
    model = tiny_models("qwen2", hidden=128, layers=4, intermediate=256)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _chat_rows(96)))

    full = tmp_path / "full"
    assert main(["sft", *_args(model, data, full)]) == 0

    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "posttrain", "sft", *_args(model, data, killed)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (killed / "checkpoints" / "step-8").exists():
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # a killed run never looks complete
    assert not (killed / "manifest.json").exists()
    assert not (killed / "model").exists()

    assert main(["sft", "--resume", *_args(model, data, killed)]) == 0
    a, b = _weights(full), _weights(killed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert _train_losses(full) == _train_losses(killed)
    m = json.loads((killed / "manifest.json").read_text())
    assert m["status"] == "completed" and m["data"]


def test_completed_run_is_not_overwritten(tiny_models, tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _chat_rows(8)))
    out = tmp_path / "run"
    args = [f"model={tiny_models('qwen2')}", f"data.train={data}", f"output_dir={out}", "train.max_steps=2",
            "train.progress=false"]
    assert main(["sft", *args]) == 0
    before = (out / "model" / "model.safetensors").read_bytes()
    assert main(["sft", *args]) == 2
    assert "already holds a completed run" in capsys.readouterr().err
    assert (out / "model" / "model.safetensors").read_bytes() == before
