import json
import math

import pytest
import torch

from posttrain.stages import load_config
from posttrain.engine.trainer import Engine, TrainingError
from posttrain.losses.sft import token_nll
from posttrain.models.loading import load
from posttrain.stages.sft import LMStage

from .helpers import pad_collate, random_items, token_data


def _engine(model_dir, tmp_path, data, **train):
    over = [f"train.{k}={v}" for k, v in train.items()]
    cfg = load_config("sft", overrides=[f"model={model_dir}", f"output_dir={tmp_path}", "train.progress=false", *over])
    model, _ = load(model_dir)
    return Engine(model, LMStage("sft"), data, cfg)


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_accumulation_matches_one_big_batch(tiny_models, tmp_path):
    """8 examples in one micro-batch vs 4 micro-batches of 2: same gradient (token-level normalization)."""
    d = tiny_models("qwen2")
    items = random_items(8, 400, seed=1)
    big = _engine(d, tmp_path / "a", token_data(8))
    big.compute_gradients([pad_collate(items)])
    g_big = _grads(big.model)

    small = _engine(d, tmp_path / "b", token_data(8))
    small.compute_gradients([pad_collate(items[i:i + 2]) for i in range(0, 8, 2)])
    g_small = _grads(small.model)

    worst = max((g_big[n] - g_small[n]).abs().max().item() for n in g_big)
    scale = max(g.abs().max().item() for g in g_big.values())
    assert worst < 1e-5 * max(1.0, scale), worst

    # the naive mean of per-micro-batch means weights tokens unequally: the test can tell the difference
    naive = _engine(d, tmp_path / "c", token_data(8))
    for i in range(0, 8, 2):
        b = pad_collate(items[i:i + 2])
        out = naive.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        s, n = token_nll(out.logits, b["labels"])
        (s / n / 4).backward()
    g_naive = _grads(naive.model)
    assert max((g_big[n] - g_naive[n]).abs().max().item() for n in g_big) > 100 * worst + 1e-7


def test_fit_lowers_loss_and_logs(tiny_models, tmp_path):
    e = _engine(tiny_models("llama"), tmp_path, token_data(16, n_eval=8), batch_size=4, max_steps=12, lr=3e-3,
                eval_every=6, schedule="linear", warmup_steps=2)
    res = e.fit()
    assert res["steps"] == 12
    recs = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["split"] == "train"]
    evals = [r for r in recs if r["split"] == "eval"]
    assert [r["step"] for r in train] == list(range(1, 13))
    assert [r["step"] for r in evals] == [6, 12]
    assert train[-1]["loss"] < train[0]["loss"]
    # warmup then linear decay: lr rises over the first 2 steps, then falls to ~0
    lrs = [r["lr"] for r in train]
    assert lrs[0] == pytest.approx(1.5e-3) and lrs[1] == pytest.approx(3e-3)
    assert lrs[-1] < lrs[2]
    assert all(r["tokens_per_s"] > 0 for r in train)


def test_non_finite_loss_stops_with_clear_message_and_keeps_checkpoint(tiny_models, tmp_path):
    e = _engine(tiny_models("qwen2"), tmp_path, token_data(16), batch_size=4, max_steps=10, save_every=2)
    calls = {"n": 0}

    def poison(module, args, output):
        calls["n"] += 1
        if calls["n"] == 5:  # the 5th forward (step 5) produces NaN activations
            return output * float("nan")
        return output

    e.model.get_input_embeddings().register_forward_hook(poison)
    with pytest.raises(TrainingError, match=r"non-finite loss \(nan\) at step 5.*checkpoint is kept at .*step-4"):
        e.fit()
    assert (tmp_path / "checkpoints" / "step-4" / "trainer_state.json").exists()
    assert (tmp_path / "checkpoints" / "step-4" / "weights").is_dir()
    assert not any(p.name.startswith(".tmp") for p in (tmp_path / "checkpoints").iterdir())


def test_early_stopping_restores_best_weights(tiny_models, tmp_path):
    # random labels: the model overfits the 8 training rows, so held-out loss soon rises
    e = _engine(tiny_models("qwen2"), tmp_path, token_data(8, n_eval=8, seed=3), batch_size=8, max_steps=60,
                lr=2e-2, schedule="constant", warmup_steps=0, eval_every=2, early_stopping_patience=2)
    res = e.fit()
    evals = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in evals if r["split"] == "eval"]
    assert res["steps"] < 60, "expected an early stop"
    assert res["stop_reason"].startswith("early stopping")
    best = min(losses)
    assert losses[-1] > best and losses[-2] > best  # two evaluations without improvement
    assert e.eval_loss() == pytest.approx(best, abs=1e-5)  # the best weights are back


def test_lr_schedules():
    from posttrain.engine.optim import lr_lambda

    cos = lr_lambda("cosine", 10, 110)
    assert cos(0) == pytest.approx(0.1) and cos(9) == pytest.approx(1.0)
    assert cos(60) == pytest.approx(0.5) and cos(110) == pytest.approx(0.0)
    lin = lr_lambda("linear", 0, 100)
    assert lin(50) == pytest.approx(0.5)
    assert lr_lambda("constant", 5, 100)(99) == 1.0
