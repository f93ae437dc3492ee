"""The default-on drift guard: its time budget, its stop and roll-back on a run that forgets, and its settings."""

import json
import pytest
import torch

from posttrain.eval.guard import DEFAULT_MAX_DRIFT_KL, DriftGuard, default_guard, guard_settings, within_budget
from tests.eval.conftest import narrow_step


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path / "cache"))


def test_budget_keeps_checks_within_ten_percent():
    # 300 steps of 0.5 s, a check of 1 s measured once at the start (it counts too)
    spent, train, checks, steps_at = 1.0, 0.0, 0, []
    for step in range(1, 301):
        train += 0.5
        if within_budget(spent, 1.0, train, 0.10):
            spent += 1.0
            checks += 1
            steps_at.append(step)
    assert spent / (spent + train) <= 0.10
    gaps = {b - a for a, b in zip(steps_at, steps_at[1:])}
    assert gaps == {18}  # ceil(1.0 * 0.9 / (0.1 * 0.5)) = 18 steps between checks
    assert checks == 15 and steps_at[0] == 36  # the start-up check is paid for first



def test_guard_stops_a_forgetting_run_and_rolls_back(tiny_models):
    from posttrain.models.loading import load

    model, tok = load(tiny_models("qwen2"), device="cpu")
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = DriftGuard(model, tok, n_prompts=12, max_new_tokens=6, n_text=8, max_drift_kl=0.3, max_ppl_change=None,
                   budget=0.99)
    assert g.start["drift_kl"] == 0.0 and g.start["general_ppl_change"] == 0.0 and g.good_step == 0
    step_fn, reason, total = narrow_step(model, tok, lr=0.5), None, 20
    for step in range(1, total + 1):
        step_fn()
        if g.due(step, total):
            m = g(model, step)
            reason = g.check(m)
            if reason:
                break
    assert reason is not None and step < total, g.history
    assert reason.startswith(f"forgetting guard: drift from the base {g.history[-1]['drift_kl']:.3f} nats/token > "
                             "limit 0.3; weights rolled back to step ")
    assert reason.endswith(" (eval.guard: off disables it)")
    good = [h for h in g.history if h["step"] == g.good_step]
    # the weights now are those of the last check within the limit: measuring again gives its numbers
    again = g._measure(model)
    if good:
        assert abs(again["drift_kl"] - good[0]["drift_kl"]) < 1e-6 and good[0]["drift_kl"] <= 0.3
    else:  # no check was within the limit: back to the starting weights
        assert all(torch.equal(p, start[n]) for n, p in model.named_parameters())
        assert again["drift_kl"] == 0.0


def test_no_rollback_only_stops(tiny_models):
    from posttrain.models.loading import load

    model, tok = load(tiny_models("qwen2"), device="cpu")
    g = DriftGuard(model, tok, n_prompts=8, max_new_tokens=4, n_text=4, max_drift_kl=0.01, max_ppl_change=None,
                   budget=0.5, rollback=False)
    step_fn = narrow_step(model, tok, lr=0.5)
    for _ in range(3):
        step_fn()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    reason = g.check(g(model, 1))
    assert reason and "rolled back" not in reason
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_guard_limits_are_checked(tiny_models):
    with pytest.raises(ValueError, match=r"max_drift_kl must be > 0 \(or None to only log\), got 0"):
        DriftGuard(None, None, max_drift_kl=0)
    with pytest.raises(ValueError, match=r"budget must be in \(0, 1\)"):
        DriftGuard(None, None, budget=1.5)


def test_settings_default_on_and_off():
    from posttrain.config import ConfigError, load_config

    s = guard_settings(load_config("sft"))
    assert s == {"on": True, "max_drift_kl": 0.5, "max_ppl_change": 1.0, "budget": 0.10, "n_prompts": 64,
                 "rollback": True, "text": None}
    assert DEFAULT_MAX_DRIFT_KL == 0.5  # one source: the config's default
    # YAML 1.1 reads a bare off as false: both spellings turn the guard off
    assert guard_settings(load_config("sft", overrides=["eval.guard=off"]))["on"] is False
    assert load_config("sft", overrides=["eval.guard=off"]).eval.guard == "off"
    assert guard_settings(load_config("sft", overrides=["eval.guard_text=g.jsonl", "data.mix.data=m.jsonl"]))["text"] \
        == "g.jsonl"
    assert guard_settings(load_config("sft", overrides=["data.mix.data=m.jsonl"]))["text"] == "m.jsonl"
    with pytest.raises(ConfigError, match=r"eval.guard: Input should be 'on' or 'off', got 'maybe'"):
        load_config("sft", overrides=["eval.guard=maybe"])
    with pytest.raises(ConfigError, match=r"eval.guard_budget: Input should be less than 1"):
        load_config("sft", overrides=["eval.guard_budget=1.5"])


def test_default_guard_uses_the_mix_data(tiny_models, tmp_path):
    from posttrain.config import load_config
    from posttrain.models.loading import load

    model, tok = load(tiny_models("qwen2"), device="cpu")
    general = tmp_path / "general.jsonl"
    general.write_text("".join(json.dumps({"text": f"General text number {i}."}) + "\n" for i in range(6)))
    cfg = load_config("sft", overrides=[f"data.mix.data={general}"])
    guards = default_guard(cfg, tok, model)
    assert guards.evaluators == [] and guards.guard is None
    assert guards.drift.text_source == str(general) and sum(len(p.text_rows) for p in guards.drift.pieces) == 6
    assert guards.drift.summary()["checks"] == 0 and guards.drift.summary()["drift_kl"] == 0.0


def test_guard_inside_the_engine_rolls_back_a_forgetting_run(tiny_models, tmp_path):
    """The guard through today's Engine hooks (evaluators at every step + guard), as the stages will call it."""
    from posttrain.config import load_config
    from posttrain.models.loading import load
    from posttrain.stages import sft

    d = tiny_models("qwen2")
    train = tmp_path / "narrow.jsonl"
    train.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Say it {i}"},
                                                       {"role": "assistant", "content": "yes yes yes yes"}]}) + "\n"
                             for i in range(32)))
    cfg = load_config("sft", overrides=[f"model={d}", f"data.train={train}", f"output_dir={tmp_path / 'run'}",
                                        "train.lr=3e-3", "train.max_steps=30", "train.batch_size=8", "train.eval_every=1",
                                        "train.schedule=constant", "train.warmup_steps=0", "train.progress=false"])
    model, tok = load(d, device="cpu")
    model.requires_grad_(True)
    g = DriftGuard(model, tok, n_prompts=12, max_new_tokens=6, n_text=8, max_drift_kl=0.2, max_ppl_change=None,
                   budget=0.9)

    def evaluator(m, step):
        return g(m, step) if g.due(step, 30) else {}

    res = sft.run(cfg, evaluators=[evaluator], guard=g.check, model=model, tokenizer=tok)
    reason = res.result["stop_reason"]
    assert reason.startswith("forgetting guard: drift from the base") and res.result["steps"] < 30, g.history
    assert f"weights rolled back to step {g.good_step}" in reason
    assert g._measure(res.model)["drift_kl"] <= 0.2
    logged = [json.loads(x) for x in (res.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "drift_kl" in r] == [h["step"] for h in g.history]
