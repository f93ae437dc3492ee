"""posttrain export RUN --out DIR: merged model, model card, GGUF, and the Hub upload offline."""

import json
import re

import pytest
import torch
import yaml

from posttrain.cli import main
from posttrain.export import ExportError, export_run
from posttrain.export.card import StageInfo, guard_verdict
from posttrain.models.loading import load


@pytest.fixture(scope="module")
def lora_run(tiny_models, tmp_path_factory):
    """A finished LoRA SFT run of a tiny qwen2 (two steps at a high learning rate, so the adapter is not zero)."""
    root = tmp_path_factory.mktemp("export")
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i} + 1 =", "completion": f" {i + 1}"}) + "\n" for i in range(8)))
    out = root / "run"
    assert main(["sft", f"model={tiny_models('qwen2')}", f"data.train={data}", f"output_dir={out}", "adapter.type=lora",
                 "train.max_steps=2", "train.batch_size=4", "train.lr=1e-2", "train.progress=false"]) == 0
    return out


def test_export_writes_a_merged_model_its_card_and_gguf(lora_run, tmp_path):
    out = tmp_path / "exported"
    res = export_run(lora_run, out, gguf=("q8_0",), license="apache-2.0", name="adder")
    assert res["files"] == ["README.md", "chat_template.jinja", "config.json", "generation_config.json",
                            "model-q8_0.gguf", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    # the merged checkpoint computes what the base + adapter computed
    ids = torch.tensor([[1, 5, 9, 33, 70, 2, 8, 100]])
    adapted, _ = load(lora_run, device="cpu")
    merged, _ = load(out, device="cpu")
    base, _ = load(json.loads((lora_run / "manifest.json").read_text())["base_model"], device="cpu")
    with torch.no_grad():
        a, m, b = adapted(ids).logits, merged(ids).logits, base(ids).logits
    assert (m - a).abs().max().item() < 1e-5 and (m - b).abs().max().item() > 1e-3
    # the GGUF file loads back with transformers and matches the merged model within Q8_0's error
    from transformers import AutoModelForCausalLM

    back = AutoModelForCausalLM.from_pretrained(out, gguf_file="model-q8_0.gguf", dtype=torch.float32)
    with torch.no_grad():
        assert (back(ids).logits - m).abs().max().item() < 2e-2
    # the card: front matter, the stage with its config, the data hash, the guard, versions, licence
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front == {"license": "apache-2.0", "library_name": "transformers", "pipeline_tag": "text-generation",
                     "tags": ["posttrain", "sft"]}  # a local base model is not a Hub id: no base_model key
    manifest = json.loads((lora_run / "manifest.json").read_text())
    assert "# adder" in card and "| 1 | run | sft | lora | 2 |" in card
    assert yaml.safe_load(re.search(r"```yaml\n(.*?)```", card, re.S).group(1)) == yaml.safe_load(
        (lora_run / "config.yaml").read_text())
    (src, digest), = manifest["data"].items()
    assert f"| run | `{src}` | `{digest}` |" in card
    # two steps are too short for a drift check within the guard's 10% budget: the card says so
    assert "- run: on (drift guard): no check after the start: the run (" in card
    assert f"transformers {manifest['versions']['transformers']}" in card and "GGUF (llama.cpp, Ollama): " \
        "`model-q8_0.gguf`." in card and "## Licence\n\n`apache-2.0`" in card


def test_guard_verdicts_read_the_runs_evaluations():
    def info(result, limit=0.05):
        return StageInfo("sft", "sft", None, {"eval": {"regression_max_drop": limit}}, {"result": result})

    hist = [{"step": 50, "regression_score": 0.80, "regression_drop": 0.01},
            {"step": 100, "regression_score": 0.78, "regression_drop": 0.03}]
    assert guard_verdict(info({"eval_history": hist, "stop_reason": None})) == \
        "passed: 2 check(s), largest drop of the regression score +0.030 (within the limit 0.05)"
    stop = "forgetting guard: regression score 0.700 is 0.110 below the reference 0.810 (limit 0.05)"
    assert guard_verdict(info({"eval_history": hist, "stop_reason": stop})) == f"stopped: {stop}"
    drift = {"checks": 3, "drift_kl": 0.1234, "max_drift_kl": 0.5, "general_ppl_change": 0.031, "max_ppl_change": 1.0}
    assert guard_verdict(info({"guard": drift, "stop_reason": None})) == (
        "on (drift guard): 3 check(s) did not stop the run; last drift 0.123 nats/token (limit 0.5), "
        "general perplexity change +3.1% (limit 100%)")
    assert guard_verdict(info({"stop_reason": None})) == "not run (the run's guard was off, eval.guard: off)"


def test_push_to_hub_offline_is_one_clear_error_after_a_complete_export(lora_run, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "exported"
    with pytest.raises(ExportError, match=rf"^cannot push to me/adder: HF_HUB_OFFLINE is set; {re.escape(str(out))} "
                                          rf"is complete, upload it later with `hf upload me/adder {re.escape(str(out))}`$"):
        export_run(lora_run, out, push_to_hub="me/adder")
    assert (out / "README.md").exists() and (out / "model.safetensors").exists()


def test_cli_export_and_its_errors(lora_run, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["export", str(lora_run), "--out", str(out)]) == 0
    assert f"posttrain: wrote {out} (README.md, " in capsys.readouterr().out
    assert main(["export", str(lora_run), "--out", str(out)]) == 2
    assert capsys.readouterr().err == f"posttrain: error: {out} is not empty; export into a new directory\n"
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "is neither a finished run (manifest.json) nor a pipeline output (lineage.json)" in capsys.readouterr().err


def test_a_pipeline_output_exports_its_last_stage_with_measures_against_the_base(lora_run, tmp_path):
    """lineage.json as the pipeline writes it (docs/pipeline.md): the card lists the stages and the deltas."""
    manifest = json.loads((lora_run / "manifest.json").read_text())
    pipe = tmp_path / "pipe"
    pipe.mkdir()
    lineage = {
        "base_model": {"model": manifest["base_model"], "key": "k0"},
        "base": {"metrics": {"regression_score": 0.5, "task_accuracy": 0.25}},
        "stages": {
            "sft": {"stage": "sft", "status": "completed", "output": {"run_dir": str(lora_run)},
                    "policy": {"model": manifest["base_model"], "adapter": str(lora_run / manifest["model_dir"])},
                    "measures": {"regression_score": 0.625, "task_accuracy": 0.75}},
            "check": {"stage": "eval", "status": "completed", "output": {"run_dir": str(tmp_path / "check")},
                      "measures": {"regression_score": 0.625}},
        }}
    (pipe / "lineage.json").write_text(json.dumps(lineage))
    res = export_run(pipe, tmp_path / "out", license="mit")
    card = (res["out"] / "README.md").read_text()
    assert "from `" + manifest["base_model"] + "`: `sft`." in card  # the eval step is not a training stage
    assert "| regression_score | 0.5 | 0.625 | +0.125 |" in card and "| task_accuracy | 0.25 | 0.75 | +0.5 |" in card
    ids = torch.tensor([[1, 5, 9, 33]])
    adapted, _ = load(lora_run, device="cpu")
    merged, _ = load(res["out"], device="cpu")
    with torch.no_grad():
        assert (merged(ids).logits - adapted(ids).logits).abs().max().item() < 1e-5
