"""lm-evaluation-harness adapter: evaluate posttrain models and adapters with `lm_eval`.

    python -m posttrain.eval.harness install          # once per environment: the import hook
    lm_eval --model posttrain --model_args model=runs/sft,adapter=runs/sft/adapter --tasks hellaswag

`PosttrainLM` implements the three request types with posttrain's own scoring code
(posttrain.eval.lm), so `lm_eval` numbers and `posttrain eval` numbers come from the same
functions. lm-eval (0.4.x) finds models only through its registry, which has no plugin entry
points; `install` writes a `.pth` file into site-packages that adds a tiny import hook
(`posttrain.eval.lm_eval_hook`) registering the name `posttrain` lazily right after lm-eval has
registered its own models, so `--model hf` and every other built-in model keep working. Without
the hook, `python -m posttrain.eval.harness run <lm_eval args>` registers the model and runs
lm-eval's own CLI.

The other direction: `run_lm_eval_task` runs an lm-eval task on an in-memory model through lm-eval's
own `simple_evaluate`, for the `lm_eval:TASK[@N],...` suites (eval.suites.LmEvalTask) that
`posttrain eval` and the forgetting guard run.
"""

from __future__ import annotations

import difflib
import json
import sys
from pathlib import Path

import lm_eval
import lm_eval.models  # noqa: F401  -- lm-eval's built-in models first; see lm_eval_hook for why
from lm_eval.api.model import LM
from lm_eval.tasks import TaskManager

from posttrain.eval import lm as L, lm_eval_hook, stats
from posttrain.eval.tasks import TaskError
from posttrain.models.loading import load
from posttrain.eval.lm_eval_hook import write_pth


class PosttrainLM(LM):
    """`model_args`: model=DIR (required), adapter=DIR, dtype=fp32|bf16|fp16, device=auto|cpu|cuda,
    batch_size=N, trust_remote_code=false. From Python, `model` may also be an in-memory model with
    its `tokenizer` (used as it is: no loading, its train/eval mode left to the caller)."""

    def __init__(self, model=None, adapter: str | None = None, dtype: str = "fp32",
                 device: str | None = None, batch_size: int | str | None = 16, trust_remote_code=False,
                 max_length: int | None = None, tokenizer=None, **_ignored):
        super().__init__()
        if tokenizer is not None and not isinstance(model, (str, Path)):
            self.model, self.tokenizer = model, tokenizer
            self.batch_size, self._max_length = int(batch_size), None
            self._name = type(model).__name__
            return
        if not model:
            raise ValueError("lm_eval --model posttrain needs --model_args model=DIR[,adapter=DIR]")

        trust = str(trust_remote_code).lower() in ("1", "true", "yes")
        import torch

        if device is None or (str(device).startswith("cuda") and not torch.cuda.is_available()):
            device = "auto"  # lm_eval passes its own default ("cuda") even on machines without one
        self.model, self.tokenizer = load(model, adapter=adapter, dtype=dtype, device=device,
                                          trust_remote_code=trust)
        self.model.eval()
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 16  # "auto" -> a fixed default
        self._max_length = int(max_length) if max_length else None
        self._name = str(model) + (f"+{adapter}" if adapter else "")

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return L.loglikelihood(self.model, self.tokenizer, [r.args[:2] for r in requests], batch_size=self.batch_size)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        scored = L.loglikelihood_rolling(self.model, self.tokenizer, [r.args[0] for r in requests],
                                         batch_size=self.batch_size)
        return [ll for ll, _ in scored]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        # requests with the same generation settings are batched together; order is restored after
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            kw = dict(r.args[1]) if len(r.args) > 1 and r.args[1] else {}
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            if kw.get("do_sample") and float(kw.get("temperature", 1.0) or 0.0) > 0:
                raise ValueError("PosttrainLM decodes greedily; drop do_sample/temperature from gen_kwargs")
            groups.setdefault((int(kw.get("max_gen_toks", 256)), tuple(until)), []).append(i)
        out: list[str] = [""] * len(requests)
        for (max_new, until), idx in groups.items():
            texts = L.generate(self.model, self.tokenizer, [requests[i].args[0] for i in idx],
                               max_new_tokens=max_new, stop=until, batch_size=self.batch_size)
            for i, t in zip(idx, texts):
                out[i] = t
        return out

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    @property
    def tokenizer_name(self) -> str:
        return self._name.replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.tokenizer.chat_template if chat_template else None


_TASK_MANAGERS: dict = {}


def _task_manager(include_path) -> TaskManager:
    """One TaskManager per include path and process: indexing lm-eval's ~15,000 built-in task files
    took 36 s on our shared 2-core machine, so a local task's folder is indexed alone."""
    if include_path not in _TASK_MANAGERS:
        _TASK_MANAGERS[include_path] = (TaskManager(include_path=include_path, include_defaults=False)
                                        if include_path else TaskManager())
    return _TASK_MANAGERS[include_path]


def run_lm_eval_task(task, model, tokenizer, *, batch_size: int = 32) -> dict:
    """One lm-eval task (`eval.suites.LmEvalTask`) on an in-memory model, through lm-eval's own
    `simple_evaluate`; the result in `kinds.run_task`'s shape.

    metrics: every metric lm-eval reports, under its own name without the default filter's ",none"
        (`acc`, `acc_norm`; `exact_match,strict-match` for another filter), with lm-eval's value and
        standard error (bootstrapped with 1,000 resamples where lm-eval bootstraps, instead of its
        100,000: a guard check must stay cheap; the values are the same).
    items: per-document values (lm-eval's logged samples), for paired base-vs-tuned deltas.
    primary: `acc_norm` when reported, else the task's first metric. in_score: whether lm-eval says
        higher is better for it (a perplexity is not averaged into the suite score).
    Global random seeds are left alone (None): a guard check in the middle of training must not
    reseed it; lm-eval's few-shot sampler keeps its own seed (1234, its default).
    """
    name = task.lm_eval_task
    tm = _task_manager(task.include_path)
    if name not in tm.all_tasks:
        near = difflib.get_close_matches(name, tm.all_tasks, n=1)
        hint = f" (did you mean '{near[0]}'?)" if near else ""
        where = f" in {task.include_path}" if task.include_path else ""
        raise TaskError(f"lm-eval has no task {name!r}{where}{hint}")
    out = lm_eval.simple_evaluate(model=PosttrainLM(model, tokenizer=tokenizer, batch_size=batch_size), tasks=[name],
                                  limit=task.limit, task_manager=tm, log_samples=True, bootstrap_iters=1000,
                                  random_seed=None, numpy_random_seed=None, torch_random_seed=None,
                                  verbosity="ERROR")
    if name not in out["samples"]:
        raise TaskError(f"lm-eval's {name!r} is a group or tag of tasks; list the tasks themselves: "
                        f"lm_eval:{','.join(sorted(out['samples']))}")
    res, docs = out["results"][name], out["samples"][name]
    higher = out.get("higher_is_better", {}).get(name, {})
    n = int(out["n-samples"][name]["effective"])
    metrics, items = {}, {}
    for key, value in res.items():
        metric, _, filt = key.partition(",")
        if not filt or metric.endswith("_stderr") or not isinstance(value, (int, float)):
            continue
        label = metric if filt == "none" else key
        per_doc = [d[metric] for d in sorted(docs, key=lambda d: d["doc_id"]) if d.get("filter") == filt]
        if per_doc and all(isinstance(v, (int, float)) for v in per_doc):
            items[label] = [float(v) for v in per_doc]
        se = res.get(f"{metric}_stderr,{filt}")
        if not isinstance(se, (int, float)):  # "N/A": lm-eval computed none
            se = stats.metric(items[label])["stderr"] if label in items else 0.0
        metrics[label] = {"value": float(value), "stderr": float(se), "n": n}
    if not metrics:
        raise TaskError(f"lm-eval task {name!r} reported no metric")
    primary = "acc_norm" if "acc_norm" in metrics else next(iter(metrics))
    first = min(docs, key=lambda d: d["doc_id"])["filter"] if docs else "none"
    samples = [{"origin": f"{name} doc {d['doc_id']}", "output": json.dumps(d["filtered_resps"], default=str)}
               for d in sorted(docs, key=lambda d: d["doc_id"]) if d.get("filter") == first]
    return {"kind": "lm_eval", "n": n, "primary": primary, "in_score": bool(higher.get(primary.split(",")[0], True)),
            "metrics": metrics, "items": items, "samples": samples,
            "settings": {"kind": "lm_eval", "task": name, "limit": task.limit, "include_path": task.include_path,
                         "num_fewshot": out.get("n-shot", {}).get(name), "lm_eval": lm_eval.__version__}}


# Registered by its import path, as the hook does, never as a class object: run as
# `python -m posttrain.eval.harness` this module is `__main__`, and lm-eval's registry refuses a
# second, different object under the same name.
lm_eval_hook.register()


def main(argv: list[str]) -> int:
    if argv[:1] == ["install"]:

        print(f"wrote {write_pth(argv[1] if len(argv) > 1 else None)}")
        return 0
    if argv[:1] == ["run"]:
        from lm_eval.__main__ import cli_evaluate

        sys.argv = ["lm_eval", *argv[1:]]
        cli_evaluate()
        return 0
    print("usage: python -m posttrain.eval.harness install [SITE_DIR] | run <lm_eval arguments>", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
