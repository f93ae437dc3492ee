"""The server through the official `openai` client against a real uvicorn on 127.0.0.1."""

import json
import socket
import threading
import time

try:  # the HTTP client the openai package ships with: httpx2 in this project's registry, httpx upstream
    import httpx2 as httpx
except ImportError:
    import httpx
import openai
import pytest

from posttrain.gym import base_model_path
from posttrain.serve.app import Server, create_app
from posttrain.serve.cli import build_engine

uvicorn = pytest.importorskip("uvicorn")

BASE = "base"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(served_adapters):
    engine = build_engine(str(base_model_path()), {"lora-a": str(served_adapters["lora-a"]),
                                                   "prefix": str(served_adapters["prefix"])}, max_batch=16)
    srv = Server(engine, base_name=BASE, max_model_len=256)
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(create_app(srv), host="127.0.0.1", port=port, log_level="warning"))
    t = threading.Thread(target=uv.run, daemon=True)
    t.start()
    while not uv.started:
        time.sleep(0.05)
    yield srv, f"http://127.0.0.1:{port}"
    uv.should_exit = True
    t.join(30)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[1] + "/v1", api_key="unused", max_retries=0)


def chat(client, model, text, **kw):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": text}],
                                          temperature=kw.pop("temperature", 0), max_tokens=kw.pop("max_tokens", 20),
                                          **kw)


def test_models_lists_base_and_adapters(client):
    assert [m.id for m in client.models.list().data] == [BASE, "lora-a", "prefix"]


def test_chat_greedy_per_adapter_and_usage(client, server):
    srv = server[0]
    out = {m: chat(client, m, "What is 2 plus 3?") for m in (BASE, "lora-a", "prefix")}
    texts = {m: r.choices[0].message.content for m, r in out.items()}
    assert len(set(texts.values())) == 3  # each adapter changes the answer
    # the same answer as the engine gives the same prompt directly
    ids = srv.tokenizer(srv.tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 plus 3?"}],
                                                          add_generation_prompt=True, tokenize=False),
                        add_special_tokens=False)["input_ids"]
    from posttrain.rollout import SamplingParams
    direct = srv.engine.generate(ids, SamplingParams(max_new_tokens=20, temperature=0), "lora-a")
    assert texts["lora-a"] == direct.text
    u = out["lora-a"].usage
    assert (u.prompt_tokens, u.completion_tokens) == (len(ids), len(direct.tokens))
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens


def test_streaming_equals_plain(client):
    plain = chat(client, "lora-a", "Name a colour.").choices[0].message.content
    stream = chat(client, "lora-a", "Name a colour.", stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain
    assert chunks[-1].usage.completion_tokens > 0
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")


def test_completions_logprobs_and_stop(client):
    r = client.completions.create(model=BASE, prompt="Q: What is 2 plus 3?\nA:", max_tokens=8, temperature=0,
                                  logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == r.usage.completion_tokens == len(lp.token_logprobs) == len(lp.top_logprobs)
    # greedy: the chosen token is the most likely one
    assert all(abs(max(top.values()) - v) < 1e-5 for top, v in zip(lp.top_logprobs, lp.token_logprobs))
    full = r.choices[0].text
    cut = full[len(full) // 2:][:2]
    r2 = client.completions.create(model=BASE, prompt="Q: What is 2 plus 3?\nA:", max_tokens=8, temperature=0,
                                   stop=[cut])
    assert r2.choices[0].text == full[:full.index(cut)]
    assert r2.choices[0].finish_reason == "stop"


def test_seeded_sampling_repeats_and_n(client):
    a = chat(client, BASE, "Tell me a fact.", temperature=1.0, seed=7, n=2)
    b = chat(client, BASE, "Tell me a fact.", temperature=1.0, seed=7, n=2)
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert [c.index for c in a.choices] == [0, 1]
    assert a.choices[0].message.content != a.choices[1].message.content  # choice i is seeded with seed + i


def test_errors_have_openai_shape(client, server):
    with pytest.raises(openai.NotFoundError) as e:
        chat(client, "nope", "hi")
    assert e.value.status_code == 404
    assert "The model 'nope' does not exist. Available models: base, lora-a, prefix" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=BASE, messages=[{"role": "bot", "content": "hi"}])
    assert e.value.body["param"] == "messages.0.role"
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, BASE, "hi " * 300)
    assert "maximum context length is 256 tokens" in e.value.message
    r = httpx.post(server[1] + "/v1/chat/completions", content=b"{not json")
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("the request body is not valid JSON")
    r = httpx.post(server[1] + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 400 and r.json()["error"] == {
        "message": "model: field required", "type": "invalid_request_error", "param": "model", "code": None}


WEATHER = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


@pytest.mark.parametrize("choice", ["auto", "required", {"type": "function", "function": {"name": "get_weather"}}])
def test_tool_calls_parsed(client, choice):
    r = chat(client, BASE, "What is the weather in Paris?", tools=WEATHER, tool_choice=choice, max_tokens=40)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls"
    call = c.message.tool_calls[0]
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    assert set(json.loads(call.function.arguments)) == {"city"}
    # streamed: the same call, in one delta at the end
    chunks = list(chat(client, BASE, "What is the weather in Paris?", tools=WEATHER, tool_choice=choice,
                       max_tokens=40, stream=True))
    calls = [tc for ch in chunks for tc in (ch.choices[0].delta.tool_calls or [])]
    assert [(t.function.name, t.function.arguments) for t in calls] == [("get_weather", call.function.arguments)]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tool_choice_errors(client):
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, BASE, "hi", tools=WEATHER, tool_choice={"type": "function", "function": {"name": "nope"}})
    assert e.value.body["param"] == "tool_choice.function.name"
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, BASE, "hi", tool_choice="required")
    assert e.value.body["message"] == "tool_choice 'required' needs 'tools'"


def test_load_and_unload_adapter_while_serving(client, server, served_adapters):
    url = server[1] + "/v1"
    r = httpx.post(url + "/load_lora_adapter", json={"lora_name": "dora", "lora_path": str(served_adapters["dora"])})
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'dora' added successfully."
    assert "dora" in [m.id for m in client.models.list().data]
    text = chat(client, "dora", "What is 2 plus 3?").choices[0].message.content
    assert text != chat(client, BASE, "What is 2 plus 3?").choices[0].message.content
    r = httpx.post(url + "/load_lora_adapter", json={"lora_name": "dora", "lora_path": str(served_adapters["dora"])})
    assert (r.status_code, r.json()["error"]["message"]) == (400, "The model 'dora' is already loaded")
    r = httpx.post(url + "/load_lora_adapter", json={"lora_name": "x", "lora_path": "/nonexistent"})
    assert r.status_code == 400 and "adapter_config.json is missing" in r.json()["error"]["message"]
    r = httpx.post(url + "/unload_lora_adapter", json={"lora_name": "dora"})
    assert r.status_code == 200
    with pytest.raises(openai.NotFoundError):
        chat(client, "dora", "hi")
    r = httpx.post(url + "/unload_lora_adapter", json={"lora_name": "dora"})
    assert r.status_code == 404
    # the LoRA left behind still answers as before the load
    assert [m.id for m in client.models.list().data] == [BASE, "lora-a", "prefix"]


def _wait_for(cond, timeout=20.0):
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, "timed out"
        time.sleep(0.02)


def test_disconnect_cancels_generation(server):
    srv, url = server
    engine = srv.engine
    # ignore_eos: 240 tokens whatever the model says, so the client always leaves first
    body = {"model": "lora-a", "prompt": "The", "max_tokens": 240, "ignore_eos": True}
    before = engine.stats["cancelled"]
    with httpx.Client(timeout=30) as h:
        with h.stream("POST", url + "/v1/completions", json={**body, "stream": True}) as r:
            lines = r.iter_lines()
            while not next(lines).startswith("data: "):
                pass
    _wait_for(lambda: engine.stats["cancelled"] == before + 1 and engine.num_running == 0)
    # a plain (non-streaming) request whose client gives up is cancelled too
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/completions", json=body, timeout=0.3)
    _wait_for(lambda: engine.stats["cancelled"] == before + 2 and engine.num_running == 0)


def test_api_key(server):
    srv, url = server
    srv.api_key = "s3cret"
    try:
        r = httpx.get(url + "/v1/models")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(url + "/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert httpx.get(url + "/health").status_code == 200
    finally:
        srv.api_key = None
