"""Thin training recipes: each says what a batch is and what its loss is."""

STAGES = {
    "sft": "posttrain.stages.sft",
    "cpt": "posttrain.stages.cpt",
}


def get(name: str):
    import importlib

    if name not in STAGES:
        raise KeyError(f"unknown stage '{name}'; known: {', '.join(sorted(STAGES))}")
    return importlib.import_module(STAGES[name])
