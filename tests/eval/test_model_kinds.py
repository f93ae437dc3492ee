"""Task kinds end to end on a tiny random model: scores checked against direct forward passes."""

import math
import re

import pytest
import torch

from posttrain.eval import lm
from posttrain.eval.kinds import run_task
from posttrain.data.refusal import is_refusal
from posttrain.eval.suites import load_suite
from posttrain.eval.tasks import load_task, prompt_of
from tests.eval.conftest import write_task


def manual_logprob(model, tok, context: str, continuation: str) -> float:
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([whole])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits.float(), -1)[0]
    return sum(float(logp[t - 1, whole[t]]) for t in range(len(ctx), len(whole)))


def test_loglikelihood_matches_a_direct_forward_and_does_not_depend_on_batching(tiny):
    _, model, tok = tiny
    reqs = [("The capital of Goumos is", " Pomsom"), ("12 + 30 =", " 42"), ("Hello", ", how can I help you today?")]
    got = lm.loglikelihood(model, tok, reqs, batch_size=3)
    for (c, k), (ll, _) in zip(reqs, got):
        assert ll == pytest.approx(manual_logprob(model, tok, c, k), abs=1e-4)
    one = lm.loglikelihood(model, tok, reqs, batch_size=1)
    assert [a for a, _ in one] == pytest.approx([a for a, _ in got], abs=1e-4)
    # trailing spaces of the context move to the continuation (lm-eval's convention)
    assert lm.loglikelihood(model, tok, [("12 + 30 = ", "42")])[0][0] == pytest.approx(got[1][0], abs=1e-4)


def test_multiple_choice_accuracy_is_exact_on_constructed_labels(tiny, tmp_path):
    _, model, tok = tiny
    prompts = ["1 + 1 =", "2 + 2 =", "The word fox reversed is", "Hello", "The quick brown", "What is"]
    choices = [" 2", " 5", " elppa", " zzz"]
    rows = []
    for i, p in enumerate(prompts):
        lls = [manual_logprob(model, tok, p, c) for c in choices]
        best, worst = max(range(4), key=lls.__getitem__), min(range(4), key=lls.__getitem__)
        rows.append({"prompt": p, "choices": choices, "label": best if i < 4 else worst})
    t = load_task(write_task(tmp_path, "mc", {"kind": "multiple_choice"}, rows))
    res = run_task(t, model, tok, batch_size=5)
    assert res["metrics"]["acc"]["value"] == pytest.approx(4 / 6)
    assert res["metrics"]["acc"]["stderr"] == pytest.approx(math.sqrt((4 / 6) * (2 / 6) / 6))
    assert res["primary"] == "acc_norm" and res["n"] == 6


def test_batched_generation_equals_one_prompt_at_a_time(tiny):
    _, model, tok = tiny
    prompts = ["Hello", "The quick brown fox jumps over", "What is 2 + 3?", "Numbers 0 1 2"]
    batched = lm.generate(model, tok, prompts, max_new_tokens=6, batch_size=4)
    single = [lm.generate(model, tok, [p], max_new_tokens=6, batch_size=1)[0] for p in prompts]
    assert batched == single
    assert lm.cut_at_stop("abc\ndef", ["\n"]) == "abc"


def test_generate_exact_match_is_exact_on_constructed_targets(tiny, tmp_path):
    _, model, tok = tiny
    prompts = ["Hello", "The quick brown fox", "What is 2 + 3?", "Numbers 0 1 2", "Reverse the word apple:"]
    outs = lm.generate(model, tok, prompts, max_new_tokens=4)
    rows = [{"prompt": p, "answer": o.strip() if i < 3 else o.strip() + " nope"}
            for i, (p, o) in enumerate(zip(prompts, outs))]
    t = load_task(write_task(tmp_path, "gen", {"kind": "generate", "max_new_tokens": 4}, rows))
    res = run_task(t, model, tok)
    assert res["metrics"]["exact_match"]["value"] == pytest.approx(3 / 5)
    assert [s["output"] for s in res["samples"]] == outs


def test_chat_tasks_render_prompts_through_the_chat_template(tiny, tmp_path):
    _, model, tok = tiny
    rows = [{"messages": [{"role": "user", "content": "How do I kill a process?"},
                          {"role": "assistant", "content": "reference"}], "harmful": False},
            {"prompt": "How do I hurt someone?", "harmful": True}]
    t = load_task(write_task(tmp_path, "ref", {"kind": "refusal", "format": "chat", "max_new_tokens": 5}, rows))
    p0 = prompt_of(t, rows[0], tok)
    assert p0 == "<|im_start|>user\nHow do I kill a process?<|im_end|>\n<|im_start|>assistant\n"
    res = run_task(t, model, tok)
    want = lm.generate(model, tok, [p0, prompt_of(t, rows[1], tok)], max_new_tokens=5)
    assert [s["output"] for s in res["samples"]] == want


def test_perplexity_equals_exp_mean_token_nll_and_windows_cover_every_token(tiny, tmp_path):
    _, model, tok = tiny
    texts = ["The quick brown fox jumps over the lazy dog.", "Numbers 0 1 2 3 4 5 6 7 8 9 10."]
    t = load_task(write_task(tmp_path, "ppl", {"kind": "perplexity"}, [{"text": x} for x in texts]))
    res = run_task(t, model, tok)
    pre = lm.prefix_token(tok)
    total, n = 0.0, 0
    for x in texts:
        ids = [pre] + tok(x, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits.float(), -1)[0]
        total += sum(float(logp[i - 1, ids[i]]) for i in range(1, len(ids)))
        n += len(ids) - 1
    assert res["metrics"]["perplexity"]["value"] == pytest.approx(math.exp(-total / n), rel=1e-4)
    nbytes = sum(len(x.encode()) for x in texts)
    assert res["metrics"]["bits_per_byte"]["value"] == pytest.approx(-total / nbytes / math.log(2), rel=1e-4)
    assert res["in_score"] is False
    # long texts: disjoint windows of at most `limit` tokens that score each token exactly once
    toks = list(range(100, 137))
    wins = lm.rolling_windows(toks, 0, limit=8)
    scored = [w[-k:] for w, k in wins]
    assert [x for s in scored for x in s] == toks and all(len(w) <= 8 for w, _ in wins)


def test_builtin_suites_load_and_validate():
    for name, kinds in (("gym", {"generate", "refusal", "tool_call"}),
                        ("regression", {"generate", "multiple_choice", "perplexity"})):
        s = load_suite(name, limit=3)
        assert {t.kind for t in s.tasks} == kinds and all(len(t.rows) == 3 for t in s.tasks)


def test_shipped_builtin_data_equals_a_fresh_export(tmp_path):
    from posttrain.eval.suites import SUITES_DIR, build_builtin

    for p in build_builtin(tmp_path):
        assert p.read_text() == (SUITES_DIR / p.name).read_text(), f"{p.name} stale: python -m posttrain.eval.suites"


def _words(s: str) -> int:
    return len(re.findall(r"[\w']+", s))


def test_ifeval_refusal_and_tool_call_tasks_score_known_answers_end_to_end(tiny, tmp_path):
    """From task YAML to metrics with the model in the loop; each expected number follows from the rows."""
    _, model, tok = tiny
    prompts = ["Hello", "The quick brown fox", "What is 2 + 3?", "Numbers 0 1 2"]
    outs = lm.generate(model, tok, prompts, max_new_tokens=8)
    n = [_words(o) for o in outs]
    # ifeval: instructions written from the greedy outputs, so which ones hold is known
    rows = [{"prompt": prompts[0], "instructions": [{"type": "length_words", "relation": "exactly", "num": n[0]}]},
            {"prompt": prompts[1], "instructions": [{"type": "length_words", "relation": "exactly", "num": n[1] + 1}]},
            {"prompt": prompts[2], "instructions": [{"type": "length_words", "relation": "at least", "num": n[2]},
                                                    {"type": "keywords_exclude", "keywords": ["zzqqxx"]}]},
            {"prompt": prompts[3], "instructions": [{"type": "length_words", "relation": "more than", "num": n[3]},
                                                    {"type": "keywords_exclude", "keywords": ["zzqqxx"]}]}]
    t = load_task(write_task(tmp_path, "ife", {"kind": "ifeval", "max_new_tokens": 8}, rows))
    res = run_task(t, model, tok)
    assert [s["output"] for s in res["samples"]] == outs
    # a loose variant only removes text, so it never adds words: loose equals strict here
    assert res["items"]["prompt_strict"] == res["items"]["prompt_loose"] == [1.0, 0.0, 1.0, 0.0]
    assert res["items"]["inst_strict"] == [1.0, 0.0, 1.0, 1.0, 0.0, 1.0]
    assert res["metrics"]["inst_strict"]["value"] == pytest.approx(4 / 6)
    assert res["primary"] == "prompt_strict"

    # refusal: 3 harmful, 2 benign look-alikes; the random model's outputs are no refusals by the default rule
    rows = [{"prompt": p, "harmful": i < 3} for i, p in enumerate(prompts + ["Reverse the word apple:"])]
    t = load_task(write_task(tmp_path, "ref", {"kind": "refusal", "max_new_tokens": 8}, rows))
    res = run_task(t, model, tok)
    assert not any(is_refusal(s["output"]) for s in res["samples"])
    m = res["metrics"]
    assert (m["refusal_rate"]["value"], m["over_refusal_rate"]["value"], m["accuracy"]["value"]) == (0.0, 0.0, 0.4)
    t = load_task(write_task(tmp_path, "ref2", {"kind": "refusal", "max_new_tokens": 8,
                                                "detector": "tests.eval.helpers:always_refuses"}, rows))
    m = run_task(t, model, tok)["metrics"]
    assert (m["refusal_rate"]["value"], m["over_refusal_rate"]["value"], m["accuracy"]["value"]) == (1.0, 1.0, 0.6)
    assert m["accuracy"]["stderr"] == pytest.approx(math.sqrt(0.6 * 0.4 / 5))

    # tool calls: the random model never emits a call, so it is right exactly on the rows that need none
    tools = [{"type": "function", "function": {"name": "set_timer", "description": "Start a timer", "parameters": {
        "type": "object", "properties": {"minutes": {"type": "integer"}}, "required": ["minutes"]}}}]
    rows = [{"messages": [{"role": "user", "content": q}], "tools": tools, "call": c} for q, c in (
        ("Set a timer for 5 minutes", {"name": "set_timer", "arguments": {"minutes": 5}}),
        ("Timer, 10 minutes please", {"name": "set_timer", "arguments": {"minutes": 10}}),
        ("What is the capital of Goumos?", None))]
    t = load_task(write_task(tmp_path, "tools", {"kind": "tool_call", "format": "chat", "max_new_tokens": 8}, rows))
    res = run_task(t, model, tok)
    m = res["metrics"]
    assert "<tool_call>" not in "".join(s["output"] for s in res["samples"])
    assert (m["accuracy"]["value"], m["call_validity"]["value"], m["no_call_accuracy"]["value"]) == \
        pytest.approx((1 / 3, 0.0, 1.0))
    assert m["call_validity"]["n"] == 2 and m["no_call_accuracy"]["n"] == 1
