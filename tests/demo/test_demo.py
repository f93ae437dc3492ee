"""The demo on the bundled base model (about 2.5 min on 2 cores), measured: SFT teaches the chat format without forgetting.

Issue 3's acceptance numbers: held-out instruction accuracy < 10% before SFT and >= 90% after,
regression score down by at most 2 points. One demo run serves every assertion.
"""

import json
from pathlib import Path

import pytest

from posttrain.gym.demo import format_table, run_demo




@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    summary = run_demo(out, stages=("base", "sft"))
    return out, summary


def test_sft_teaches_instructions_without_forgetting(demo):
    out, s = demo
    base, sft = s["base"], s["sft"]
    assert base["task_accuracy"] < 0.10, base
    assert sft["task_accuracy"] >= 0.90, sft
    assert sft["regression_score"] >= base["regression_score"] - 0.02, (base, sft)


def test_demo_outputs(demo):
    out, s = demo
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == s
    assert set(on_disk) == {"base", "sft"}
    for m in on_disk.values():
        assert 0.0 <= m["task_accuracy"] <= 1.0 and 0.0 <= m["regression_score"] <= 1.0
    html = (out / "report.html").read_text()
    assert f"{s['sft']['task_accuracy']:.3f}" in html
    assert html.count("data:image/png;base64,") >= 3  # loss, eval metrics, learning rate
    # the SFT stage trained a LoRA adapter, published in PEFT format
    cfg = json.loads((out / "sft" / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA"
    # the demo ran as a pipeline: lineage.json records the stage, its key and its regression delta
    lin = json.loads((out / "lineage.json").read_text())
    assert lin["stages"]["sft"]["status"] == "completed"
    assert lin["stages"]["sft"]["regression_delta"] == round(s["sft"]["regression_score"]
                                                             - s["base"]["regression_score"], 4)
    table = format_table(s)
    assert table.splitlines()[0].split()[:3] == ["stage", "task_accuracy", "regression_score"]
