"""The three DPO references (adapter-disabled, frozen copy, precomputed) give the same loss and gradient."""

import copy
import functools
import json
import math

import pytest
import torch

from posttrain.config import AdapterConfig, ConfigError
from posttrain.stages import load_config
from posttrain.data import read_records
from posttrain.data.preference import to_preference_examples, tokenize_pairs
from posttrain.models import adapters
from posttrain.models.loading import load
from posttrain.stages import dpo
from posttrain.stages.dpo import DPOSection, DPOStage
from posttrain.data.preference_batches import collate_pairs
from posttrain.engine.reference import Reference, precompute_reference


def pref_rows(n):
    rows = []
    for i in range(n):
        a, b = i % 7, (i * 3) % 5
        rows.append({"prompt": [{"role": "user", "content": f"What is {a} + {b}?"}],
                     "chosen": [{"role": "assistant", "content": f"The answer is {a + b}."}],
                     "rejected": [{"role": "assistant", "content": f"Hello {a + b + 1} {b}"}]})
    return rows


def _loss_and_grads(stage, model, batch):
    model.zero_grad(set_to_none=True)
    loss, m = stage.loss(model, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return float(loss), m, grads


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_adapter_precomputed_and_copy_references_agree(tiny_models, tmp_path, loss_type):
    base, tok = load(tiny_models("qwen2"), device="cpu")
    frozen = copy.deepcopy(base)  # the reference a full copy would hold: the starting weights
    model = adapters.apply(base, AdapterConfig(type="lora", r=4))
    torch.manual_seed(0)
    for n, p in model.named_parameters():
        if "lora_B" in n:  # move the policy away from the reference so the log-ratios are not 0
            p.data.normal_(0, 0.05)
    items = tokenize_pairs(to_preference_examples(read_records(pref_rows(6)), "paired"), tok, max_length=64)
    collate = functools.partial(collate_pairs, pad_id=tok.pad_token_id)
    opts = load_config("dpo", overrides=["dpo.beta=0.5", f"dpo.loss={loss_type}", "adapter.type=lora"])

    results = {}
    for mode in ("adapter", "copy", "precomputed"):
        if mode == "precomputed":
            precompute_reference(model, {"train": items}, collate, batch_size=4, path=tmp_path / "ref.safetensors",
                                 model_id="tiny")
            ref = Reference("precomputed", model)
            assert ref.model is None  # nothing but the policy in memory
        else:
            ref = Reference(mode, frozen if mode == "copy" else model)
        batch = collate(items)
        assert ("ref_logps" in batch) == (mode == "precomputed")
        results[mode] = _loss_and_grads(DPOStage(opts, ref), model, batch)
        for it in items:
            it.ref = None
    la, ma, ga = results["adapter"]
    assert la != pytest.approx(6 * math.log(2), abs=1e-3) or loss_type == "ipo"  # policy != reference
    for mode in ("copy", "precomputed"):
        l, m, g = results[mode]
        assert l == pytest.approx(la, abs=1e-5)
        assert m["reward_margin"] == pytest.approx(ma["reward_margin"], abs=1e-5)
        for n in ga:
            torch.testing.assert_close(g[n], ga[n], atol=1e-6, rtol=1e-4)


def test_precomputed_cache_is_reused_and_invalidated(tiny_models, tmp_path):
    model, tok = load(tiny_models("qwen2"), device="cpu")
    items = tokenize_pairs(to_preference_examples(read_records(pref_rows(4)), "paired"), tok, max_length=64)
    collate = functools.partial(collate_pairs, pad_id=tok.pad_token_id)
    path = tmp_path / "ref.safetensors"
    first = precompute_reference(model, {"train": items}, collate, batch_size=3, path=path, model_id="m")
    stamp = path.stat().st_mtime_ns
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    again = precompute_reference(model, {"train": items}, collate, batch_size=3, path=path, model_id="m")
    assert path.stat().st_mtime_ns == stamp and torch.equal(first["train"], again["train"])  # cache hit
    fresh = precompute_reference(model, {"train": items[:3]}, collate, batch_size=3, path=path, model_id="m")
    assert not torch.allclose(fresh["train"], first["train"][:3])  # other data: recomputed with the new weights


def _run(tiny_models, tmp_path, name, *extra):
    out = tmp_path / name
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in pref_rows(24)))
    cfg = load_config("dpo", overrides=[f"model={tiny_models('qwen2')}", f"data.train={data}", f"output_dir={out}",
                                        "train.max_steps=4", "train.batch_size=4", "train.lr=5e-3",
                                        "train.progress=false", *extra])
    dpo.run(cfg)
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return out, [r for r in recs if r["split"] == "train"]


def test_runs_with_adapter_and_precomputed_reference_match(tiny_models, tmp_path):
    out_a, a = _run(tiny_models, tmp_path, "adapter", "adapter.type=lora", "dpo.reference=adapter")
    out_p, p = _run(tiny_models, tmp_path, "pre", "adapter.type=lora", "dpo.reference=precomputed")
    assert (out_p / "reference_logps.safetensors").exists() and not (out_a / "reference_logps.safetensors").exists()
    assert a[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy = reference at initialisation
    for x, y in zip(a, p):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-5)
        assert x["reward_margin"] == pytest.approx(y["reward_margin"], abs=1e-5)
    assert a[-1]["reward_margin"] > 0  # it learns to prefer the chosen side


def test_config_errors_name_the_key(tiny_models):
    with pytest.raises(ConfigError, match="dpo.reference=adapter needs an adapter"):
        load_config("dpo", overrides=["dpo.reference=adapter"])
    with pytest.raises(ConfigError, match=r"unknown key 'dpo.bta' \(did you mean 'dpo.beta'\?\)"):
        load_config("dpo", overrides=["dpo.bta=0.2"])
    with pytest.raises(ConfigError, match="dpo.label_smoothing applies to dpo.loss sigmoid or robust, not ipo"):
        load_config("dpo", overrides=["dpo.loss=ipo", "dpo.label_smoothing=0.1"])
    with pytest.raises(ConfigError, match="dpo.loss"):
        load_config("dpo", overrides=["dpo.loss=sigmoidd"])
    with pytest.raises(ConfigError, match="kto needs train.batch_size >= 2"):
        load_config("kto", overrides=["train.batch_size=1"])
    with pytest.raises(ConfigError, match="reward stage trains the full model"):
        load_config("reward", overrides=["adapter.type=lora"])
    cfg = load_config("dpo", overrides=["dpo.beta=0.3", "dpo.loss=robust", "dpo.label_smoothing=0.1"])
    assert (cfg.dpo.beta, cfg.dpo.loss, cfg.dpo.label_smoothing) == (0.3, "robust", 0.1)
