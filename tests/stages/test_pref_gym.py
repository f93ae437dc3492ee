"""base -> SFT -> DPO on the bundled gym model: issue 5's targets, as measured (about 2 min).

The SFT is short (40 steps), so its answers to the held-out preference prompts leave room (0.355
correct); the demo's longer SFT is already at 0.91 there (docs/preference.md). DPO is the demo's
recipe: LoRA, RPO term, and the SFT model's own rejected answers beside the gym pairs.
"""

import json

import pytest

from posttrain import gym


def test_dpo_on_the_gym_beats_sft(tmp_path):
    try:
        gym.base_model_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    from preference_gym import run_sft

    from posttrain.pipeline.gym_rows import dpo_row

    # measured 2026-11-27 16:30 UTC (base v2, 1 thread, bf16 on an AVX512 CPU): preference accuracy 0.955,
    # correctness 0.645 vs SFT 0.355, regression 0.75 vs 0.765; DPO training 77 s. 2026-12-07 in fp32 on an
    # AVX2 CPU (the demo recipe's `precision: auto` picks fp32 there): 0.975, 0.685 vs 0.36, regression 0.735
    # vs 0.76 (5 of the 200 items), DPO training 81 s. Both rows run in fp32 here, on every machine, so the
    # numbers do not depend on the CPU's bf16 kernels; issue 5's <= 0.02 regression target is asserted on
    # the demo's own chain (tests/demo/test_demo.py: +0.01 in fp32), this short-SFT start keeps <= 0.03.
    sft_dir = run_sft(gym.base_model_path(), tmp_path, steps=40, n_train=2400, extra=["train.precision=fp32"])
    m = dpo_row(sft_dir, tmp_path / "dpo-stage", n_train=1600, n_eval=200, extra_overrides=["train.precision=fp32"])
    print(json.dumps(m))
    assert m["preference_accuracy"] >= 0.9
    assert m["preference_correctness"] > m["sft_preference_correctness"]
    assert m["sft_regression_score"] - m["regression_score"] <= 0.03
