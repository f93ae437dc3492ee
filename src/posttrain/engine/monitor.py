"""Metrics sinks: metrics.jsonl (always), a progress bar, TensorBoard / W&B when installed.

Only rank 0 writes. On resume, metrics logged after the checkpoint's step are dropped,
so curves never show a step twice.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Optional

from posttrain.engine.dist import is_main


class Monitor:
    def __init__(self, output_dir: Path, *, total_steps: int, progress: bool = True,
                 report_to: tuple = (), resume_step: Optional[int] = None, run_name: str = "run"):
        self.path = Path(output_dir) / "metrics.jsonl"
        self.main = is_main()
        self.bar = None
        self.tb = None
        self.wandb = None
        if not self.main:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            self._truncate_after(resume_step)
        elif self.path.exists():
            self.path.unlink()
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=resume_step or 0, desc=run_name, unit="step",
                            dynamic_ncols=True, file=sys.stderr, mininterval=0.5)
        if "tensorboard" in report_to:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(output_dir) / "tensorboard"))
            except ImportError:
                print("posttrain: tensorboard is not installed; skipping it", file=sys.stderr)
        if "wandb" in report_to:
            try:
                import wandb

                self.wandb = wandb.init(project="posttrain", name=run_name, dir=str(output_dir))
            except ImportError:
                print("posttrain: wandb is not installed; skipping it", file=sys.stderr)

    def _truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by the kill
            if rec.get("step", 0) <= step:
                keep.append(line)
        self.path.write_text("".join(l + "\n" for l in keep))

    def log(self, step: int, split: str, metrics: dict) -> None:
        if not self.main:
            return
        rec = {"step": step, "split": split, "time": round(time.time(), 3)}
        for k, v in metrics.items():
            if isinstance(v, float) and not math.isfinite(v):
                v = str(v)
            rec[k] = v
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                if self.tb is not None:
                    self.tb.add_scalar(f"{split}/{k}", v, step)
        if self.wandb is not None:
            self.wandb.log({f"{split}/{k}": v for k, v in metrics.items()}, step=step)

    def progress(self, n: int = 1, **postfix) -> None:
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in postfix.items()},
                                     refresh=False)

    def write(self, msg: str) -> None:
        if not self.main:
            return
        if self.bar is not None:
            self.bar.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
