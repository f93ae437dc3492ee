"""The forgetting demonstration on the bundled base model (slow: two fine-tunes and their evaluations)."""

import json

import pytest

pytestmark = pytest.mark.slow


def test_naive_forgets_and_guarded_does_not(tmp_path):
    from posttrain import gym
    from posttrain.eval import forgetting

    try:
        gym.base_model_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    res = forgetting.run(tmp_path / "out")
    b, n, g = res["base"], res["naive"], res["guarded"]
    # what the demonstration is for: the naive run loses general skills, the guarded one keeps them
    assert b["regression_score"] - n["regression_score"] >= 0.15, res
    assert b["regression_score"] - g["regression_score"] <= 0.03, res
    assert g["task_accuracy"] > b["task_accuracy"], res
    saved = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert saved["verdict"] == res["verdict"]
    assert (tmp_path / "out" / "report.html").stat().st_size > 10_000
    logged = [json.loads(x) for x in (tmp_path / "out" / "guarded" / "metrics.jsonl").read_text().splitlines()]
    assert any("regression_score" in r and "task_accuracy" in r for r in logged if r.get("split") == "eval")
