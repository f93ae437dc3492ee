"""The studio's pages and JSON API over synthetic run folders (no training, no browser)."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from fastapi.testclient import TestClient

from posttrain.cli import main as cli_main
from posttrain.report.metrics import series
from posttrain.studio.app import Studio, create_app
from posttrain.studio.cli import StudioError, check_host
from tests.report.report_runs import DEMO_SUMMARY, write_run


def rows_of(page: str, table_id: str) -> list[list[str]]:
    body = re.search(rf'<table id="{table_id}">.*?<tbody>(.*?)</tbody>', page, re.S).group(1)
    return [[" ".join(re.sub(r"<[^>]+>", " ", c).split()) for c in re.findall(r"<td[^>]*>(.*?)</td>", tr, re.S)]
            for tr in re.findall(r"<tr.*?</tr>", body, re.S)]


@pytest.fixture
def runs(tmp_path):
    root = tmp_path / "runs"
    write_run(root / "done", steps=40, eval_every=10)
    with (root / "done" / "config.yaml").open("a") as f:
        f.write("model: /models/org/base\n")
    write_run(root / "broken", steps=5, status="failed")
    write_run(root / "guarded", steps=20, eval_every=10)
    m = json.loads((root / "guarded" / "manifest.json").read_text())
    m["result"] = {"stop_reason": "forgetting guard: regression score 0.700 is 0.120 below the start"}
    (root / "guarded" / "manifest.json").write_text(json.dumps(m))
    write_run(root / "live", steps=3, status=None)  # no manifest, metrics written just now
    write_run(root / "stale", steps=3, status=None)
    old = time.time() - 3600
    os.utime(root / "stale" / "metrics.jsonl", (old, old))
    (root / "pipe").mkdir()
    write_run(root / "pipe" / "sft", steps=10, eval_every=5)
    (root / "pipe" / "lineage.json").write_text(json.dumps({"stages": {"sft": {"run_dir": "elsewhere/sft"}}}))
    ev = root / ".studio" / "evals" / "done"
    ev.mkdir(parents=True)
    (ev / "results.json").write_text(json.dumps({"passed": True, "comparison": {"rows": [
        {"task": "mc", "metric": "acc", "base": 0.5, "base_stderr": 0.03, "tuned": 0.62, "tuned_stderr": 0.04,
         "delta": 0.12, "stderr": 0.05}]}}))
    return root


def test_runs_list_statuses_pipeline_row_and_evaluations(runs):
    c = TestClient(create_app(Studio(runs)))
    page = c.get("/").text
    table = {r[1]: r for r in rows_of(page, "runs")}
    assert {k: v[2] for k, v in table.items()} == {
        "done": "completed", "broken": "failed", "guarded": "stopped by the guard", "live": "running",
        "stale": "unfinished", "pipe (pipeline)": "completed", ".studio/evals/done (evaluation)": "completed"}
    done = table["done"]
    assert done[3:5] == ["sft", "org/base"] and done[7] == "40"  # the model's last two path parts
    assert done[6] == "20 s"  # 0.5 s per step in write_run's clock, steps 1..40: 19.5 s, rounded
    # 2.5 e^-1 + 0.4 and 2.5 e^-0.8 + 0.5
    assert done[8] == "final train loss 1.320 · final eval loss 1.623 · task accuracy 1.000"
    assert table["pipe (pipeline)"][3] == "sft completed"  # its stage inside the row, not a row of its own
    assert "pipe/sft" not in table
    api = {e["id"]: e for e in c.get("/api/runs").json()}
    assert api["pipe"]["stages"] == ["pipe/sft"] and api["guarded"]["status"] == "stopped by the guard"


def test_run_metrics_api_groups_curves_like_the_report(runs):
    c = TestClient(create_app(Studio(runs)))
    d = c.get("/api/runs/done/metrics").json()
    assert d["status"] == "completed" and d["last_step"] == 40 and d["events"] == 40 + 4 * 2
    assert d["glance"] == {"stage": "sft", "model": "/models/org/base", "started": "2027-01-15 08:00 UTC", "duration": "20 s"}
    assert [g["name"] for g in d["groups"]] == ["losses", "target metric", "forgetting checks", "optimization",
                                                "throughput"]
    assert [g["folded"] for g in d["groups"]] == [False, False, False, True, True]
    loss = d["groups"][0]["metrics"][0]
    assert loss["key"] == "loss" and [ln["split"] for ln in loss["lines"]] == ["train", "eval"]
    rows = [json.loads(x) for x in (runs / "done" / "metrics.jsonl").read_text().splitlines()]
    assert (loss["lines"][1]["steps"], loss["lines"][1]["values"]) == tuple(map(list, series(rows)["eval"]["loss"]))
    page = c.get("/runs/done").text
    assert "Studio.followRun(\"done\")" in page and "stage: sft" in page and '"Segoe UI"' in page
    # its evaluation against the base (made by "Evaluate vs base") is linked from the run
    assert 'href="/compare?run=.studio/evals/done&amp;run=done" id="evaluation"' in page
    assert 'id="evaluation"' not in c.get("/runs/broken").text
    assert c.get("/runs/nope").status_code == 404
    assert c.get("/runs/../../etc").status_code == 404  # an id never leaves the runs folder
    assert c.get("/api/runs/nope/metrics").json() == {"error": "no run 'nope'"}


def test_compare_with_base_column_deltas_and_standard_errors(runs):
    c = TestClient(create_app(Studio(runs)))
    page = c.get("/compare?run=.studio/evals/done&run=done&run=broken").text
    head = re.search(r'<table id="compare"><thead><tr>(.*?)</tr>', page).group(1)
    assert re.findall(r"<th[^>]*>(.*?)</th>", head) == ["measure", "base", ".studio/evals/done", "done", "broken"]
    table = {r[0]: r[1:] for r in rows_of(page, "compare")}
    # 0.62 - 0.50 = +0.120, se of the difference sqrt(0.03^2 + 0.04^2) = 0.050
    assert table["mc / acc"] == ["0.500 ± 0.030", "0.620 ± 0.040 +0.120 ± 0.050", "–", "–"]
    # done: 2.5 e^(-40/40) + 0.4 = 1.320; broken: 2.5 e^(-5/40) + 0.4 = 2.606, compared with the first value
    assert table["final train loss"] == ["–", "–", "1.320", "2.606 +1.287"]  # 2.606242 - 1.319699


def test_launch_form_shows_errors_inline_and_never_leaves_the_runs_folder(runs):
    studio = Studio(runs)
    c = TestClient(create_app(studio))
    page = c.get("/launch?stage=dpo").text
    assert 'name="dpo.beta"' in page and 'name="train.lr"' in page and "<option selected>dpo</option>" in page
    r = c.post("/launch", data={"_stage": "sft", "output_dir": "new", "train.lr": "-1", "train.max_stepz": "3"})
    assert r.status_code == 422
    assert re.search(r'class="field bad" data-key="train.lr".*?class="err">train.lr: Input should be greater than 0, '
                     r"got -1</div>", r.text, re.S)
    assert "unknown key &#39;train.max_stepz&#39; (did you mean &#39;train.max_steps&#39;?)" in r.text
    assert 'value="-1"' in r.text  # what was typed is kept
    r = c.post("/launch", data={"_stage": "sft", "output_dir": "../outside"})
    assert r.status_code == 422
    assert f"output_dir: must be a folder name under {runs}, got &#39;../outside&#39;" in r.text
    r = c.post("/launch", data={"_stage": "sft", "output_dir": "done"})
    assert "output_dir: done already holds a run; pick a new name" in r.text
    assert c.post("/launch", data={"_stage": "rm -rf"}).status_code == 400
    assert studio.jobs.running() == set()  # nothing was started
    assert c.post("/api/runs/done/cancel").json() == {
        "error": "done is not running (only runs started here can be cancelled)"}


def test_api_key_and_host(capsys):
    with pytest.raises(StudioError, match="refusing to bind 0.0.0.0 without --api-key"):
        check_host("0.0.0.0", None)
    check_host("0.0.0.0", "k")
    check_host("127.0.0.1", None)
    assert cli_main(["studio", "--host", "0.0.0.0"]) == 2
    assert capsys.readouterr().err.startswith("posttrain: error: refusing to bind 0.0.0.0 without --api-key")


def test_the_command_serves_on_127_0_0_1(tmp_path):
    """`posttrain studio` as a user starts it: a process, the default host, the given port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "posttrain", "studio", "--runs", str(tmp_path / "r"),
                             "--port", str(port)], stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr.readline().strip() == f"posttrain studio: {tmp_path / 'r'} on http://127.0.0.1:{port}/"
        for _ in range(100):
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{port}/api/runs", timeout=2).read()
                break
            except OSError:
                time.sleep(0.1)
        assert json.loads(body) == []
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0


def test_api_key_is_required_on_every_page(runs):
    c = TestClient(create_app(Studio(runs, api_key="s3cret")))
    assert c.get("/").status_code == 401 and c.get("/api/runs").status_code == 401
    assert c.get("/", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert c.get("/api/runs", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert c.get("/?key=s3cret").status_code == 200  # the browser way: the key then rides in a cookie
    assert c.get("/api/runs").status_code == 200


def test_an_adviser_result_is_launched_from_its_page(runs):
    from posttrain.plan.advise import write_recipe
    from posttrain.stages import load_config

    adv = runs / "advice"
    adv.mkdir()
    cfg = load_config("sft", None, ["model=/models/base", "data.train=gym:instruct", "train.batch_size=4"])
    write_recipe(adv / "advice.yaml", cfg, "lora", adv, None)
    (adv / "advice.json").write_text(json.dumps({"recommendation": "lora", "reasons": ["small data"], "candidates": [
        {"method": "lora", "expected_score": None, "learning_rate": [1e-4, 2e-4], "fits": True}]}))
    c = TestClient(create_app(Studio(runs)))
    row = {r[1]: r for r in rows_of(c.get("/").text, "runs")}["advice (adviser result)"]
    assert row[4] == "recommends lora · launch it"
    page = c.get("/runs/advice").text
    assert '<b id="recommendation">lora</b>' in page and 'href="/launch?advice=advice"' in page
    cand = re.search(r"<h2>Candidates</h2>.*?<tbody><tr>(.*?)</tr>", page, re.S).group(1)
    assert re.findall(r"<td>(.*?)</td>", cand) == ["lora", "–", "[0.0001, 0.0002]", "True"]
    form = c.get("/launch?advice=advice").text
    filled = dict(re.findall(r'<input name="([^"]+)" id="[^"]+" value="([^"]*)"', form))
    assert filled["model"] == "/models/base" and filled["data.train"] == "gym:instruct"
    assert filled["train.batch_size"] == "4" and filled["train.lr"] == "0.0002"  # the adviser's LoRA rate
    assert re.search(r'<option value="lora" selected>', form)  # adapter.type
    assert "from " in form and "stage &#39;sft&#39;" in form
    assert filled["output_dir"].startswith("sft-")  # a fresh folder, not the adviser's
    assert c.get("/launch?advice=nope").status_code == 404


def test_compare_a_pipelines_stages_with_its_base_row(runs):
    (runs / "pipe" / "summary.json").write_text(json.dumps(DEMO_SUMMARY))  # the demo's shape
    c = TestClient(create_app(Studio(runs)))
    assert 'href="/compare?run=pipe"' in c.get("/runs/pipe").text
    page = c.get("/compare?run=pipe").text
    head = re.search(r'<table id="compare"><thead><tr>(.*?)</tr>', page).group(1)
    assert re.findall(r"<th[^>]*>(.*?)</th>", head) == ["measure", "base", "pipe: sft"]
    table = {r[0]: r[1:] for r in rows_of(page, "compare")}
    assert table["task_accuracy"] == ["0.062", "0.938 +0.877"]  # 0.9383 - 0.0617
    assert table["train_time_s"] == ["–", "41"]
    assert '<option value="pipe/sft" >pipe/sft</option>' in page  # its runs can be compared one by one


def test_the_runs_folder_itself_is_a_pipeline(runs):
    """`posttrain studio --runs demo-out`: the demo's folder holds lineage.json and its stages."""
    pipe = runs / "pipe"
    (pipe / "summary.json").write_text(json.dumps(DEMO_SUMMARY))
    c = TestClient(create_app(Studio(pipe)))
    assert [r[1:3] for r in rows_of(c.get("/").text, "runs")] == [["pipe (pipeline)", "completed"]]
    assert "Compare the stages with the base" in c.get("/runs/pipe").text
    assert c.get("/runs/sft").status_code == 200 and c.get("/api/runs/sft/metrics").json()["last_step"] == 10


def test_chat_errors_are_one_line_json(runs):
    run = runs / "done"
    (run / "adapter").mkdir()
    (run / "adapter" / "adapter_config.json").write_text("{}")
    with (run / "config.yaml").open("a") as f:
        f.write("model: /nonexistent/base\n")
    c = TestClient(create_app(Studio(runs)))
    msgs = [{"role": "user", "content": "hi"}]
    r = c.post("/api/chat", json={"run": "broken", "conversations": {"base": msgs}})
    assert r.status_code == 404 and r.json()["error"].startswith("run 'broken': no adapter to chat with")
    r = c.post("/api/chat", json={"run": "done", "conversations": {"tuned": msgs}})
    assert r.json() == {"error": "conversations: expected {base: [messages], adapter: [messages]}"}
    r = c.post("/api/chat", json={"run": "done", "conversations": {"base": msgs}})
    assert r.status_code == 500 and r.json()["error"].startswith("could not answer with /nonexistent/base: ")
