"""On-policy rejected answers for DPO (iterative RPO): the pairs are the model's own rejected samples."""

import json

import pytest

from posttrain.stages import load_config
from posttrain.rollout.self_rejected import self_rejected_pairs
from posttrain.models.loading import load
from posttrain.rollout import RolloutEngine, SamplingParams
from posttrain.stages import dpo
from posttrain.rollout.prompts import prompt_text
from tests.stages.test_pref_reference import pref_rows


def odd_length_is_wrong(prompts, completions, **cols):
    # a verifier with known answers: rejects exactly the samples whose text length is odd
    assert set(cols) == {"tag"}  # the row's extra columns reach the reward, the pair sides do not
    return [0.0 if len(c.strip()) % 2 else 1.0 for c in completions]


def test_pairs_are_exactly_the_rejected_samples(tiny_models):
    model, tok = load(tiny_models("qwen2"), device="cpu")
    rows = [{**r, "tag": i} for i, r in enumerate(pref_rows(6))]
    pairs, stats = self_rejected_pairs(model, tok, rows, odd_length_is_wrong, samples=3, max_new_tokens=8, seed=5,
                                       model_name="tiny")
    # the same samples again, straight from the rollout engine with the same seed
    ro = RolloutEngine(model, tok).generate([prompt_text(tok, r) for r in rows],
                                            SamplingParams(max_new_tokens=8, temperature=1.0, n=3, seed=5))
    expected = []
    for i, r in enumerate(rows):
        bad = [c.strip() for c in ro.completions[3 * i:3 * i + 3] if len(c.strip()) % 2]
        if bad:
            expected.append((r["tag"], bad[0]))
    assert expected and [(p["tag"], p["rejected"][0]["content"]) for p in pairs] == expected
    assert stats["self_rejected_samples"] == 18 and stats["self_rejected_pairs"] == len(expected)
    assert stats["self_rejected_wrong"] == sum(len(c.strip()) % 2 == 1 for c in ro.completions)
    for p in pairs:
        assert p["source"] == "self" and p["model"] == "tiny" and p["reward"] == 0.0
        assert p["chosen"] == rows[p["tag"]]["chosen"] and p["rejected"][0]["role"] == "assistant"


def test_rows_without_chosen_are_a_clear_error(tiny_models):
    model, tok = load(tiny_models("qwen2"), device="cpu")
    with pytest.raises(ValueError, match=r"row 0 needs 'prompt' and 'chosen'"):
        self_rejected_pairs(model, tok, [{"prompt": "hi"}], odd_length_is_wrong)


def test_dpo_trains_on_self_rejected_pairs_beside_its_data(tiny_models, tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({**r, "tag": i}) + "\n" for i, r in enumerate(pref_rows(8))))
    out = tmp_path / "run"
    cfg = load_config("dpo", overrides=[
        f"model={tiny_models('qwen2')}", f"data.train={data}", f"output_dir={out}", "adapter.type=lora",
        "train.max_steps=3", "train.batch_size=4", "train.progress=false", "dpo.self_rejected.samples=2",
        "dpo.self_rejected.max_new_tokens=8", "dpo.self_rejected.reward=tests.stages.test_dpo_self_rejected:"
        "odd_length_is_wrong"])
    dpo.run(cfg)
    made = [json.loads(x) for x in (out / "self_rejected.jsonl").read_text().splitlines()]
    stats = json.loads((out / "self_rejected.stats.json").read_text())
    assert len(made) == stats["self_rejected_pairs"] > 0 and stats["self_rejected_samples"] == 16
    resolved = (out / "config.yaml").read_text()
    assert "self_rejected.jsonl" in resolved and str(data) in resolved  # trained on both sources
    assert (out / "manifest.json").exists()


def test_self_rejected_needs_a_verifier():
    with pytest.raises(ValueError, match="dpo.self_rejected.samples needs dpo.self_rejected.reward"):
        load_config("dpo", overrides=["model=x", "dpo.self_rejected.samples=4"])


def test_gym_tasks_are_reward_specs():
    from posttrain.rewards.sets import resolve_reward

    name, fn = resolve_reward("gym:preference")
    row = {"answer": "5", "check": "exact"}
    assert name == "gym_preference"
    assert fn(None, ["5", "6"], **{k: [v, v] for k, v in row.items()}) == [1.0, 0.0]
    with pytest.raises(ValueError, match="unknown gym task 'prefernce'; did you mean 'preference'"):
        resolve_reward("gym:prefernce")
