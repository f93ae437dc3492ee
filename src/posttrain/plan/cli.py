"""`posttrain plan`: estimate a run before it starts.

    posttrain plan --config run.yaml [key=value ...] [--stage sft] [--device H100-80GB] [--gpus N] [--json]

The planner reads config.json only; each command imports the data and model code it needs (torch,
transformers) inside its function, so `posttrain plan` answers in a fraction of a second.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional

import yaml

from posttrain.plan.devices import DEVICES, get_device
from posttrain.plan.shapes import PlanError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="posttrain plan", description="Estimate a run's peak memory, speed and wall "
                                "time from the model's config.json (no weights loaded), and say whether it fits.")
    p.add_argument("--config", "-c", help="the run's YAML config")
    p.add_argument("--stage", default=None, help="stage (default: the config's `stage`, else sft)")
    p.add_argument("--device", default="cpu", help=f"cpu (this machine) or one of: {', '.join(DEVICES)}")
    p.add_argument("--gpus", type=int, default=1, help="devices the run uses (DDP, or FSDP2 with train.distributed=fsdp)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. adapter.type=lora")
    return p


def _stage_of(config_path: Optional[str], given: Optional[str]) -> str:
    if given:
        return given
    if config_path and Path(config_path).is_file():
        try:
            tree = yaml.safe_load(Path(config_path).read_text()) or {}
        except yaml.YAMLError:
            return "sft"  # load_config reports the YAML error with its place
        if isinstance(tree, dict) and isinstance(tree.get("stage"), str):
            return tree["stage"]
    return "sft"


def count_rows(cfg) -> Optional[int]:
    """Training examples, when data.train is a readable file (or several); None otherwise."""
    from posttrain.data.sources import GYM_PREFIX, read_records

    sources = cfg.data.train if isinstance(cfg.data.train, list) else [cfg.data.train]
    if not sources or any(s is None or str(s).startswith(GYM_PREFIX) or not Path(s).is_file() for s in sources):
        return None
    n = sum(len(read_records(s)) for s in sources)
    return min(n, cfg.data.limit) if cfg.data.limit else n


def main(argv: list[str]) -> int:
    from posttrain.plan.planner import format_plan, plan
    from posttrain.stages import load_config

    a = build_parser().parse_args(argv)
    cfg = load_config(_stage_of(a.config, a.stage), a.config, a.overrides)
    try:
        device = get_device(a.device)
    except KeyError as e:
        raise PlanError(e.args[0]) from None
    p = plan(cfg, device, gpus=a.gpus, rows=count_rows(cfg))
    print(json.dumps(p.to_json(), indent=2) if a.json else format_plan(p))
    return 0


def _records(sources, split: str):
    from posttrain.data.sources import read_records

    if not sources:
        return []
    return [r for s in (sources if isinstance(sources, list) else [sources]) for r in read_records(s, split=split)]


def data_check_main(argv: list[str]) -> int:
    """`posttrain data check data.train=D [data.eval=E] [model=M] [--json]`: duplicates, contamination, lengths."""
    from posttrain.plan.quality import check_data, format_report
    from posttrain.stages import load_config

    p = argparse.ArgumentParser(prog="posttrain data check", description="Data quality: exact and near duplicates, "
                                "train/held-out 13-gram overlap, truncation and length outliers, rejected rows; "
                                "each with its origin. With `model` set, lengths are in that tokenizer's tokens "
                                "and the template audit runs.")
    p.add_argument("--config", "-c")
    p.add_argument("--json", action="store_true")
    p.add_argument("--show", type=int, default=5, help="examples listed per finding (text output)")
    p.add_argument("--near-threshold", type=float, default=0.8, help="Jaccard similarity of near duplicates")
    p.add_argument("overrides", nargs="*", help="data.train=..., data.eval=..., model=..., data.max_length=...")
    a = p.parse_args(argv)
    cfg = load_config("sft", a.config, a.overrides)
    if not cfg.data.train:
        raise PlanError("no training data: set data.train (a file, a list of files, or gym:TASK)")
    tok = None
    if cfg.model:
        from posttrain.models.loading import load_tokenizer, resolve_model_dir

        tok = load_tokenizer(cfg.tokenizer or resolve_model_dir(cfg.model), trust_remote_code=cfg.trust_remote_code)
        if cfg.data.chat_template:
            tok.chat_template = cfg.data.chat_template
    rep = check_data(_records(cfg.data.train, "train"), _records(cfg.data.eval, "validation"), tokenizer=tok,
                     max_length=cfg.data.max_length, near_threshold=a.near_threshold)
    print(json.dumps(rep.to_json(), indent=2) if a.json else format_report(rep, a.show))
    return 0


PILOT_MINUTES = 5.0  # per method, of predicted compute


def advise_main(argv: list[str]) -> int:
    """`posttrain advise model=M data.train=D data.eval=E [--budget 1xA100-40GB,8h] [--pilot-minutes N | --no-pilots]`."""
    from posttrain.plan.advise import advise, format_advice, parse_budget
    from posttrain.stages import load_config

    p = argparse.ArgumentParser(prog="posttrain advise", description="Which adaptation (prompting, prompt/prefix "
                                "tuning, LoRA, QLoRA, full, continued pretraining then SFT) for this model and "
                                "data: data analysis on the base model, the planner, documented rules of thumb; "
                                "writes a ready-to-run pipeline recipe (advice.yaml).")
    p.add_argument("--config", "-c")
    p.add_argument("--budget", default=None, help="devices and time, e.g. '1xA100-40GB,8h' or 'cpu,30m' "
                   "(default: this machine, no time limit)")
    p.add_argument("--no-pilots", action="store_true", help="decide without pilot runs")
    p.add_argument("--pilot-minutes", type=float, default=PILOT_MINUTES, help="predicted compute per pilot, the "
                   f"same for every method (default {PILOT_MINUTES:g}); pilots need data.eval")
    p.add_argument("--general", default="gym:regression:train", help="general text to compare the answers' loss with")
    p.add_argument("--domain-text", default=None, help="raw domain text (enables continued pretraining then SFT)")
    p.add_argument("--out", default="advice", help="directory for advice.yaml and advice.json")
    p.add_argument("--json", action="store_true")
    p.add_argument("overrides", nargs="*", help="model=..., data.train=..., data.eval=..., train.*, adapter.*")
    a = p.parse_args(argv)
    if a.pilot_minutes <= 0:
        raise PlanError(f"--pilot-minutes must be > 0, got {a.pilot_minutes:g}")
    cfg = load_config("sft", a.config, a.overrides)
    out = Path(a.out)
    result = advise(cfg, budget=parse_budget(a.budget), out_dir=out, general=a.general, domain_text=a.domain_text,
                    pilot_minutes=None if a.no_pilots else a.pilot_minutes)
    (out / "advice.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2) if a.json else format_advice(result))
    return 0
