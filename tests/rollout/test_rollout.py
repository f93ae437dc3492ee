"""Rollout engine: equal to `model.generate`, padding-invariant, log-probs that training recomputes."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from posttrain.config import AdapterConfig
from posttrain.models import adapters as A
from posttrain.rollout import RolloutEngine, SamplingParams, completion_logprobs, default_stop_ids, process_logits

PROMPTS = ["Hello, how", "The quick brown fox jumps over the lazy", "What is 2 + 3?", "Numbers 0 1 2 3 4 5 6 7"]
LOGPROB_BOUND = 1e-4  # |sampling-time policy log-prob - training forward log-prob|, fp32


def _load(path):
    return AutoModelForCausalLM.from_pretrained(str(path)).eval()


@pytest.fixture(scope="module")
def model_tok(tiny_models, tokenizer):
    return _load(tiny_models("qwen2")), tokenizer


def _rows(ro):
    return [ro.completion_ids[r][ro.completion_mask[r].bool()].tolist() for r in range(len(ro))]


def test_greedy_equals_model_generate(model_tok):
    model, tok = model_tok
    ro = RolloutEngine(model, tok).generate(PROMPTS, SamplingParams(max_new_tokens=16, temperature=0))
    enc = tok(PROMPTS, padding=True, padding_side="left", return_tensors="pt")
    gen = model.generate(**enc, do_sample=False, max_new_tokens=16, eos_token_id=default_stop_ids(tok),
                         pad_token_id=tok.pad_token_id)
    ref = gen[:, enc["input_ids"].shape[1]:].tolist()
    for r, mine in enumerate(_rows(ro)):
        assert mine == ref[r][:len(mine)]
        assert len(mine) == 16 or mine[-1] in default_stop_ids(tok)
    assert ro.completions[0] == tok.decode(ref[0], skip_special_tokens=True)


def test_left_padded_batch_equals_each_row_alone(model_tok):
    model, tok = model_tok
    params = SamplingParams(max_new_tokens=12, temperature=0)
    eng = RolloutEngine(model, tok)
    batch = eng.generate(PROMPTS, params)
    assert batch.prompt_mask.sum(1).tolist() != [batch.prompt_ids.shape[1]] * len(PROMPTS)  # really padded
    for i, p in enumerate(PROMPTS):
        alone = eng.generate([p], params)
        assert _rows(alone)[0] == _rows(batch)[i]
        L = len(_rows(alone)[0])
        assert torch.allclose(alone.logprobs[0, :L], batch.logprobs[i, :L], atol=1e-5)


def test_training_forward_recomputes_sampling_logprobs(model_tok):
    model, tok = model_tok
    for temp in (1.0, 0.7):
        params = SamplingParams(max_new_tokens=16, temperature=temp, n=3, seed=0)
        ro = RolloutEngine(model, tok).generate(PROMPTS, params)
        assert torch.equal(ro.logprobs, ro.policy_logprobs)  # no top-k/top-p: the same distribution
        with torch.no_grad():
            lp = completion_logprobs(model, ro.batch(), temperature=temp)
        diff = (lp - ro.policy_logprobs).abs()[ro.completion_mask.bool()]
        assert diff.max() < LOGPROB_BOUND, diff.max()
        assert ro.logprobs[~ro.completion_mask.bool()].abs().max() == 0


def test_top_k_top_p_logprobs_are_renormalized(model_tok):
    model, tok = model_tok
    ro = RolloutEngine(model, tok).generate(PROMPTS, SamplingParams(max_new_tokens=8, temperature=1.0, top_k=5,
                                                                    top_p=0.9, seed=1))
    m = ro.completion_mask.bool()
    # the sampling distribution keeps less mass, renormalized: each sampled token gains log-prob
    assert (ro.logprobs[m] >= ro.policy_logprobs[m] - 1e-6).all()
    assert (ro.logprobs[m] - ro.policy_logprobs[m]).max() > 1e-3
    with torch.no_grad():
        lp = completion_logprobs(model, ro.batch(), temperature=1.0)
    assert (lp - ro.policy_logprobs).abs()[m].max() < LOGPROB_BOUND


def test_process_logits_top_k_top_p():
    z = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda **kw: torch.isfinite(process_logits(z, SamplingParams(**kw)))[0].tolist()  # noqa: E731
    assert kept(top_k=2) == [True, True, False, False]
    assert kept(top_p=0.8) == [True, True, False, False]  # 0.5 + 0.3 reaches 0.8
    assert kept(top_p=0.81) == [True, True, True, False]
    assert kept(top_p=0.1) == [True, False, False, False]  # the top token always stays
    t = process_logits(z, SamplingParams(temperature=2.0))
    assert torch.allclose(t, z / 2)


def test_top_k_one_is_greedy_and_seed_reproduces(model_tok):
    model, tok = model_tok
    eng = RolloutEngine(model, tok)
    greedy = eng.generate(PROMPTS, SamplingParams(max_new_tokens=10, temperature=0))
    k1 = eng.generate(PROMPTS, SamplingParams(max_new_tokens=10, temperature=1.3, top_k=1, seed=5))
    assert _rows(k1) == _rows(greedy)
    assert torch.allclose(k1.logprobs[k1.completion_mask.bool()], torch.zeros(k1.num_tokens))  # p = 1
    a = eng.generate(PROMPTS, SamplingParams(max_new_tokens=10, n=2, seed=3))
    b = eng.generate(PROMPTS, SamplingParams(max_new_tokens=10, n=2, seed=3))
    assert _rows(a) == _rows(b) and len(a) == 8 and a.group_size == 2
    assert a.prompts[0] == a.prompts[1] == PROMPTS[0]


def test_eos_and_stop_strings(model_tok):
    model, tok = model_tok
    eng = RolloutEngine(model, tok)
    free = eng.generate(PROMPTS[:1], SamplingParams(max_new_tokens=16, temperature=0, stop_token_ids=()))
    ids = _rows(free)[0]
    assert free.stop_reasons == ["length"] and len(ids) == 16
    # the 5th generated token as EOS: generation ends there, the EOS token is kept in the mask
    eos = eng.generate(PROMPTS[:1], SamplingParams(max_new_tokens=16, temperature=0, stop_token_ids=(ids[4],)))
    first = ids.index(ids[4])
    assert _rows(eos)[0] == ids[:first + 1] and eos.stop_reasons == ["eos"]
    assert not eos.finished.logical_not().any()
    # a stop string taken from the free text: the text ends before it, tokens end where it completed
    text = tok.decode(ids)
    stop = text[len(text) // 2: len(text) // 2 + 2]
    st = eng.generate(PROMPTS[:1], SamplingParams(max_new_tokens=16, temperature=0, stop_token_ids=(), stop=(stop,)))
    assert st.stop_reasons == ["stop"]
    assert st.completions[0] == text[:text.find(stop)]
    assert stop in tok.decode(_rows(st)[0]) and stop not in tok.decode(_rows(st)[0][:-1])


def test_tokens_per_s_measured(model_tok):
    model, tok = model_tok
    ro = RolloutEngine(model, tok).generate(PROMPTS, SamplingParams(max_new_tokens=8, stop_token_ids=()))
    assert ro.num_tokens == 32 and ro.time_s > 0
    assert ro.tokens_per_s == pytest.approx(32 / ro.time_s)


def _make_adapter(path, out, seed):
    torch.manual_seed(seed)
    m = _load(path)
    A.apply(m, AdapterConfig(type="lora", r=8))
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.3)
    A.save(m, out)
    return out


def test_several_adapters_in_one_batch(tiny_models, tokenizer, tmp_path):
    path = tiny_models("qwen2")
    a, b = _make_adapter(path, tmp_path / "a", 1), _make_adapter(path, tmp_path / "b", 2)
    m = A.load_adapters(_load(path), {"a": a, "b": b})
    eng = RolloutEngine(m, tokenizer)
    params = SamplingParams(max_new_tokens=10, temperature=0, n=2)
    names = ["a", "none", "b", "a"]
    mixed = eng.generate(PROMPTS, params, adapters=names)
    assert mixed.adapters == [n for n in names for _ in range(2)]
    alone = {n: eng.generate(PROMPTS, params, adapters=n) for n in ("a", "b", "none")}
    assert _rows(alone["a"]) != _rows(alone["none"])  # the adapters change the output
    for i, n in enumerate(names):
        for j in range(2):
            assert _rows(mixed)[2 * i + j] == _rows(alone[n])[2 * i + j]
    with pytest.raises(ValueError, match="3 adapter names for 4 prompts"):
        eng.generate(PROMPTS, params, adapters=["a", "b", "a"])


def test_bad_params_say_what():
    with pytest.raises(ValueError, match="top_p must be in"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="unknown rollout backend 'vllmx'"):
        RolloutEngine(None, type("T", (), {"pad_token_id": 0})(), backend="vllmx")


def test_sampler_draws_from_the_processed_distribution():
    from posttrain.rollout import sample_next

    z = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(20000, 4)
    g = torch.Generator().manual_seed(0)
    tok, lp, lpt = sample_next(z, SamplingParams(top_k=3), g)
    freq = torch.bincount(tok, minlength=4).float() / len(tok)
    want = torch.tensor([0.5, 0.3, 0.15, 0.0]) / 0.95
    assert (freq - want).abs().max() < 0.01 and freq[3] == 0  # the filtered token is never drawn
    assert torch.allclose(lp, torch.log(want[tok]), atol=1e-6)
    assert torch.allclose(lpt, torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05])[tok]), atol=1e-6)


def test_merged_adapter_samples_what_the_adapter_samples(tiny_models, tokenizer, tmp_path):
    path = tiny_models("qwen2")
    m = A.load_adapters(_load(path), {"a": _make_adapter(path, tmp_path / "a", 1)})
    layers = dict(A.lora.lora_layers(m))
    params = SamplingParams(max_new_tokens=16, temperature=1.0, n=3, seed=5)
    plain = RolloutEngine(m, tokenizer).generate(PROMPTS, params)
    merged = RolloutEngine(m, tokenizer, merge_adapter=True).generate(PROMPTS, params)
    assert torch.equal(merged.completion_ids, plain.completion_ids)
    diff = (merged.logprobs - plain.logprobs).abs().max().item()
    assert 0 < diff < 1e-5  # the merged product rounds differently, within fp32 rounding
    assert A.lora.lora_layers(m) == layers  # the adapter layers are back, the same objects
    again = RolloutEngine(m, tokenizer).generate(PROMPTS, params)
    assert torch.equal(again.logprobs, plain.logprobs)


def test_lean_lora_layers_sample_bit_for_bit_what_the_adapter_layers_sample(tiny_models, tokenizer, tmp_path):
    from posttrain.rollout.hf import lean_adapter

    path = tiny_models("qwen2")
    m = A.load_adapters(_load(path), {"a": _make_adapter(path, tmp_path / "a", 1)})
    with lean_adapter(m):
        assert type(m.model.layers[0].self_attn.q_proj).__name__ == "_LeanLora"
    assert type(m.model.layers[0].self_attn.q_proj).__name__ == "LoraLinear"
    params = SamplingParams(max_new_tokens=16, temperature=1.0, n=3, seed=7)
    eng = RolloutEngine(m, tokenizer)
    lean = eng.generate(PROMPTS, params)  # one active adapter: the lean layers
    adapted = eng.generate(PROMPTS, params, adapters="a")  # named adapters: the adapter layers themselves
    assert torch.equal(lean.completion_ids, adapted.completion_ids)
    assert torch.equal(lean.logprobs, adapted.logprobs)
    base = eng.generate(PROMPTS, params, adapters="none")
    assert not torch.equal(base.logprobs, lean.logprobs)  # the adapter is really in the lean layers


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 0, 0.9), (1.3, 20, 1.0), (1.0, 0, 0.5)])
def test_processed_distribution_equals_transformers_warpers(model_tok, temperature, top_k, top_p):
    from transformers.generation.logits_process import (
        LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper,
    )

    model, tok = model_tok
    enc = tok(PROMPTS, padding=True, padding_side="left", return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits[:, -1].float()
    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)]
                                  + ([TopKLogitsWarper(top_k)] if top_k else [])
                                  + ([TopPLogitsWarper(top_p)] if top_p < 1 else []))
    want = torch.softmax(warpers(enc["input_ids"], logits.clone()), -1)
    got = torch.softmax(process_logits(logits, SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)), -1)
    assert torch.equal(want > 0, got > 0)  # the same tokens kept
    assert (want > 0).sum(-1).min() < logits.shape[-1]  # and some filtered out
    assert torch.allclose(want, got, atol=1e-6)
    # and the sampler draws from it: 20,000 draws of row 0 match its probabilities
    from posttrain.rollout import sample_next

    z = logits[:1].expand(20000, -1)
    drawn, _, _ = sample_next(z, SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p),
                              torch.Generator().manual_seed(0))
    freq = torch.bincount(drawn, minlength=logits.shape[-1]).float() / len(drawn)
    assert (freq - want[0]).abs().max() < 0.015
    assert freq[want[0] == 0].sum() == 0
