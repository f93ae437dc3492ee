"""Thin training recipes: each says what a batch is, what its loss is and what it measures."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Optional, Union

from posttrain import config

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


def get(name: str):
    """The stage module `name` (which registers its config schema when imported)."""
    if name not in STAGES:
        raise config.ConfigError(f"unknown stage '{name}'; known stages: {', '.join(sorted(STAGES))}")
    return importlib.import_module(STAGES[name])


def schema(name: str) -> type[config.RunConfig]:
    """The typed config class of stage `name`."""
    get(name)
    return config.STAGE_SCHEMAS[name]


def load_config(stage: str, path: Optional[Union[str, Path]] = None, overrides: Optional[list[str]] = None,
                base: Optional[dict] = None) -> config.RunConfig:
    """`posttrain.config.load_config` for any stage, importing the stage module (and its schema) first."""
    get(stage)
    return config.load_config(stage, path, overrides, base)
