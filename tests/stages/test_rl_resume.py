"""GRPO and PPO resume bit for bit: from a checkpoint taken between the minibatch steps of one rollout,
at the end of a rollout, and later, the resumed run ends with every tensor equal to the uninterrupted one.

A kill -9 leaves exactly what a run with an atomic checkpoint at step k has on disk when nothing
after step k was written (tests/stages/test_resume.py kills a real process for SFT, and
tests/engine/test_checkpoint_faults.py interrupts checkpoint writes); here each kill point is the
uninterrupted run's directory cut back to its step-k checkpoint, so one run serves three kill points.
"""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from posttrain.stages import grpo, load_config, ppo

STEPS = 6


def digit_frac(prompts, completions, **kw):
    return [sum(ch.isdigit() for ch in c) / max(1, len(c)) for c in completions]


@pytest.fixture
def prompts_file(tmp_path):
    p = tmp_path / "prompts.jsonl"
    p.write_text("\n".join(json.dumps({"prompt": f"Hello {i} how"}) for i in range(32)))
    return p


def _config(stage, model, prompts, out):
    common = [f"model={model}", f"data.train={prompts}", f"output_dir={out}", "train.batch_size=4",
              f"train.max_steps={STEPS}", "train.save_every=1", "train.keep_last=100", "train.lr=1e-2",
              "train.warmup_steps=0", "train.progress=false", "train.seed=5"]
    if stage == "grpo":  # 2 optimizer steps per rollout, beta > 0 (the reference reloads from disk on resume)
        extra = ["grpo.num_generations=4", "grpo.max_new_tokens=8", "grpo.minibatches=2", "grpo.beta=0.1",
                 "grpo.micro_batch_size=4"]
    else:  # 2 epochs per rollout, an adaptive KL coefficient (part of the checkpointed state)
        extra = ["ppo.max_new_tokens=8", "ppo.epochs=2", "ppo.target_kl=1.0", "ppo.kl_horizon=100"]
    return load_config(stage, overrides=[*common, *extra])


def _cut_back_to(run, step, to):
    """`run` as a kill -9 right after its step-`step` checkpoint would have left it."""
    shutil.copytree(run, to, ignore=shutil.ignore_patterns("model", "manifest.json", "report.html", "step-*"))
    for d in sorted((run / "checkpoints").glob("step-*")):
        if int(d.name[5:]) <= step:
            shutil.copytree(d, to / "checkpoints" / d.name)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (to / "metrics.jsonl").write_text("".join(line + "\n" for line in lines
                                              if json.loads(line).get("step", 0) <= step))


@pytest.mark.parametrize("stage", ["grpo", "ppo"])
def test_rl_resume_is_exact_at_three_kill_points(tiny_models, prompts_file, tmp_path, stage):
    module = {"grpo": grpo, "ppo": ppo}[stage]
    model = tiny_models("qwen2")
    full = tmp_path / "full"
    res = module.run(_config(stage, model, prompts_file, full), reward_fns=[digit_frac])
    want = load_file(str(res.model_dir / "model.safetensors"))
    losses = [r["loss"] for r in map(json.loads, (full / "metrics.jsonl").read_text().splitlines())
              if r.get("split") == "train"]
    assert len(losses) == STEPS and len(set(losses)) > 1
    # step 1: between the two steps of the first rollout; 2: at the end of a rollout; 5: mid third rollout
    for k in (1, 2, 5):
        killed = tmp_path / f"killed-{k}"
        _cut_back_to(full, k, killed)
        got = module.run(_config(stage, model, prompts_file, killed), reward_fns=[digit_frac], resume=True)
        weights = load_file(str(got.model_dir / "model.safetensors"))
        assert weights.keys() == want.keys()
        for name in want:
            assert torch.equal(weights[name], want[name]), (k, name)
        resumed = [r["loss"] for r in map(json.loads, (killed / "metrics.jsonl").read_text().splitlines())
                   if r.get("split") == "train"]
        assert resumed == losses, k


def test_grpo_killed_mid_rollout_resumes_bit_for_bit(tiny_models, prompts_file, tmp_path):
    """A real SIGKILL: `posttrain grpo` is killed once its step-3 checkpoint (the first step of the
    second rollout) exists; `--resume` ends with the uninterrupted run's weights."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from posttrain.cli import main

    model = tiny_models("qwen2")
    reward = "grpo.rewards=[tests.stages.test_rl_resume:digit_frac]"

    def args(out):
        cfg = _config("grpo", model, prompts_file, out)
        return [f"model={model}", f"data.train={prompts_file}", f"output_dir={out}", "train.batch_size=4",
                f"train.max_steps={STEPS}", "train.save_every=1", "train.keep_last=100", "train.lr=1e-2",
                "train.warmup_steps=0", "train.progress=false", "train.seed=5", "grpo.num_generations=4",
                f"grpo.max_new_tokens={cfg.grpo.max_new_tokens}", "grpo.minibatches=2", "grpo.beta=0.1",
                "grpo.micro_batch_size=4", reward]

    root = Path(__file__).resolve().parents[2]  # the reward is importable from the repository root
    assert main(["grpo", *args(tmp_path / "full")]) == 0
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "posttrain", "grpo", *args(killed)], cwd=root,
                            env={**os.environ, "PYTHONPATH": str(root)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "step-3").exists():
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "manifest.json").exists() and not (killed / "model").exists()
    assert main(["grpo", "--resume", *args(killed)]) == 0
    a = load_file(str(tmp_path / "full" / "model" / "model.safetensors"))
    b = load_file(str(killed / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
