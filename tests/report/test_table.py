"""The demo's closing table: common columns, each stage's own measures beneath, at most 100 columns."""

from posttrain.report.table import format_summary_table

# the shape of the demo's summary.json: every row measured by the recipe, stage rows with their own extras
SUMMARY = {
    "base": {"task_accuracy": 0.355, "regression_score": 0.79, "refusal_rate": 0.1, "over_refusal_rate": 0.05,
             "valid_call_rate": 0.0, "no_call_rate": 1.0, "reasoning_accuracy": 0.1, "preference_accuracy": 0.5},
    "sft": {"task_accuracy": 0.645, "regression_score": 0.8, "train_time_s": 41.2, "final_train_loss": 1.2345},
    "dpo": {"task_accuracy": 0.54, "regression_score": 0.785, "preference_accuracy": 0.955,
            "preference_correctness": 0.645, "train_time_s": 62.0, "final_train_loss": 0.412},
    "safety": {"task_accuracy": 0.6, "regression_score": 0.78, "refusal_rate": 0.97, "over_refusal_rate": 0.04,
               "train_time_s": 30.1, "final_train_loss": 0.3},
    "tools": {"task_accuracy": 0.61, "regression_score": 0.79, "valid_call_rate": 0.9, "no_call_rate": 0.95,
              "train_time_s": 35.0, "final_train_loss": 0.2},
    "ppo": {"task_accuracy": 0.66, "regression_score": 0.8, "train_time_s": 80.0, "final_train_loss": None},
    "reasoning-sft": {"task_accuracy": 0.6, "regression_score": 0.78, "reasoning_accuracy": 0.3,
                      "train_time_s": 100, "final_train_loss": 0.5},
    "grpo": {"task_accuracy": 0.59, "regression_score": 0.77, "reasoning_accuracy": 0.51, "train_time_s": 474.4},
}


def test_table_fits_100_columns_with_common_columns_and_each_stages_measures_beneath():
    text = format_summary_table(SUMMARY)
    lines = text.splitlines()
    assert max(map(len, lines)) <= 100
    assert lines[0].split("  ")[0].strip() == "stage" and lines[0].split()[1:] == [
        "task", "acc", "regression", "train", "s", "final", "loss"]
    assert lines[2] == "base              0.355       0.790        -           -"
    row = lines.index("dpo               0.540       0.785       62       0.412")
    assert lines[row + 1] == "               preference_accuracy 0.955   preference_correctness 0.645"
    assert "grpo              0.590       0.770      474           -" in lines
    # every measure of every stage is printed once, next to its stage
    flat = " ".join(text.split())
    for row in SUMMARY.values():
        for k, v in row.items():
            if k not in ("task_accuracy", "regression_score", "train_time_s", "final_train_loss"):
                assert f"{k} {v:.3f}" in flat
    assert text.count("valid_call_rate") == 2 and text.count("reasoning_accuracy") == 3
    # the base row's seven extras wrap, without splitting a name from its value
    base_extra = lines[3:lines.index("sft               0.645       0.800       41       1.234")]
    assert len(base_extra) == 2 and all(x.startswith(" " * 15) for x in base_extra)
    pairs = " ".join(base_extra).split()
    assert pairs[pairs.index("no_call_rate") + 1] == "1.000"



def test_a_runs_glance_says_what_the_default_drift_guard_saw():
    from posttrain.report.runs import glance

    g = {"checks": 2, "drift_kl": 0.41, "max_drift_kl": 0.5, "general_ppl_change": -0.02, "max_ppl_change": None}
    run = {"status": "completed", "stage": "sft", "model": "m", "rows": [],
           "manifest_data": {"result": {"guard": g, "stop_reason": None}}, "config_data": {"eval": {}}}
    assert glance(run)["guard"] == ("on (drift guard): 2 check(s) did not stop the run; last drift 0.410 nats/token "
                                    "(limit 0.5), general perplexity change -2.0% (limit none)")
    stop = "forgetting guard: drift from the base 0.710 nats/token > limit 0.5; rolled back to step 40"
    run["manifest_data"]["result"]["stop_reason"] = stop
    assert glance(run)["guard"] == stop
    run["manifest_data"]["result"] = {}
    assert glance(run)["guard"] == "off"
