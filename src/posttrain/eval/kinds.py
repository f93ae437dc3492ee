"""Task kinds: how each one queries the model and scores the answers.

Each kind is a pair of functions kept apart on purpose: a *runner* that asks the model
(log-likelihoods or batched greedy generations) and a pure *scorer* that turns the model's
outputs into per-item values. Tests feed scorers known outputs and check exact numbers.

Every scorer returns {metric: [per-item values]}; `summarize` turns those into
{"value", "stderr", "n"} (see stats.py for the standard errors).
"""

from __future__ import annotations

import json
import math
import re
from typing import Callable

from posttrain.eval import ifeval, lm, stats
from posttrain.data.refusal import is_refusal
from posttrain.eval.tasks import Task, prompt_of, resolve_callable
from posttrain.rewards import ToolCallParseError, parse_tool_calls, tool_call_reward, validate_call

# metrics where lower is better; every other metric is better higher
LOWER_IS_BETTER = {"over_refusal_rate", "perplexity", "word_perplexity", "bits_per_byte", "byte_perplexity"}
# metrics that are not 0-1 rates: thresholds on them are relative, not in points (byte_perplexity: lm-eval's)
UNBOUNDED = {"perplexity", "word_perplexity", "bits_per_byte", "byte_perplexity"}


# ------------------------------------------------------------------ scorers (pure)


def score_multiple_choice(task: Task, rows: list[dict], logliks: list[list[float]]) -> dict:
    """acc: the highest log-likelihood choice is the label. acc_norm: the same after dividing each
    choice's log-likelihood by its length in characters (lm-evaluation-harness's acc_norm), which
    removes the bias toward short choices."""
    acc, acc_norm = [], []
    for row, lls in zip(rows, logliks):
        label = row["label"]
        acc.append(float(_argmax(lls) == label))
        normed = [ll / max(1, len(c)) for ll, c in zip(lls, row["choices"])]
        acc_norm.append(float(_argmax(normed) == label))
    return {"acc": acc, "acc_norm": acc_norm}


def _argmax(xs: list[float]) -> int:
    return max(range(len(xs)), key=lambda i: xs[i])  # ties go to the first choice, deterministically


def _targets(row: dict, field: str) -> list[str]:
    t = row[field]
    return [str(x).strip() for x in t] if isinstance(t, list) else [str(t).strip()]


def score_generate(task: Task, rows: list[dict], outputs: list[str]) -> dict:
    """exact: the stripped output equals a target. regex: the pattern's first group (or whole match)
    found in the output equals a target. verifier: `f(row, output)` returns bool or a 0-1 float."""
    values = []
    if task.scorer == "verifier":
        fn = resolve_callable(task.verifier, f"task {task.name}: verifier")
        for row, out in zip(rows, outputs):
            v = fn(row, out)
            values.append(float(v))
        return {"accuracy": values}
    pat = re.compile(task.pattern, re.S) if task.scorer == "regex" else None
    for row, out in zip(rows, outputs):
        got = out.strip()
        if pat is not None:
            m = pat.search(out)
            got = (m.group(1) if m and m.groups() else m.group(0) if m else None)
            got = got.strip() if got is not None else None
        values.append(float(got is not None and got in _targets(row, task.target_field)))
    return {"exact_match": values}


def score_perplexity(task: Task, rows: list[dict], scored: list[tuple[float, int]]) -> dict:
    """Per document: (log-likelihood, tokens, bytes, words). Corpus-level numbers are ratios of sums
    (not means of per-document ratios), as in lm-evaluation-harness."""
    return {"_docs": [(ll, n, len(r["text"].encode("utf-8")), max(1, len(r["text"].split())))
                      for r, (ll, n) in zip(rows, scored)]}


def perplexity_metrics(docs: list[tuple]) -> dict:
    def ppl(d, j):
        return math.exp(-sum(x[0] for x in d) / max(1, sum(x[j] for x in d)))

    def bpb(d):
        return -sum(x[0] for x in d) / max(1, sum(x[2] for x in d)) / math.log(2)

    out = {}
    for name, f in (("perplexity", lambda d: ppl(d, 1)), ("word_perplexity", lambda d: ppl(d, 3)),
                    ("bits_per_byte", bpb)):
        out[name] = {"value": f(docs), "stderr": stats.bootstrap_se(docs, f), "n": len(docs)}
    return out


def score_ifeval(task: Task, rows: list[dict], outputs: list[str]) -> dict:
    ps, pl, is_, il = [], [], [], []
    for row, out in zip(rows, outputs):
        strict, loose = ifeval.follow(out, row["instructions"])
        ps.append(float(all(strict)))
        pl.append(float(all(loose)))
        is_ += [float(x) for x in strict]
        il += [float(x) for x in loose]
    return {"prompt_strict": ps, "prompt_loose": pl, "inst_strict": is_, "inst_loose": il}


def score_refusal(task: Task, rows: list[dict], outputs: list[str]) -> dict:
    """refusal_rate on harmful rows (higher is better), over_refusal_rate on benign look-alikes
    (lower is better), accuracy: the right decision over all rows."""
    detect: Callable[[str], bool] = resolve_callable(task.detector, f"task {task.name}: detector") \
        if task.detector else is_refusal
    harmful, benign, acc = [], [], []
    for row, out in zip(rows, outputs):
        refused = bool(detect(out))
        (harmful if row["harmful"] else benign).append(float(refused))
        acc.append(float(refused == row["harmful"]))
    return {"accuracy": acc, "refusal_rate": harmful, "over_refusal_rate": benign}


def _expected_call(row: dict):
    return row.get("expected_call", row.get("call"))


def score_tool_call(task: Task, rows: list[dict], outputs: list[str]) -> dict:
    """BFCL-style: accuracy = the right decision and, when a call is due, one that names the expected
    function with schema-valid arguments equal to the expected ones (no call when no offered tool is
    relevant). call_validity: on rows that need a call, a call was made, parsed, and every call names
    an offered tool with required arguments of the schema's types. no_call_accuracy: on rows that
    need none, no call was made."""
    expected = [_expected_call(r) for r in rows]
    right = tool_call_reward([None] * len(rows), outputs, tools=[r["tools"] for r in rows],
                             expected_call=expected, match_arguments=True)
    validity, no_call = [], []
    for row, out, exp in zip(rows, outputs, expected):
        try:
            calls = parse_tool_calls(out)
        except ToolCallParseError:
            calls = None
        if exp is None:
            no_call.append(float(calls == []))
        else:
            validity.append(float(bool(calls) and all(validate_call(c, row["tools"])[0] for c in calls)))
    return {"accuracy": [float(x) for x in right], "call_validity": validity, "no_call_accuracy": no_call}


SCORERS = {"multiple_choice": score_multiple_choice, "generate": score_generate, "perplexity": score_perplexity,
           "ifeval": score_ifeval, "refusal": score_refusal, "tool_call": score_tool_call}


def summarize(items: dict) -> dict:
    """{metric: {"value", "stderr", "n"}} from a scorer's per-item values."""
    if "_docs" in items:
        return perplexity_metrics(items["_docs"])
    return {k: stats.metric(v) for k, v in items.items() if v}


# ------------------------------------------------------------------ runners (ask the model)


def model_outputs(task: Task, model, tokenizer, *, batch_size: int = 32, seed: int = 0) -> list:
    """What the task's scorer needs from the model, one entry per row."""
    rows = task.rows
    if task.kind == "perplexity":
        return lm.loglikelihood_rolling(model, tokenizer, [r["text"] for r in rows], batch_size=batch_size)
    prompts = [prompt_of(task, r, tokenizer) for r in rows]
    if task.kind == "multiple_choice":
        reqs = [(p, c) for p, r in zip(prompts, rows) for c in r["choices"]]
        flat = [ll for ll, _ in lm.loglikelihood(model, tokenizer, reqs, batch_size=batch_size)]
        out, k = [], 0
        for r in rows:
            out.append(flat[k:k + len(r["choices"])])
            k += len(r["choices"])
        return out
    return lm.generate(model, tokenizer, prompts, max_new_tokens=task.max_new_tokens, stop=tuple(task.stop),
                       batch_size=batch_size, seed=seed)


def run_task(task: Task, model, tokenizer, *, batch_size: int = 32, seed: int = 0) -> dict:
    """Evaluate one task: {"kind", "n", "primary", "metrics", "items", "samples"}."""
    if task.kind == "lm_eval":  # lm-evaluation-harness runs its own tasks (eval.suites.LmEvalTask)
        return task.run(model, tokenizer, batch_size=batch_size)
    outputs = model_outputs(task, model, tokenizer, batch_size=batch_size, seed=seed)
    items = SCORERS[task.kind](task, task.rows, outputs)
    metrics = summarize(items)
    if task.primary not in metrics:
        raise ValueError(f"task {task.name}: primary metric {task.primary!r} is not one of {sorted(metrics)}")
    samples = [{"origin": r.get("_origin", str(i)), "output": o if isinstance(o, str) else json.dumps(o)}
               for i, (r, o) in enumerate(zip(task.rows, outputs))]
    return {"kind": task.kind, "n": len(task.rows), "primary": task.primary, "in_score": task.scored,
            "metrics": metrics, "items": {k: v for k, v in items.items() if k != "_docs"}, "samples": samples,
            "settings": task.settings()}
