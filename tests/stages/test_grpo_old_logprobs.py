"""GRPO in bf16 with one update per rollout: the old log-probs are the loss's own (detached), no second pass."""

import json

import torch

from posttrain.engine.trainer import Engine
from posttrain.models.loading import load
from posttrain.rollout.prompts import prompt_data
from posttrain.stages import grpo, load_config


def digit_frac(prompts, completions, **kw):
    return [sum(ch.isdigit() for ch in c) / max(1, len(c)) for c in completions]


def test_bf16_one_update_per_rollout_skips_the_old_pass_with_the_same_gradient(tiny_models, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": f"Hello {i} how"}) for i in range(8)))
    cfg = load_config("grpo", overrides=[
        f"model={tiny_models('qwen2')}", f"data.train={prompts}", f"output_dir={tmp_path / 'run'}",
        "train.batch_size=4", "train.progress=false", "train.precision=bf16", "grpo.max_new_tokens=12",
        "grpo.num_generations=4", "grpo.skip_zero_advantage=false"])
    model, tok = load(cfg.model, device="cpu")
    model.requires_grad_(True)
    stage = grpo.GRPOStage(cfg, tok, [digit_frac])
    assert stage.old_is_current
    data = prompt_data(cfg, tok)
    steps = stage.rollout(model, data.collate(data.train[:4]))
    batch = steps[0][0]
    # no bf16 pass ran: the batch still carries the fp32 sampling log-probs, which the loss does not use
    sampled = stage.session.last.policy_logprobs[:, :batch["logprobs"].shape[1]]
    assert torch.equal(batch["logprobs"].flatten().sort().values, sampled.flatten().sort().values)
    eng = Engine(model, stage, data, cfg, device=torch.device("cpu"))
    grads, stats = [], []
    for old_is_current in (True, False):
        if not old_is_current:  # the pass this skips: old log-probs recomputed in bf16, as before
            stage.old_is_current = False
            t = {k: v for k, v in batch.items() if torch.is_tensor(v)}
            batch["logprobs"] = stage.session.logprobs(model, t, reference=False, temperature=1.0)["logprobs"]
        model.zero_grad(set_to_none=True)
        stats.append(eng.compute_gradients(steps[0]))
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert stats[0]["clip_frac"] == 0.0
    assert grads[0].abs().max() > 0
    # the same update up to the bf16 rounding of the recomputed pass (ratio exactly 1 vs 1 +- ~1e-2)
    cos = torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0)
    assert cos > 0.999, cos
    assert abs(stats[0]["loss"] - stats[1]["loss"]) < 1e-2
