"""The batching engine: a request's greedy tokens do not depend on the rest of the batch, and every
adapter type computes what the adapted model computes on its own."""

import threading

import pytest
import torch

from posttrain.gym import base_model_path
from posttrain.models.adapters import load_adapter
from posttrain.models.loading import load
from posttrain.rollout import SamplingParams
from posttrain.serve.engine import Engine
from posttrain.serve.requests import Request

GREEDY = SamplingParams(max_new_tokens=16, temperature=0)


@pytest.fixture(scope="module")
def engine(served_adapters):
    model, tok = load(base_model_path(), device="cpu")
    eng = Engine(model, tok, max_batch=24)
    for name, path in served_adapters.items():
        eng.adapters.load(name, path)
    eng.start()
    yield eng
    eng.stop()


def prompts(tok, k):
    rows = [tok.apply_chat_template([{"role": "user", "content": f"What is {i} plus {2 * i + 1}?" + " Think." * (i % 3)}],
                                    add_generation_prompt=True, tokenize=False) for i in range(k)]
    return [tok(r, add_special_tokens=False)["input_ids"] for r in rows]


def test_greedy_alone_equals_full_mixed_batch(engine):
    names = [None, "lora-a", "lora-b", "dora", "prompt", "prefix"]
    ps = prompts(engine.tokenizer, 4)  # 4 prompts x 6 models = 24 rows, the whole batch
    alone = {(i, n): engine.generate(p, GREEDY, n).tokens for i, p in enumerate(ps) for n in names}
    for n in names[1:]:  # every adapter really changes some answer
        assert any(alone[(i, n)] != alone[(i, None)] for i in range(len(ps))), n
    reqs = {(i, n): Request(p, GREEDY, engine.adapters.adapters[n] if n else None)
            for i, p in enumerate(ps) for n in names}
    before = engine.stats["max_running"]
    engine.stats["max_running"] = 0
    # submitted in one go, they are admitted together: every step decodes a full mixed batch
    for r in reqs.values():
        engine.submit(r)
    while any(r.finish_reason is None for r in reqs.values()):
        threading.Event().wait(0.01)
    assert engine.stats["max_running"] == 24
    engine.stats["max_running"] = max(before, 24)
    assert {k: r.tokens for k, r in reqs.items()} == alone


def test_requests_join_between_steps(engine):
    """A request submitted while others decode joins the running batch and still matches its solo run."""
    p = prompts(engine.tokenizer, 6)
    long = SamplingParams(max_new_tokens=40, temperature=0)
    solo = [engine.generate(q, long, "lora-a").tokens for q in p[:3]]
    first = [engine.submit(Request(q, long, engine.adapters.adapters["lora-a"])) for q in p[:2]]
    while len(first[0].tokens) < 5:
        threading.Event().wait(0.005)
    late = engine.submit(Request(p[2], long, engine.adapters.adapters["lora-a"]))
    while late.finish_reason is None or any(r.finish_reason is None for r in first):
        threading.Event().wait(0.01)
    assert [r.tokens for r in first] + [late.tokens] == solo
    assert len(first[0].tokens) >= 5


@pytest.mark.parametrize("name", ["lora-b", "dora", "prompt", "prefix"])
def test_adapter_matches_the_adapted_model(engine, served_adapters, name):
    """Served tokens equal `generate` of the model with the adapter attached (PEFT-format loading)."""
    model, tok = load(base_model_path(), device="cpu")
    load_adapter(model, served_adapters[name])
    p = prompts(tok, 1)[0]
    ids = torch.tensor([p])
    ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False,
                         pad_token_id=tok.pad_token_id)[0, len(p):].tolist()
    got = engine.generate(p, GREEDY, name).tokens
    assert got == ref[:len(got)]
    assert len(got) == len(ref) or got[-1] in engine.stop_ids
