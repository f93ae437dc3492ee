"""`posttrain data inspect CONFIG`: the rendered example with loss tokens marked, the counts, the exit code."""

import json

from posttrain.cli import main


def test_data_inspect(tmp_path, tiny_models, capsys):
    rows = [{"messages": [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"}]},
            {"prompt": "word " * 80, "completion": " done"}]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model: {tiny_models('qwen2')}\ndata:\n  train: {tmp_path / 'train.jsonl'}\n  max_length: 512\n")
    assert main(["data", "inspect", str(cfg)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"--- {tmp_path / 'train.jsonl'} line 1 (conversational): 22 tokens, 2 with loss, in [[...]]"
    assert "[[5<|im_end|>]]" in out
    assert out[-2].startswith("--- 2 examples, ") and out[-1] == (
        "checks: eos_trained ok, loss_after_truncation ok, no_loss_on_context ok, generation_prompt ok, reasoning ok")
    assert main(["data", "inspect", str(cfg), "data.max_length=32", "--show", "0"]) == 1
    out = capsys.readouterr().out
    assert "loss_after_truncation 1 violation(s)" in out
    assert f"  {tmp_path / 'train.jsonl'} line 2: loss_after_truncation: no loss token left: 86 tokens truncated" in out
