"""The demo's multi-turn tool rows (issue 21): `lookup_sft` (SFT of the bundled base on gym:lookup traces),
then `lookup` (multi-turn GRPO against the gym:lookup environment).

Success is the fraction of 200 held-out questions answered right by greedy episodes (`lookup_success`).
The run is the shipped recipe's optional rows through `posttrain demo --stages base,lookup_sft,lookup`,
so these are the numbers the demo prints. Marked slow (numbers and duration in docs/rl.md). The
first test holds the rows to the protocol and the budget (a moderate X, time, valid calls, the logged
episode metrics); the second to a gain that GRPO delivered on both CPUs this project has run on.

Issue 21's target is +20 points. On an AVX512 CPU (2026-12-07, load 2), from the recipe's SFT model
(0.26), GRPO seeds 42, 7 and 3 gained +28.5, +33 and +26 in 505-514 s, and this test reproduced the
seed-42 numbers exactly. On an AVX2-only AMD EPYC (2026-12-07, CI on a fresh clone) the same seeded
rows, fp32 on both machines, summed in another order: SFT 0.23, GRPO 0.32, **+9** in 538 s, the
environment's verdict rising 0.19 -> 0.29 during training. The +20 holds for one SFT model, not
robustly: SFT data orders 7, 3 and 11 ended at 0.115, 0.17 and 0.39, and their chains at -4.5, +16 and
-1.5 (docs/rl.md, "Gym task lookup"), so issue 21 stays open on it, and the test asserts +5 (about one
standard error of a 200-question difference) and prints whether the +20 was met.
"""

import json

import pytest

from posttrain.pipeline.demo import DEFAULT_STAGES, OPTIONAL_ROWS, run_demo

pytestmark = pytest.mark.slow

ISSUE_TARGET = 0.20         # success points (0-1): issue 21's target, met on one CPU only (see above)
MIN_GAIN = 0.05             # what the test holds GRPO to: +28.5 (AVX512) and +9 (AVX2) measured
MAX_INVALID = 0.02          # invalid tool calls after GRPO
MAX_TRAIN_S = 600           # "within 10 minutes on 2 cores"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo-lookup")
    return out, run_demo(out, stages=("base", "lookup_sft", "lookup"))


def test_the_lookup_rows_are_optional():
    assert {"lookup_sft", "lookup"} <= set(OPTIONAL_ROWS) and not {"lookup_sft", "lookup"} & set(DEFAULT_STAGES)


def test_multi_turn_grpo_rows_keep_the_protocol_within_budget(demo):
    """A moderate X, GRPO within 10 minutes, no lost success, valid calls, the logged episode metrics."""
    out, s = demo
    sft, rl = s["lookup_sft"], s["lookup"]
    print(json.dumps({"lookup_sft": sft, "lookup": rl}))
    assert 0.15 <= sft["lookup_success"] <= 0.5, sft     # SFT leaves room: a moderate X (0.26 measured)
    assert rl["lookup_success"] >= sft["lookup_success"] - 0.05, (sft, rl)   # 0.05: about 1.5 standard errors
    assert rl["invalid_call_rate"] <= MAX_INVALID, rl
    assert rl["train_time_s"] <= MAX_TRAIN_S, rl
    lin = json.loads((out / "lineage.json").read_text())
    assert lin["stages"]["lookup"]["started_from"] == "lookup_sft"
    train = [r for r in map(json.loads, (out / "lookup" / "metrics.jsonl").read_text().splitlines())
             if r.get("split") == "train"]
    assert all({"turns_per_episode", "tool_calls_per_episode", "invalid_call_rate", "reward_per_turn",
                "episode_outcome"} <= set(r) for r in train)


def test_multi_turn_grpo_raises_lookup_success(demo):
    out, s = demo
    sft, rl = s["lookup_sft"], s["lookup"]
    gain = rl["lookup_success"] - sft["lookup_success"]
    print(json.dumps({"lookup_gain": round(gain, 4), "issue_21_target_met": gain >= ISSUE_TARGET}))
    assert gain >= MIN_GAIN, (sft, rl)
    train = [r for r in map(json.loads, (out / "lookup" / "metrics.jsonl").read_text().splitlines())
             if r.get("split") == "train"]
    k = max(1, len(train) // 4)  # the environment's verdict (no shaping) rose during training
    assert sum(r["episode_outcome"] for r in train[-k:]) / k > sum(r["episode_outcome"] for r in train[:k]) / k, train
