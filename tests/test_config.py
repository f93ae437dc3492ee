import pytest

from posttrain.config import ConfigError
from posttrain.stages import load_config


def test_defaults_are_conservative():
    cfg = load_config("sft", overrides=["model=m"])
    assert cfg.default_lr() == 2e-5
    assert 1 <= cfg.train.epochs <= 3
    lora = load_config("sft", overrides=["model=m", "adapter.type=lora"])
    assert lora.default_lr() == 2e-4


def test_yaml_plus_dotted_overrides(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("model: base\ntrain:\n  lr: 3.0e-5\n  batch_size: 4\ndata:\n  train: a.jsonl\n")
    cfg = load_config("sft", f, ["train.lr=1e-4", "data.packing=true", "data.mix.data=gen.jsonl",
                                 "data.mix.ratio=0.2", "train.max_steps=7"])
    assert cfg.train.lr == 1e-4 and cfg.train.batch_size == 4
    assert cfg.data.packing is True and cfg.data.mix.ratio == 0.2 and cfg.train.max_steps == 7


def test_unknown_key_suggests_nearest():
    with pytest.raises(ConfigError, match=r"unknown key 'train.learning_rate' \(did you mean 'train.lr'\?\)"):
        load_config("sft", overrides=["train.learning_rate=1e-4"])
    with pytest.raises(ConfigError, match=r"unknown key 'data.max_lenght' \(did you mean 'data.max_length'\?\)"):
        load_config("sft", overrides=["data.max_lenght=512"])


def test_wrong_type_and_range_name_the_key():
    with pytest.raises(ConfigError, match=r"train.batch_size: .*got 'many'"):
        load_config("sft", overrides=["train.batch_size=many"])
    with pytest.raises(ConfigError, match=r"train.precision: .*'fp32', 'bf16' or 'auto'"):
        load_config("sft", overrides=["train.precision=fp8"])
    with pytest.raises(ConfigError, match=r"data.mix.ratio: .*less than 1"):
        load_config("sft", overrides=["data.mix.data=x", "data.mix.ratio=1.5"])


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("sft", tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config("sft", bad)
    with pytest.raises(ConfigError, match="must look like key=value"):
        load_config("sft", overrides=["train.lr"])
    with pytest.raises(ConfigError, match="unknown stage 'sfx'"):
        load_config("sfx")


def test_cpt_is_always_packed_and_patience_needs_eval():
    assert load_config("cpt", overrides=["model=m"]).data.packing is True
    with pytest.raises(ConfigError, match="early_stopping_patience needs train.eval_every"):
        load_config("sft", overrides=["train.early_stopping_patience=2"])


def test_padding_free_is_on_by_default_where_it_applies():
    # fast by default (issue 20): same batches and loss, fewer tokens; off where it cannot apply
    assert load_config("sft").data.padding_free is True
    assert load_config("dpo").data.padding_free is True
    assert load_config("sft", overrides=["data.packing=true"]).data.padding_free is False
    assert load_config("sft", overrides=["adapter.type=prefix"]).data.padding_free is False
    assert load_config("cpt").data.padding_free is False
    assert load_config("reward").data.padding_free is False
    assert load_config("kto").data.padding_free is False
    assert load_config("sft", overrides=["data.padding_free=false"]).data.padding_free is False


def test_report_sinks_are_the_monitor_s():
    from posttrain.config import REPORT_SINKS
    from posttrain.engine.monitor import SINKS

    assert set(REPORT_SINKS) == set(SINKS)
    cfg = load_config("sft", overrides=["train.report_to=[mlflow]", "train.run_name=a", "data.columns=alpaca"])
    assert cfg.train.report_to == ["mlflow"] and cfg.train.run_name == "a"
