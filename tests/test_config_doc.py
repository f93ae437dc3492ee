"""The CLI explains itself: key lists, commented YAML and command summaries read from the schemas."""

import re

import pytest
import yaml

from posttrain import stages
from posttrain.cli import COMMANDS, main
from posttrain.config import _all_keys
from posttrain.config_doc import format_help, format_yaml_doc, keys


def _flat(text: str) -> str:
    return " ".join(text.replace("#", " ").split())


@pytest.mark.parametrize("stage", list(stages.STAGES))
def test_help_lists_every_key_with_type_default_and_the_schemas_description(stage):
    schema = stages.schema(stage)
    text = format_help(schema)
    docs = {k.key: k for k in keys(schema)}
    assert set(docs) == set(_all_keys(schema))
    for key, d in docs.items():
        if d.type == "section":
            assert f"\n{key}.*\n" in f"\n{text}\n"
        else:
            # a long type wraps onto indented lines under its key: compare with the wrapping undone
            assert re.search(rf"^  {re.escape(key)}  {re.escape(d.type)} = ", re.sub(r"\n {8}(?=\S)", " ", text),
                             re.M), key
        # the description is the schema's own text, whatever the wrapping
        assert d.description == " ".join((_field(schema, key).description or "").split())
        assert d.description in _flat(text)
    assert max(len(line) for line in text.splitlines()) <= 100


def _field(schema, dotted):
    *path, last = dotted.split(".")
    for name in path:
        ann = schema.model_fields[name].annotation
        schema = next(t for t in getattr(ann, "__args__", (ann,)) if isinstance(t, type) and hasattr(t, "model_fields"))
    return schema.model_fields[last]


def test_help_shows_measured_defaults():
    text = format_help(stages.schema("sft"))
    assert "  train.lr  float | null = null\n      Peak learning rate. Default: 2e-5 for full fine-tuning" in text
    assert "  train.precision  fp32 | bf16 | auto = fp32\n" in text
    assert "  data.mix.data  str | list[str] | Dataset = required\n" in text
    assert "  train.adam_betas  tuple[float, float] = [0.9, 0.999]\n" in text


@pytest.mark.parametrize("stage", ["sft", "grpo", "orpo"])
def test_yaml_doc_loads_back_to_the_config_and_carries_every_description(stage):
    cfg = stages.load_config(stage, None, ["data.mix.data=gym:regression", "train.lr=1e-4"])
    doc = format_yaml_doc(cfg)
    assert yaml.safe_load(doc) == cfg.model_dump(mode="json")
    for k in keys(type(cfg)):
        assert k.description in _flat(doc)
    assert "  # (float | null) Peak learning rate." in doc and "\n  lr: 0.0001\n" in doc
    assert max(len(line) for line in doc.splitlines()) <= 100


def test_cli_stage_help_config_doc_and_top_level_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["sft", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    assert "Run the `sft` stage: supervised fine-tuning on prompt-completion or conversational data" in out
    assert "config keys (KEY=VALUE on the command line, nested in --config YAML):" in out
    assert format_help(stages.schema("sft")) in out

    assert main(["config", "sft", "--doc", "train.lr=1e-4"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["train"]["lr"] == 1e-4

    assert main(["--help"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert max(map(len, lines)) <= 100
    for name in [*stages.STAGES, *COMMANDS]:
        mine = [x for x in lines if x.startswith(f"  {name} ")]
        assert len(mine) == 1 and len(mine[0].split(None, 1)[1]) > 10, name  # one line, with a summary
    assert "  orpo      ORPO, SFT plus an odds-ratio preference term, no reference model (Hong et al. 2024)" in lines


def test_missing_model_is_one_line_with_what_to_do(capsys):
    assert main(["sft", "data.train=x.jsonl"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("posttrain: error: no model given: add model=DIR")
    assert "`posttrain sft --help` lists every key" in err
