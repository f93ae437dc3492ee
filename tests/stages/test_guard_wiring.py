"""The guards wired into every stage: the default-on drift guard (its metrics, manifest entry, stop and
roll-back, the CLI line, `eval.guard=off`), the data audit at stage start, the RL reward-hacking monitor."""

import json
import logging

import pytest
import torch

from posttrain.cli import main
from posttrain.data.sources import DataError
from posttrain.eval.guard import DriftGuard
from posttrain.models.loading import load
from posttrain.stages import grpo, load_config, sft


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path / "cache"))


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _narrow(tmp_path, n=32):
    """One narrow answer to many prompts: at a high learning rate the model forgets everything else."""
    return _write(tmp_path / "narrow.jsonl", [{"messages": [{"role": "user", "content": f"Say it {i}"},
                                                             {"role": "assistant", "content": "yes yes yes yes"}]}
                                               for i in range(n)])


def _records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _sft(tiny_models, tmp_path, name, *extra):
    return load_config("sft", overrides=[f"model={tiny_models('qwen2')}", f"data.train={_narrow(tmp_path)}",
                                         f"output_dir={tmp_path / name}", "train.batch_size=8",
                                         "train.progress=false", "train.schedule=constant", "train.warmup_steps=0",
                                         *extra])


def test_guard_is_on_by_default_logs_drift_and_writes_the_manifest(tiny_models, tmp_path):
    # no eval.* key at all; then a budget and a prompt count a tiny run of a few seconds can afford
    # some checks with (at the default 10% it gets none: the next test)
    cfg = _sft(tiny_models, tmp_path, "run", "train.max_steps=30", "train.lr=1e-4")
    assert cfg.eval.guard == "on" and cfg.eval.guard_budget == 0.10
    cfg.eval.guard_budget, cfg.eval.guard_prompts = 0.5, 16
    res = sft.run(cfg)
    g = json.loads((res.output_dir / "manifest.json").read_text())["result"]["guard"]
    assert g["max_drift_kl"] == 0.5 and g["max_ppl_change"] == 1.0 and g["text_source"] == "bundled general_text.jsonl"
    checks = [r for r in _records(res.output_dir) if "drift_kl" in r]
    assert len(checks) == g["checks"] >= 1 and all(r["split"] == "eval" for r in checks)
    assert checks[-1]["drift_kl"] == g["drift_kl"] and 0 < g["drift_kl"] < 0.5
    assert {"general_ppl", "general_ppl_change", "guard_time_share"} <= set(checks[-1])
    assert res.result["stop_reason"] is None
    assert 0 < g["time_share"] <= 0.5


def test_a_short_run_at_the_default_budget_is_not_checked_and_says_why(tiny_models, tmp_path):
    res = sft.run(_sft(tiny_models, tmp_path, "run", "train.max_steps=2"))
    g = res.result["guard"]
    assert g["checks"] == 0 and g["drift_kl"] == 0.0  # the start's numbers
    assert g["note"].startswith("no check after the start: the run (") and "within 10% of its time" in g["note"]
    assert not [r for r in _records(res.output_dir) if "drift_kl" in r]


def test_guard_off(tiny_models, tmp_path):
    res = sft.run(_sft(tiny_models, tmp_path, "run", "train.max_steps=3", "eval.guard=off"))
    assert "guard" not in res.result
    assert not [r for r in _records(res.output_dir) if "drift_kl" in r]


def test_absurd_lr_trips_the_drift_limit_and_publishes_the_last_good_weights(tiny_models, tmp_path, capsys):
    d = tiny_models("qwen2")
    out = tmp_path / "run"
    rc = main(["sft", f"model={d}", f"data.train={_narrow(tmp_path)}", f"output_dir={out}", "train.batch_size=8",
               "train.max_steps=40", "train.lr=5e-2", "train.schedule=constant", "train.warmup_steps=0",
               "train.progress=false", "eval.guard_budget=0.9"])
    assert rc == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "completed"
    r = m["result"]
    reason, steps, good = r["stop_reason"], r["steps"], r["guard"]["good_step"]
    assert steps < 40 and reason.startswith("forgetting guard: drift from the base ")
    assert " nats/token > limit 0.5" in reason
    assert reason.endswith(f"; weights rolled back to step {good} (eval.guard: off disables it)")
    # the CLI's one line: stopped, why, whose weights
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("posttrain: sft ")]
    assert lines == [f"posttrain: sft stopped at step {steps} by the {reason}; published {out / 'model'}"]
    # the published weights are the last good check's: their drift on the first piece of prompts (in
    # every check) is that check's `drift_kl_core` (the start's, 0, when it rolled back to step 0)
    model, tok = load(str(out / "model"), device="cpu")
    g = DriftGuard(load(d, device="cpu")[0], tok)  # the run's settings: the same pieces, from the cache
    g._grow(1)
    published = g._measure(model)["drift_kl_core"]
    checks = {c["step"]: c["drift_kl_core"] for c in _records(out) if "drift_kl" in c}
    assert published == pytest.approx(checks.get(good, 0.0), abs=1e-5) and published <= 0.5
    if good == 0:
        base, _ = load(d, device="cpu")
        assert all(torch.equal(p, base.state_dict()[n]) for n, p in model.state_dict().items())


# ---------------------------------------------------------------- the data audit at stage start


def _truncating(tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"Say {i}"}, {"role": "assistant", "content": f"{i}"}]}
            for i in range(8)]
    rows[2] = {"messages": [{"role": "user", "content": "word " * 80}, {"role": "assistant", "content": "ok"}]}
    return _write(tmp_path / "train.jsonl", rows)


def test_audit_error_names_the_origin(tiny_models, tmp_path, capsys):
    train = _truncating(tmp_path)
    rc = main(["sft", f"model={tiny_models('qwen2')}", f"data.train={train}", f"output_dir={tmp_path / 'run'}",
               "data.max_length=32", "train.max_steps=1", "train.progress=false"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert err.count("\n") <= 3
    assert f"{train} line 3: loss_after_truncation: no loss token left:" in err
    with pytest.raises(DataError, match=r"data audit: 1 violation\(s\) in 8 examples \(loss_after_truncation: 1\)"):
        sft.run(load_config("sft", overrides=[f"model={tiny_models('qwen2')}", f"data.train={train}",
                                              f"output_dir={tmp_path / 'run2'}", "data.max_length=32",
                                              "train.max_steps=1", "train.progress=false"]))


def test_audit_warn_is_one_line_and_off_is_silent(tiny_models, tmp_path, caplog):
    train = _truncating(tmp_path)
    base = [f"model={tiny_models('qwen2')}", f"data.train={train}", "data.max_length=32", "train.max_steps=1",
            "train.progress=false", "eval.guard=off"]
    with caplog.at_level(logging.WARNING, logger="posttrain.data.audit"):
        sft.run(load_config("sft", overrides=[*base, f"output_dir={tmp_path / 'w'}", "data.audit=warn"]))
    msgs = [r.getMessage() for r in caplog.records if r.name == "posttrain.data.audit"]
    assert len(msgs) == 1 and "\n" not in msgs[0]
    assert msgs[0].startswith("data audit: 1 violation(s) in 8 examples (loss_after_truncation: 1); first: "
                              f"{train} line 3: loss_after_truncation:")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="posttrain.data.audit"):
        sft.run(load_config("sft", overrides=[*base, f"output_dir={tmp_path / 'o'}", "data.audit=off"]))
    assert not [r for r in caplog.records if r.name == "posttrain.data.audit"]


# ---------------------------------------------------------------- the RL reward-hacking monitor


def shorter(prompts, completions, **kw):
    """A hackable length reward: shorter is better, whatever is said."""
    return [-len(c) / 40 for c in completions]


def digit_frac(prompts, completions, **kw):
    return [sum(ch.isdigit() for ch in c) / max(1, len(c)) for c in completions]


def _grpo(tiny_models, tmp_path, name, *extra):
    prompts = _write(tmp_path / "prompts.jsonl", [{"prompt": f"Hello {i} how"} for i in range(32)])
    return load_config("grpo", overrides=[
        f"model={tiny_models('qwen2')}", f"data.train={prompts}", f"output_dir={tmp_path / name}",
        "train.batch_size=8", "train.progress=false", "train.warmup_steps=0", "train.schedule=constant",
        "grpo.max_new_tokens=16", "grpo.num_generations=4", "eval.guard=off", *extra])


def test_length_reward_trips_length_drift_and_stops(tiny_models, tmp_path, capsys):
    cfg = _grpo(tiny_models, tmp_path, "hack", "train.max_steps=30", "train.lr=3e-2", "grpo.hacking_window=2",
                "grpo.hacking_max_length_factor=1.3", "grpo.hacking_stop_on=[length_drift]")
    res = grpo.run(cfg, reward_fns=[shorter])
    h = res.result["hacking"]
    assert "length_drift" in h["fired"] and h["stop_on"] == ["length_drift"]
    step = h["fired"]["length_drift"]["step"]
    assert res.result["steps"] == step < 30
    assert res.result["stop_reason"].startswith("reward-hacking guard: mean completion length went ")
    assert "weights rolled back to step " in res.result["stop_reason"]
    assert f"posttrain: reward hacking? step {step}: mean completion length went" in capsys.readouterr().err
    train = [r for r in _records(res.output_dir) if r["split"] == "train"]
    assert train[-1]["hack/length_drift"] == 1.0 and train[0]["hack/length_drift"] == 0.0
    assert {"distinct_2", "identical_share", "zero_variance_frac"} <= set(train[0])


def test_a_normal_run_fires_nothing(tiny_models, tmp_path):
    cfg = _grpo(tiny_models, tmp_path, "clean", "train.max_steps=10", "train.lr=1e-4", "grpo.hacking_window=2")
    res = grpo.run(cfg, reward_fns=[digit_frac])
    assert res.result["hacking"]["fired"] == {} and res.result["stop_reason"] is None
    train = [r for r in _records(res.output_dir) if r["split"] == "train"]
    assert len(train) == 10 and all(r[f"hack/{d}"] == 0.0 for r in train for d in
                                    ("length_drift", "kl_bound", "diversity_collapse"))


def test_help_lists_the_guard_audit_and_hacking_keys(capsys):
    for stage, keys in (("sft", ("eval.guard  on | off = 'on'", "eval.guard_max_drift_kl  float | null = 0.5",
                                 "eval.guard_budget  float = 0.1", "eval.guard_text  str | null = null",
                                 "data.audit  error | warn | off = error")),
                        ("grpo", ("grpo.hacking_stop_on  list[reward_vs_verifier | length_drift", "grpo.hacking_window")),
                        ("ppo", ("ppo.hacking_stop_on", "ppo.hacking_max_kl  float = 0.5"))):
        with pytest.raises(SystemExit):
            main([stage, "--help"])
        out = capsys.readouterr().out
        assert all(k in out for k in keys), (stage, [k for k in keys if k not in out])


def test_hacking_verifier_feeds_reward_vs_verifier():
    """`grpo.hacking_verifier` names the reward whose score is the verifier (logged as reward/NAME): the
    training reward rising while it falls fires reward_vs_verifier; both rising does not."""
    from posttrain.stages.rl_common import HackingCheck

    cfg = load_config("grpo", None, ["grpo.rewards=[length,gym:reasoning]", "grpo.reward_weights=[1.0,0.0]",
                                      "grpo.hacking_verifier=gym:reasoning"])

    def run(verifier):
        check = HackingCheck(cfg.grpo, None, 1)
        fired = []
        for step in range(1, 13):
            m = {"reward": 0.1 + 0.05 * step, "reward/gym_reasoning": verifier(step), "completion_length": 30.0}
            out, _ = check.after_step(None, step, 12, m)
            fired = list(check.summary()["fired"])
        return fired

    assert "reward_vs_verifier" in run(lambda t: 0.6 - 0.04 * t)
    assert "reward_vs_verifier" not in run(lambda t: 0.2 + 0.02 * t)
    with pytest.raises(ValueError, match="hacking_verifier 'gym:math' is not one of rewards"):
        load_config("grpo", None, ["grpo.rewards=[length]", "grpo.hacking_verifier=gym:math"])
