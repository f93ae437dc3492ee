"""Thin training recipes: each says what a batch is, what its loss is and what it measures."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Optional, Union

STAGES = {
    "sft": "posttrain.stages.sft",
    "cpt": "posttrain.stages.cpt",
    "dpo": "posttrain.stages.dpo",
    "kto": "posttrain.stages.kto",
    "orpo": "posttrain.stages.orpo",
    "simpo": "posttrain.stages.simpo",
    "reward": "posttrain.stages.reward",
    "ppo": "posttrain.stages.ppo",
    "grpo": "posttrain.stages.grpo",
    "distill": "posttrain.stages.distill",
    "safety": "posttrain.stages.safety",
}


# `posttrain.config` is imported inside these functions: its registries pull in torch (seconds), and
# `posttrain --help` reads STAGES without it.


def get(name: str):
    """The stage module `name` (which registers its config schema when imported)."""
    from posttrain import config

    if name not in STAGES:
        raise config.ConfigError(f"unknown stage '{name}'; known stages: {', '.join(sorted(STAGES))}")
    return importlib.import_module(STAGES[name])


def schema(name: str):
    """The typed config class of stage `name` (a posttrain.config.RunConfig subclass)."""
    from posttrain import config

    get(name)
    return config.STAGE_SCHEMAS[name]


def load_config(stage: str, path: Optional[Union[str, Path]] = None, overrides: Optional[list[str]] = None,
                base: Optional[dict] = None):
    """`posttrain.config.load_config` for any stage, importing the stage module (and its schema) first."""
    from posttrain import config

    get(stage)
    return config.load_config(stage, path, overrides, base)
