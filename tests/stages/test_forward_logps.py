"""forward_logps runs the output head at completion positions only: same log-probs as the full head."""

import pytest
import torch

from posttrain.data import read_records
from posttrain.data.preference import to_preference_examples, tokenize_pairs
from posttrain.losses.sft import sequence_logps
from posttrain.models.loading import load
from posttrain.data.preference_batches import collate_preference, pack_pairs
from posttrain.engine.reference import _model_inputs, forward_logps
from tests.stages.test_pref_reference import pref_rows


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_padded_and_packed_logps_equal_the_full_head(tiny_models, arch):
    model, tok = load(tiny_models(arch), device="cpu")
    items = tokenize_pairs(to_preference_examples(read_records(pref_rows(6)), "paired"), tok, max_length=64)
    batch = collate_preference(items, tok.pad_token_id)
    full = sequence_logps(model(**_model_inputs(model, batch), use_cache=False).logits, batch["labels"])
    with torch.no_grad():
        got = forward_logps(model, batch)
    B = len(items)  # padded: rows are c1..cB then r1..rB
    assert torch.allclose(got[0], full[0].detach(), atol=1e-5) and torch.equal(got[1], full[1])
    assert got[0].shape == (2 * B,)
    # packed rows of pairs give the same per-sequence log-probs (in the same c..., r... order)
    rows = pack_pairs(items, 256, {})
    packed = collate_preference(rows, tok.pad_token_id, row_len=256)
    order = [p.origin for row in rows for p in row]
    idx = torch.tensor([[i.origin for i in items].index(o) for o in order])
    with torch.no_grad():
        pk = forward_logps(model, packed)
    assert torch.allclose(pk[0], torch.cat([got[0][idx], got[0][B + idx]]), atol=1e-4)
    assert torch.equal(pk[1], torch.cat([got[1][idx], got[1][B + idx]]))


def test_padding_free_pairs_give_the_padded_loss_and_gradients(tiny_models, tmp_path):
    from posttrain.stages import load_config
    from posttrain.stages.dpo import DPOStage
    from posttrain.data.preference_batches import collate_pairs_padding_free
    from posttrain.engine.reference import Reference

    model, tok = load(tiny_models("qwen2"), device="cpu")
    items = tokenize_pairs(to_preference_examples(read_records(pref_rows(7)), "paired"), tok, max_length=64)
    cfg = load_config("dpo", overrides=["model=x", "dpo.beta=0.5"])
    stage = DPOStage(cfg, Reference("copy", model))
    model.requires_grad_(True)
    out = []
    for batch in (collate_preference(items, tok.pad_token_id), collate_pairs_padding_free(items, tok.pad_token_id)):
        model.zero_grad(set_to_none=True)
        loss, m = stage.loss(model, batch)
        loss.backward()
        out.append((float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    pf = collate_pairs_padding_free(items, tok.pad_token_id)
    assert pf["input_ids"].shape[0] < len(items) and pf["input_ids"].numel() < 2 * len(items) * 64
    assert out[0][0] == pytest.approx(out[1][0], rel=1e-5)
    for n, g in out[0][1].items():
        assert torch.allclose(g, out[1][1][n], atol=1e-6, rtol=1e-4), n
    # the pairs keep their order: sequence k of the padding-free batch is sequence k of the padded one
    # (precomputed reference log-probs are stored per position; a reordering gave each pair another's)
    with torch.no_grad():
        padded = forward_logps(model, collate_preference(items, tok.pad_token_id))[0]
        assert torch.allclose(forward_logps(model, pf)[0], padded, atol=1e-4)


def test_padding_free_is_refused_where_it_cannot_apply():
    from posttrain.config import ConfigError
    from posttrain.stages import load_config

    with pytest.raises(ConfigError, match="the reward stage scores one sequence per row"):
        load_config("reward", overrides=["model=x", "data.padding_free=true"])
