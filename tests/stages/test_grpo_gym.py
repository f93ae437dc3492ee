"""GRPO on the bundled gym model after SFT: measured held-out accuracy on the reasoning task.

The bundled base model is fine-tuned (stage `sft`) on gym:reasoning worked solutions, then GRPO
trains it with the task's verifier as the reward (`grpo.demo_stage`). Accuracy is greedy exact
match of the final answer on 200 held-out test problems, before and after GRPO.
"""

import json
import os

import pytest

from posttrain import gym
from posttrain.config import load_config
from posttrain.stages import grpo, sft

pytestmark = pytest.mark.slow


def base_model():
    # POSTTRAIN_TEST_BASE_MODEL runs the measurement on another checkpoint of the same family
    return os.environ.get("POSTTRAIN_TEST_BASE_MODEL") or gym.base_model_path()


SFT_STEPS = 150
GRPO_STEPS = 40
TARGET_GAIN = 0.15  # accuracy points (0-1), the target
MAX_TRAIN_S = 600
# Not met yet: on the step-600 pretraining checkpoint of the bundled model, SFT reaches 0.05 greedy
# (pass@8 0.23) and 40 GRPO steps (lr 2e-4, G=8, 16 prompts) gave 0.04 while the training reward rose
# from ~0.04 to ~0.10. The run takes ~15 min on the shared 2-core box, so it is opt-in.
RUN = os.environ.get("POSTTRAIN_RL_GYM") == "1"


@pytest.fixture(scope="module")
def reasoning_sft(tmp_path_factory):
    out = tmp_path_factory.mktemp("reasoning-sft")
    cfg = load_config("sft", overrides=[
        f"model={base_model()}", "data.train=gym:reasoning", f"output_dir={out / 'run'}", "train.lr=2e-3",
        "train.batch_size=16", f"train.max_steps={SFT_STEPS}", "train.warmup_steps=5", "train.progress=false",
        "data.max_length=256"])
    return sft.run(cfg).model_dir


@pytest.mark.skipif(not RUN, reason="opt-in (POSTTRAIN_RL_GYM=1): ~15 min, target not met yet, see TARGET_GAIN")
def test_grpo_raises_held_out_reasoning_accuracy(reasoning_sft, tmp_path):
    row = grpo.demo_stage(reasoning_sft, tmp_path / "grpo", max_steps=GRPO_STEPS, n_eval=200,
                          extra_overrides=["train.lr=2e-4"])
    print(json.dumps(row))
    assert row["train_time_s"] <= MAX_TRAIN_S
    assert row["gain"] >= TARGET_GAIN, row


def test_gym_reward_is_the_verifier():
    rows = gym.load_task_rows("reasoning", "validation", n=3)
    cols = {k: [r[k] for r in rows] for k in rows[0]}
    right = [f"work\nAnswer: {r['answer']}" for r in rows]
    wrong = [f"Answer: {int(r['answer']) + 1}" for r in rows]
    f = grpo.gym_reward("reasoning")
    assert f(None, right, **cols) == [1.0, 1.0, 1.0]
    assert f(None, wrong, **cols) == [0.0, 0.0, 0.0]
