"""The forgetting guard inside the real Engine: a high-lr run on narrow data that the guard stops and rolls back."""

import json
import re

import pytest

from posttrain.eval import lm
from posttrain.eval.guard import from_config, measure, regression_guard
from tests.eval.conftest import write_task

PROMPTS = ["Hello", "The quick brown fox", "What is 2 + 3?", "Numbers 0 1 2", "Reverse the word apple:",
           "user assistant", "The answer is", "Post-training turns", "Paris", "The lazy dog"]


def test_guard_stops_a_forgetting_run_and_restores_the_last_good_weights(tiny, tmp_path):
    from posttrain.stages import load_config
    from posttrain.stages import sft
    from posttrain.engine.setup import load_for_training

    d, base, tok = tiny
    outs = lm.generate(base, tok, PROMPTS, max_new_tokens=4)
    suite = write_task(tmp_path / "suite", "echo", {"kind": "generate", "max_new_tokens": 4},
                       [{"prompt": p, "answer": o.strip()} for p, o in zip(PROMPTS, outs)])
    train = tmp_path / "narrow.jsonl"
    train.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Say it {i}"},
                                                       {"role": "assistant", "content": "yes yes yes yes"}]}) + "\n"
                             for i in range(32)))
    cfg = load_config("sft", overrides=[
        f"model={d}", f"data.train={train}", f"output_dir={tmp_path / 'run'}", "train.lr=2e-4", "train.max_steps=40",
        "train.batch_size=8", "train.eval_every=1", "train.warmup_steps=4", "train.schedule=constant",
        "train.progress=false", "eval.regression_every=2", f"eval.regression_suite={suite}",
        "eval.regression_max_drop=0.3"])
    model, tok2 = load_for_training(cfg)
    evaluators, guard = from_config(cfg, tok2, model=model)
    assert evaluators[0].state["reference"] == 1.0 and evaluators[0].state["good_step"] == 0
    narrow = [f"<|im_start|>user\nSay it {i}<|im_end|>\n<|im_start|>assistant\n" for i in range(4)]

    def target(m, step):  # the narrow task: does the model answer "yes ..."
        outs = lm.generate(m, tok2, narrow, max_new_tokens=3)
        return {"task_accuracy": sum(o.strip().startswith("yes") for o in outs) / len(outs)}

    res = sft.run(cfg, evaluators=[target, *evaluators], guard=guard, model=model, tokenizer=tok2)

    reason = res.result["stop_reason"]
    assert reason and reason.startswith("forgetting guard") and "rolled back to step" in reason
    assert res.result["steps"] < 40
    history = evaluators[0].state["history"]
    assert all(step % 2 == 0 for step, _ in history)  # eval.regression_every honoured
    good_step = evaluators[0].state["good_step"]
    good_score = dict(history)[good_step]
    assert history[-1][1] < 1.0 - 0.3 <= good_score
    assert good_step > 0, history  # the run had good evaluations before it forgot
    # the weights in memory are those of the last good evaluation, not of the stopping step
    assert measure(res.model, tok2, suite)["value"] == good_score
    logged = [json.loads(x) for x in (res.output_dir / "metrics.jsonl").read_text().splitlines()]
    scores = [r for r in logged if r.get("split") == "eval" and "regression_score" in r]
    assert [(r["step"], r["regression_score"]) for r in scores] == history
    assert all("task_accuracy" in r for r in scores)
    # the run's report plots the target metric and the regression metric over steps
    page = (res.output_dir / "report.html").read_text()
    alts = re.findall(r'<img src="data:image/png;base64,[^"]+" alt="([^"]+)"', page)
    # (grouped by meaning, issue 22: losses, the target metric, then the forgetting checks; a metric
    # that stayed constant is in the table, not drawn)
    task = {r["task_accuracy"] for r in scores}
    want = ["loss", "task accuracy", "regression score"] if len(task) > 1 else ["loss", "regression score"]
    assert alts[:len(want)] == want, alts


def test_guard_arguments_are_checked():
    with pytest.raises(ValueError, match="every must be >= 1"):
        regression_guard(None, "regression", every=0)
    with pytest.raises(ValueError, match="max_drop must be > 0"):
        regression_guard(None, "regression", every=1, max_drop=0)


def test_from_config_needs_engine_evaluations_to_run_on():
    from posttrain.stages import load_config

    assert from_config(load_config("sft"), None) == ([], None)
    cfg = load_config("sft", overrides=["eval.regression_every=10", "train.eval_every=4"])
    with pytest.raises(ValueError, match="needs train.eval_every set to it or a divisor of it \\(got 4\\)"):
        from_config(cfg, None)
