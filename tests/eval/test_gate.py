"""The regression gate: a drop equal to the limit passes, and --significance lets noise pass."""

import pytest

from posttrain.eval.cli import main
from posttrain.eval.compare import compare, format_comparison, is_regression, z_for


def _res(metrics: dict, items: dict | None = None) -> dict:
    """A one-task `run_suite` result: metrics {name: (value, stderr)}, per-item values optional."""
    return {"tasks": {"t": {"metrics": {k: {"value": v, "stderr": se} for k, (v, se) in metrics.items()},
                            "items": items or {}, "primary": "acc", "in_score": False}}}


def _acc_row(base: dict, tuned: dict, **kw) -> dict:
    return next(r for r in compare(base, tuned, **kw)["rows"] if r["metric"] == "acc")


def test_a_drop_equal_to_the_limit_is_not_a_regression():
    # 49/50 -> 48/50 on the same items: 0.96 - 0.98 = -0.020000000000000018 in floating point
    b_items, t_items = [1.0] * 49 + [0.0], [1.0] * 48 + [0.0, 0.0]
    b, t = _res({"acc": (0.98, 0.0198)}, {"acc": b_items}), _res({"acc": (0.96, 0.0277)}, {"acc": t_items})
    row = _acc_row(b, t, max_drop=0.02)
    assert row["delta"] == 0.96 - 0.98 and -row["delta"] > 0.02
    assert not row["regression"]
    # one more item wrong is a 4-point drop: past the limit
    t2 = _res({"acc": (0.94, 0.0336)}, {"acc": [1.0] * 47 + [0.0] * 3})
    assert _acc_row(b, t2, max_drop=0.02)["regression"]


def test_significance_lets_a_drop_inside_the_noise_pass():
    # the case: -0.056 +- 0.097 (unpaired: no per-item values)
    b, t = _res({"acc": (0.5, 0.0686)}), _res({"acc": (0.444, 0.0686)})
    row = _acc_row(b, t, max_drop=0.02)
    assert row["delta"] == pytest.approx(-0.056) and row["stderr"] == pytest.approx(0.0970, abs=1e-4)
    assert row["regression"]  # no significance asked: every drop past the limit fails
    assert not _acc_row(b, t, max_drop=0.02, significance=0.05)["regression"]  # 0.056 < 1.645 * 0.097
    # a 20-point drop with the same SE is significant at 0.05 (0.2 > 0.1596), not at 0.01 (2.326 * 0.097 = 0.2257)
    t_big = _res({"acc": (0.3, 0.0686)})
    assert _acc_row(b, t_big, max_drop=0.02, significance=0.05)["regression"]
    assert not _acc_row(b, t_big, max_drop=0.02, significance=0.01)["regression"]
    # significance never flags a drop within max_drop, however certain
    assert not is_regression(0.01, 0.0, 0.02, z_for(0.05))
    assert is_regression(0.03, 0.0, 0.02, z_for(0.05))  # SE 0 (identical items elsewhere): any drop is certain


def test_significance_on_a_relative_metric_uses_the_relative_se():
    # perplexity 4.0 -> 4.4: 10% worse; SE of the delta 0.3 = 7.5% of the base
    b, t = _res({"perplexity": (4.0, 0.2121)}), _res({"perplexity": (4.4, 0.2121)})
    row = compare(b, t, max_drop=0.02)["rows"][0]
    assert row["stderr"] == pytest.approx(0.3, abs=1e-4) and row["regression"]
    assert not compare(b, t, max_drop=0.02, significance=0.05)["rows"][0]["regression"]  # 0.10 < 1.645 * 0.075
    assert compare(b, t, max_drop=0.02, significance=0.2)["rows"][0]["regression"]  # 0.10 > 0.8416 * 0.075


def test_z_and_bad_alpha():
    assert z_for(0.05) == pytest.approx(1.6449, abs=1e-4) and z_for(None) is None
    with pytest.raises(ValueError, match=r"significance must be in \(0, 0.5\), got 0.7"):
        z_for(0.7)
    cmp = compare(_res({"acc": (0.5, 0.0686)}), _res({"acc": (0.3, 0.0686)}), significance=0.05)
    assert "1 regression(s) beyond max_drop=0.02, significant at alpha=0.05 (one-sided)" in format_comparison(cmp)


def test_cli_rejects_a_bad_significance(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--model", "m", "--baseline", "b", "--fail-on-regression", "--significance", "0.7"])
    assert e.value.code == 2
    assert "--significance must be in (0, 0.5), got 0.7" in capsys.readouterr().err


def test_the_training_guard_uses_the_same_rule_for_a_drop_equal_to_its_limit():
    from posttrain.eval.guard import regression_guard
    from posttrain.models.tiny import build_tokenizer

    _, guard = regression_guard(build_tokenizer(), "regression", every=1, max_drop=0.02, baseline=0.98)
    assert guard({"regression_score": 0.96, "regression_drop": 0.98 - 0.96}) is None  # 0.020000000000000018
    assert guard({"regression_score": 0.95, "regression_drop": 0.98 - 0.95}).startswith(
        "forgetting guard: regression score 0.950 is 0.030 below the reference 0.980 (limit 0.02)")
