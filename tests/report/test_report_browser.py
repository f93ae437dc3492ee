"""Open report.html in a real headless Chromium (Debian's, driven by Playwright) and check it renders."""

import json
import shutil
import time
from pathlib import Path

import pytest
from .report_runs import DEMO_SUMMARY

from posttrain.report import build_report

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists(),
    reason=f"{CHROMIUM} missing: install Debian's chromium (apt-get install chromium) to run the browser test",
)


def test_report_renders_in_chromium(make_run, tmp_path):
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    a, _ = make_run("sft")
    b, _ = make_run("sft-high-lr", lr=3e-4, loss0=4.0)
    out = build_report([a], tmp_path / "report.html", summary=DEMO_SUMMARY, stages={"sft-high-lr": b})

    t0 = time.perf_counter()
    requests = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("request", lambda r: requests.append(r.url))
            page.goto(out.as_uri(), wait_until="load")
            assert page.title() == "posttrain report: sft, sft-high-lr"
            summary = page.locator("table").first
            rows = summary.locator("tr")
            assert rows.count() == 3
            assert rows.nth(1).locator("td").all_inner_texts()[:3] == ["base", "0.062", "0.941"]
            sft_cells = rows.nth(2).locator("td").all_inner_texts()
            assert sft_cells[0] == "sft"
            assert sft_cells[1].split() == ["0.938", "+0.877", "vs", "base"]
            imgs = page.evaluate(
                "() => Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth, i.naturalHeight])"
            )
            assert len(imgs) == 7
            for alt, complete, w, h in imgs:
                assert complete and (w, h) == (500, 320), alt
            # Collapsed config opens on click and shows the escaped text as text.
            details = page.locator("details", has=page.locator("pre")).first  # (curves fold in details too)
            assert not details.evaluate("d => d.open")
            details.locator("summary").click()
            assert "name: <adamw>" in details.locator("pre").inner_text()
            # optimization and throughput plots are folded; one click opens them
            fold = page.locator("details.more").first
            assert fold.locator("h4").text_content() == "optimization" and not fold.evaluate("d => d.open")
            fold.locator("summary").click()
            assert fold.locator("img").first.is_visible()
            shot = tmp_path / "report.png"
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    elapsed = time.perf_counter() - t0
    # Self-contained: the only thing fetched is the page itself (data: URIs are not requests).
    assert requests == [out.as_uri()]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 50_000
    keep = Path("/tmp/posttrain-report-screenshot.png")
    if keep.parent.exists():  # left for a human to look at; not part of the assertion
        shutil.copy(shot, keep)
    print(json.dumps({"browser_s": round(elapsed, 2)}))


def test_eval_report_renders_its_delta_table_and_plots_in_chromium(tiny_models, tokenizer, tmp_path):
    """`posttrain eval --baseline ... --out DIR` on two real tiny checkpoints; the page as a browser shows it."""
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    from posttrain.eval.report import ALT_DELTAS, ALT_SCORES
    from posttrain.eval.runner import evaluate
    from posttrain.models.tiny import build_tiny_model
    from tests.eval.conftest import write_task

    base = tiny_models("qwen2")
    tuned = build_tiny_model("qwen2", tmp_path / "tuned", tokenizer=tokenizer, seed=1)
    rows = [{"prompt": p, "choices": [" 2", " 5", " elppa"], "label": i % 3}
            for i, p in enumerate(["Hello", "What is 2 + 3?", "Reverse apple:", "Numbers 0 1", "The answer is"])]
    task = write_task(tmp_path / "suite", "mc", {"kind": "multiple_choice"}, rows)
    res = evaluate(str(tuned), suite=task, baseline=str(base), out=tmp_path / "eval", verbose=False)
    out = tmp_path / "eval" / "report.html"
    expected = [[r["task"], r["metric"], f"{r['base']:.3f} ± {r['base_stderr']:.3f}",
                 f"{r['tuned']:.3f} ± {r['tuned_stderr']:.3f}", f"{r['delta']:+.3f} ± {r['stderr']:.3f}",
                 "REGRESSION" if r["regression"] else ("*" if r["significant"] else "")]
                for r in res["comparison"]["rows"]]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(out.as_uri(), wait_until="load")
            assert page.title() == f"posttrain eval: mc ({tuned})"
            assert page.locator("h2").all_inner_texts() == ["Summary", "Base vs tuned"]
            table = page.locator("table").nth(1)
            assert table.locator("th").all_inner_texts() == ["task", "metric", "base", "tuned", "delta ± se", "flag"]
            body = table.locator("tbody tr")
            assert [body.nth(i).locator("td").all_inner_texts() for i in range(body.count())] == expected
            imgs = page.evaluate(
                "() => Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth, i.naturalHeight])"
            )
            assert [alt for alt, *_ in imgs] == [ALT_SCORES, ALT_DELTAS]
            for alt, complete, w, h in imgs:
                assert complete and w == 600 and h >= 240, (alt, w, h)
        finally:
            browser.close()
