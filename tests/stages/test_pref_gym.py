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

    # measured 13:53 UTC (bundled base of 13:25): accuracy 0.935, correctness 0.205 vs SFT 0.185,
    # regression 0.66 vs 0.725 (the last target is not met yet)
    sft_dir = run_sft(gym.base_model_path(), tmp_path, steps=40, n_train=2400)
    m = dpo.demo_stage(sft_dir, tmp_path / "dpo-stage", n_train=1600, n_eval=200)
    print(json.dumps(m))
    assert m["preference_accuracy"] >= 0.9
    assert m["preference_correctness"] > m["sft_preference_correctness"]
    assert m["sft_regression_score"] - m["regression_score"] <= 0.02
