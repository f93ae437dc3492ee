"""Independent stages at once (`jobs`): the same lineage and results as one at a time, real overlap,
a failure that lets the running stage finish, and the scheduler's graph arithmetic."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from posttrain.pipeline import MEASURES, PipelineError, RecipeError, load_recipe, register_measure, run_pipeline
from posttrain.pipeline import schedule
from posttrain.pipeline.recipe import stage_refs
from posttrain.pipeline.runner import _cost, _parents
from tests.pipeline.test_pipeline_run import _write
from tests.stages.test_pref_reference import pref_rows

TRAIN = {"max_steps": 6, "batch_size": 4, "lr": 1e-3, "progress": False, "warmup_steps": 0}


def _chats(n, word="Say"):
    return [{"messages": [{"role": "user", "content": f"{word} {i}."}, {"role": "assistant", "content": f"{i}."}]}
            for i in range(n)]


def _branched(tmp_path, model, out="pipe", **extra):
    """sft, then two branches from it (dpo; a second LoRA SFT), and a chain from the base model."""
    chats = _write(tmp_path / "chats.jsonl", _chats(16))
    other = _write(tmp_path / "other.jsonl", _chats(16, "Repeat"))
    prefs = _write(tmp_path / "prefs.jsonl", pref_rows(12))
    return {"output_dir": str(tmp_path / out), **extra,
            "eval": {"regression": "gym", "n": 4,
                     "measures": [{"measure": "task_accuracy", "args": {"task": "instruct", "n": 4},
                                   "name": "task_accuracy"}]},
            "stages": [
                {"name": "sft", "stage": "sft", "model": str(model), "data": {"train": str(chats), "max_length": 64},
                 "adapter": {"type": "lora", "r": 8}, "train": TRAIN},
                {"name": "dpo", "stage": "dpo", "from": "sft", "data": {"train": str(prefs), "max_length": 64},
                 "adapter": {"type": "lora", "r": 8}, "train": TRAIN, "dpo": {"beta": 0.1}},
                {"name": "more", "stage": "sft", "from": "sft", "data": {"train": str(other), "max_length": 64},
                 "adapter": {"type": "lora", "r": 8}, "train": TRAIN},
                {"name": "side", "stage": "sft", "from": "base", "data": {"train": str(other), "max_length": 64},
                 "adapter": {"type": "lora", "r": 8}, "train": TRAIN},
            ]}


def _tensors(adapter_dir: Path) -> dict:
    out = {}
    for f in sorted(adapter_dir.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _timing(key: str) -> bool:
    return key.endswith("_s") or "time" in key or "per_s" in key


def _results(lin):
    return {n: (e["key"], e["status"], e["measures"], e["metrics"]) for n, e in lin["stages"].items()}


def test_two_jobs_give_the_lineage_of_one_and_overlap(tiny_models, tmp_path):
    model = tiny_models("qwen2")
    serial = run_pipeline(load_recipe(_branched(tmp_path, model, "one")), jobs=1, report=False)
    seen = []
    parallel = run_pipeline(load_recipe(_branched(tmp_path, model, "two", jobs=2)), report=True,
                            on_stage=lambda n, e: seen.append(n))
    # every stage recorded, none lost to a concurrent write, in the file as returned
    assert set(parallel["stages"]) == {"sft", "dpo", "more", "side"}
    on_disk = json.loads((tmp_path / "two" / "lineage.json").read_text())
    assert on_disk["stages"] == json.loads(json.dumps(parallel["stages"], default=str))
    assert all(e["status"] == "completed" for e in parallel["stages"].values())
    assert sorted(seen) == ["dpo", "more", "sft", "side"] and seen.index("sft") < min(seen.index("dpo"),
                                                                                      seen.index("more"))
    # the same keys (config, inputs, start), hence the same runs: the results agree
    one, two = _results(serial), _results(parallel)
    for name in one:
        k1, s1, m1, t1 = one[name]
        k2, s2, m2, t2 = two[name]
        assert (k1, s1) == (k2, s2), name
        assert {k: v for k, v in m2.items() if not _timing(k)} == \
            pytest.approx({k: v for k, v in m1.items() if not _timing(k)}, rel=1e-4, abs=1e-4), name
        numbers = [k for k in t1 if not _timing(k)]
        assert {k: t2[k] for k in numbers} == pytest.approx({k: t1[k] for k in numbers}, rel=1e-4, abs=1e-5), name
        # the trained adapters themselves agree
        a1, a2 = (_tensors(Path(lin["stages"][name]["output"]["model_dir"])) for lin in (serial, parallel))
        assert a1.keys() == a2.keys() and a1
        for k in a1:
            torch.testing.assert_close(a2[k], a1[k], rtol=1e-4, atol=1e-6)
    # two stages really ran at once: some pair of the three that only need sft (or the base) overlapped
    st = parallel["stages"]
    spans = [(st[n]["started_at"], st[n]["finished_at"]) for n in ("dpo", "more", "side")]
    assert any(a[0] < b[1] and b[0] < a[1] for i, a in enumerate(spans) for b in spans[i + 1:]), spans
    # dpo and more both start from sft merged: merged once, under the lock, and both read it
    assert st["dpo"]["inputs"]["model"] == st["more"]["inputs"]["model"] == str(tmp_path / "two" / "sft" / "merged")
    assert (tmp_path / "two" / "report.html").exists()
    # a second run with jobs skips everything: the keys match
    again = run_pipeline(load_recipe(_branched(tmp_path, model, "two", jobs=2)), report=False)
    assert _results(again) == two


def test_a_failing_branch_lets_the_other_finish_and_resumes(tiny_models, tmp_path):
    raw = _branched(tmp_path, tiny_models("qwen2"), jobs=2)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": "not a list"}\n')
    raw["stages"][2]["data"]["train"] = str(bad)  # `more` fails when it reads its data
    with pytest.raises(PipelineError, match="stage 'more'"):
        run_pipeline(load_recipe(raw), report=False)
    lin = json.loads((tmp_path / "pipe" / "lineage.json").read_text())
    assert lin["stages"]["more"]["status"] == "failed"
    assert lin["stages"]["sft"]["status"] == "completed"
    # what was running or ready beside the failure is not lost: at least one sibling completed
    done = [n for n in ("dpo", "side") if lin["stages"].get(n, {}).get("status") == "completed"]
    assert done
    # fixed: the completed stages are skipped (same keys), the rest run
    raw["stages"][2]["data"]["train"] = str(tmp_path / "other.jsonl")
    lin2 = run_pipeline(load_recipe(raw), report=False)
    assert all(e["status"] == "completed" for e in lin2["stages"].values())
    for n in done:
        assert lin2["stages"][n]["finished_at"] == lin["stages"][n]["finished_at"]  # skipped, not re-run


def _specs(raw_stages):
    return load_recipe({"output_dir": "x", "stages": raw_stages})


def test_graph_width_ranks_and_jobs():
    m = {"model": "gym:base", "data": {"train": "gym:instruct:train"}}
    rec = _specs([
        {"name": "a", "stage": "sft", **m, "train": {"max_steps": 10}},
        {"name": "b", "stage": "sft", "data": m["data"], "train": {"max_steps": 5}},            # from a
        {"name": "c", "stage": "sft", "from": "a", "data": m["data"], "train": {"max_steps": 50}},
        {"name": "d", "stage": "sft", "from": "c", "data": m["data"], "train": {"max_steps": 50}},
        {"name": "e", "stage": "eval"},                                                          # after d
    ])
    deps = schedule.dependencies(rec.stages, _parents(rec), stage_refs)
    assert deps == {"a": set(), "b": {"a"}, "c": {"a"}, "d": {"c"}, "e": {"d"}}
    assert schedule.width(rec.stages, deps) == 2
    r = schedule.ranks(rec.stages, deps, _cost)
    assert r == {"a": 111.0, "b": 5.0, "c": 101.0, "d": 51.0, "e": 1.0}  # c's chain first
    assert schedule.resolve_jobs(8, 2) == 2 and schedule.resolve_jobs(1, 2) == 1
    chain = _specs([{"name": "a", "stage": "sft", **m}, {"name": "b", "stage": "sft", "data": m["data"]}])
    cdeps = schedule.dependencies(chain.stages, _parents(chain), stage_refs)
    assert schedule.width(chain.stages, cdeps) == 1 and schedule.resolve_jobs("auto", 1) == 1


def test_jobs_is_validated_and_set_by_override():
    base = {"output_dir": "x", "stages": [{"name": "a", "stage": "sft", "model": "gym:base",
                                           "data": {"train": "gym:instruct:train"}}]}
    assert load_recipe(base).jobs == 1
    assert load_recipe({**base, "jobs": "auto"}).jobs == "auto"
    assert load_recipe(base, ["jobs=3"]).jobs == 3
    for bad in (0, -1, "many", 1.5, True):
        with pytest.raises(RecipeError, match=r"jobs must be a whole number >= 1 or auto"):
            load_recipe({**base, "jobs": bad})


def test_a_measure_defined_in_a_function_is_refused_before_workers_start(tiny_models, tmp_path):
    def local_measure(model, tokenizer):
        return {"x": 1.0}

    register_measure("local_only", local_measure)
    try:
        raw = _branched(tmp_path, tiny_models("qwen2"), jobs=2)
        raw["stages"][1]["measures"] = [{"measure": "local_only"}]
        with pytest.raises(PipelineError, match="measure 'local_only'.*cannot import.*jobs: 1"):
            run_pipeline(load_recipe(raw), report=False)
    finally:
        MEASURES.pop("local_only")
