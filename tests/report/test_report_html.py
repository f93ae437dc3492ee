"""build_report / read_metrics on synthetic runs: numbers in, numbers out, real PNGs, robust reading."""

import base64
import io
import json
import math
import time
import warnings
from html.parser import HTMLParser

import numpy as np
import pytest
from .report_runs import DEMO_SUMMARY, write_run
from PIL import Image

from posttrain.report import Section, build_report, read_metrics
from posttrain.report.__main__ import main as report_main
from posttrain.report.metrics import series
from posttrain.report.page import fmt
from posttrain.report.plots import plot_bars, plot_deltas


class _Page(HTMLParser):
    """Tables as lists of rows of cell texts, and every <img>'s attributes."""

    def __init__(self):
        super().__init__()
        self.tables, self.imgs, self.links, self._cell = [], [], [], None
        self.headings, self._heading = [], None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "img":
            self.imgs.append(a)
        elif tag in ("h1", "h2", "h3", "h4"):
            self._heading = [tag]
        if tag in ("link", "script") or a.get("href", "").startswith("http"):
            self.links.append((tag, a))

    def handle_endtag(self, tag):
        if tag in ("h1", "h2", "h3", "h4") and self._heading:
            self.headings.append(" ".join(self._heading) if tag != "h1" else "h1")
            self._heading = None
        if tag in ("td", "th"):
            self.tables[-1][-1].append(" ".join("".join(self._cell).split()))
            self._cell = None

    def handle_data(self, data):
        if self._heading is not None:
            self._heading.append(data.strip())
        if self._cell is not None:
            self._cell.append(data)


def parse(path):
    p = _Page()
    p.feed(path.read_text(encoding="utf-8"))
    return p


def decode_png(src):
    assert src.startswith("data:image/png;base64,")
    raw = base64.b64decode(src.split(",", 1)[1])
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    img = Image.open(io.BytesIO(raw))
    img.load()
    return np.asarray(img.convert("RGB"))


def test_read_metrics_skips_corrupt_tail_with_warning(tmp_path):
    rows = write_run(tmp_path / "r", steps=30, eval_every=10, corrupt_tail=True)
    with pytest.warns(UserWarning, match=r"metrics.jsonl line 37: not valid JSON"):
        got = read_metrics(tmp_path / "r")
    assert got == rows  # everything before the torn line survives, values unchanged
    with pytest.warns(UserWarning, match="line 37"):
        assert read_metrics(tmp_path / "r" / "metrics.jsonl") == rows  # accepts the file path too
    write_run(tmp_path / "clean", steps=30, eval_every=10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an intact file reads without any warning
        assert len(read_metrics(tmp_path / "clean")) == 36
    with pytest.raises(FileNotFoundError, match="no metrics file"):
        read_metrics(tmp_path / "missing")


def test_read_metrics_skips_non_objects(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n[1, 2]\n\n{"step": 2, "loss": 1.5}\n')
    with pytest.warns(UserWarning, match="line 2: expected a JSON object, got list"):
        assert read_metrics(tmp_path) == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]


def test_series_resume_keeps_later_values_and_ignores_non_numeric():
    rows = [
        {"step": 1, "loss": 3.0, "lr": 1e-4},
        {"step": 2, "loss": 2.0, "done": True, "note": "x"},
        {"step": 3, "loss": 1.0},
        {"step": 2, "loss": 2.5},  # resumed from checkpoint at step 1: step 2 logged again
        {"split": "eval", "loss": 9.0},  # no step: not a point on a curve
        {"step": 3, "split": "eval", "loss": 1.7},
        {"step": 4, "loss": "nan", "time": 1000.0},  # the engine logs non-finite floats as strings
        {"step": 5, "loss": 0.9, "time": 1012.5},
    ]
    s = series(rows)
    steps, loss = s["train"]["loss"]
    assert steps == [1, 2, 3, 4, 5] and loss[:3] == [3.0, 2.5, 1.0] and math.isnan(loss[3]) and loss[4] == 0.9
    assert s["train"]["elapsed_s"] == ([4, 5], [0.0, 12.5])
    assert s["train"]["lr"] == ([1], [1e-4])
    assert "done" not in s["train"] and "note" not in s["train"]
    assert s["eval"] == {"loss": ([3], [1.7])}


def test_report_table_numbers_and_pngs(make_run):
    run, _ = make_run("sft", corrupt_tail=True)
    (run / "summary.json").write_text(json.dumps(DEMO_SUMMARY))
    with pytest.warns(UserWarning, match="not valid JSON"):
        out = build_report([run])
    assert out == run / "report.html"
    page = parse(out)
    assert page.links == []  # nothing external: no scripts, stylesheets or http links

    summary = page.tables[0]
    assert summary[0] == ["stage", "task_accuracy", "regression_score", "eval_loss", "train_time_s"]
    assert summary[1] == ["base", "0.062", "0.941", "2.750", "–"]
    # sft row: value then its delta against base (0.9383 - 0.0617, 0.9331 - 0.9412, 0.5 - 2.75)
    assert summary[2] == ["sft", "0.938+0.877 vs base", "0.933-0.008 vs base", "0.500-2.250 vs base", "41"]
    html_text = out.read_text()
    assert 'class="d up">+0.877' in html_text and 'class="d down">-0.008' in html_text
    assert 'class="d up">-2.250' in html_text  # lower loss is better
    assert '"Segoe UI"' in html_text and "details.more>summary" in html_text  # the stylesheet is not escaped

    alts = [i["alt"] for i in page.imgs]
    # grouped by meaning: losses, target metric, forgetting checks, optimization, throughput
    assert alts == ["loss", "task accuracy", "regression score", "learning rate",
                    "grad norm", "elapsed s", "tokens per s"]
    assert page.headings == ["h1", "h2 Summary", "h2 Curves", "h3 sft", "h4 losses", "h4 target metric",
                             "h4 forgetting checks", "h4 optimization", "h4 throughput", "h2 Last logged values",
                             "h2 Runs"]
    for img in page.imgs:
        pixels = decode_png(img["src"])
        assert pixels.shape == (320, 500, 3)
        assert (pixels.std(axis=(0, 1)) > 10).all()  # a drawn plot, not a blank canvas

    last = page.tables[1]  # last logged values per run, the torn step-101 line absent
    head = last[0]
    assert last[1][0] == "sft"
    assert last[1][head.index("train/loss")] == "0.605"  # 2.5*exp(-100/40)+0.4 = 0.60521
    assert last[1][head.index("eval/loss")] == "0.838"  # 2.5*exp(-100/50)+0.5 = 0.83834
    assert last[1][head.index("eval/task_accuracy")] == "1.000"
    assert last[1][head.index("train/tokens_per_s")] == "5100"  # logged as an int, shown exactly
    assert last[1][head.index("train/elapsed_s")] == "49.500"  # 0.5 s/step, steps 1..100

    runs = page.tables[2]
    assert runs[1][2:] == ["completed", "100", "110", "1"]  # 100 train + 5*2 eval events, 1 torn line
    assert "metrics.jsonl line 111: not valid JSON" in html_text
    assert "<summary>sft: config.yaml (resolved config)</summary>" in html_text
    assert "name: &lt;adamw&gt;" in html_text  # config shown escaped
    assert "&#34;status&#34;: &#34;completed&#34;" in html_text  # Jinja2's escape of '"' 


@pytest.mark.parametrize("value, text", [
    (0.9383, "0.938"), (2.75, "2.750"), (5100.5, "5100.5"), (3e-4, "0.0003"), (2.5e-5, "2.5e-05"),
    (0.0, "0.000"), (41, "41"), (1.5e7, "1.5e+07"), (float("nan"), "nan"), (True, "True"),
    ({"value": 0.5, "stderr": 0.0123}, "0.500 ± 0.012"), ({"value": 0.5}, "0.500"), ([1, 2], "[1, 2]"),
])
def test_fmt(value, text):
    assert fmt(value) == text


def _colour_pixels(pixels, rgb, tol=40):
    return int((np.abs(pixels.astype(int) - np.array(rgb)).sum(axis=2) < tol).sum())


def test_several_runs_share_axes(make_run, tmp_path):
    a, _ = make_run("lr-1e-4", lr=1e-4)
    b, _ = make_run("lr-3e-4", lr=3e-4, loss0=4.0, status=None)
    one = parse(build_report([a], tmp_path / "one.html"))
    two = parse(build_report([a, b], tmp_path / "two.html", title="lr sweep"))
    orange = (0xFF, 0x7F, 0x0E)  # matplotlib C1: the second run
    loss_one, loss_two = decode_png(one.imgs[0]["src"]), decode_png(two.imgs[0]["src"])
    assert _colour_pixels(loss_one, orange) == 0
    assert _colour_pixels(loss_two, orange) > 300  # the whole second curve, not just a legend swatch
    assert len(two.imgs) == len(one.imgs)  # one figure per metric, runs overlaid
    runs = two.tables[-1]
    assert [r[0] for r in runs[1:]] == ["lr-1e-4", "lr-3e-4"]
    assert runs[2][2] == "no manifest.json (unfinished)"


def test_stages_mapping_and_explicit_summary(make_run, tmp_path):
    sft, _ = make_run("sft")
    out = build_report([], tmp_path / "demo" / "report.html", summary=DEMO_SUMMARY, stages={"sft": sft})
    page = parse(out)
    assert page.tables[0][1][0] == "base" and page.tables[0][2][0] == "sft"
    assert len(page.imgs) == 7
    with pytest.raises(ValueError, match="at least one run directory"):
        build_report([])
    with pytest.raises(FileNotFoundError, match="run 'x'.*is not a directory"):
        build_report([], tmp_path / "r.html", stages={"x": tmp_path / "nope"})


def test_sections_only_report_with_bar_plots(tmp_path):
    """An evaluation's page: summary, a section with a table and two bar plots, no curves, no runs."""
    bars = plot_bars("score per task", ["gen", "mc"], [("base", [0.8, 0.9], [0.03, 0.02]),
                                                       ("tuned", [0.7, 0.9], [0.03, 0.02])])
    deltas = plot_deltas("deltas", ["gen", "mc"], [-0.1, 0.0], [0.05, 0.02], [True, False], threshold=0.02)
    sec = Section("Base vs tuned", "<table><tr><td>gen</td><td>-0.100</td></tr></table>",
                  [("score <per> task", bars), ("deltas", deltas)])
    summary = {"base": {"score": 0.85}, "tuned": {"score": 0.8}}
    out = build_report([], tmp_path / "eval" / "report.html", summary=summary, sections=[sec])
    page = parse(out)
    assert [i["alt"] for i in page.imgs] == ["score <per> task", "deltas"]  # alt escaped in the file, not lost
    for img in page.imgs:
        pixels = decode_png(img["src"])
        assert pixels.shape[1] == 600 and pixels.shape[0] >= 240
        assert (pixels[..., 0] > 150).any() and pixels.std() > 10  # something was drawn
    assert page.tables[0][2] == ["tuned", "0.800-0.050 vs base"] and page.tables[1] == [["gen", "-0.100"]]
    text = out.read_text()
    assert "<h2>Base vs tuned</h2>" in text and "<h2>Curves</h2>" not in text and "<h2>Runs</h2>" not in text
    with pytest.raises(ValueError, match="without run directories needs out="):
        build_report([], sections=[sec])


def test_summary_only_run_and_escaping(tmp_path):
    d = tmp_path / "eval-out"
    d.mkdir()
    summary = {"base": {"acc": {"value": 0.5, "stderr": 0.05}},
               "<b>tuned</b>": {"acc": {"value": 0.75, "stderr": 0.04}, "note": "<script>alert(1)</script>"}}
    (d / "summary.json").write_text(json.dumps(summary))
    out = build_report([d], title="<i>eval</i> & more")
    text = out.read_text()
    assert "<script>" not in text and "<b>tuned</b>" not in text and "<i>eval</i>" not in text
    assert "&lt;b&gt;tuned&lt;/b&gt;" in text and "<title>&lt;i&gt;eval&lt;/i&gt; &amp; more</title>" in text
    page = parse(out)
    assert page.imgs == []
    assert page.tables[0][1] == ["base", "0.500 ± 0.050", "–"]
    assert page.tables[0][2][:2] == ["<b>tuned</b>", "0.750 ± 0.040+0.250 vs base"]
    assert page.tables[-1][1][4] == "no metrics.jsonl"


def test_cli_entry(make_run, tmp_path, capsys):
    run, _ = make_run("r")
    assert report_main([str(run), "--out", str(tmp_path / "x.html")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "x.html")
    assert report_main([str(tmp_path / "missing")]) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_fast_and_leaks_no_figures(make_run):
    import matplotlib.pyplot as plt

    run, _ = make_run("big", steps=1000, eval_every=50)
    build_report([run])  # warm-up: imports and font cache
    # CPU time of this process, so other jobs on a shared machine do not make the test flaky.
    t0 = time.process_time()
    build_report([run])
    cpu = time.process_time() - t0
    assert plt.get_fignums() == []
    assert cpu < 2.0, f"report of a 1000-step run took {cpu:.2f} s of CPU"


def test_reads_what_the_engine_monitor_writes(tmp_path):
    """The engine's own logger writes the file; the report reads it (NaN as a string included)."""
    from posttrain.engine.monitor import Monitor

    mon = Monitor(tmp_path, total_steps=4, progress=False)
    for step, loss in [(1, 2.0), (2, 1.5), (3, float("nan")), (4, 1.0)]:
        mon.log(step, "train", {"loss": loss, "lr": 1e-4 * step})
    mon.log(4, "eval", {"task_accuracy": 0.75, "regression_score": 0.9})
    mon.log(0, "data", {"rows": 1000, "tokens": 32352})  # the engine's dataset statistics
    s = series(read_metrics(tmp_path))
    steps, loss = s["train"]["loss"]
    assert steps == [1, 2, 3, 4] and loss[:2] == [2.0, 1.5] and math.isnan(loss[2]) and loss[3] == 1.0
    assert s["eval"]["task_accuracy"] == ([4], [0.75])
    page = parse(build_report([tmp_path]))
    # no one-point plots (dataset statistics, a single evaluation): they are in the last-values table
    # (elapsed s is drawn only when the four log calls did not land on the same clock tick)
    assert [i["alt"] for i in page.imgs][:2] == ["loss", "learning rate"]
    assert {"task accuracy", "regression score", "rows"}.isdisjoint(i["alt"] for i in page.imgs)
    last = page.tables[0]
    assert last[1][last[0].index("eval/task_accuracy")] == "0.750"
    assert last[1][last[0].index("train/lr")] == "0.0004" and last[1][last[0].index("data/rows")] == "1000"
