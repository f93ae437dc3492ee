"""Metrics sinks: metrics.jsonl (always), a progress bar, and TensorBoard, W&B, MLflow when asked.

Only rank 0 writes. On resume, metrics logged after the checkpoint's step are dropped from
metrics.jsonl, so curves never show a step twice.

`train.report_to` names the extra sinks. Each is optional: a sink whose package is missing is
skipped with one line that says what to install. Each logs every numeric metric as
`<split>/<name>` at its step, and the resolved config (the run's config.yaml) once:

- ``tensorboard``: event files in `<output_dir>/tensorboard` (the config as a text summary);
- ``wandb``: project `train.wandb_project` (else `$WANDB_PROJECT`, else "posttrain"), run name
  `train.run_name` (else the output directory's name), the config as the run's config. Offline
  with ``WANDB_MODE=offline``; a resumed run continues the same W&B run (its id is kept in
  `<output_dir>/wandb/run-id`).
- ``mlflow``: tracking URI `train.mlflow_tracking_uri` (else `$MLFLOW_TRACKING_URI`, else the
  local file store `<output_dir>/mlruns`), experiment `train.mlflow_experiment` (else
  "posttrain"), the config flattened into params (`train.lr`, ...).
"""

from __future__ import annotations

import json
import math
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Optional, Protocol

import yaml

from posttrain.engine.dist import is_main


class Sink(Protocol):
    def log(self, step: int, split: str, scalars: dict[str, float]) -> None: ...

    def close(self) -> None: ...


class TensorBoardSink:
    def __init__(self, out: Path, run_name: str, config: dict, settings: dict):
        from torch.utils.tensorboard import SummaryWriter  # needs the optional tensorboard package

        self.writer = SummaryWriter(str(out / "tensorboard"))
        if config:
            # four-space indent: TensorBoard renders text summaries as markdown
            text = "".join("    " + line + "\n" for line in yaml.safe_dump(config, sort_keys=False).splitlines())
            self.writer.add_text("config", text, 0)

    def log(self, step, split, scalars):
        for k, v in scalars.items():
            self.writer.add_scalar(f"{split}/{k}", v, step)

    def close(self):
        self.writer.close()


class WandbSink:
    def __init__(self, out: Path, run_name: str, config: dict, settings: dict):
        import wandb  # optional dependency

        id_file = out / "wandb" / "run-id"
        id_file.parent.mkdir(parents=True, exist_ok=True)
        run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)  # W&B ids: [a-z0-9]
        self.run = wandb.init(project=settings.get("wandb_project") or os.environ.get("WANDB_PROJECT") or "posttrain",
                              name=run_name, dir=str(out), config=config, id=run_id, resume="allow")
        id_file.write_text(run_id)

    def log(self, step, split, scalars):
        self.run.log({f"{split}/{k}": v for k, v in scalars.items()}, step=step)

    def close(self):
        self.run.finish()


class MlflowSink:
    def __init__(self, out: Path, run_name: str, config: dict, settings: dict):
        from mlflow.entities import Param  # optional dependency
        from mlflow.tracking import MlflowClient

        uri = settings.get("mlflow_tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            uri = (out / "mlruns").resolve().as_uri()
            # MLflow 3 refuses a file store unless asked: the local default needs no database package
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.uri = uri
        self.client = MlflowClient(uri)
        name = settings.get("mlflow_experiment") or "posttrain"
        exp = self.client.get_experiment_by_name(name)
        exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(name)
        self.run_id = self.client.create_run(exp_id, run_name=run_name).info.run_id
        params = [Param(k, str(v)[:6000]) for k, v in _flatten(config).items()]  # MLflow's value limit
        for i in range(0, len(params), 100):  # at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    def log(self, step, split, scalars):
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(f"{split}/{k}", v, now, step) for k, v in scalars.items()])

    def close(self):
        self.client.set_terminated(self.run_id)


SINKS: dict[str, type] = {"tensorboard": TensorBoardSink, "wandb": WandbSink, "mlflow": MlflowSink}
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow-skinny"}


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _run_config(out: Path) -> dict:
    """The resolved config the run wrote (config.yaml), or {} before it exists."""
    try:
        cfg = yaml.safe_load((out / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return cfg if isinstance(cfg, dict) else {}


class Monitor:
    def __init__(self, output_dir: Path, *, total_steps: int, progress: bool = True,
                 report_to: tuple = (), resume_step: Optional[int] = None, run_name: str = "run",
                 config: Optional[dict] = None):
        out = Path(output_dir)
        self.path = out / "metrics.jsonl"
        self.main = is_main()
        self.bar = None
        self.sinks: dict[str, Sink] = {}
        if not self.main:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            self._truncate_after(resume_step)
        elif self.path.exists():
            self.path.unlink()
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=resume_step or 0, desc=run_name, unit="step",
                            dynamic_ncols=True, file=sys.stderr, mininterval=0.5)
        config = _run_config(out) if config is None else config
        # wandb_project, run_name, mlflow_*: read from the train section until the schema declares them
        settings = {k: v for k, v in (config.get("train") or {}).items() if v is not None}
        for name in report_to:
            if name not in SINKS:
                raise ValueError(f"train.report_to: unknown sink '{name}'; choose from {', '.join(SINKS)}")
            try:
                self.sinks[name] = SINKS[name](out, settings.get("run_name") or out.resolve().name, config, settings)
            except ImportError:
                print(f"posttrain: train.report_to includes {name}, but it is not installed "
                      f"(pip install {PACKAGES[name]}); skipping it", file=sys.stderr)

    def _truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by the kill
            if rec.get("step", 0) <= step:
                keep.append(line)
        self.path.write_text("".join(l + "\n" for l in keep))

    def log(self, step: int, split: str, metrics: dict) -> None:
        if not self.main:
            return
        rec = {"step": step, "split": split, "time": round(time.time(), 3)}
        for k, v in metrics.items():
            if isinstance(v, float) and not math.isfinite(v):
                v = str(v)
            rec[k] = v
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        scalars = {k: float(v) for k, v in metrics.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        for sink in self.sinks.values():
            sink.log(step, split, scalars)

    def progress(self, n: int = 1, **postfix) -> None:
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in postfix.items()},
                                     refresh=False)

    def write(self, msg: str) -> None:
        if not self.main:
            return
        if self.bar is not None:
            self.bar.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        for sink in self.sinks.values():
            sink.close()
