"""The guard's set-up from the cache: the base's general-text NLL is cached beside the drift reference,
and a guard built from the cache measures exactly what an uncached one does."""

import pytest
import torch

from posttrain.eval import drift as D
from posttrain.eval import perplexity as P
from posttrain.eval.guard import DriftGuard


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path / "cache"))


def _lora_model(tiny_models):
    from posttrain.config import AdapterConfig
    from posttrain.models import adapters as A
    from posttrain.models.loading import load

    model, tok = load(tiny_models("qwen2"), device="cpu")
    A.apply(model, AdapterConfig(type="lora", r=8))
    with torch.no_grad():  # an adapter that already moved the model: the start check is not the base's
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2, generator=torch.Generator().manual_seed(3))
    return model, tok


def test_text_reference_cached_equals_measured(tiny_models):
    model, tok = _lora_model(tiny_models)
    fresh = P.text_reference(model, tok, n=8, cache=False)
    assert not list(D.cache_dir().glob("ppl-*.json"))  # cache=False writes nothing
    first = P.text_reference(model, tok, n=8)  # measures and writes
    files = list(D.cache_dir().glob("ppl-*.json"))
    assert len(files) == 1
    again = P.text_reference(model, tok, n=8)  # reads
    assert fresh.base_ppl == first.base_ppl == again.base_ppl  # bit for bit: JSON keeps a float exact
    assert (again.rows, again.start) == (fresh.rows, fresh.start)
    # another sample, another batching: other keys, never the stale number
    assert P.text_reference(model, tok, n=6).base_ppl != fresh.base_ppl
    P.text_reference(model, tok, n=8, batch_size=3)
    assert len(list(D.cache_dir().glob("ppl-*.json"))) == 3
    files[0].write_text('{"base_nll": ')  # torn file: measured again, the same number
    assert P.text_reference(model, tok, n=8).base_ppl == fresh.base_ppl


def test_guard_numbers_same_cached_and_uncached(tiny_models):
    model, tok = _lora_model(tiny_models)
    kw = dict(n_prompts=10, max_new_tokens=6, n_text=8, piece_size=4)
    cold = DriftGuard(model, tok, **kw)
    assert len(cold.pieces) == 3 and not any(p.cached for p in cold.pieces) and cold.n_active == 0
    assert not cold.start_is_base  # the adapter moved the model: its start is measured, piece by piece
    cold._grow(3)  # builds every piece's drift reference and base NLL, caches them
    warm = DriftGuard(model, tok, **kw)
    assert all(p.cached for p in warm.pieces)
    warm._grow(3)
    for c, w in zip(cold.pieces, warm.pieces):
        assert c.base_nll == w.base_nll and c.start_kl == w.start_kl and c.start_nll == w.start_nll
        assert torch.equal(c.ref.topk_logp, w.ref.topk_logp) and c.ref.sequences == w.ref.sequences
    assert cold.start == warm.start and cold.start["drift_kl"] > 0 and cold.start["general_ppl_change"] != 0


def test_reference_generation_batch_gives_the_same_tokens(tiny_models):
    from posttrain.models.loading import load

    model, tok = load(tiny_models("qwen2"), device="cpu")
    kw = dict(n_prompts=24, max_new_tokens=8, top_k=16, cache=False)
    by16 = D.build_drift_reference(model, tok, generation_batch_size=16, **kw)
    by64 = D.build_drift_reference(model, tok, **kw)  # the default: all 24 prompts in one batch
    assert by16.sequences == by64.sequences and by16.n_cont == by64.n_cont
    assert torch.equal(by16.topk_ids, by64.topk_ids) and torch.equal(by16.topk_logp, by64.topk_logp)
