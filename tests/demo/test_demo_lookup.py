"""The demo's multi-turn tool rows (issue 21): `lookup_sft` (SFT of the bundled base on gym:lookup traces),
then `lookup` (multi-turn GRPO against the gym:lookup environment).

Success is the fraction of 200 held-out questions answered right by greedy episodes (`lookup_success`).
The run is the shipped recipe's optional rows through `posttrain demo --stages base,lookup_sft,lookup`,
so these are the numbers the demo prints. Marked slow (numbers and duration in docs/rl.md). The
first test holds the rows to the protocol and the budget (a moderate X, time, valid calls, the logged
episode metrics); the second to issue 21's gain.

Issue 21's target: GRPO raises X by >= 20 points, <= 2% invalid calls, within 10 minutes on 2 cores.
The recipe's `lookup` row is 30 rollouts x 2 passes (60 steps), which fit that budget when the run has both
cores (torch's default: one thread per core; `make test-lookup-gym` sets no thread limit). Measured
2026-12-07 on a 2-core AVX2 AMD EPYC, idle, two threads: SFT 224 s to 0.23, GRPO 450 s to 0.50, **+27**,
0% invalid calls (GRPO seeds 7 and 3 from that SFT model: +32 and +38; CI on a fresh clone: the same
numbers, GRPO 488 s). With one thread the same 60 steps take ~840 s; 20 rollouts (the row until then)
gained +9 there in 538 s, and +28.5 on an AVX512 CPU (+33 and +26 with GRPO seeds 7 and 3). The gain depends
on where SFT lands: SFT data orders 7, 3 and 11 ended at 0.115, 0.17 and 0.39, and their 20-rollout
chains at -4.5, +16 and -1.5 (docs/rl.md, "Gym task lookup").
"""

import json

import pytest
import torch

from posttrain.pipeline.demo import DEFAULT_STAGES, OPTIONAL_ROWS, run_demo

pytestmark = pytest.mark.slow

MIN_GAIN = 0.20             # issue 21: success points (0-1) GRPO adds to SFT's X (+27 measured, above)
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
    assert 0.15 <= sft["lookup_success"] <= 0.5, sft     # SFT leaves room: a moderate X (0.23-0.26 measured)
    assert rl["lookup_success"] >= sft["lookup_success"] - 0.05, (sft, rl)   # 0.05: about 1.5 standard errors
    assert rl["invalid_call_rate"] <= MAX_INVALID, rl
    assert rl["train_time_s"] <= MAX_TRAIN_S, (rl, f"torch threads: {torch.get_num_threads()} (the budget is 2 cores)")
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
    print(json.dumps({"lookup_gain": round(gain, 4)}))
    assert gain >= MIN_GAIN, (sft, rl)
    train = [r for r in map(json.loads, (out / "lookup" / "metrics.jsonl").read_text().splitlines())
             if r.get("split") == "train"]
    k = max(1, len(train) // 4)  # the environment's verdict (no shaping) rose during training
    assert sum(r["episode_outcome"] for r in train[-k:]) / k > sum(r["episode_outcome"] for r in train[:k]) / k, train
