"""Metric sinks against their real packages, offline: TensorBoard event files, W&B offline runs, MLflow file store."""

import json
import time

import pytest
import yaml

from posttrain.engine.monitor import Monitor

CONFIG = {"stage": "sft", "model": "base/", "train": {"lr": 0.0002, "batch_size": 8, "wandb_project": "ptest",
                                                      "run_name": "run-a", "mlflow_experiment": "exp-a"},
          "adapter": {"type": "lora", "r": 16}}
LOSSES = [2.5, 2.0, 1.75]


def _run(out, report_to, config=CONFIG):
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(config))
    mon = Monitor(out, total_steps=3, progress=False, report_to=tuple(report_to))
    for step, loss in enumerate(LOSSES, start=1):
        mon.log(step, "train", {"loss": loss, "lr": 1e-4 * step, "note": "text is skipped", "nan": float("nan")})
    mon.log(3, "eval", {"loss": 2.2})
    return mon


def test_tensorboard_event_files_hold_every_scalar_and_the_config(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _run(tmp_path, ["tensorboard"]).close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"tensors": 0, "scalars": 0})
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == list(zip([1, 2, 3], LOSSES))
    assert [e.value for e in acc.Scalars("eval/loss")] == [pytest.approx(2.2)]
    assert "train/nan" not in acc.Tags()["scalars"] and "train/note" not in acc.Tags()["scalars"]
    text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "    train:" in text and "lr: 0.0002" in text


def test_wandb_offline_run_has_project_name_config_and_history(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    mon = _run(tmp_path, ["wandb"])
    run = mon.sinks["wandb"].run
    assert (run.project, run.name, run.offline) == ("ptest", "run-a", True)
    assert run.config["train"]["lr"] == 0.0002 and run.config["adapter"] == {"type": "lora", "r": 16}
    assert run.summary["train/loss"] == 2.0  # step 3 (train and eval) is committed when the run finishes
    run_id = run.id
    mon.close()
    assert (tmp_path / "wandb" / "run-id").read_text() == run_id
    path = next((tmp_path / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    for _ in range(100):  # W&B's service process writes the run file shortly after finish() returns
        data = path.read_bytes()
        if b"eval/loss" in data:
            break
        time.sleep(0.2)
    assert b"ptest" in data and b"run-a" in data
    for key, value in [("train/loss", 2.5), ("train/loss", 1.75), ("eval/loss", 2.2)]:  # history items, JSON values
        assert key.encode() in data and json.dumps(value).encode() in data
    # a resumed run continues the same W&B run
    mon2 = Monitor(tmp_path, total_steps=3, progress=False, report_to=("wandb",), resume_step=2)
    assert mon2.sinks["wandb"].run.id == run_id
    mon2.close()


def test_mlflow_file_store_run_has_params_and_metric_history(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    mon = _run(tmp_path, ["mlflow"])
    sink = mon.sinks["mlflow"]
    mon.close()
    assert sink.uri == (tmp_path / "mlruns").resolve().as_uri()
    client = MlflowClient(sink.uri)
    run = client.get_run(sink.run_id)
    assert run.info.run_name == "run-a" and run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "exp-a"
    assert run.data.params["train.lr"] == "0.0002" and run.data.params["adapter.type"] == "lora"
    hist = client.get_metric_history(sink.run_id, "train/loss")
    assert [(m.step, m.value) for m in hist] == list(zip([1, 2, 3], LOSSES))


def test_a_missing_package_is_skipped_with_what_to_install(tmp_path, monkeypatch, capsys):
    import builtins

    real = builtins.__import__

    def no_mlflow(name, *a, **kw):
        if name.startswith("mlflow"):
            raise ImportError(name)
        return real(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_mlflow)
    mon = _run(tmp_path, ["mlflow"])
    mon.close()
    assert mon.sinks == {}
    assert "train.report_to includes mlflow, but it is not installed (pip install mlflow-skinny); skipping it" in \
        capsys.readouterr().err
    assert [json.loads(x)["loss"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [*LOSSES, 2.2]
    with pytest.raises(ValueError, match="train.report_to: unknown sink 'comet'; choose from tensorboard, wandb, mlflow"):
        Monitor(tmp_path, total_steps=1, progress=False, report_to=("comet",))


def test_a_training_run_reports_to_tensorboard_with_its_resolved_config(tiny_models, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from posttrain.cli import main

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i} + 1 =", "completion": f" {i + 1}"}) + "\n" for i in range(8)))
    out = tmp_path / "run"
    assert main(["sft", f"model={tiny_models('qwen2')}", f"data.train={data}", f"output_dir={out}",
                 "train.max_steps=2", "train.batch_size=4", "train.report_to=[tensorboard]", "train.lr=1e-3",
                 "train.progress=false"]) == 0
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"tensors": 0, "scalars": 0})
    acc.Reload()
    logged = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    want = [(r["step"], r["loss"]) for r in logged if r["split"] == "train"]
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(s, pytest.approx(v)) for s, v in want]
    assert len(want) == 2
    assert "lr: 0.001" in acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
