"""`posttrain serve` as a process (binding rules, Ctrl-C drains) and `posttrain chat`."""

import io
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

try:  # the HTTP client the openai package ships with: httpx2 in this project's registry, httpx upstream
    import httpx2 as httpx
except ImportError:
    import httpx
import pytest

from posttrain.cli import main
from posttrain.gym import base_model_path
from posttrain.data.tools import render_prompt
from posttrain.rollout import SamplingParams
from posttrain.serve.cli import build_engine, chat_main
from tests.serve.test_server import free_port


def test_refuses_public_host_without_api_key(capsys):
    assert main(["serve", str(base_model_path()), "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err
    assert "refusing to bind 0.0.0.0 without --api-key" in err


def test_bad_adapter_is_one_line(capsys, tmp_path):
    assert main(["serve", str(base_model_path()), "--adapter", f"x={tmp_path}"]) == 2
    assert capsys.readouterr().err.strip() == (f"posttrain: error: --adapter x={tmp_path}: {tmp_path} is not an "
                                               "adapter directory: adapter_config.json is missing")


def test_ctrl_c_drains_open_requests_then_exits():
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "posttrain", "serve", str(base_model_path()), "--port", str(port),
                             "--served-model-name", "base", "--log-level", "warning"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        t0 = time.monotonic()
        while True:
            assert proc.poll() is None, proc.stderr.read()
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() - t0 < 120
            time.sleep(0.2)
        result = {}
        body = {"model": "base", "prompt": "The", "max_tokens": 300, "ignore_eos": True}
        t = threading.Thread(target=lambda: result.update(r=httpx.post(url + "/v1/completions", json=body,
                                                                       timeout=120)))
        t.start()
        while httpx.get(url + "/health").json()["running"] == 0:
            time.sleep(0.01)
        proc.send_signal(signal.SIGINT)
        t.join(120)
        assert proc.wait(60) == 0
        r = result["r"]
        assert r.status_code == 200
        # the request that was running when Ctrl-C came finished in full
        assert r.json()["choices"][0]["finish_reason"] == "length"
        assert r.json()["usage"]["completion_tokens"] == 300
    finally:
        if proc.poll() is None:
            proc.kill()


def test_chat_streams_answers_and_keeps_history(served_adapters):
    out = io.StringIO()
    chat_main([str(base_model_path()), "--adapter", str(served_adapters["lora-a"]), "--max-tokens", "12"],
              stdin=io.StringIO("What is 2 plus 3?\nAnd 4 plus 4?\n/reset\n/quit\n"), stdout=out)
    text = out.getvalue()
    assert text.count("model> ") == 2 and "(conversation reset)" in text
    answers = [part.split("\nyou> ")[0] for part in text.split("model> ")[1:]]
    # the same answers as the engine gives the same conversation, the second turn seeing the first
    engine = build_engine(str(base_model_path()), {"a": str(served_adapters["lora-a"])}, max_batch=1).start()
    try:
        history, expected = [], []
        for q in ("What is 2 plus 3?", "And 4 plus 4?"):
            history.append({"role": "user", "content": q})
            ids = engine.tokenizer(render_prompt(engine.tokenizer, history), add_special_tokens=False)["input_ids"]
            expected.append(engine.generate(ids, SamplingParams(max_new_tokens=12, temperature=0), "a").text)
            history.append({"role": "assistant", "content": expected[-1]})
    finally:
        engine.stop()
    assert answers == expected


def test_model_that_is_an_adapter_run_is_served_merged(served_adapters, tmp_path):
    from posttrain.models.loading import load_tokenizer
    from posttrain.serve.cli import ServeError

    def run_model(name):  # what an adapter run's model/ holds: the adapter and the tokenizer
        out = tmp_path / name
        shutil.copytree(served_adapters[name], out)
        load_tokenizer(base_model_path()).save_pretrained(str(out))
        return str(out)

    merged = build_engine(run_model("lora-a"), {}, max_batch=1).start()
    unmerged = build_engine(str(base_model_path()), {"a": str(served_adapters["lora-a"])}, max_batch=1).start()
    try:
        ids = merged.tokenizer("Q: What is 2 plus 3?\nA:")["input_ids"]
        greedy = SamplingParams(max_new_tokens=8, temperature=0)
        assert merged.generate(ids, greedy).tokens == unmerged.generate(ids, greedy, "a").tokens
    finally:
        merged.stop()
        unmerged.stop()
    with pytest.raises(ServeError, match="is a prompt-tuning run, which cannot be merged into its base"):
        build_engine(run_model("prompt"), {})
