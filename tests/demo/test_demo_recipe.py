"""The demo is a pipeline recipe shipped in the package: printable, valid, and the source of the demo's rows."""

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
    assert [(s.name, s.stage) for s in rec.stages] == [("sft", "sft"), ("dpo", "dpo"), ("safety", "safety"),
                                                       ("tools", "sft"), ("rm", "reward"), ("ppo", "ppo"),
                                                       ("reasoning", "sft"), ("grpo", "grpo")]
    assert rec.stages[6].source == "base" and rec.stages[7].cfg.grpo.rewards == ["gym:reasoning"]
    assert order_warnings(rec) == []
    sft = rec.stages[0].cfg
    assert (sft.adapter.type, sft.adapter.r, sft.train.max_steps, sft.data.mix.ratio) == ("lora", 16, 150, 0.2)
    # the rows the demo offers come from the recipe (side stages such as the reward model are not rows)
    assert demo.ALL_STAGES == ("base", "sft", "dpo", "safety", "tools", "ppo", "reasoning", "grpo")
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
    assert [l.split(":")[0] for l in lines] == ["sft", "rm", "ppo"]
    assert lines[2].startswith("ppo: ppo from sft (merged)")


def test_unknown_row_and_bad_recipe_errors(capsys, tmp_path):
    import pytest

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
