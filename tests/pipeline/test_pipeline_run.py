"""The pipeline on a tiny checkpoint: hand-off, lineage, skip on re-run, re-run after a change, fix and resume."""

import hashlib
import json

import pytest

from posttrain.pipeline import PipelineError, load_recipe, run_pipeline
from tests.stages.test_pref_reference import pref_rows

TRAIN = {"max_steps": 3, "batch_size": 4, "lr": 1e-3, "progress": False, "warmup_steps": 0}


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _chats(n):
    return [{"messages": [{"role": "user", "content": f"Say {i}."}, {"role": "assistant", "content": f"{i}."}]}
            for i in range(n)]


def _recipe(tmp_path, model, **dpo_extra):
    chats = _write(tmp_path / "chats.jsonl", _chats(16))
    prefs = _write(tmp_path / "prefs.jsonl", pref_rows(12))
    return {"output_dir": str(tmp_path / "pipe"),
            "eval": {"regression": "gym", "n": 4,
                     "measures": [{"measure": "task_accuracy", "args": {"task": "instruct", "n": 4},
                                   "name": "task_accuracy"}]},
            "stages": [
                {"name": "sft", "stage": "sft", "model": str(model), "data": {"train": str(chats), "max_length": 64},
                 "adapter": {"type": "lora", "r": 8}, "train": TRAIN},
                {"name": "dpo", "stage": "dpo", "data": {"train": str(prefs), "max_length": 64},
                 "adapter": {"type": "lora", "r": 8}, "train": TRAIN, "dpo": {"beta": 0.1, **dpo_extra}},
                {"name": "check", "stage": "eval", "suite": "regression", "limit": 2},
            ]}


@pytest.fixture(scope="module")
def first_run(tiny_models, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipe")
    raw = _recipe(tmp, tiny_models("qwen2"))
    events = []
    lin = run_pipeline(load_recipe(raw), on_stage=lambda n, e: events.append((n, e["status"])))
    return tmp, raw, lin


def test_stages_hand_off_and_lineage_records_them(first_run):
    tmp, raw, lin = first_run
    out = tmp / "pipe"
    assert json.loads((out / "lineage.json").read_text()) == json.loads(json.dumps(lin, default=str))
    sft, dpo = lin["stages"]["sft"], lin["stages"]["dpo"]
    assert sft["status"] == dpo["status"] == "completed"
    # sft trained a LoRA adapter; dpo (start_from: merged) starts from it merged into the base
    assert sft["output"]["kind"] == "adapter" and sft["policy"]["adapter"] == str(out / "sft" / "adapter")
    assert dpo["inputs"]["model"] == str(out / "sft" / "merged")
    assert json.loads((out / "sft" / "merged" / "posttrain-merged-from.json").read_text())["key"] == sft["key"]
    assert dpo["inputs"]["input_key"] == sft["key"]
    # data files enter the key by content
    chats = tmp / "chats.jsonl"
    assert sft["inputs"]["files"][str(chats)] == hashlib.sha256(chats.read_bytes()).hexdigest()
    for e in (sft, dpo):
        m = json.loads((out / e["stage"] / "manifest.json").read_text())
        assert m["status"] == "completed"
        assert set(e["measures"]) >= {"regression_score", "task_accuracy"}
        assert e["regression_delta"] == round(e["measures"]["regression_score"]
                                              - lin["base"]["metrics"]["regression_score"], 4)
        assert len(e["config_hash"]) == 16 and len(e["key"]) == 16
    # `eval` as a step: the regression suite on the dpo policy (base + dpo adapter)
    check = lin["stages"]["check"]
    assert check["status"] == "completed" and check["started_from"] == "dpo"
    assert check["inputs"]["adapter"] == str(out / "dpo" / "adapter")
    results = json.loads((out / "check" / "results.json").read_text())
    assert check["measures"]["regression_score"] == results["tuned"]["score"]["value"]
    html = (out / "report.html").read_text()
    assert "regression_delta" in html and ">dpo<" in html and ">sft<" in html


def test_rerun_skips_completed_stages(first_run):
    tmp, raw, lin = first_run
    out = tmp / "pipe"
    finished = {n: json.loads((out / n / "manifest.json").read_text())["finished"] for n in ("sft", "dpo")}
    mtime = (out / "sft" / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns
    lin2 = run_pipeline(load_recipe(raw))
    assert {n: e["key"] for n, e in lin2["stages"].items()} == {n: e["key"] for n, e in lin["stages"].items()}
    assert {n: json.loads((out / n / "manifest.json").read_text())["finished"] for n in finished} == finished
    assert (out / "sft" / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns == mtime


def test_a_changed_stage_reruns_alone(first_run):
    tmp, raw, lin = first_run
    out = tmp / "pipe"
    sft_finished = json.loads((out / "sft" / "manifest.json").read_text())["finished"]
    raw2 = json.loads(json.dumps(raw))
    raw2["stages"][1]["dpo"]["beta"] = 0.2
    lin2 = run_pipeline(load_recipe(raw2), report=False)
    assert lin2["stages"]["sft"]["key"] == lin["stages"]["sft"]["key"]
    assert json.loads((out / "sft" / "manifest.json").read_text())["finished"] == sft_finished
    assert lin2["stages"]["dpo"]["key"] != lin["stages"]["dpo"]["key"]
    assert "beta: 0.2" in (out / "dpo" / "config.yaml").read_text()
    moved = list((out / ".superseded").iterdir())
    assert len(moved) == 1 and moved[0].name.startswith(f"dpo-{lin['stages']['dpo']['key']}-")


def test_failed_stage_is_fixed_and_resumed(tiny_models, tmp_path):
    raw = _recipe(tmp_path, tiny_models("qwen2"))
    raw["eval"] = {"regression": None, "base": False}
    raw["stages"] = raw["stages"][:2]  # sft, dpo
    more = tmp_path / "more.jsonl"
    # a third stage continues the SFT adapter of the first branch (start_from: adapter) on a file not written yet
    raw["stages"].append({"name": "more", "stage": "sft", "from": "sft", "start_from": "adapter",
                          "data": {"train": str(more), "max_length": 64}, "adapter": {"type": "lora", "r": 8},
                          "train": TRAIN})
    with pytest.raises(PipelineError) as e:
        run_pipeline(load_recipe(raw), report=False)
    assert "stage 'more' (stages[2], stage: sft) failed" in str(e.value)
    assert str(more) in str(e.value)
    lin = json.loads((tmp_path / "pipe" / "lineage.json").read_text())
    assert lin["stages"]["more"]["status"] == "failed" and str(more) in lin["stages"]["more"]["error"]
    done = {n: json.loads((tmp_path / "pipe" / n / "manifest.json").read_text())["finished"] for n in ("sft", "dpo")}
    _write(more, _chats(8))  # the fix
    lin = run_pipeline(load_recipe(raw), report=False)
    assert lin["stages"]["more"]["status"] == "completed"
    assert {n: json.loads((tmp_path / "pipe" / n / "manifest.json").read_text())["finished"] for n in done} == done
    # it continued the first stage's adapter on the original base
    assert lin["stages"]["more"]["inputs"]["adapter"] == str(tmp_path / "pipe" / "sft" / "adapter")
    assert lin["stages"]["more"]["inputs"]["model"] == lin["stages"]["sft"]["inputs"]["model"]


def test_a_killed_stage_resumes_from_its_checkpoint(tiny_models, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    import yaml

    chats = _write(tmp_path / "chats.jsonl", _chats(64))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "pipe"), "eval": {"regression": None, "base": False},
                                      "stages": [{"name": "sft", "stage": "sft", "model": str(tiny_models("qwen2")),
                                                  "data": {"train": str(chats), "max_length": 64},
                                                  "train": {**TRAIN, "max_steps": 16, "save_every": 4}}]}))
    run = tmp_path / "pipe" / "sft"
    proc = subprocess.Popen([sys.executable, "-m", "posttrain", "pipeline", str(recipe)],
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while not (run / "checkpoints" / "step-4").exists():
        assert proc.poll() is None, "the pipeline ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    lin = json.loads((tmp_path / "pipe" / "lineage.json").read_text())
    assert lin["stages"]["sft"]["status"] == "running"  # what a kill leaves behind
    lin = run_pipeline(load_recipe(recipe), report=False)
    e = lin["stages"]["sft"]
    assert e["status"] == "completed" and e["resumed"] is True and e["metrics"]["steps"] == 16
    steps = [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
             if r["split"] == "train"]
    # the same run directory went on from a checkpoint (steps 1-4 logged once, by the killed process)
    assert steps[0] == 1 and steps[-1] == 16 and steps.count(1) == 1
    assert not (tmp_path / "pipe" / ".superseded").exists()
