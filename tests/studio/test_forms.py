"""The launch form: fields from the typed schema, overrides from what changed, the CLI's validation."""

import pytest

from posttrain.config import ConfigError
from posttrain.stages import load_config, schema
from posttrain.studio.forms import BASICS, fields_of, form_fields, overrides_from_form, show, validate


def test_every_leaf_key_of_the_schema_is_a_field_with_its_default_and_description():
    fields = {f.key: f for f in fields_of(schema("sft"))}
    assert "stage" not in fields and "data" not in fields  # the command, and a section (its keys are fields)
    assert fields["train.lr"].default == "" and fields["train.lr"].kind == "text"
    assert fields["train.batch_size"].default == "8"
    assert fields["train.adam_betas"].default == "[0.9, 0.999]"
    assert fields["data.packing"].options == ["true", "false"] and fields["data.packing"].default == "false"
    assert fields["train.schedule"].options == ["constant", "linear", "cosine"]
    assert fields["adapter.type"].options[:2] == ["none", "lora"]
    assert fields["data.mix"].kind == "text"  # an optional section is typed as YAML: {data: ..., ratio: 0.2}
    assert fields["train.max_grad_norm"].description.startswith("Clip the global gradient norm")
    dpo = {f.key: f for f in fields_of(schema("dpo"))}
    assert "dpo.beta" in dpo and "dpo.beta" not in fields  # a stage's own section appears on its own form
    groups = form_fields("dpo")
    assert groups[0][0] == "basics" and [f.key for f in groups[0][1]] == BASICS
    assert "dpo" in [name for name, _ in groups]


@pytest.mark.parametrize("value, text", [(None, ""), (True, "true"), (3, "3"), ((0.9, 0.999), "[0.9, 0.999]"),
                                         (["a", "b"], "[a, b]"), ("cosine", "cosine")])
def test_show(value, text):
    assert show(value) == text


def test_only_changed_fields_become_overrides_and_load_like_the_cli():
    form = {"_stage": "sft", "model": "m", "train.lr": "1e-4", "train.batch_size": "8", "data.packing": "false",
            "train.max_steps": " 30 ", "data.eval": "", "adapter.type": "lora", "output_dir": "runs/a"}
    ov = overrides_from_form("sft", form)
    assert ov == ["model=m", "train.lr=1e-4", "train.max_steps=30", "adapter.type=lora", "output_dir=runs/a"]
    cfg, errors = validate("sft", ov)
    assert errors == {} and cfg.train.lr == 1e-4 and cfg.train.max_steps == 30 and cfg.adapter.type == "lora"
    assert cfg == load_config("sft", None, ov)


def test_errors_go_to_their_field_with_the_cli_message():
    ov = ["train.lr=-1", "train.max_stepz=3", "adapter.type=lorra"]
    cfg, errors = validate("sft", ov)
    assert cfg is None
    with pytest.raises(ConfigError) as cli:
        load_config("sft", None, ov)
    lines = [ln.strip() for ln in str(cli.value).splitlines()[1:]]
    assert sorted(x for v in errors.values() for x in v) == sorted(lines)  # the same words as the CLI's
    assert errors["train.lr"] == ["train.lr: Input should be greater than 0, got -1"]
    assert errors["train.max_stepz"] == ["unknown key 'train.max_stepz' (did you mean 'train.max_steps'?)"]
    assert errors["adapter.type"][0].startswith("adapter.type: Input should be 'none', 'lora'")
    cfg, errors = validate("sft", ["data.packing=true", "data.padding_free=true"])
    assert list(errors) == [""] and errors[""][0].startswith("Value error, data.padding_free and data.packing")
