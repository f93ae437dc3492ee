"""Resumable checkpoints with `torch.distributed.checkpoint`, written atomically.

A checkpoint is a directory `checkpoints/step-N/` holding:

- `weights/` and `optim/`: the trainable weights and the optimizer state, saved by
  `torch.distributed.checkpoint` (DCP). Every rank writes its own shards, and DCP reshards
  on load, so a run saved on 2 ranks resumes on 1 (or 4).
- `extra.pt`: the LR scheduler state and each rank's RNG state.
- `trainer_state.json`: step, data position (in samples, so it survives a change of world
  size), best evaluation, and the like.

It is written into a hidden temporary directory and renamed by rank 0 after every rank has
finished, so a run killed mid-write never leaves a checkpoint that looks complete.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Optional

import torch

from posttrain.engine.dist import barrier, is_main, rank, world_size

STATE = "trainer_state.json"


def _dcp():
    """`torch.distributed.checkpoint` and its state-dict helpers, imported on first use.

    Importing DCP pulls in DTensor, torch.fx and sympy: ~50 MB of RSS and ~1 s in every training
    process, most of which never write a checkpoint (measured with bench/sft_throughput.py).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import state_dict as sd

    return dcp, sd


def _opts(**kw):
    # frozen base weights (LoRA, QLoRA) are never saved: they come from the base model
    return _dcp()[1].StateDictOptions(ignore_frozen_params=True, **kw)


def rng_state() -> dict:
    s = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def _tmp_for(final: Path) -> Path:
    # the same name on every rank: all ranks write shards into one directory
    return final.parent / f".tmp-{final.name}"


def save_checkpoint(ckpt_root: Path, name: str, *, model, optimizer=None, scheduler=None,
                    trainer_state: dict, keep_last: Optional[int] = None) -> Path:
    """Collective: every rank calls it. Returns the final directory."""
    final = Path(ckpt_root) / name
    tmp = _tmp_for(final)
    if is_main():
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    barrier()
    dcp, sd = _dcp()
    dcp.save(sd.get_model_state_dict(model, options=_opts()), checkpoint_id=str(tmp / "weights"))
    if optimizer is not None:
        dcp.save(sd.get_optimizer_state_dict(model, optimizer, options=_opts()), checkpoint_id=str(tmp / "optim"))
    extra = {"rng": rng_state(), "scheduler": scheduler.state_dict() if scheduler is not None else None}
    torch.save(extra, tmp / f"extra-rank{rank()}.pt")
    barrier()
    if is_main():
        (tmp / STATE).write_text(json.dumps({**trainer_state, "world_size": world_size()}, indent=1))
        if final.exists():
            old = final.parent / f".old-{final.name}"
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old)
        else:
            tmp.rename(final)
        if keep_last is not None:
            prune(Path(ckpt_root), keep_last)
    barrier()
    return final


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    if not Path(ckpt_root).is_dir():
        return []
    found = []
    for d in Path(ckpt_root).iterdir():
        if d.is_dir() and d.name.startswith("step-") and (d / STATE).exists():
            try:
                found.append((int(d.name[5:]), d))
            except ValueError:
                continue
    return [d for _, d in sorted(found)]


def latest_checkpoint(ckpt_root: Path) -> Optional[Path]:
    cks = list_checkpoints(ckpt_root)
    return cks[-1] if cks else None


def prune(ckpt_root: Path, keep_last: int) -> None:
    for d in list_checkpoints(ckpt_root)[:-keep_last]:
        shutil.rmtree(d, ignore_errors=True)


def load_weights(path: Path, model) -> None:
    """Load a checkpoint's trainable weights into `model` (any world size)."""
    dcp, sdu = _dcp()
    sd = sdu.get_model_state_dict(model, options=_opts())
    dcp.load(sd, checkpoint_id=str(Path(path) / "weights"))  # errors if a trainable weight is missing
    # non-strict only so the frozen base weights (absent by design) are not reported missing
    sdu.set_model_state_dict(model, sd, options=_opts(strict=False))


def load_checkpoint(path: Path, *, model, optimizer=None, scheduler=None) -> dict:
    """Collective. Restores weights, and optimizer/scheduler/RNG when given; returns the trainer state."""
    path = Path(path)
    state = json.loads((path / STATE).read_text())
    load_weights(path, model)
    if optimizer is not None and (path / "optim").exists():
        dcp, sdu = _dcp()
        osd = sdu.get_optimizer_state_dict(model, optimizer, options=_opts())
        dcp.load(osd, checkpoint_id=str(path / "optim"))
        sdu.set_optimizer_state_dict(model, optimizer, osd, options=_opts())
        own = path / f"extra-rank{rank()}.pt"
        same_world = state.get("world_size", 1) == world_size()
        extra = torch.load(own if own.exists() else path / "extra-rank0.pt", map_location="cpu", weights_only=True)
        if scheduler is not None and extra.get("scheduler") is not None:
            scheduler.load_state_dict(extra["scheduler"])
        if same_world:
            # with a different number of ranks the RNG streams cannot be matched one to one
            set_rng_state(extra["rng"])
    return state
