"""`train.schedule_steps`: a run that is the first steps of a longer learning-rate schedule."""

import json

import pytest

from posttrain.config import ConfigError
from posttrain.engine.optim import schedule_length
from posttrain.engine.trainer import Engine
from posttrain.models.loading import load
from posttrain.stages import load_config
from posttrain.stages.sft import LMStage

from .helpers import token_data


def _engine(model_dir, out, **train):
    over = [f"train.{k}={v}" for k, v in train.items()]
    cfg = load_config("sft", overrides=[f"model={model_dir}", f"output_dir={out}", "train.progress=false",
                                        "train.batch_size=4", "train.lr=1e-3", *over])
    model, _ = load(model_dir)
    return Engine(model, LMStage("sft"), token_data(16), cfg)


def _lrs(out) -> dict[int, float]:
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["lr"] for r in recs if r["split"] == "train"}


def test_a_run_is_the_first_steps_of_the_longer_schedule(tiny_models, tmp_path):
    """4 steps of a 10-step cosine schedule (warmup 20% of 10 = 2 steps) log the learning rates of the
    10-step run's first 4 steps, and stop there; without schedule_steps the 4-step run decays by step 4."""
    d = tiny_models("qwen2")
    _engine(d, tmp_path / "full", max_steps=10, warmup_ratio=0.2).fit()
    e = _engine(d, tmp_path / "pilot", max_steps=4, schedule_steps=10, warmup_ratio=0.2)
    assert e.fit()["steps"] == 4 and e.schedule_steps == 10
    full, pilot = _lrs(tmp_path / "full"), _lrs(tmp_path / "pilot")
    assert list(pilot) == [1, 2, 3, 4]
    assert [pilot[s] for s in pilot] == pytest.approx([full[s] for s in pilot], rel=1e-12)
    assert pilot[2] == pytest.approx(1e-3) and pilot[4] == pytest.approx(1e-3 * 0.5 * (1 + 0.9238795), rel=1e-6)
    _engine(d, tmp_path / "own", max_steps=4, warmup_ratio=0.2).fit()
    own = _lrs(tmp_path / "own")
    assert own[4] == pytest.approx(1e-3 * 0.5 * (1 - 0.7071068), rel=1e-6)  # its own 4 steps: 3/4 of the cosine


def test_resume_keeps_the_longer_schedule(tiny_models, tmp_path):
    """A run of 6 steps on a 10-step schedule, checkpointed at step 3 and resumed: steps 4-6 have the
    learning rates of the uninterrupted run."""
    d = tiny_models("qwen2")
    _engine(d, tmp_path / "whole", max_steps=6, schedule_steps=10, schedule="linear", warmup_steps=1).fit()
    first = _engine(d, tmp_path / "cut", max_steps=6, schedule_steps=10, schedule="linear", warmup_steps=1,
                    save_every=3)
    first.fit()
    assert (tmp_path / "cut" / "checkpoints" / "step-3").is_dir()
    (tmp_path / "cut" / "metrics.jsonl").write_text("")  # only the resumed run's lines from here
    again = _engine(d, tmp_path / "cut", max_steps=6, schedule_steps=10, schedule="linear", warmup_steps=1)
    assert again.fit(resume=True)["steps"] == 6
    whole, resumed = _lrs(tmp_path / "whole"), _lrs(tmp_path / "cut")
    assert list(resumed) == [4, 5, 6]
    assert [resumed[s] for s in resumed] == pytest.approx([whole[s] for s in resumed], rel=1e-12)
    assert resumed[4] == pytest.approx(1e-3 * (1 - 2 / 9))  # 1 warmup step, then linear over 9: step 4 is 2/9 down


def test_a_schedule_shorter_than_the_run_is_refused(tiny_models, tmp_path):
    with pytest.raises(ConfigError, match=r"train.schedule_steps=5 is shorter than train.max_steps=10: the "
                                          r"schedule must cover the run"):
        load_config("sft", overrides=["model=x", "train.max_steps=10", "train.schedule_steps=5"])
    # without max_steps the run's length is known only to the engine (epochs): it says so there
    with pytest.raises(ConfigError, match=r"^train.schedule_steps=3 is shorter than the run \(4 optimizer steps\)"):
        _engine(tiny_models("qwen2"), tmp_path, epochs=1, schedule_steps=3)
    assert schedule_length(None, 7) == 7 and schedule_length(12, 7) == 12
