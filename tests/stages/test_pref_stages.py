"""Each preference stage learns on the engine: margins and accuracies move the right way."""

import functools

import pytest
import torch

from posttrain.stages import load_config
from posttrain.data import read_records
from posttrain.data.preference import to_preference_examples, tokenize_pairs, tokenize_unpaired
from posttrain.engine.trainer import Engine, TrainData
from posttrain.models.loading import load
from posttrain.stages import kto, orpo, simpo
from posttrain.data.preference_batches import collate_pairs, collate_unpaired
from posttrain.engine.reference import Reference
from posttrain.eval.preference import implicit_reward_score, pair_accuracy_evaluator
from posttrain.stages.dpo import DPOStage
from tests.stages.test_pref_reference import pref_rows


def _fit(stage_name, overrides, tiny_models, tmp_path, make_stage, kind="paired"):
    cfg = load_config(stage_name, overrides=[f"output_dir={tmp_path / stage_name}", "train.max_steps=12",
                                             "train.batch_size=4", "train.lr=3e-3", "train.progress=false",
                                             "train.warmup_steps=0", *overrides])
    model, tok = load(tiny_models("qwen2"), device="cpu")
    model.requires_grad_(True)
    ex = to_preference_examples(read_records(pref_rows(16)), kind)
    if kind == "paired":
        items = tokenize_pairs(ex, tok, max_length=64)
        collate = functools.partial(collate_pairs, pad_id=tok.pad_token_id)
    else:
        items = tokenize_unpaired(ex, tok, max_length=64)
        collate = functools.partial(collate_unpaired, pad_id=tok.pad_token_id, max_length=64)
    stage = make_stage(cfg, model)
    eng = Engine(model, stage, TrainData(train=items, collate=collate), cfg)
    first = eng.compute_gradients([collate(items[:4])])
    model.zero_grad(set_to_none=True)
    eng.fit()
    last = eng.compute_gradients([collate(items[:4])])
    model.zero_grad(set_to_none=True)
    return model, tok, items, collate, first, last


def test_dpo_full_finetune_with_copy_reference(tiny_models, tmp_path):
    box = {}

    def make(cfg, model):
        box["ref"] = Reference("copy", model)
        return DPOStage(cfg, box["ref"])

    model, tok, items, collate, first, last = _fit("dpo", ["dpo.beta=0.5"], tiny_models, tmp_path, make)
    assert first["loss"] == pytest.approx(0.6931472, abs=1e-6)  # log 2 at initialisation
    assert first["reward_margin"] == 0.0
    assert last["loss"] < 0.5 and last["reward_margin"] > 0.5 and last["pair_accuracy"] == 1.0
    ev = pair_accuracy_evaluator(items, collate, implicit_reward_score(box["ref"], 0.5), batch_size=8,
                                 reference=box["ref"])(model, 0)
    assert ev["pref_accuracy"] >= 0.9 and ev["kl_to_ref"] > 0


def test_kto_learns_from_unpaired_data(tiny_models, tmp_path):
    _, _, items, collate, first, last = _fit(
        "kto", [], tiny_models, tmp_path, lambda cfg, m: kto.KTOStage(cfg, Reference("copy", m)), kind="unpaired")
    assert [x.label for x in items[:4]] == [True, False, True, False]
    assert first["loss"] == pytest.approx(0.5, abs=1e-6)  # policy = reference, z = 0: half the weight
    assert first["kl"] == 0.0
    assert last["reward_desirable"] > 0 > last["reward_undesirable"]
    assert last["loss"] < 0.45


def test_kto_weights_scale_the_initial_loss(tiny_models, tmp_path):
    _, _, items, _, first, _ = _fit(
        "kto", ["kto.desirable_weight=2.0", "kto.undesirable_weight=0.5", "train.max_steps=1"], tiny_models, tmp_path,
        lambda cfg, m: kto.KTOStage(cfg, Reference("copy", m)), kind="unpaired")
    # two desirable (0.5 * 2) and two undesirable (0.5 * 0.5) examples, averaged
    assert first["loss"] == pytest.approx((2 * 1.0 + 2 * 0.25) / 4, abs=1e-6)


@pytest.mark.parametrize("name, module, cls", [("orpo", orpo, "ORPOStage"), ("simpo", simpo, "SimPOStage")])
def test_reference_free_stages_learn_the_preference(tiny_models, tmp_path, name, module, cls):
    _, _, items, collate, first, last = _fit(
        name, [], tiny_models, tmp_path, lambda cfg, m: getattr(module, cls)(cfg))
    assert last["loss"] < first["loss"]
    assert last["reward_margin"] > first["reward_margin"] and last["pair_accuracy"] == 1.0
    if name == "orpo":
        assert last["nll_chosen"] < first["nll_chosen"]  # the SFT half of ORPO


def test_one_forward_pass_per_micro_batch(tiny_models, tmp_path):
    model, tok = load(tiny_models("qwen2"), device="cpu")
    items = tokenize_pairs(to_preference_examples(read_records(pref_rows(4)), "paired"), tok, max_length=64)
    batch = collate_pairs(items, pad_id=tok.pad_token_id)
    assert batch["input_ids"].shape[0] == 8 and batch["num_pairs"] == 4
    calls = []
    hook = model.register_forward_hook(lambda mod, args, out: calls.append(1))
    cfg = load_config("dpo", overrides=["adapter.type=lora"])
    from posttrain.models import adapters

    adapters.apply(model, cfg.adapter)
    DPOStage(cfg, Reference("precomputed", model)).loss(
        model, {**batch, "ref_logps": torch.zeros(8)})
    hook.remove()
    assert len(calls) == 1


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_pairs_give_the_padded_loss(tiny_models, attn):
    from posttrain.data.preference_batches import collate_preference, pack_pairs

    model, tok = load(tiny_models("qwen2"), device="cpu", attn_implementation=attn)
    items = tokenize_pairs(to_preference_examples(read_records(pref_rows(6)), "paired"), tok, max_length=64)
    stats = {}
    rows = pack_pairs(items, 128, stats)
    assert len(rows) < len(items) and stats["packing_efficiency"] > 0.5
    order = [p for row in rows for p in row]  # the packed batch lists pairs in row order
    torch.manual_seed(0)
    ref = torch.randn(2 * len(order))
    stage = DPOStage(load_config("dpo"), Reference("precomputed", model))
    padded = collate_preference(order, tok.pad_token_id)
    packed = collate_preference(rows, tok.pad_token_id, row_len=128)
    assert packed["input_ids"].shape[0] == len(rows) and packed["num_pairs"] == len(order)
    l1, m1 = stage.loss(model, {**padded, "ref_logps": ref})
    l2, m2 = stage.loss(model, {**packed, "ref_logps": ref})
    assert float(l2) == pytest.approx(float(l1), abs=1e-4)
    assert m2["logp_chosen"] == pytest.approx(m1["logp_chosen"], abs=1e-3)
