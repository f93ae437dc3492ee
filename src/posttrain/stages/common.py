"""What every training stage shares: claim the run directory, load the model, run the engine,
publish the model, measure, report and sign the run off, in that order.

A stage module only supplies its loss (a `Stage` object), its data and, where it measures
something after training, an `after_training` hook. The manifest is written last: a run whose
manifest says "completed" has its model, its final measures and its report.
"""

from __future__ import annotations

import json
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from posttrain.config import RunConfig
from posttrain.engine import run as rundir
from posttrain.engine.dist import init_distributed, is_main, local_device, unwrap, world_size, wrap_model
from posttrain.engine.precision import resolve_precision
from posttrain.engine.setup import load_for_training
from posttrain.engine.trainer import Engine, Stage, TrainData
from posttrain.eval.guard import default_guard
from posttrain.models.loading import resolve_device


@dataclass
class RunResult:
    output_dir: Path
    model_dir: Path
    result: dict
    model: torch.nn.Module
    tokenizer: object


@dataclass
class FinalMeasures:
    """What a stage measures once training is over (the `after_training` hook): `result` goes into the
    manifest's result under the stage's key, `metrics` (dicts with `step` and `split`) into metrics.jsonl."""

    result: dict
    metrics: list[dict]


def run_training(cfg: RunConfig, make_stage: Callable[[object], Stage],
                 make_data: Callable[[RunConfig, object], TrainData], *, resume: bool = False,
                 evaluators: Sequence[Callable] = (), guard=None, model=None, tokenizer=None,
                 after_training: Optional[Callable[[torch.nn.Module, dict], FinalMeasures]] = None,
                 make_checks: Optional[Callable[[torch.nn.Module], list]] = None,
                 trust_checkpoint: bool = False) -> RunResult:
    """Claim the output directory, train, publish the final model, measure, report, sign the run off.

    Every run is guarded (`eval.guard`, on by default): `eval.guard.default_guard` builds the drift
    guard (and the regression suite's when `eval.regression_every` is set) from the model about to be
    trained. `make_checks(model)` adds the stage's own `StepCheck`s (the RL reward-hacking monitor).
    A check that stops the run has rolled the weights back; the run still completes and publishes
    them, and `result["stop_reason"]` says why (the CLI prints it on one line).

    `after_training(model, result) -> FinalMeasures` runs on the main process after the model is
    published and before the report and the manifest. `trust_checkpoint` lets a resumed run's
    checkpoint unpickle what the safe loader refuses (`--trust-checkpoint`). On any failure the manifest says "failed"
    with the error, checkpoints stay, and no final model appears under its final name.
    """
    started = time.time()
    device = resolve_device(cfg.train.device)
    init_distributed(device)
    device = local_device(device)
    cfg.train.precision = resolve_precision(cfg.train.precision, device)  # auto -> fp32 | bf16, before anything reads it
    out = rundir.claim(cfg, resume)
    data: Optional[TrainData] = None
    try:
        if model is None:
            model, tokenizer = load_for_training(cfg, device)
        data = make_data(cfg, tokenizer)
        guards = default_guard(cfg, tokenizer, model)
        evaluators, guard = [*evaluators, *guards.evaluators], guard or guards.guard
        checks = ([guards.drift] if guards.drift is not None else []) + (make_checks(model) if make_checks else [])
        model, strategy = wrap_model(model, cfg.train.distributed, precision=cfg.train.precision, device=device,
                                     cpu_offload=cfg.train.cpu_offload)
        engine = Engine(model, make_stage(tokenizer), data, cfg, evaluators=evaluators, guard=guard, checks=checks,
                        device=device)
        result = engine.fit(resume=resume, trust_checkpoint=trust_checkpoint)
        for c in checks:
            result[c.name] = c.summary()
        result["data"] = {k: v for k, v in data.stats.items() if isinstance(v, (int, float, str))}
        result["eval_history"] = engine.history
        result["distributed"] = {"strategy": strategy, "world_size": world_size()}
        model_dir = rundir.publish_model(model, tokenizer, out, adapter=cfg.adapter.type != "none",
                                         sharded=strategy == "fsdp")
        model = unwrap(model)
        if after_training is not None and is_main():
            final = after_training(model, result)
            result[cfg.stage] = final.result
            _append_metrics(out, final.metrics)
    except BaseException as e:
        hashes = getattr(data, "hashes", {}) if data is not None else {}
        rundir.write_manifest(out, status="failed", cfg=cfg, data_hashes=hashes, result={},
                              error="".join(traceback.format_exception_only(type(e), e)).strip(), started=started)
        raise
    manifest = rundir.build_manifest(status="completed", cfg=cfg, data_hashes=getattr(data, "hashes", {}),
                                     result=result, model_dir=model_dir, started=started)
    if is_main():
        _report(out, manifest)
    rundir.write_manifest(out, status="completed", cfg=cfg, data_hashes={}, result={}, started=started,
                          manifest=manifest)
    return RunResult(out, out / model_dir, result, model, tokenizer)


def _append_metrics(out: Path, lines: list[dict]) -> None:
    with (out / "metrics.jsonl").open("a") as f:
        for m in lines:
            f.write(json.dumps(m) + "\n")


def _report(out: Path, manifest: dict) -> None:
    """Every run gets its report.html; a report failure never fails a finished run."""
    # deferred: the report's Jinja2 and Pillow (~0.1 s of imports) are needed only once training is over
    from posttrain.report import build_report

    try:
        build_report([out], manifests={out: manifest})
    except Exception as e:  # the model is already published; say what went wrong and go on
        print(f"posttrain: could not build the report: {e}")
