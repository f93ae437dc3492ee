"""Which heading a metric goes under, which curves are drawn, and in which order."""

import pytest

from posttrain.report.groups import group_of, metric_order, splits_of, worth_plotting


@pytest.mark.parametrize("key, group", [
    ("loss", "losses"), ("policy_loss", "losses"), ("value_loss", "losses"), ("perplexity", "losses"),
    ("task_accuracy", "target metric"), ("pair_accuracy", "target metric"), ("refusal_rate", "target metric"),
    ("valid_call_rate", "target metric"), ("reasoning_accuracy", "target metric"),
    ("regression_score", "forgetting checks"), ("heldout_divergence", "forgetting checks"),
    ("drift", "forgetting checks"),
    ("reward", "rewards and reward-hacking detectors"), ("reward_std", "rewards and reward-hacking detectors"),
    ("kl", "rewards and reward-hacking detectors"), ("entropy", "rewards and reward-hacking detectors"),
    ("completion_length", "rewards and reward-hacking detectors"),
    ("zero_variance_frac", "rewards and reward-hacking detectors"),
    ("score_chosen", "rewards and reward-hacking detectors"),
    ("hack/length_drift", "rewards and reward-hacking detectors"),
    ("hack/component_divergence", "rewards and reward-hacking detectors"),
    ("reward/format", "rewards and reward-hacking detectors"),
    ("distinct_2", "rewards and reward-hacking detectors"), ("identical_share", "rewards and reward-hacking detectors"),
    ("lr", "optimization"), ("grad_norm", "optimization"), ("epoch", "optimization"),
    ("tokens_per_s", "throughput"), ("step_time_s", "throughput"), ("elapsed_s", "throughput"),
    ("something_new", "other"),
])
def test_group_of(key, group):
    assert group_of(key) == group


def test_order_is_by_meaning_then_headline_then_name():
    keys = ["tokens_per_s", "kl", "grad_norm", "regression_score", "reward", "lr", "task_accuracy", "loss",
            "policy_loss", "zzz"]
    assert metric_order(keys) == ["loss", "policy_loss", "task_accuracy", "regression_score", "kl", "reward",
                                  "lr", "grad_norm", "tokens_per_s", "zzz"]


def test_constants_and_single_points_are_not_curves():
    assert not worth_plotting([[0.5]])  # one evaluation at the end
    assert not worth_plotting([[0.5], [0.7]])  # one point in each of two lines
    assert not worth_plotting([[0.1, 0.1, 0.1]])  # a fixed KL coefficient
    assert not worth_plotting([[0.0, 0.0], [float("nan"), 0.0]])  # NaN gaps do not make a curve
    assert not worth_plotting([])
    assert worth_plotting([[1.0, 0.9]])
    assert worth_plotting([[0.5], [0.5, 0.6]])
    assert worth_plotting([[1e-4, 1e-4 * (1 + 1e-6)]])  # a tiny change is still a change
    assert not worth_plotting([[1.0, float("inf"), 1.0]])  # an infinity is a gap, not a change


def test_elapsed_time_from_the_train_split_only():
    s = {"eval": {"loss": 1, "elapsed_s": 1}, "train": {"loss": 1, "elapsed_s": 1}, "data": {"rows": 1}}
    assert splits_of(s, "loss") == ["train", "eval"]
    assert splits_of(s, "elapsed_s") == ["train"]
    assert splits_of({"eval": {"elapsed_s": 1}}, "elapsed_s") == ["eval"]
