"""Stage `cpt`: continued pretraining on raw text, always packed.

Same loss as `sft` (every token of every document is a target); the data pipeline packs
documents into full rows with attention kept inside each document.
"""

from __future__ import annotations

from posttrain.config import RunConfig
from posttrain.stages.common import RunResult
from posttrain.stages.sft import run as _run_lm


def run(cfg: RunConfig, *, resume: bool = False, **kw) -> RunResult:
    if cfg.stage != "cpt":
        raise ValueError(f"cpt.run got a '{cfg.stage}' config")
    return _run_lm(cfg, resume=resume, **kw)
