"""`posttrain sft` / `posttrain cpt` end to end through the CLI, on tiny checkpoints."""

import json

import pytest
import torch

from posttrain.cli import main


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _chat(i):
    return {"messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": f"Say {i}."},
                         {"role": "assistant", "content": f"{i}."},
                         {"role": "user", "content": f"And twice {i}?"},
                         {"role": "assistant", "content": f"{2 * i}."}]}


def test_sft_writes_a_loadable_hf_model_and_a_manifest(tiny_models, tmp_path):
    from transformers import AutoModelForCausalLM

    train = _write(tmp_path / "train.jsonl", [_chat(i) for i in range(24)])
    held = _write(tmp_path / "eval.jsonl", [_chat(i) for i in range(100, 108)])
    gen = _write(tmp_path / "general.jsonl", [{"prompt": f"{i} + 1 =", "completion": f" {i + 1}"} for i in range(30)])
    out = tmp_path / "run"
    rc = main(["sft", f"model={tiny_models('mistral')}", f"data.train={train}", f"data.eval={held}",
               f"output_dir={out}", "train.max_steps=6", "train.eval_every=3", "train.batch_size=4",
               "data.packing=true", "data.max_length=128", f"data.mix.data={gen}", "data.mix.ratio=0.25",
               "train.progress=false", "train.precision=bf16"])
    assert rc == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "completed" and m["model_dir"] == "model"
    import hashlib

    assert m["data"][str(train)] == hashlib.sha256(train.read_bytes()).hexdigest()
    assert set(m["data"]) == {str(train), str(held), str(gen)}
    assert m["versions"]["torch"] == torch.__version__
    model = AutoModelForCausalLM.from_pretrained(str(out / "model"))
    assert model.config.model_type == "mistral"
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    data_rec = next(r for r in recs if r["split"] == "data")
    assert 0 < data_rec["packing_efficiency"] <= 1
    assert [r["step"] for r in recs if r["split"] == "eval"] == [3, 6]
    assert (out / "report.html").exists() and (out / "config.yaml").exists()


def test_cpt_packs_raw_text(tiny_models, tmp_path):
    corpus = _write(tmp_path / "corpus.jsonl", [{"text": "the quick brown fox " * (i % 5 + 1)} for i in range(40)])
    out = tmp_path / "cpt"
    assert main(["cpt", f"model={tiny_models('gemma')}", f"data.train={corpus}", f"output_dir={out}",
                 "train.max_steps=3", "data.max_length=64", "train.progress=false"]) == 0
    cfg = (out / "config.yaml").read_text()
    assert "packing: true" in cfg


@pytest.mark.parametrize("row, message", [
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]}',
     r"train.jsonl line 2: messages\[1\].role must be one of system/user/assistant/tool, got 'bot'"),
    ('{"messages": [{"role": "user", "content": "hi"', r"train.jsonl line 2: .*JSON"),
    ('{"prompt": "hi", "completion": ""}', r"train.jsonl line 2: .*completion"),
])
def test_bad_rows_fail_clearly_and_leave_nothing_complete(tiny_models, tmp_path, capsys, row, message):
    good = json.dumps({"prompt": "a", "completion": "b"}) if "prompt" in row else json.dumps(_chat(1))
    train = _write(tmp_path / "train.jsonl", [good, row])
    out = tmp_path / "run"
    rc = main(["sft", f"model={tiny_models('qwen2')}", f"data.train={train}", f"output_dir={out}",
               "train.progress=false"])
    assert rc == 2
    import re

    assert re.search(message, capsys.readouterr().err)
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "failed" and "line 2" in m["error"]
    assert not (out / "model").exists()
    import posttrain
    from posttrain.models.loading import ModelLoadError

    with pytest.raises(ModelLoadError, match="did not complete"):
        posttrain.load(out)


def test_missing_data_file_is_named(tiny_models, tmp_path, capsys):
    rc = main(["sft", f"model={tiny_models('qwen2')}", f"data.train={tmp_path / 'nope.jsonl'}",
               f"output_dir={tmp_path / 'r'}", "train.progress=false"])
    assert rc == 2
    assert "nope.jsonl" in capsys.readouterr().err
