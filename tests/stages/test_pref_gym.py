"""base -> SFT -> DPO on the bundled gym model: the issue's targets, as measured (slow)."""

import json

import pytest

from posttrain import gym


@pytest.mark.slow
def test_dpo_on_the_gym_beats_sft(tmp_path):
    try:
        gym.base_model_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    from preference_gym import run_sft

    from posttrain.stages import dpo

    # the settings of `python bench/preference_gym.py --sft-steps 40 --dpo-steps 30 --n-eval 60
    #   --dpo train.batch_size=8 train.lr=5e-4 train.eval_every=null train.warmup_steps=3`
    sft_dir = run_sft(gym.base_model_path(), tmp_path, steps=40, n_train=2400)
    m = dpo.demo_stage(sft_dir, tmp_path / "dpo-stage", n_train=1600, n_eval=60,
                       extra_overrides=["train.max_steps=30", "train.batch_size=8", "train.lr=5e-4",
                                        "train.eval_every=null", "train.warmup_steps=3"])
    print(json.dumps(m))
    assert m["preference_accuracy"] >= 0.9
    assert m["preference_correctness"] > m["sft_preference_correctness"]
    assert m["sft_regression_score"] - m["regression_score"] <= 0.02
