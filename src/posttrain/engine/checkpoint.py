"""Resumable checkpoints with `torch.distributed.checkpoint`, written atomically.

A checkpoint is a directory `checkpoints/step-N/` holding:

- `weights/` and `optim/`: the trainable weights and the optimizer state, saved by
  `torch.distributed.checkpoint` (DCP). Every rank writes its own shards, and DCP reshards
  on load, so a run saved on 2 ranks resumes on 1 (or 4).
- `extra-rank*.pt`: the LR scheduler state, each rank's RNG state and, for RL stages, the stage's
  sampling state and the optimizer steps still pending from the current rollout (tensors, numbers
  and strings only: it is read with `torch.load(weights_only=True)`).
- `trainer_state.json`: step, data position (in samples, so it survives a change of world
  size), best evaluation, and the like.

It is written into a hidden temporary directory and renamed by rank 0 after every rank has
finished, so a run killed mid-write never leaves a checkpoint that looks complete; a write that
fails (a full disk) removes its temporary directory and raises `CheckpointError`.

Loading never runs code from the checkpoint unless `trust=True` (`--trust-checkpoint`): DCP's
pickles go through allow-lists (`posttrain.engine.safe_dcp`) and `extra-rank*.pt` through
`torch.load(weights_only=True)`. docs/security.md ("Checkpoints") says what that guarantees.
"""

from __future__ import annotations

import json
import pickle
import random
import shutil
from pathlib import Path
from typing import Optional

import torch

from posttrain.engine.dist import barrier, is_main, rank, world_size

STATE = "trainer_state.json"
TRUST_HINT = "pass --trust-checkpoint (trust=True) only if you trust whoever wrote it"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read; the message names the file and what to do."""


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
                    trainer_state: dict, keep_last: Optional[int] = None, stage_state: Optional[dict] = None) -> Path:
    """Collective: every rank calls it. Returns the final directory.

    A failed write (disk full, permissions) removes the temporary directory, leaves the previous
    checkpoints as they were, and raises `CheckpointError`.
    """
    final = Path(ckpt_root) / name
    tmp = _tmp_for(final)
    try:
        _write(tmp, model, optimizer, scheduler, trainer_state, stage_state)
    except (OSError, RuntimeError, _dcp()[0].CheckpointException) as e:
        # torch.save reports a full disk as a RuntimeError of its zip writer: ask the disk itself
        full = shutil.disk_usage(ckpt_root).free < _FULL
        if is_main():
            shutil.rmtree(tmp, ignore_errors=True)
        prev = latest_checkpoint(Path(ckpt_root))
        kept = f"the previous checkpoint {prev} is intact" if prev else "no earlier checkpoint exists"
        why = "the disk is full; free some space, then resume with --resume" if full else _reason(e)
        raise CheckpointError(f"could not write checkpoint {final}: {why}; nothing was published and {kept}") from e
    barrier()
    if is_main():
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


def _write(tmp: Path, model, optimizer, scheduler, trainer_state: dict, stage_state: Optional[dict] = None) -> None:
    if is_main():
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    barrier()
    dcp, sd = _dcp()
    dcp.save(sd.get_model_state_dict(model, options=_opts()), checkpoint_id=str(tmp / "weights"))
    if optimizer is not None:
        dcp.save(sd.get_optimizer_state_dict(model, optimizer, options=_opts()), checkpoint_id=str(tmp / "optim"))
    extra = {"rng": rng_state(), "scheduler": scheduler.state_dict() if scheduler is not None else None,
             "stage": stage_state}
    torch.save(extra, tmp / f"extra-rank{rank()}.pt")
    barrier()
    if is_main():
        # written last: a directory without it is never taken for a checkpoint (list_checkpoints)
        (tmp / STATE).write_text(json.dumps({**trainer_state, "world_size": world_size()}, indent=1))


_FULL = 1 << 20  # bytes free below which a failed write is put down to a full disk


def _reason(e: BaseException) -> str:
    """The underlying error in words; DCP wraps each rank's exception in a CheckpointException."""
    failures = getattr(e, "failures", None)
    if failures:
        e = next(iter(failures.values()))[0]
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror}" + (f": {e.filename}" if e.filename else "")
    return f"{type(e).__name__}: {e}"


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


def _check_metadata(d: Path, trust: bool) -> None:
    """Refuse a DCP directory whose `.metadata` is missing, damaged or would run code (unless trusted)."""
    from posttrain.engine import safe_dcp  # deferred with DCP itself (see _dcp)

    f = d / ".metadata"
    if not f.is_file():
        raise CheckpointError(f"{f} not found: {d.parent} is not a complete posttrain checkpoint")
    if trust:
        return
    try:
        safe_dcp.read_metadata_file(f)
    except safe_dcp.UnsafeCheckpoint as e:
        raise CheckpointError(f"{f}: refused to load: {e}, and unpickling it could run code. Nothing was loaded; "
                              f"{TRUST_HINT}") from None
    except (pickle.UnpicklingError, EOFError, TypeError, ValueError, AttributeError, IndexError) as e:
        raise CheckpointError(f"{f}: damaged or not a checkpoint's metadata ({type(e).__name__}: {e})") from None


def _dcp_load(state: dict, d: Path, trust: bool) -> None:
    """`dcp.load` of the directory `d` into `state`; through the allow-lists unless `trust`."""
    _check_metadata(d, trust)
    dcp, _ = _dcp()
    try:
        if trust:
            dcp.load(state, checkpoint_id=str(d))
        else:
            from posttrain.engine.safe_dcp import SafePlanner, SafeReader  # deferred with DCP itself

            dcp.load(state, storage_reader=SafeReader(str(d)), planner=SafePlanner())
    except dcp.CheckpointException as e:
        cause = next(iter(e.failures.values()))[0] if e.failures else e
        if isinstance(cause, pickle.UnpicklingError) and "Weights only load failed" in str(cause):
            raise CheckpointError(f"{d}: refused to load: a stored value would need code to be unpickled. "
                                  f"Nothing was run; {TRUST_HINT}") from None
        raise CheckpointError(f"{d}: cannot read the checkpoint ({_reason(cause)})") from None


def load_weights(path: Path, model, *, trust: bool = False) -> None:
    """Load a checkpoint's trainable weights into `model` (any world size).

    `trust=True` lets DCP unpickle the files without allow-lists (they can then run code).
    """
    dcp, sdu = _dcp()
    sd = sdu.get_model_state_dict(model, options=_opts())
    _dcp_load(sd, Path(path) / "weights", trust)  # errors if a trainable weight is missing
    # non-strict only so the frozen base weights (absent by design) are not reported missing
    sdu.set_model_state_dict(model, sd, options=_opts(strict=False))


def read_trainer_state(path: Path) -> dict:
    f = Path(path) / STATE
    try:
        state = json.loads(f.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{f} not found: {path} is not a posttrain checkpoint") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{f}: damaged ({e}); resume from an earlier checkpoint by moving this one away") \
            from None
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"{f}: not a posttrain trainer state (no 'step')")
    return state


def _load_extra(path: Path) -> dict:
    own = path / f"extra-rank{rank()}.pt"
    f = own if own.exists() else path / "extra-rank0.pt"
    try:
        return torch.load(f, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{f} not found: the checkpoint has no scheduler and RNG state") from None
    except pickle.UnpicklingError as e:
        if "Weights only load failed" in str(e):
            # always weights-only, trusted or not: posttrain writes only tensors, numbers and tuples here
            raise CheckpointError(f"{f}: refused to load: it holds values that need code to be unpickled, "
                                  "which posttrain never writes there. Nothing was run") from None
        raise CheckpointError(f"{f}: damaged ({e})") from None
    except (RuntimeError, EOFError) as e:
        raise CheckpointError(f"{f}: damaged ({type(e).__name__}: {str(e).splitlines()[0]})") from None


def load_checkpoint(path: Path, *, model, optimizer=None, scheduler=None, trust: bool = False) -> dict:
    """Collective. Restores weights, and optimizer/scheduler/RNG when given; returns the trainer state.

    Nothing in the checkpoint can run code unless `trust=True` (see the module docstring).
    """
    path = Path(path)
    state = read_trainer_state(path)
    load_weights(path, model, trust=trust)
    if optimizer is not None and (path / "optim").exists():
        dcp, sdu = _dcp()
        osd = sdu.get_optimizer_state_dict(model, optimizer, options=_opts())
        _dcp_load(osd, path / "optim", trust)
        sdu.set_optimizer_state_dict(model, optimizer, osd, options=_opts())
        same_world = state.get("world_size", 1) == world_size()
        extra = _load_extra(path)
        if scheduler is not None and extra.get("scheduler") is not None:
            scheduler.load_state_dict(extra["scheduler"])
        if same_world:
            # with a different number of ranks the RNG streams cannot be matched one to one
            set_rng_state(extra["rng"])
            state["stage_state"] = extra.get("stage")
    return state
