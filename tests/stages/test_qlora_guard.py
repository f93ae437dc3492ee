"""QLoRA under the default forgetting guard: the guard fingerprints the NF4 base and checks its drift."""

import json

import pytest

from posttrain.stages import load_config, sft


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path / "cache"))


def test_qlora_sft_runs_with_the_default_guard_and_checks_drift(tiny_models, tmp_path):
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Count to {i}"},
                                                     {"role": "assistant", "content": " ".join(map(str, range(i)))}]})
                            + "\n" for i in range(2, 34)))
    cfg = load_config("sft", overrides=[f"model={tiny_models('llama')}", f"data.train={data}", "adapter.type=qlora",
                                        f"output_dir={tmp_path / 'run'}", "train.batch_size=8", "train.max_steps=40",
                                        "train.lr=1e-3", "train.progress=false"])
    assert cfg.eval.guard == "on"
    cfg.eval.guard_budget, cfg.eval.guard_prompts = 0.5, 16  # a tiny run of seconds affords checks only so
    res = sft.run(cfg)
    g = res.result["guard"]
    assert g["checks"] >= 1 and 0 < g["drift_kl"] < 0.5, g
    assert res.result["stop_reason"] is None
