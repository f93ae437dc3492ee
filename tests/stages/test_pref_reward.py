"""The reward model: trains, saves as *ForSequenceClassification, loads with transformers and posttrain."""

import json

import torch

import posttrain
from posttrain.stages import load_config
from posttrain.data.collate import collate_padded
from posttrain.data.preference import to_preference_examples, tokenize_pairs
from posttrain.data import read_records
from posttrain.models.reward import last_token_index, reward_scores
from posttrain.stages import reward
from tests.stages.test_pref_reference import pref_rows


def test_last_token_index_left_and_right_padding():
    m = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert last_token_index(m).tolist() == [2, 4, 4]


def test_reward_model_trains_saves_and_loads(tiny_models, tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in pref_rows(40)))
    out = tmp_path / "rm"
    cfg = load_config("reward", overrides=[f"model={tiny_models('qwen2')}", f"data.train={data}",
                                           "data.eval_fraction=0.2", f"output_dir={out}", "train.max_steps=24",
                                           "train.batch_size=8", "train.lr=2e-3", "train.eval_every=12",
                                           "train.warmup_steps=0", "train.progress=false"])
    res = reward.run(cfg)
    evals = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if r["split"] == "eval"]
    assert evals[-1]["pref_accuracy"] >= 0.9  # held-out pairwise accuracy

    from transformers import AutoModelForSequenceClassification

    hf = AutoModelForSequenceClassification.from_pretrained(str(out / "model")).eval()
    assert hf.config.architectures == ["Qwen2ForSequenceClassification"] and hf.config.num_labels == 1
    ours, tok = posttrain.load(out)
    assert type(ours).__name__ == "Qwen2ForSequenceClassification"
    pairs = tokenize_pairs(to_preference_examples(read_records(pref_rows(5)), "paired"), tok, max_length=64)
    batch = collate_padded([p.chosen for p in pairs] + [p.rejected for p in pairs], tok.pad_token_id)
    with torch.no_grad():
        theirs = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.squeeze(-1)
        mine = reward_scores(ours.eval(), batch["input_ids"], batch["attention_mask"])
        trained = reward_scores(res.model.eval(), batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(trained, theirs, atol=1e-5, rtol=1e-5)
    assert (mine[:5] > mine[5:]).all()
