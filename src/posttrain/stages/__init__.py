"""Thin training recipes: each says what a batch is and what its loss is."""

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
    import importlib

    if name not in STAGES:
        raise KeyError(f"unknown stage '{name}'; known: {', '.join(sorted(STAGES))}")
    return importlib.import_module(STAGES[name])
