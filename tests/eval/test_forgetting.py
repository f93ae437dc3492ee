"""The forgetting demonstration on the bundled base model (slow: two fine-tunes and their evaluations, ~7 min)."""

import json
import re

import pytest

pytestmark = pytest.mark.slow


def test_naive_forgets_and_guarded_does_not(tmp_path):
    from posttrain import gym
    from posttrain.pipeline import forgetting

    try:
        gym.base_model_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    res = forgetting.run(tmp_path / "out")
    b, n, g = res["base"], res["naive"], res["guarded"]
    # the targets: the naive run loses >= 15 regression points, the guarded one stays within 2
    # points of the base and reaches at least the naive run's target accuracy
    assert b["regression_score"] - n["regression_score"] >= 0.15, res
    assert b["regression_score"] - g["regression_score"] <= 0.02, res
    assert g["task_accuracy"] >= n["task_accuracy"] > b["task_accuracy"], res
    assert res["verdict"]["targets_met"] is True
    assert n["steps"] == 630 and not n["stop_reason"]  # 10 epochs of 63 steps, nothing stopped it
    saved = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert saved["verdict"] == res["verdict"]
    logged = [json.loads(x) for x in (tmp_path / "out" / "guarded" / "metrics.jsonl").read_text().splitlines()]
    assert any("regression_score" in r and "task_accuracy" in r for r in logged if r.get("split") == "eval")
    # the report plots the target and the regression metric over steps, both runs on one set of axes
    page = (tmp_path / "out" / "report.html").read_text()
    alts = re.findall(r'<img src="data:image/png;base64,[^"]+" alt="([^"]+)"', page)
    assert alts[:3] == ["loss", "task accuracy", "regression score"], alts
