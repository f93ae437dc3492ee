"""Stage `safety` on tiny models: the data recipe (sft and dpo forms), config errors, and what a run records."""

import json

import pytest

from posttrain import gym
from posttrain.config import ConfigError
from posttrain.stages import load_config
from posttrain.data.sources import DataError
from posttrain.stages import safety
from posttrain.data.refusal import refusal_scores
from posttrain.data.safety import DEFAULT_COMPLIANCE, DEFAULT_REFUSAL, build_rows, to_conversation, to_pair

HARMFUL = {"messages": [{"role": "user", "content": "How do I hurt Bo?"},
                        {"role": "assistant", "content": DEFAULT_REFUSAL}], "harmful": True}
BENIGN = {"messages": [{"role": "user", "content": "How do I kill a python process?"},
                       {"role": "assistant", "content": "Run pkill."}], "harmful": False}


def test_labelled_conversations_become_the_issue_s_preference_pairs():
    h = to_pair(HARMFUL, "row 0", refusal=DEFAULT_REFUSAL, compliance=DEFAULT_COMPLIANCE)
    assert h["prompt"] == HARMFUL["messages"][:1]
    assert h["chosen"] == [{"role": "assistant", "content": DEFAULT_REFUSAL}]  # refusal over compliance
    assert h["rejected"] == [{"role": "assistant", "content": DEFAULT_COMPLIANCE}]
    b = to_pair(BENIGN, "row 1", refusal=DEFAULT_REFUSAL, compliance=DEFAULT_COMPLIANCE)
    assert b["chosen"] == [{"role": "assistant", "content": "Run pkill."}]  # helpful over refusal
    assert b["rejected"] == [{"role": "assistant", "content": DEFAULT_REFUSAL}]
    pair = {"prompt": "p", "chosen": "a", "rejected": "b"}
    assert to_pair(pair, "row 2", refusal="x", compliance="y") is pair
    assert to_conversation(pair, "row 2")["messages"] == [{"role": "user", "content": "p"},
                                                          {"role": "assistant", "content": "a"}]


def test_recipe_errors_name_the_row_and_the_fix():
    unlabelled = {"messages": BENIGN["messages"]}
    with pytest.raises(DataError, match="row 3: safety.method=dpo builds pairs from conversations labelled 'harmful'"):
        to_pair(unlabelled, "row 3", refusal=DEFAULT_REFUSAL, compliance=DEFAULT_COMPLIANCE)
    mislabelled = {**HARMFUL, "harmful": False}
    with pytest.raises(DataError, match="row 4: the answer equals the refusal text .* is 'harmful' right"):
        to_pair(mislabelled, "row 4", refusal=DEFAULT_REFUSAL, compliance=DEFAULT_COMPLIANCE)
    with pytest.raises(DataError, match="row 5: a safety row needs 'messages'"):
        to_conversation({"text": "hi"}, "row 5")


def test_retain_rows_are_mixed_at_the_ratio(tmp_path):
    cfg = load_config("safety", overrides=["safety.retain=gym:instruct:train",
                                           "safety.retain_ratio=0.25", "train.seed=3"])
    rows = build_rows(cfg.safety, "gym:refusal:train", retain=True, seed=cfg.train.seed)
    refusal = [r for r in rows if "harmful" in r]
    assert len(refusal) == 2000 and len(rows) == round(2000 / 0.75)
    assert len({json.dumps(r, sort_keys=True) for r in rows if "harmful" not in r}) == len(rows) - 2000  # no repeats
    assert build_rows(cfg.safety, "gym:refusal:train", retain=True, seed=cfg.train.seed) == rows  # seeded
    assert len(build_rows(cfg.safety, "gym:refusal:train", retain=False, seed=cfg.train.seed)) == 2000


def test_refusal_scores_use_the_eval_detector():
    rows = [{"harmful": True}, {"harmful": True}, {"harmful": False}, {"harmful": False}, {"harmful": False}, {}]
    outs = ["I can't help with that.", "Sure, first buy", "I'm sorry, no.", "Run pkill.", "Use a pump.", "I can't"]
    s = refusal_scores(rows, outs)
    assert (s["refusal_rate"], s["over_refusal_rate"], s["n_harmful"], s["n_benign"]) == (0.5, 1 / 3, 2, 3)
    assert s["refusal_accuracy"] == 3 / 5


def test_config_errors():
    with pytest.raises(ConfigError, match=r"unknown key 'safety.retain_ration' \(did you mean 'safety.retain_ratio'\?\)"):
        load_config("safety", overrides=["safety.retain_ration=0.3"])
    with pytest.raises(ConfigError, match="safety.retain mixes helpful chats into the sft recipe; with safety.method=dpo"):
        load_config("safety", overrides=["safety.method=dpo", "safety.retain=gym:instruct"])
    with pytest.raises(ConfigError, match="data.mix .* needs safety.method=sft"):
        load_config("safety", overrides=["safety.method=dpo", "data.mix.data=gym:regression"])
    with pytest.raises(ConfigError, match="safety.method"):
        load_config("safety", overrides=["safety.method=ppo"])
    with pytest.raises(ConfigError, match="safety.retain_ratio"):
        load_config("safety", overrides=["safety.retain_ratio=1.0"])


@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_a_run_records_refusal_rates_before_and_after(tiny_models, tmp_path, method):
    out = tmp_path / "run"
    train = gym.export("refusal", "train", tmp_path / "train.jsonl", n=12)
    val = gym.export("refusal", "validation", tmp_path / "val.jsonl", n=10)
    retain = gym.export("instruct", "train", tmp_path / "retain.jsonl", n=8)
    # sft: a 64-token limit (for speed) leaves one long refusal prompt no loss token, which training
    # drops; the data audit is right to stop on it, so it only warns here (this test is about the rates)
    extra = [f"safety.retain={retain}", "safety.retain_ratio=0.25", "data.audit=warn"] if method == "sft" else \
        ["adapter.type=lora", "dpo.reference=adapter"]
    cfg = load_config("safety", overrides=[
        f"model={tiny_models('qwen2')}", f"data.train={train}", f"data.eval={val}",
        f"output_dir={out}", f"safety.method={method}", "train.max_steps=2", "train.batch_size=4",
        "safety.max_new_tokens=4", "data.max_length=64", "train.progress=false", *extra])
    res = safety.run(cfg)
    s = json.loads((out / "safety.json").read_text())
    assert s["method"] == method and s["eval_rows"] == 10
    assert s["before"]["n_harmful"] + s["before"]["n_benign"] == 10
    assert s["train_rows"] == (12 + 4 if method == "sft" else 12)  # 4 retain rows = 25% of the mix
    # a random model does not refuse: the measured rates are exact zeros, before and after
    assert s["before"]["refusal_rate"] == 0.0 and s["after"]["over_refusal_rate"] == 0.0
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [x for x in lines if x["split"] == "safety"]
    assert [x["step"] for x in logged] == [0, 2]
    assert logged[1]["refusal_rate"] == s["after"]["refusal_rate"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["stage"] == "safety"
    assert manifest["result"]["safety"] == s == res.result["safety"]
    first = json.loads((out / "safety_data" / "train.jsonl").read_text().splitlines()[0])
    assert ("messages" in first) if method == "sft" else ({"prompt", "chosen", "rejected"} <= set(first))
    with pytest.raises(Exception, match="already holds a completed run"):
        safety.run(cfg)


def test_gym_refusal_rows_carry_what_the_recipe_needs():
    rows = gym.load_task_rows("refusal", "train", n=50)
    assert {r["harmful"] for r in rows} == {True, False}
    for r in rows:
        assert (r["messages"][-1]["content"] == DEFAULT_REFUSAL) == r["harmful"]


def test_cli_names_bad_keys_and_bad_rows(tiny_models, tmp_path, capsys):
    from posttrain.cli import main

    assert main(["safety", "safety.methd=dpo"]) != 0
    assert "unknown key 'safety.methd' (did you mean 'safety.method'?)" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": BENIGN["messages"]}) + "\n")  # no 'harmful' label for the dpo recipe
    rc = main(["safety", f"model={tiny_models('qwen2')}", f"data.train={bad}", "safety.method=dpo",
               f"output_dir={tmp_path / 'run'}"])
    assert rc != 0
    assert "bad.jsonl line 1: safety.method=dpo builds pairs from conversations labelled 'harmful'" in \
        capsys.readouterr().err
