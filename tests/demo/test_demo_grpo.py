"""The demo's reasoning chain (issues 6 and 17): a guarded reasoning SFT (LoRA from sft with the regression
mix), then GRPO with the task's verifier.

Accuracy is greedy exact match of the final answer on 200 held-out reasoning problems. The run is the
shipped recipe's `reasoning` and `grpo` stages through `posttrain demo` (the pipeline), the rows `make demo`
prints. `make test-grpo-gym` runs it on both cores (the chain runs alone; `make demo` gives each of its two
parallel rows one thread, so its numbers round differently): 528 s on an idle 2-core AVX2 CPU (2026-12-07:
reasoning SFT 51 s to 0.32, GRPO 425 s to 0.365; with one thread 712 s). Marked slow; CI runs it after
the suite.

Issue 17 item 6 asks that the guarded chain keep the base's skills (regression within 2 points) "while
reasoning accuracy still rises by >= 15 points": the base and the sft model score 0.0 on the held-out
reasoning problems, the guarded reasoning SFT 0.32 and GRPO 0.36-0.45 (measured 2026-12-06,
docs/pipeline.md "The reasoning chains"), so the test asserts the chain's rise from the base (>= 0.15)
with the regression score kept. GRPO's own gain over its start is noisy at this budget (+4 to +13 in
four runs of the recipe; the wave-1 target of +15 for the GRPO row is issue 20's): the test asserts that
GRPO does not lose held-out accuracy beyond rounding and that it learns, the training reward (320
sampled completions per 20 steps) rising by at least 0.05, within the 10-minute budget, with no stop.
"""

import json

import pytest

from posttrain.pipeline.demo import DEFAULT_STAGES, run_demo

pytestmark = pytest.mark.slow

CHAIN_GAIN = 0.15   # issue 17 item 6: the guarded chain's held-out reasoning accuracy rises >= 15 points from the base
TARGET_GAIN = -0.03  # GRPO's own held-out gain may not fall beyond rounding (measured +0.04 to +0.13)
MAX_TRAIN_S = 600   # "within 10 minutes on this 2-core CPU"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo-grpo")
    return out, run_demo(out, stages=("base", "reasoning", "grpo"))


def _base_reasoning_accuracy() -> float:
    """The bundled base's greedy accuracy on the same 200 held-out problems (0.0: it has never seen the
    answer format), measured the way the demo's `reasoning_accuracy` is."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain import gym

    path = gym.base_model_path()
    model = AutoModelForCausalLM.from_pretrained(path, dtype="float32").eval()
    return gym.task_accuracy(model, AutoTokenizer.from_pretrained(path), task="reasoning", n=200)


def test_the_demo_has_the_reasoning_rows():
    assert DEFAULT_STAGES[-2:] == ("reasoning", "grpo")


def test_the_guarded_chain_raises_reasoning_accuracy_and_grpo_keeps_it_within_ten_minutes(demo):
    out, s = demo
    sft, rl = s["reasoning"], s["grpo"]
    print(json.dumps({"reasoning": sft, "grpo": rl}))
    gain = rl["reasoning_accuracy"] - sft["reasoning_accuracy"]
    assert gain >= TARGET_GAIN, (sft, rl)
    base = _base_reasoning_accuracy()
    print(json.dumps({"base_reasoning_accuracy": base}))
    assert rl["reasoning_accuracy"] >= base + CHAIN_GAIN, (base, sft, rl)
    assert rl["train_time_s"] <= MAX_TRAIN_S, rl
    lin = json.loads((out / "lineage.json").read_text())
    assert lin["stages"]["grpo"]["started_from"] == "reasoning"
    assert lin["stages"]["reasoning"]["started_from"] == "sft"


def test_the_guarded_chain_keeps_the_base_skills(demo):
    """Issue 17 item 6: regression within 2 points of the base in both rows, and the default forgetting
    guard (on in every stage) stops neither."""
    out, s = demo
    for row, limit in (("reasoning", 1.0), ("grpo", 0.5)):  # the recipe's limits (reasoning: as sft's)
        assert s[row]["regression_score"] >= s["base"]["regression_score"] - 0.02, (s["base"], s[row])
        assert "stop_reason" not in s[row] and s[row]["drift_kl"] <= limit, s[row]
    # the training log shows the reward rising and zero-variance groups counted
    recs = [json.loads(x) for x in (out / "grpo" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r.get("split") == "train"]
    first = sum(r["reward"] for r in train[:20]) / 20
    last = sum(r["reward"] for r in train[-20:]) / 20
    assert last > first + 0.05, (first, last)
    assert all("zero_variance_frac" in r for r in train)
