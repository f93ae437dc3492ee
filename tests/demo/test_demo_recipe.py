"""The demo is a pipeline recipe shipped in the package: printable, valid, and the source of the demo's rows."""

import pytest
import yaml

from posttrain.cli import main
from posttrain.pipeline import demo
from posttrain.pipeline import load_recipe, order_warnings


def test_print_recipe_is_the_shipped_recipe_and_it_validates(capsys, tmp_path):
    assert main(["demo", "--print-recipe"]) == 0
    text = capsys.readouterr().out
    assert text == demo.RECIPE.read_text()
    path = tmp_path / "copy.yaml"
    path.write_text(text)
    rec = load_recipe(path)
    # optional rows (demo.OPTIONAL_ROWS) may follow the default ones at the end of the recipe
    assert [(s.name, s.stage) for s in rec.stages][:8] == [("sft", "sft"), ("dpo", "dpo"), ("safety", "safety"),
                                                           ("tools", "sft"), ("rm", "reward"), ("ppo", "ppo"),
                                                           ("reasoning", "sft"), ("grpo", "grpo")]
    # the guarded reasoning chain goes on from sft with a LoRA and the regression mix; the unguarded one
    # (optional rows) is a full fine-tune of the base with the guard off
    reasoning, grpo, unguarded, grpo_unguarded = rec.stages[6:10]
    assert reasoning.source == "sft" and reasoning.cfg.adapter.type == "lora" and reasoning.cfg.data.mix.ratio == 0.2
    assert grpo.source == "reasoning" and grpo.cfg.grpo.rewards == ["gym:reasoning"] and grpo.cfg.eval.guard == "on"
    assert (unguarded.name, unguarded.source, unguarded.cfg.adapter.type, unguarded.cfg.eval.guard) == \
        ("reasoning_unguarded", "base", "none", "off")
    assert (grpo_unguarded.source, grpo_unguarded.cfg.eval.guard) == ("reasoning_unguarded", "off")
    assert demo.FORGETTING_ROWS == ("base", "reasoning", "grpo", "reasoning_unguarded", "grpo_unguarded")
    assert order_warnings(rec) == []
    sft = rec.stages[0].cfg
    assert (sft.adapter.type, sft.adapter.r, sft.train.max_steps, sft.data.mix.ratio) == ("lora", 16, 150, 0.2)
    # the rows the demo offers come from the recipe (side stages such as the reward model are not rows)
    assert demo.DEFAULT_STAGES == ("base", "sft", "dpo", "safety", "tools", "ppo", "reasoning", "grpo")
    assert demo.ALL_STAGES[:10] == (*demo.DEFAULT_STAGES, "reasoning_unguarded", "grpo_unguarded")
    assert set(demo.ALL_STAGES[8:]) <= set(demo.OPTIONAL_ROWS)
    # every measurement the recipe names is registered (the gym's rates included)
    from posttrain.pipeline import MEASURES

    assert {m.measure for s in rec.stages for m in s.measures} | {m.measure for m in rec.eval.measures} <= set(MEASURES)
    assert "train.max_steps=150" in demo.SFT_OVERRIDES and not any(o.startswith("data.train") for o in demo.SFT_OVERRIDES)


def test_pipeline_dry_run_on_the_copy(capsys, tmp_path):
    path = tmp_path / "copy.yaml"
    path.write_text(demo.RECIPE.read_text())
    assert main(["pipeline", str(path), "--dry-run", "--only", "ppo", f"output_dir={tmp_path / 'o'}"]) == 0
    lines = capsys.readouterr().out.splitlines()
    # ppo needs sft (its start) and rm (its reward model), nothing else
    assert [l.split(":")[0] for l in lines] == ["sft", "rm", "ppo", "jobs"]
    assert lines[2].startswith("ppo: ppo from sft (merged)")
    # one chain (ppo waits for rm, rm for sft): one job, whatever the recipe's auto allows
    assert lines[3] == "jobs: 1 (the recipe says auto; at most 1 of these stages can run at once)"
    assert main(["pipeline", str(path), "--dry-run", "--jobs", "3", f"output_dir={tmp_path / 'o'}"]) == 0
    last = capsys.readouterr().out.splitlines()[-1]
    assert last.startswith("jobs: 3 (the recipe says 3; at most ") and int(last.split("at most ")[1].split()[0]) >= 3


def test_unknown_row_and_bad_recipe_errors(capsys, tmp_path):
    with pytest.raises(SystemExit):
        main(["demo", "--stages", "base,saftey"])
    assert "unknown stage(s) ['saftey']; available: base, sft, dpo, safety, tools, ppo" in capsys.readouterr().err
    raw = yaml.safe_load(demo.RECIPE.read_text())
    raw["stages"][1]["dpo"]["betta"] = 1
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw))
    assert main(["pipeline", str(bad), "--dry-run"]) == 2
    assert "stage 'dpo' (stages[1], stage: dpo): unknown key 'dpo.betta' (did you mean 'dpo.beta'?)" in \
        capsys.readouterr().err


def test_optional_rows_run_only_when_named(capsys, tmp_path):
    raw = yaml.safe_load(demo.RECIPE.read_text())
    raw["stages"] = [s for s in raw["stages"] if s["name"] not in demo.OPTIONAL_ROWS]
    raw["stages"].append({"name": "distill", "stage": "sft", "from": "sft", "data": {"train": "gym:instruct:train"}})
    path = tmp_path / "with-optional.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    assert demo.all_stages(path)[-1] == "distill"
    assert demo.default_stages(path) == ("base", "sft", "dpo", "safety", "tools", "ppo", "reasoning", "grpo")
    # --help names the default rows and the optional rows of the shipped recipe apart
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert f"(default: {','.join(demo.DEFAULT_STAGES)}; optional rows, run only when named: " in help_text
    for row in demo.ALL_STAGES:
        assert (row in demo.OPTIONAL_ROWS) == (row not in demo.DEFAULT_STAGES)
    # --stages can name an optional row: an unknown one is refused, a known one is not
    with pytest.raises(SystemExit):
        main(["demo", "--recipe", str(path), "--stages", "base,distil"])
    assert "unknown stage(s) ['distil']; available: base, sft, dpo, safety, tools, ppo, reasoning, grpo, distill" \
        in capsys.readouterr().err


def test_table_names_forgetting_rows_and_stopped_runs():
    summary = {"base": {"task_accuracy": 0.0, "regression_score": 0.835},
               "sft": {"task_accuracy": 0.93, "regression_score": 0.91, "regression_delta": 0.075, "drift_kl": 0.41},
               "reasoning_unguarded": {"task_accuracy": 0.0, "regression_score": 0.21, "regression_delta": -0.625,
                                       "reasoning_accuracy": 0.315},
               "safety": {"task_accuracy": 0.835, "regression_score": 0.835, "regression_delta": 0.0,
                          "stop_reason": "forgetting guard: drift from the base 0.671 nats/token > limit 0.5; "
                                         "weights rolled back to step 0 (eval.guard: off disables it)"}}
    lines = demo.format_table(summary).splitlines()
    assert lines[3].split() == ["sft", "0.930", "0.910", "+0.075"]
    assert lines[4].split() == ["drift_kl", "0.410"]
    assert lines[-2] == ("forgetting: regression fell more than 0.02 below the base in reasoning_unguarded (-0.625) "
                         "(posttrain demo --forgetting shows the guard; docs/eval.md)")
    assert lines[-1] == ("stopped: safety: forgetting guard: drift from the base 0.671 nats/token > limit 0.5; "
                         "weights rolled back to step 0 (eval.guard: off disables it)")
