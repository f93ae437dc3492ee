"""Recipe validation and stage-order warnings (no training): errors name the stage and the key."""

import pytest

from posttrain.pipeline import RecipeError, load_recipe, order_warnings


def _recipe(*stages, **top):
    return {"output_dir": top.get("output_dir", "runs/x"), "stages": list(stages), **{k: v for k, v in top.items()
                                                                                      if k != "output_dir"}}


SFT = {"name": "sft", "stage": "sft", "model": "some/model", "data": {"train": "chats.jsonl"}}


def _err(recipe, overrides=None) -> str:
    with pytest.raises(RecipeError) as e:
        load_recipe(recipe, overrides)
    return str(e.value)


def test_each_section_is_validated_by_its_stage_schema():
    r = load_recipe(_recipe(SFT, {"name": "dpo", "stage": "dpo", "data": {"train": "p.jsonl"}, "dpo": {"beta": 0.3},
                                  "adapter": {"type": "lora", "r": 8}}))
    assert [s.name for s in r.stages] == ["sft", "dpo"]
    assert r.stages[1].cfg.dpo.beta == 0.3 and r.stages[1].cfg.adapter.r == 8
    msg = _err(_recipe(SFT, {"name": "dpo", "stage": "dpo", "dpo": {"betta": 0.3}}))
    assert "stage 'dpo' (stages[1], stage: dpo)" in msg
    assert "unknown key 'dpo.betta' (did you mean 'dpo.beta'?)" in msg
    msg = _err(_recipe({**SFT, "train": {"learning_rate": 1e-4}}))
    assert "stage 'sft' (stages[0], stage: sft)" in msg and "(did you mean 'train.lr'?)" in msg
    msg = _err(_recipe({**SFT, "train": {"lr": -1}}))
    assert "train.lr: Input should be greater than 0, got -1" in msg


@pytest.mark.parametrize("recipe, expected", [
    (_recipe(SFT, {"name": "dpo", "stage": "dpo", "model": "other"}),
     "stage 'dpo' (stages[1], stage: dpo): only the first stage names a model"),
    (_recipe({k: v for k, v in SFT.items() if k != "model"}),
     "stage 'sft' (stages[0], stage: sft): the first stage needs `model`"),
    (_recipe(SFT, {"name": "x", "stage": "dpoo"}), "unknown stage 'dpoo' (did you mean 'dpo'?)"),
    (_recipe(SFT, {**SFT, "model": None}), "two stages are named 'sft' (stages[0] and stages[1])"),
    (_recipe(SFT, {"name": "d", "stage": "dpo", "from": "sftt"}), "from 'sftt' names no earlier stage (did you mean 'sft'?)"),
    (_recipe(SFT, {"name": "p", "stage": "ppo", "ppo": {"reward_model": "${stages.rm}"}}),
     "${stages.rm} names no earlier stage"),
    (_recipe(SFT, {"name": "d", "stage": "dpo", "start_from": "merge"}), "start_from must be merged or adapter"),
    (_recipe(SFT, {"name": "base", "stage": "dpo"}), "'base' is reserved for the recipe's starting model"),
    (_recipe({**SFT, "output_dir": "elsewhere"}), "output_dir is set by the pipeline (<output_dir>/sft)"),
    ({"stages": [SFT]}, "output_dir is required"),
    (_recipe(SFT, stagess=[]), "unknown top-level key 'stagess' (did you mean 'stages'?)"),
    (_recipe(SFT, eval={"regresion": "gym"}), "eval: unknown key 'regresion'"),
    (_recipe({**SFT, "measures": [{"measure": "task_accuracy", "argz": {}}]}), "measures: unknown key 'argz'"),
])
def test_recipe_errors_name_the_stage_and_the_key(recipe, expected):
    assert expected in _err(recipe)


def test_overrides_address_stages_by_name():
    r = load_recipe(_recipe(SFT), ["sft.train.lr=3e-4", "output_dir=runs/y"])
    assert r.stages[0].cfg.train.lr == 3e-4 and str(r.output_dir) == "runs/y"
    assert "override 'sfx.train.lr' names no stage (did you mean 'sft'?)" in _err(_recipe(SFT), ["sfx.train.lr=1"])


def _warnings(*stages):
    return order_warnings(load_recipe(_recipe(*stages)))


def test_order_warnings():
    cpt = {"name": "cpt", "stage": "cpt", "model": "m", "data": {"train": "c.jsonl"}}
    sft = {"name": "sft", "stage": "sft", "data": {"train": "s.jsonl"}}
    dpo = {"name": "dpo", "stage": "dpo", "data": {"train": "p.jsonl"}}
    assert _warnings(cpt, sft, dpo, {"name": "check", "stage": "eval"}) == []
    w = _warnings({**dpo, "model": "m"}, sft)
    assert w[0].startswith("stage 'dpo' (dpo) runs before any SFT stage")
    assert w[1] == ("stage 'sft' (sft) runs after 'dpo' (dpo) and would undo it: SFT pulls the model back toward "
                    "its demonstrations and erases the preference margins")
    w = _warnings({**sft, "model": "m"}, {**cpt, "model": None})
    assert w == ["stage 'cpt' (cpt) runs after 'sft' (sft) and would undo it: continued pretraining on raw text "
                 "erodes the chat format and instruction following that SFT taught"]
    # a branch (`from:`) only inherits its own ancestry: sft -> dpo, and a second sft branched from sft
    assert _warnings({**sft, "model": "m"}, dpo, {**sft, "name": "sft2", "from": "sft"}) == []


def test_from_base_starts_a_second_chain():
    from posttrain.pipeline.runner import _parents

    sft = {"name": "sft", "stage": "sft", "model": "m", "data": {"train": "s.jsonl"}}
    dpo = {"name": "dpo", "stage": "dpo", "data": {"train": "p.jsonl"}}
    sft2 = {"name": "sft2", "stage": "sft", "from": "base", "data": {"train": "s.jsonl"}}
    r = load_recipe(_recipe(sft, dpo, sft2, {**dpo, "name": "dpo2"}))
    assert _parents(r) == {"sft": None, "dpo": "sft", "sft2": None, "dpo2": "sft2"}
    assert order_warnings(r) == []  # sft2 starts over from the model: nothing of dpo to undo
    # a preference stage straight from the base model still gets its warning
    w = order_warnings(load_recipe(_recipe(sft, {**dpo, "from": "base"})))
    assert w and w[0].startswith("stage 'dpo' (dpo) runs before any SFT stage")
