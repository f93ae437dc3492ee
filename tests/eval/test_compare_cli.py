"""Base vs tuned with identical settings, the regression gate, results.json/report.html, CLI exit codes."""

import base64
import json
import math
from html.parser import HTMLParser

import pytest
import yaml

from posttrain.eval import lm
from posttrain.eval.cli import main
from posttrain.eval.report import ALT_DELTAS, ALT_SCORES, ALT_SCORES_SINGLE
from posttrain.eval.runner import evaluate
from tests.eval.conftest import write_task

PROMPTS = ["Hello", "The quick brown fox", "What is 2 + 3?", "Numbers 0 1 2", "Reverse the word apple:",
           "user assistant", "The answer is", "Post-training turns"]


@pytest.fixture(scope="module")
def suite(tiny, tmp_path_factory):
    """A two-task suite on which the base model is right by construction: exact match against its own
    greedy outputs, and multiple choice whose label is the base's own best choice."""
    d, model, tok = tiny
    root = tmp_path_factory.mktemp("suite")
    outs = lm.generate(model, tok, PROMPTS, max_new_tokens=4)
    write_task(root, "echo", {"kind": "generate", "max_new_tokens": 4},
               [{"prompt": p, "answer": o.strip()} for p, o in zip(PROMPTS, outs)])
    choices = [" 2", " 5", " elppa", " zzz"]
    lls = lm.loglikelihood(model, tok, [(p, c) for p in PROMPTS for c in choices])
    rows = []
    for i, p in enumerate(PROMPTS):
        row = [ll for ll, _ in lls[4 * i:4 * i + 4]]
        normed = [x / len(c) for x, c in zip(row, choices)]
        rows.append({"prompt": p, "choices": choices, "label": max(range(4), key=normed.__getitem__)})
    write_task(root, "mc", {"kind": "multiple_choice"}, rows)
    path = root / "suite.yaml"
    path.write_text(yaml.safe_dump({"name": "mini", "tasks": ["echo.yaml", "mc.yaml"]}))
    return path


def test_same_model_as_baseline_gives_zero_deltas_and_passes(tiny, suite, tmp_path):
    d, _, _ = tiny
    res = evaluate(str(d), suite=suite, baseline=str(d), out=tmp_path, verbose=False)
    assert res["base"]["score"]["value"] == 1.0
    assert all(r["delta"] == 0.0 and r["stderr"] == 0.0 for r in res["comparison"]["rows"])
    assert res["passed"] and res["comparison"]["regressions"] == []


def test_tuned_model_regression_is_flagged_with_paired_se(tiny, other_tiny, suite, tmp_path):
    d, _, _ = tiny
    res = evaluate(str(other_tiny), suite=suite, baseline=str(d), out=tmp_path, max_drop=0.05, verbose=False)
    rows = {(r["task"], r["metric"]): r for r in res["comparison"]["rows"]}
    em = rows[("echo", "exact_match")]
    tuned_items = res["tuned"]["tasks"]["echo"]["items"]["exact_match"]
    diffs = [t - 1.0 for t in tuned_items]
    m = sum(diffs) / len(diffs)
    assert em["base"] == 1.0 and em["delta"] == pytest.approx(m)
    assert em["paired"] and em["stderr"] == pytest.approx(math.sqrt(sum((x - m) ** 2 for x in diffs) / 7 / 8))
    assert em["regression"] == (-m > 0.05)
    assert res["tuned"]["score"]["value"] < 1.0 and not res["passed"]
    assert rows[("suite", "score")]["regression"]
    # what was written
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["comparison"]["rows"][0]["metric"] == "score"
    assert doc["base"]["settings"] == doc["tuned"]["settings"] == {"decoding": "greedy", "batch_size": 32, "seed": 0,
                                                                   "limit": None}
    assert "samples" not in doc["tuned"]["tasks"]["echo"]
    assert len((tmp_path / "samples-tuned.jsonl").read_text().splitlines()) == 16
    page = (tmp_path / "report.html").read_text()
    assert "echo.exact_match" in page and "vs base" in page and "±" in page
    # the report: a table of deltas with the measured numbers, and the two plots
    rep = _parse_report(page)
    assert [alt for alt, _ in rep.images] == [ALT_SCORES, ALT_DELTAS]
    assert all(png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000 for _, png in rep.images)
    deltas = next(t for t in rep.tables if t[0] == ["task", "metric", "base", "tuned", "delta ± se", "flag"])
    by_key = {(r[0], r[1]): r for r in deltas[1:]}
    assert len(deltas) - 1 == len(res["comparison"]["rows"])
    assert by_key[("echo", "exact_match")] == [
        "echo", "exact_match", "1.000 ± 0.000", f"{em['tuned']:.3f} ± {em['tuned_stderr']:.3f}",
        f"{em['delta']:+.3f} ± {em['stderr']:.3f}", "REGRESSION" if em["regression"] else ""]
    assert by_key[("suite", "score")][-1] == "REGRESSION"
    assert "Runs" not in rep.headings  # an evaluation is not a training run


class _Report(HTMLParser):
    """The tables (as lists of cell texts), headings and embedded images of a report page."""

    def __init__(self):
        super().__init__()
        self.tables, self.headings, self.images, self._cell, self._h = [], [], [], None, None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "h2":
            self._h = []
        elif tag == "img":
            self.images.append((a["alt"], base64.b64decode(a["src"].split(",", 1)[1])))

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.tables[-1][-1].append(" ".join("".join(self._cell).split()))
            self._cell = None
        elif tag == "h2":
            self.headings.append("".join(self._h))
            self._h = None

    def handle_data(self, data):
        for buf in (self._cell, self._h):
            if buf is not None:
                buf.append(data)


def _parse_report(page: str) -> _Report:
    r = _Report()
    r.feed(page)
    return r


def test_report_without_baseline_plots_the_scores_only(tiny, suite, tmp_path):
    d, _, _ = tiny
    res = evaluate(str(d), suite=suite, out=tmp_path, verbose=False)
    rep = _parse_report((tmp_path / "report.html").read_text())
    assert [alt for alt, _ in rep.images] == [ALT_SCORES_SINGLE]
    summary = rep.tables[0]
    assert summary[0][:2] == ["stage", "score"] and summary[1][:2] == ["tuned", "1.000 ± 0.000"]
    assert len(rep.tables) == 1 and res["comparison"] is None


def test_cli_exit_codes(tiny, other_tiny, suite, tmp_path, capsys):
    d, _, _ = tiny
    assert main(["--model", str(d), "--suite", str(suite), "--baseline", str(d), "--fail-on-regression"]) == 0
    assert main(["--model", str(other_tiny), "--suite", str(suite), "--baseline", str(d), "--fail-on-regression",
                 "--limit", "4", "--out", str(tmp_path)]) == 1
    assert "regression beyond max_drop=0.02: suite.score" in capsys.readouterr().err
    assert json.loads((tmp_path / "results.json").read_text())["tuned"]["settings"]["limit"] == 4
    # with --significance, only drops past the limit that are also significant fail the gate
    rows = json.loads((tmp_path / "results.json").read_text())["comparison"]["rows"]
    code = main(["--model", str(other_tiny), "--suite", str(suite), "--baseline", str(d), "--fail-on-regression",
                 "--limit", "4", "--significance", "0.05", "--out", str(tmp_path / "sig")])
    doc = json.loads((tmp_path / "sig" / "results.json").read_text())["comparison"]
    assert doc["significance"] == 0.05 and [r["delta"] for r in doc["rows"]] == [r["delta"] for r in rows]
    want = [f"{r['task']}.{r['metric']}" for r in rows if r["regression"] and -r["delta"] > 1.6449 * r["stderr"]
            and r["higher_is_better"]]
    assert [f"{r['task']}.{r['metric']}" for r in doc["regressions"]] == want and code == (1 if want else 0)
    assert "regression beyond max_drop=0.02 (significant at alpha=0.05): suite.score" in capsys.readouterr().err
    # without the gate the same regression is reported but does not fail
    assert main(["--model", str(other_tiny), "--suite", str(suite), "--baseline", str(d), "--limit", "2"]) == 0
    assert main(["--model", str(d), "--suite", "regresion"]) == 2
    assert "did you mean 'regression'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["--model", str(d), "--fail-on-regression"])
    assert e.value.code == 2
