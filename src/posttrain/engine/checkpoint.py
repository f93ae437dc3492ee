"""Resumable checkpoints, written atomically.

A checkpoint is a directory `checkpoints/step-N/` holding the trainable weights
(safetensors), optimizer and scheduler state, RNG state and the data position.
It is first written to a hidden temporary directory and then renamed, so a run
killed mid-write never leaves a checkpoint that looks complete.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

WEIGHTS = "trainable.safetensors"
STATE = "trainer_state.json"


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # named_parameters() lists tied weights once, so safetensors sees no shared storage
    return {n: p.detach().to("cpu").contiguous().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    expected = {n for n, p in params.items() if p.requires_grad}
    missing, extra = expected - state.keys(), state.keys() - expected
    if missing or extra:
        raise RuntimeError(
            f"checkpoint does not match the model: missing {sorted(missing)[:3]}, unexpected {sorted(extra)[:3]}"
        )
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t.to(params[n].device, params[n].dtype))


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


def _atomic_dir(final: Path) -> Path:
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def _commit(tmp: Path, final: Path) -> None:
    for f in tmp.iterdir():  # make the bytes durable before the rename publishes them
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        old = final.parent / f".old-{final.name}-{os.getpid()}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)


def save_checkpoint(ckpt_root: Path, name: str, *, model, optimizer=None, scheduler=None,
                    trainer_state: dict, keep_last: Optional[int] = None) -> Path:
    final = ckpt_root / name
    tmp = _atomic_dir(final)
    save_file(trainable_state(model), str(tmp / WEIGHTS), metadata={"format": "pt"})
    if optimizer is not None:
        torch.save({"optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict() if scheduler is not None else None,
                    "rng": rng_state()}, tmp / "optimizer.pt")
    (tmp / STATE).write_text(json.dumps(trainer_state, indent=1))
    _commit(tmp, final)
    if keep_last is not None:
        prune(ckpt_root, keep_last)
    return final


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    if not ckpt_root.is_dir():
        return []
    found = []
    for d in ckpt_root.iterdir():
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


def load_checkpoint(path: Path, *, model, optimizer=None, scheduler=None) -> dict:
    load_trainable_state(model, load_file(str(path / WEIGHTS)))
    opt_file = path / "optimizer.pt"
    if optimizer is not None and opt_file.exists():
        # our own file, but still loaded without unpickling arbitrary objects
        blob = torch.load(opt_file, map_location="cpu", weights_only=True)
        optimizer.load_state_dict(blob["optimizer"])
        if scheduler is not None and blob.get("scheduler") is not None:
            scheduler.load_state_dict(blob["scheduler"])
        set_rng_state(blob["rng"])
    return json.loads((path / STATE).read_text())
