"""`posttrain eval`: evaluate a model (and optionally its baseline) on a suite.

    posttrain eval --model runs/sft --suite regression --baseline base/ --fail-on-regression

Exit codes: 0 done (and, with --fail-on-regression, no regression); 1 a regression beyond
--max-drop (and, with --significance ALPHA, significant at that level) with --fail-on-regression;
2 bad arguments or a task/model that cannot be loaded.
"""

from __future__ import annotations

import argparse
import sys

from posttrain.eval.compare import DEFAULT_MAX_DROP
from posttrain.eval.runner import evaluate
from posttrain.eval.tasks import TaskError
from posttrain.models.loading import ModelLoadError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="posttrain eval", description="Evaluate a model on a suite of tasks "
                                "(built-in: gym, regression; or a suite/task YAML), optionally against a baseline.")
    p.add_argument("--model", required=True, help="model directory, or a finished posttrain run directory")
    p.add_argument("--adapter", help="adapter directory (PEFT format) to apply to --model")
    p.add_argument("--suite", default="regression",
                   help="built-in suite name, suite YAML, task YAML, or lm-evaluation-harness tasks: "
                   "lm_eval:TASK[@N][,TASK[@N]...] (a task name or a local lm-eval task YAML; @N: first N documents) "
                   "(default: regression)")
    p.add_argument("--baseline", help="baseline model to compare against (same suite and settings)")
    p.add_argument("--baseline-adapter", help="adapter for the baseline (alone: the --model base with this adapter)")
    p.add_argument("--out", help="write results.json, samples-*.jsonl and report.html here")
    p.add_argument("--fail-on-regression", action="store_true",
                   help="exit 1 when any metric regresses by more than --max-drop (a CI gate)")
    p.add_argument("--max-drop", type=float, default=DEFAULT_MAX_DROP,
                   help="regression threshold: points on 0-1 rates, relative on perplexity "
                   f"(default {DEFAULT_MAX_DROP}); a drop equal to it passes")
    p.add_argument("--significance", type=float, metavar="ALPHA",
                   help="also require the drop to be significant: drop > z(1-ALPHA) * SE of the delta, one-sided "
                   "(e.g. 0.05: z = 1.645); default: every drop past --max-drop fails")
    p.add_argument("--limit", type=int, help="use only the first N rows of each task")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    if a.fail_on_regression and not (a.baseline or a.baseline_adapter):
        p.error("--fail-on-regression needs --baseline (or --baseline-adapter) to compare against")
    if a.max_drop < 0:
        p.error(f"--max-drop must be >= 0, got {a.max_drop}")
    if a.significance is not None and not 0 < a.significance < 0.5:
        p.error(f"--significance must be in (0, 0.5), got {a.significance}")
    if a.limit is not None and a.limit <= 0:
        p.error(f"--limit must be > 0, got {a.limit}")

    try:
        res = evaluate(a.model, adapter=a.adapter, suite=a.suite, baseline=a.baseline,
                       baseline_adapter=a.baseline_adapter, out=a.out, limit=a.limit, batch_size=a.batch_size,
                       seed=a.seed, max_drop=a.max_drop, significance=a.significance,
                       device=a.device, dtype=a.dtype)
    except (TaskError, ModelLoadError, FileNotFoundError) as e:
        print(f"posttrain eval: error: {e}", file=sys.stderr)
        return 2
    if a.out:
        print(f"results: {a.out}/results.json; report: {a.out}/report.html")
    if a.fail_on_regression and not res["passed"]:
        names = ", ".join(f"{r['task']}.{r['metric']}" for r in res["comparison"]["regressions"])
        sig = f" (significant at alpha={a.significance})" if a.significance is not None else ""
        print(f"posttrain eval: regression beyond max_drop={a.max_drop}{sig}: {names}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
