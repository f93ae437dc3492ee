"""Turn a (possibly sharded) training checkpoint into a plain HF model or a PEFT adapter.

    posttrain export runs/a/checkpoints/step-400 --out exported/

Works in one process whatever number of ranks wrote the checkpoint: DCP reshards on load.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from posttrain.config import RunConfig
from posttrain.engine.checkpoint import STATE, load_weights
from posttrain.engine.run import _atomic_dir, _commit
from posttrain.models import adapters
from posttrain.engine.setup import load_for_training


def export_checkpoint(ckpt_dir, out_dir, *, trust_checkpoint: bool = False) -> Path:
    ckpt = Path(ckpt_dir)
    if not (ckpt / STATE).exists() or not (ckpt / "weights").is_dir():
        raise FileNotFoundError(f"{ckpt} is not a posttrain checkpoint (no {STATE} or weights/)")
    run_cfg = ckpt.parent.parent / "config.yaml"
    if not run_cfg.exists():
        raise FileNotFoundError(f"{run_cfg} not found: the checkpoint's run config is needed to rebuild the model")
    tree = yaml.safe_load(run_cfg.read_text())
    # the sections every stage shares say how to rebuild the model; a stage's own section does not matter here
    common = {k: v for k, v in tree.items() if k in RunConfig.model_fields and k != "stage"}
    common["train"] = {**common.get("train", {}), "device": "cpu", "gradient_checkpointing": False}
    cfg = RunConfig.model_validate(common)
    model, tok = load_for_training(cfg, "cpu")
    load_weights(ckpt, model, trust=trust_checkpoint)  # no code from the checkpoint runs unless trusted
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _atomic_dir(out)
    if cfg.adapter.type != "none":
        adapters.save(model, tmp)
    else:
        model.save_pretrained(str(tmp), safe_serialization=True)
    tok.save_pretrained(str(tmp))
    _commit(tmp, out)
    return out
