"""Fixtures for the eval tests: one tiny random model loaded once, and a helper to write task files."""

import json
from pathlib import Path

import pytest
import yaml


@pytest.fixture(scope="session")
def tiny(tiny_models):
    """(model_dir, model, tokenizer) of a tiny random qwen2 checkpoint."""
    from posttrain.models.loading import load

    d = tiny_models("qwen2")
    model, tok = load(d, device="cpu")
    return d, model, tok


@pytest.fixture(scope="session")
def other_tiny(tmp_path_factory, tokenizer):
    """A second tiny checkpoint with other random weights (a 'tuned' model that differs from the base)."""
    from posttrain.models.tiny import build_tiny_model

    return build_tiny_model("qwen2", tmp_path_factory.mktemp("tiny-other"), tokenizer=tokenizer, seed=1)


def write_task(dir_: Path, name: str, spec: dict, rows: list[dict]) -> Path:
    """A task YAML + JSONL pair in `dir_`; returns the YAML path."""
    dir_.mkdir(parents=True, exist_ok=True)
    (dir_ / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = dir_ / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "data": f"{name}.jsonl", **spec}))
    return path
