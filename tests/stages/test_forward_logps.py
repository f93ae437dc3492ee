"""forward_logps runs the output head at completion positions only: same log-probs as the full head."""

import pytest
import torch

from posttrain.data import read_records
from posttrain.data.preference import to_preference_examples, tokenize_pairs
from posttrain.losses.sft import sequence_logps
from posttrain.models.loading import load
from posttrain.stages.preference import collate_preference, pack_pairs
from posttrain.stages.reference import _model_inputs, forward_logps
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
