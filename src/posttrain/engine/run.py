"""A run directory's life cycle: claim it, write the resolved config, publish the final model, sign it off.

`manifest.json` is written last. Until it says `"status": "completed"` the directory is
not a finished run, and `posttrain.load` refuses it. The final model is written to a
temporary directory and renamed into place, so a kill never leaves a half-written model
under the final name.
"""

from __future__ import annotations

import hashlib
import json
import platform
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import torch
import yaml

from posttrain._version import __version__
from posttrain.config import RunConfig, dump_config
from posttrain.engine.dist import barrier, full_state_dict, is_main, unwrap
from posttrain.models import adapters

MANIFEST = "manifest.json"


class RunDirError(RuntimeError):
    """An output directory posttrain may not use; the message says what is there and what to do."""


def read_manifest(out: Path) -> Optional[dict]:
    """The run's manifest; None when there is none, `{"status": "corrupt"}` when it cannot be read."""
    p = Path(out) / MANIFEST
    if not p.is_file():
        return None
    try:
        m = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {"status": "corrupt"}
    return m if isinstance(m, dict) and isinstance(m.get("status"), str) else {"status": "corrupt"}


def _is_our_config(out: Path) -> bool:
    """config.yaml as `claim` writes it: a resolved config naming its stage and output_dir."""
    try:
        tree = yaml.safe_load((out / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    return isinstance(tree, dict) and isinstance(tree.get("stage"), str) and "output_dir" in tree \
        and isinstance(tree.get("train"), dict)


def _listing(out: Path, names: list[str]) -> str:
    shown = [n + "/" if (out / n).is_dir() else n for n in sorted(names)[:5]]
    more = f" and {len(names) - 5} more" if len(names) > 5 else ""
    return ", ".join(shown) + more


def claim(cfg: RunConfig, resume: bool) -> Path:
    """Check that `output_dir` may be used, without ever clobbering finished work or files we did not write.

    A directory is used only when it is new, empty, or provably one of our runs (its manifest, or
    its config.yaml as written here) that has not completed.
    """
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise RunDirError(f"output_dir {out} is a file, not a directory; choose another output_dir "
                          "(nothing was changed)")
    m = read_manifest(out)
    if m is not None and m["status"] == "corrupt":
        raise RunDirError(f"{out / MANIFEST} is empty or corrupt, so posttrain cannot tell whether this run completed; "
                          "nothing was changed. If the run did not finish, delete that file and pass --resume; "
                          "otherwise choose another output_dir")
    if m and m.get("status") == "completed":
        raise RunDirError(f"{out} already holds a completed run; choose another output_dir (nothing was changed)")
    foreign = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if foreign and m is None and not _is_our_config(out):
        raise RunDirError(f"output_dir {out} is not empty and is not a posttrain run (no manifest.json or config.yaml "
                          f"written by posttrain); it holds {_listing(out, foreign)}. posttrain never writes over "
                          "files it did not create: choose a new output_dir, or move those files away "
                          "(nothing was changed)")
    has_ckpt = (out / "checkpoints").is_dir() and any((out / "checkpoints").iterdir())
    if has_ckpt and not resume:
        raise RunDirError(f"{out} holds checkpoints of an unfinished run; pass --resume to continue it, "
                          "or choose another output_dir (nothing was changed)")
    barrier()  # every rank has read the directory before rank 0 writes into it (a half-written config.yaml
    # read by a late rank looked foreign, and that rank stopped: seen once under torchrun on a loaded machine)
    if is_main():
        try:
            out.mkdir(parents=True, exist_ok=True)
            if m is not None:
                (out / MANIFEST).unlink()  # a failed run being resumed is not complete either
            (out / "config.yaml").write_text(dump_config(cfg))
        except OSError as e:
            raise RunDirError(f"cannot write to output_dir {out}: {e.strerror} ({e.filename}); choose a writable "
                              "output_dir") from None
    barrier()
    return out


def publish_model(model, tokenizer, out: Path, *, adapter: bool, sharded: bool = False) -> str:
    """Write the final model (HF format) or adapter (PEFT format) atomically; returns its folder name.

    Collective when `sharded` (FSDP): every rank helps gather the full weights, rank 0 writes.
    """
    name = "adapter" if adapter else "model"
    full = full_state_dict(model) if sharded else None
    if not is_main():
        barrier()
        return name
    model = unwrap(model)
    final = out / name
    tmp = _atomic_dir(final)
    if adapter:

        if full is not None:
            # FSDP holds DTensor shards: give the adapter writer the gathered weights
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if p.requires_grad and n in full:
                        p.data = full[n].to(p.device)  # noqa: this model is only saved after this point
        adapters.save(model, tmp)
    else:
        model.save_pretrained(str(tmp), safe_serialization=True, state_dict=full)
    tokenizer.save_pretrained(str(tmp))
    _commit(tmp, final, replace=True)  # inside a claimed run: an existing model/ is this run's own
    barrier()
    return name


def _atomic_dir(final: Path) -> Path:
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def _commit(tmp: Path, final: Path, *, replace: bool = False) -> None:
    """Publish `tmp` as `final` with a rename, after making its bytes durable.

    An existing `final` is replaced only with `replace=True` (a folder of a run we claimed); otherwise
    it may be someone else's, so `tmp` is removed and a `RunDirError` raised.
    """
    if final.exists() and not replace:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RunDirError(f"{final} already exists; posttrain does not replace what it did not write: choose "
                          "another output path, or move it away (nothing was changed)")
    for f in tmp.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    if final.exists():
        old = final.parent / f".old-{final.name}-{os.getpid()}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)


def file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def git_commit(cwd: Optional[Path] = None) -> Optional[str]:
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5)
        return r.stdout.strip() or None if r.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict:
    import torch
    import transformers

    v = {"posttrain": __version__, "torch": torch.__version__,
         "transformers": transformers.__version__, "python": platform.python_version()}
    for pkg in ("peft", "safetensors", "torchao"):
        try:
            v[pkg] = __import__(pkg).__version__
        except Exception:  # optional packages
            pass
    return v


def config_hash(cfg: RunConfig) -> str:
    return hashlib.sha256(dump_config(cfg).encode()).hexdigest()[:16]


def write_manifest(out: Path, *, status: str, cfg: RunConfig, data_hashes: dict, result: dict,
                   model_dir: Optional[str] = None, error: Optional[str] = None, started: float,
                   manifest: Optional[dict] = None) -> None:
    """Sign the run off (atomically). `manifest`: one `build_manifest` made earlier (for the report)."""
    if not is_main():
        return
    m = manifest or build_manifest(status=status, cfg=cfg, data_hashes=data_hashes, result=result,
                                   model_dir=model_dir, error=error, started=started)
    _write_manifest_file(Path(out), m, status)


def build_manifest(*, status: str, cfg: RunConfig, data_hashes: dict, result: dict, model_dir: Optional[str] = None,
                   error: Optional[str] = None, started: float) -> dict:
    """The manifest's content: status, stage, model, config hash, data hashes, versions, times, result."""
    m = {
        "status": status,
        "stage": cfg.stage,
        "model_dir": model_dir,
        "base_model": cfg.model,
        "adapter_type": cfg.adapter.type,
        "config_hash": config_hash(cfg),
        "data": data_hashes,
        "versions": versions(),
        "git_commit": git_commit(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "result": result,
    }
    if error:
        m["error"] = error
    return m


def _write_manifest_file(out: Path, m: dict, status: str) -> None:
    tmp = Path(out) / f".{MANIFEST}.tmp"
    try:
        tmp.write_text(json.dumps(m, indent=1, default=str))
        tmp.rename(Path(out) / MANIFEST)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if status == "failed":
            # the caller is already raising the run's own error; this one must not replace it
            print(f"posttrain: could not write {Path(out) / MANIFEST} ({e.strerror})", file=sys.stderr)
            return
        raise RunDirError(f"could not write {Path(out) / MANIFEST}: {e.strerror}; the run is not signed off") from None
