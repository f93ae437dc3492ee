"""What every training stage shares: load the model, attach an adapter, run the engine, publish.

A stage module only supplies its loss (a `Stage` object) and, where it differs, its data.
"""

from __future__ import annotations

import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from posttrain.config import RunConfig
from posttrain.engine import run as rundir
from posttrain.engine.dist import init_distributed, local_device, unwrap, world_size, wrap_model
from posttrain.engine.trainer import Engine, Stage, TrainData
from posttrain.models.loading import load, resolve_device


@dataclass
class RunResult:
    output_dir: Path
    model_dir: Path
    result: dict
    model: torch.nn.Module
    tokenizer: object


def load_for_training(cfg: RunConfig, device=None):
    """Load the starting model in fp32 master weights (bf16 runs use autocast) and attach the adapter."""
    if not cfg.model:
        raise ValueError("no model given: set `model` (a local HF directory or a hub name)")
    model, tok = load(cfg.model, dtype="fp32", device=device or cfg.train.device, tokenizer=cfg.tokenizer,
                      trust_remote_code=cfg.trust_remote_code, allow_pickle=cfg.allow_pickle,
                      gradient_checkpointing=cfg.train.gradient_checkpointing)
    if cfg.adapter.type != "none":
        from posttrain.models import adapters

        torch.manual_seed(cfg.train.seed)
        model = adapters.apply(model, cfg.adapter, tokenizer=tok)  # also continues from adapter.path
    else:
        model.requires_grad_(True)
    return model, tok


def run_training(cfg: RunConfig, make_stage: Callable[[object], Stage],
                 make_data: Callable[[RunConfig, object], TrainData], *, resume: bool = False,
                 evaluators: Sequence[Callable] = (), guard=None, model=None, tokenizer=None) -> RunResult:
    """Claim the output directory, train, publish the final model and sign the run off.

    On any failure the manifest says "failed" with the error, checkpoints stay, and no final
    model appears under its final name.
    """
    started = time.time()
    device = resolve_device(cfg.train.device)
    init_distributed(device)
    device = local_device(device)
    out = rundir.claim(cfg, resume)
    data: Optional[TrainData] = None
    try:
        if model is None:
            model, tokenizer = load_for_training(cfg, device)
        data = make_data(cfg, tokenizer)
        if cfg.eval.regression_every:
            # the forgetting guard: regression suite every N steps, stop and roll back past the limit
            from posttrain.eval.guard import from_config

            reg_evaluators, reg_guard = from_config(cfg, tokenizer, model=model)
            evaluators, guard = [*evaluators, *reg_evaluators], guard or reg_guard
        model, strategy = wrap_model(model, cfg.train.distributed, precision=cfg.train.precision, device=device,
                                     cpu_offload=cfg.train.cpu_offload)
        engine = Engine(model, make_stage(tokenizer), data, cfg, evaluators=evaluators, guard=guard, device=device)
        result = engine.fit(resume=resume)
        result["data"] = {k: v for k, v in data.stats.items() if isinstance(v, (int, float, str))}
        result["eval_history"] = engine.history
        result["distributed"] = {"strategy": strategy, "world_size": world_size()}
        model_dir = rundir.publish_model(model, tokenizer, out, adapter=cfg.adapter.type != "none",
                                         sharded=strategy == "fsdp")
        model = unwrap(model)
    except BaseException as e:
        hashes = getattr(data, "hashes", {}) if data is not None else {}
        rundir.write_manifest(out, status="failed", cfg=cfg, data_hashes=hashes, result={},
                              error="".join(traceback.format_exception_only(type(e), e)).strip(), started=started)
        raise
    rundir.write_manifest(out, status="completed", cfg=cfg, data_hashes=getattr(data, "hashes", {}),
                          result=result, model_dir=model_dir, started=started)
    _report(out)
    return RunResult(out, out / model_dir, result, model, tokenizer)


def _report(out: Path) -> None:
    """Every run gets its report.html; a report failure never fails a finished run."""
    try:
        from posttrain.report import build_report
    except ImportError:
        return
    try:
        build_report([out])
    except Exception as e:  # the model is already published; say what went wrong and go on
        print(f"posttrain: could not build the report: {e}")
