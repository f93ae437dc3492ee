"""The studio end to end in a real headless Chromium (Debian's, driven by Playwright), on the bundled model.

Launch a short LoRA SFT run from the form (after an inline validation error), watch its loss curve
gain points while it trains, open it when done, evaluate it against the base model and compare,
chat with its adapter next to the base, and cancel a second run. With POSTTRAIN_STUDIO_SHOTS=DIR
set, a screenshot of each page is written there (docs/studio/*.png come from this test).
"""

import json
import os
import socket
import threading
import time
from pathlib import Path

import pytest

from posttrain.gym import base_model_path

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not Path(CHROMIUM).exists(),
    reason=f"{CHROMIUM} missing: install Debian's chromium (apt-get install chromium) to run the browser test")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def studio_url(tmp_path):
    uvicorn = pytest.importorskip("uvicorn")
    from posttrain.studio.app import Studio, create_app

    studio = Studio(tmp_path / "runs")
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(studio), host="127.0.0.1", port=port, log_level="warning"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    while not server.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", studio
    server.should_exit = True
    t.join(30)


def _shot(page, name):
    d = os.environ.get("POSTTRAIN_STUDIO_SHOTS")
    if d:
        Path(d).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(d) / f"{name}.png"), full_page=True)


def _points(page) -> int:
    loc = page.locator('.chart[data-metric="loss"] polyline[data-split="train"]')
    return int(loc.get_attribute("data-points")) if loc.count() else 0


def test_launch_watch_compare_chat_cancel(studio_url):
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    url, studio = studio_url
    timings = {}
    t_all = time.perf_counter()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(url + "/")
            assert "No runs yet" in page.inner_text("body")

            # Launch: a bad value first, shown next to its field with the CLI's words
            page.goto(url + "/launch?stage=sft")
            page.fill("#f-model", str(base_model_path()))
            page.fill('[id="f-data.train"]', "gym:instruct")
            page.fill('[id="f-data.limit"]', "64")
            page.fill("#f-output_dir", "sft-tiny")
            page.select_option('[id="f-adapter.type"]', "lora")
            page.fill('[id="f-train.max_steps"]', "60")
            page.fill('[id="f-train.batch_size"]', "4")
            page.fill('[id="f-train.lr"]', "-1")
            page.click("#start")
            err = page.locator('.field.bad[data-key="train.lr"] .err')
            assert err.inner_text() == "train.lr: Input should be greater than 0, got -1"
            assert page.input_value("#f-model") == str(base_model_path())  # the rest of the form is kept
            _shot(page, "launch")
            page.fill('[id="f-train.lr"]', "5e-4")
            t0 = time.perf_counter()
            page.click("#start")
            page.wait_for_url(url + "/runs/sft-tiny")

            # A run: the loss curve gains points while it trains
            page.wait_for_function("() => { const l = document.querySelector("
                                   "'.chart[data-metric=\"loss\"] polyline[data-split=\"train\"]');"
                                   " return l && +l.dataset.points >= 2; }", timeout=240_000)
            first = _points(page)
            assert page.inner_text("#status") == "running"
            _shot(page, "run-live")
            page.wait_for_function(f"() => +document.querySelector('.chart[data-metric=\"loss\"] "
                                   f"polyline[data-split=\"train\"]').dataset.points > {first}", timeout=120_000)
            assert _points(page) > first
            page.wait_for_function("() => document.getElementById('status').textContent === 'completed'",
                                   timeout=240_000)
            timings["launch_to_completed_s"] = round(time.perf_counter() - t0, 1)
            # the page reloads once when the run ends (its summary was rendered while it ran)
            page.wait_for_function("() => { const l = document.querySelector("
                                   "'.chart[data-metric=\"loss\"] polyline[data-split=\"train\"]');"
                                   " return l && +l.dataset.points === 60; }", timeout=30_000)
            assert page.locator(".card dd").first.inner_text().startswith("completed sft · ")
            rows = [json.loads(x) for x in (studio.runs / "sft-tiny" / "metrics.jsonl").read_text().splitlines()]
            assert [r["step"] for r in rows if r.get("split") == "train"] == list(range(1, 61))
            assert page.locator("#cancel").is_hidden()

            # open it when done (a fresh load, as a user coming back), with its data audit
            page.goto(url + "/runs/sft-tiny")
            assert page.inner_text("#status") == "completed"
            page.click("#load-audit")
            page.wait_for_selector("#audit-example mark", timeout=60_000)
            assert page.locator("#audit-example mark").count() >= 1
            _shot(page, "run-done")

            # compare with the base: posttrain eval --baseline in the background
            t0 = time.perf_counter()
            page.click("#evaluate")
            page.wait_for_selector("#eval-done", timeout=300_000)
            timings["evaluate_s"] = round(time.perf_counter() - t0, 1)
            assert page.inner_text("#eval-done") == "evaluation done: compare with the base"
            page.click("#eval-done")
            heads = page.locator("#compare thead th").all_inner_texts()
            assert heads == ["measure", "base", ".studio/evals/sft-tiny", "sft-tiny"]
            res = json.loads((studio.runs / ".studio/evals/sft-tiny/results.json").read_text())
            first_row = res["comparison"]["rows"][0]
            cells = page.locator("#compare tbody tr").first.locator("td").all_inner_texts()
            assert cells[0] == f"{first_row['task']} / {first_row['metric']}"
            assert cells[1] == f"{first_row['base']:.3f} ± {first_row['base_stderr']:.3f}"
            assert cells[2].split()[:3] == [f"{first_row['tuned']:.3f}", "±", f"{first_row['tuned_stderr']:.3f}"]
            _shot(page, "compare")

            # chat with its adapter next to the base
            t0 = time.perf_counter()
            page.goto(url + "/playground?run=sft-tiny")
            page.fill("#prompt", "Reverse the word: apple")
            page.click("#send")
            page.wait_for_selector("#col-adapter .msg.assistant", timeout=120_000)
            timings["first_chat_s"] = round(time.perf_counter() - t0, 1)
            assert page.locator("#col-base .msg.assistant").count() == 1
            assert page.inner_text("#chatmsg") == ""
            _shot(page, "playground")

            # the runs list, then a second run cancelled from its page
            page.goto(url + "/")
            assert page.locator('tr[data-run="sft-tiny"] .status').inner_text() == "completed"
            _shot(page, "runs")
            page.goto(url + "/launch?stage=sft")
            page.fill("#f-model", str(base_model_path()))
            page.fill('[id="f-data.train"]', "gym:instruct")
            page.fill("#f-output_dir", "to-cancel")
            page.select_option('[id="f-adapter.type"]', "lora")
            page.fill('[id="f-train.max_steps"]', "100000")
            page.click("#start")
            page.wait_for_url(url + "/runs/to-cancel")
            page.wait_for_function("() => { const l = document.querySelector("
                                   "'.chart[data-metric=\"loss\"] polyline[data-split=\"train\"]');"
                                   " return l && +l.dataset.points >= 1; }", timeout=240_000)
            page.click("#cancel")
            page.wait_for_function("() => document.getElementById('jobmsg').textContent === 'process cancelled'",
                                   timeout=60_000)
            job = studio.jobs.get("to-cancel")
            assert job.proc.returncode is not None and job.state() == "cancelled"
            # Ctrl-C's way: the run signs itself off as failed
            manifest = json.loads((studio.runs / "to-cancel" / "manifest.json").read_text())
            assert manifest["status"] == "failed" and manifest["error"] == "KeyboardInterrupt"
            page.wait_for_function("() => document.getElementById('status').textContent === 'failed'",
                                   timeout=30_000)
        finally:
            browser.close()
    timings["total_s"] = round(time.perf_counter() - t_all, 1)
    print(json.dumps(timings))
