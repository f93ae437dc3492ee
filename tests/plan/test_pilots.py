"""Pilots: the learning-curve fit and its extrapolation, the uncertainty, and the decision with pilots."""

import math

import pytest

from posttrain.plan.advise import decide_with_pilots, pilot_plan
from posttrain.plan.pilots import binomial_noise, extrapolate, pilot_steps


def _correct(score: float, n: int) -> list[bool]:
    k = round(score * n)
    return [True] * k + [False] * (n - k)


def test_a_power_law_is_read_at_the_full_step_count():
    """err(t) = 0.8 t^-0.5 measured exactly at 4..64 steps: 256 steps give 1 - 0.8/16 = 95%."""
    steps, n = [4, 8, 16, 32, 64], 4000
    got = extrapolate(steps, [_correct(1 - 0.8 * t ** -0.5, n) for t in steps], 256)
    assert got["alpha"] == pytest.approx(0.5, abs=1e-2)
    assert got["expected_score"] == pytest.approx(0.95, abs=2e-3)
    assert got["uncertainty"] < 0.01  # 4,000 examples: about the binomial noise of the full run (0.34 points)
    assert [p["step"] for p in got["points"]] == steps and got["target_steps"] == 256


def test_the_uncertainty_is_the_bootstrap_and_the_full_runs_own_noise():
    steps, n = [4, 8, 16, 32, 64], 50
    got = extrapolate(steps, [_correct(1 - 0.8 * t ** -0.5, n) for t in steps], 256)
    # on 50 examples the prediction is ±5 to ±10 points: more than the full run's noise alone
    assert binomial_noise(got["expected_score"], n) < got["uncertainty"] < 0.10
    assert got["expected_score"] == pytest.approx(0.95, abs=0.02)


def test_a_curve_that_gets_worse_is_not_extrapolated():
    steps, n = [5, 10, 15, 20], 50
    got = extrapolate(steps, [_correct(s, n) for s in (0.4, 0.3, 0.3, 0.2)], 1000)
    assert got["alpha"] == 0.0
    # the geometric mean of the errors (0.6, 0.7, 0.7, 0.8), not a growing error
    assert got["expected_score"] == pytest.approx(1 - math.exp(sum(map(math.log, (0.6, 0.7, 0.7, 0.8))) / 4))


def test_nothing_learned_predicts_nothing_with_an_honest_uncertainty():
    got = extrapolate([4, 8, 12], [[False] * 50] * 3, 100)
    assert got["expected_score"] == 0.0
    assert got["uncertainty"] == pytest.approx(math.sqrt(0.01 * 0.99 / 50))  # half an example of 50 off 0


def test_extrapolate_rejects_mismatched_points():
    with pytest.raises(ValueError, match="one list of per-example results per step"):
        extrapolate([1, 2], [[True]], 10)


def test_equal_compute_buys_more_steps_of_a_cheaper_method():
    assert pilot_steps(1.0, 0.5, 1000) == 120
    assert pilot_steps(1.0, 2.0, 1000) == 30
    assert pilot_steps(1.0, 0.01, 1000) == 1000  # never past the full run
    assert pilot_steps(0.01, 60.0, 1000) == 5  # at least the five points a curve needs


def _cand(score, unc=0.02, fits=True):
    return {"fits": fits, "expected_score": score, "uncertainty": unc}


@pytest.mark.parametrize("rule, cands, expected", [
    ("lora", {"prompting": _cand(0.0), "lora": _cand(0.0), "full": _cand(0.02)}, "lora"),  # all noise: the rule
    ("lora", {"prompting": _cand(0.1), "lora": _cand(0.3), "cpt+sft": _cand(0.7, 0.1)}, "cpt+sft"),
    ("lora", {"prompting": _cand(0.1), "lora": _cand(0.3), "cpt+sft": _cand(0.38, 0.1)}, "lora"),  # within ± 10
    ("prompting", {"prompting": _cand(1.0), "prompt_tuning": _cand(0.98)}, "prompting"),
    ("prefix_tuning", {"prompting": _cand(0.2), "lora": _cand(0.5)}, "lora"),  # the rule's pick was not piloted
    ("lora", {"prompting": _cand(0.0), "lora": _cand(0.2), "full": _cand(0.9, fits=False)}, "lora"),
])
def test_pilots_overrule_the_rule_of_thumb_only_beyond_the_noise(rule, cands, expected):
    assert decide_with_pilots(rule, cands)[0] == expected


def test_which_methods_get_a_pilot():
    fits = lambda *ms: {m: {"fits": m in ms} for m in  # noqa: E731
                        ("prompting", "prompt_tuning", "prefix_tuning", "lora", "qlora", "full", "cpt+sft")}
    every = ("prompting", "prompt_tuning", "prefix_tuning", "lora", "qlora", "full", "cpt+sft")
    assert pilot_plan(fits(*every), {}, None) == ["prompt_tuning", "lora", "full"]
    assert pilot_plan(fits(*every), {}, "domain.jsonl") == ["prompt_tuning", "lora", "full", "cpt+sft"]
    assert pilot_plan(fits("prompting", "prompt_tuning", "qlora"), {}, None) == ["prompt_tuning", "qlora"]


def test_drift_is_projected_to_the_full_run():
    from posttrain.plan.pilots import project_drift

    assert project_drift([10, 20, 40], [0.1, 0.2, 0.4], 80) == pytest.approx(0.8)  # drift ∝ t
    assert project_drift([10, 20, 40], [0.3, 0.2, 0.1], 80) == pytest.approx(0.006 ** (1 / 3))  # shrinking: the mean level
    assert project_drift([10], [0.2], 80) == 0.2


def test_a_run_the_guard_would_stop_is_not_picked():
    cands = {"prompting": _cand(0.0), "lora": _cand(0.9), "full": {**_cand(0.96), "guard_stops": True}}
    pick, reasons = decide_with_pilots("lora", cands)
    assert pick == "lora"
    assert reasons[0].startswith("pilots: the forgetting guard would stop full (drift from the base projected")


def test_advise_with_pilots_end_to_end(tmp_path):
    """`posttrain advise --pilot-minutes`: three pilots of 5 steps (the minimum) on the gym's chat
    instructions, each scored 5 times on 20 held-out rows, with the keys the docs list."""
    import contextlib
    import io
    import json

    from posttrain import gym
    from posttrain.cli import main

    train = gym.export("instruct", "train", tmp_path / "train.jsonl", n=100)
    held = gym.export("instruct", "validation", tmp_path / "val.jsonl", n=20)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["advise", f"model={gym.base_model_path()}", f"data.train={train}", f"data.eval={held}",
                   "data.max_length=128", "train.batch_size=8", "train.max_steps=10", "--pilot-minutes", "0.01",
                   "--json", "--out", str(tmp_path / "adv")])
    assert rc == 0
    out = json.loads(buf.getvalue())
    assert sorted(out["pilots"]) == ["full", "lora", "prompt_tuning"]
    for m, p in out["pilots"].items():
        assert p["pilot_steps"] == 5 and p["target_steps"] == 10 and len(p["points"]) == 5
        assert {"expected_score", "uncertainty", "alpha", "drift_kl", "general_ppl_change", "forgetting_risk",
                "projected_drift_kl"} <= set(p)
        assert 0.0 <= p["expected_score"] <= 1.0 and p["uncertainty"] > 0
    c = {x["method"]: x for x in out["candidates"]}
    assert c["lora"]["expected_score"] == out["pilots"]["lora"]["expected_score"]
    assert c["qlora"]["expected_score"] is None  # LoRA fits: QLoRA is not piloted
    assert out["recommendation"] in ("lora", "full", "prompt_tuning", "prompting")
    assert any(r.startswith("pilots") for r in out["reasons"])
    # each pilot is the first 5 steps of the 10-step run: its schedule is the full run's (cosine over 10
    # steps after int(0.03 * 10) = 0 warmup steps), so its 5th step is at the middle of the decay, not at its end
    lrs = [json.loads(x)["lr"] for x in (tmp_path / "adv" / "pilots" / "lora" / "sft" / "metrics.jsonl").read_text()
           .splitlines() if json.loads(x)["split"] == "train"]
    peak = out["pilots"]["lora"]["learning_rate"]
    assert lrs == pytest.approx([peak * 0.5 * (1 + math.cos(math.pi * s / 10)) for s in range(5)])
