"""Drift from the base (top-k bucketed KL on the base's own continuations) and general-text perplexity change."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from posttrain.eval import drift as D
from posttrain.eval import perplexity as P


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path / "cache"))


def _model(tiny_models, arch):
    from posttrain.models.loading import load

    return load(tiny_models(arch), device="cpu")


def _perturb(model, scale, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


def test_bundled_prompt_files():
    rows = D.load_prompts()
    assert len(rows) == 300
    kinds = {k: sum(r["kind"] == k for r in rows) for k in ("instruction", "question", "code", "arithmetic", "chat")}
    assert kinds == dict.fromkeys(kinds, 60)
    assert sum(r["form"] == "chat" for r in rows) == 150
    texts = [json.loads(line)["text"] for line in D.GENERAL_TEXT.read_text().splitlines()]
    assert len(texts) == len(set(texts)) >= 200


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gemma"])
def test_identical_model_zero_and_perturbation_grows(tiny_models, arch):
    model, tok = _model(tiny_models, arch)
    ref = D.build_drift_reference(model, tok, n_prompts=20, max_new_tokens=8, top_k=16)
    assert ref.meta["n_prompts"] == 20 and len(ref.topk_ids) == sum(ref.n_cont)
    assert D.drift(model, ref)["drift_kl"] == 0.0
    kls = []
    for scale in (0.005, 0.02, 0.08):
        kls.append(D.drift(_perturb(copy.deepcopy(model), scale), ref)["drift_kl"])
    assert 0 < kls[0] < kls[1] < kls[2], kls


def test_bucket_kl_is_a_lower_bound_exact_with_the_whole_vocabulary():
    g = torch.Generator().manual_seed(0)
    p = F.log_softmax(torch.randn(50, 40, generator=g) * 2, -1)
    q = F.log_softmax(torch.randn(50, 40, generator=g) * 2, -1)
    full = (p.exp() * (p - q)).sum(-1)
    for k, exact in ((40, True), (8, False)):
        top = p.topk(k, -1)
        tail = D._log1mexp(torch.logsumexp(top.values, -1))
        kl = D.bucket_kl(top.values, tail, q.gather(-1, top.indices))
        if exact:
            assert torch.allclose(kl, full, atol=1e-5)
        else:
            assert (kl <= full + 1e-6).all() and kl.mean() > 0.5 * full.mean()


def test_reference_is_cached_and_keyed_by_the_weights(tiny_models, tmp_path):
    model, tok = _model(tiny_models, "qwen2")
    ref = D.build_drift_reference(model, tok, n_prompts=6, max_new_tokens=4, top_k=8)
    files = list(D.cache_dir().glob("*.safetensors"))
    assert [f.stem for f in files] == [ref.key]
    again = D.build_drift_reference(model, tok, n_prompts=6, max_new_tokens=4, top_k=8)
    assert again.sequences == ref.sequences and torch.equal(again.topk_logp, ref.topk_logp)
    other = _perturb(copy.deepcopy(model), 0.01)
    assert D.build_drift_reference(other, tok, n_prompts=6, max_new_tokens=4, top_k=8).key != ref.key
    assert len(list(D.cache_dir().glob("*.safetensors"))) == 2


def test_adapter_base_is_the_disabled_model(tiny_models):
    from posttrain.config import AdapterConfig
    from posttrain.models import adapters

    model, tok = _model(tiny_models, "llama")
    plain = D.build_drift_reference(model, tok, n_prompts=8, max_new_tokens=6, top_k=8, cache=False)
    lora = adapters.apply(copy.deepcopy(model), AdapterConfig(type="lora", r=8))
    with torch.no_grad():  # a trained adapter: B away from zero
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    ref = D.build_drift_reference(lora, tok, n_prompts=8, max_new_tokens=6, top_k=8, cache=False)
    assert ref.sequences == plain.sequences and torch.allclose(ref.topk_logp, plain.topk_logp, atol=1e-5)
    assert D.drift(lora, ref)["drift_kl"] > 0
    with adapters.disabled(lora):
        assert D.drift(lora, ref)["drift_kl"] < 1e-6


def test_perplexity_change_sign(tiny_models):
    model, tok = _model(tiny_models, "qwen2")
    ref = P.text_reference(model, tok, n=8, max_length=64)
    assert len(ref.rows) == 8 and P.perplexity_change(model, ref)["general_ppl_change"] == 0.0

    def steps(m, sign):
        opt = torch.optim.SGD(m.parameters(), lr=0.05)
        for _ in range(3):
            batch = torch.tensor([r[:16] for r in ref.rows])
            loss = m(input_ids=batch, labels=batch).loss
            (sign * loss).backward()
            opt.step()
            opt.zero_grad()
        return m

    better = P.perplexity_change(steps(copy.deepcopy(model), +1), ref)
    worse = P.perplexity_change(steps(copy.deepcopy(model), -1), ref)
    assert better["general_ppl_change"] < 0 < worse["general_ppl_change"], (better, worse)


def test_text_source_is_the_users_mix_data(tiny_models, tmp_path):
    model, tok = _model(tiny_models, "qwen2")
    f = tmp_path / "general.jsonl"
    f.write_text("".join(json.dumps({"prompt": f"Say {i}.", "completion": f" {i} {i}"}) + "\n" for i in range(10)))
    ref = P.text_reference(model, tok, str(f), n=4)
    assert ref.source == str(f) and len(ref.rows) == 4
    # only the completion is scored: the first scored position is after the prompt
    assert all(s == len(tok(f"Say {i}.")["input_ids"]) for s, i in zip(ref.start, (0, 2, 5, 7)))


def test_bad_prompt_file_names_the_line(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"id": "a", "form": "plain", "prompt": "x"}\n{"id": "b", "form": "chat"}\n')
    with pytest.raises(ValueError, match=r"p.jsonl line 2: a chat row needs a 'messages' list"):
        D.load_prompts(f)
