"""Stage `ppo` on a tiny random model: reward model and reward functions, KL control, value model."""

import json

import pytest
import torch
from safetensors import safe_open

from posttrain.rewards.sets import AdaptiveKLController
from posttrain.config import ConfigError
from posttrain.stages import load_config
from posttrain.models.loading import load
from posttrain.models.reward import reward_model_from_lm, reward_scores
from posttrain.rollout import RolloutEngine, SamplingParams
from posttrain.stages import ppo
from posttrain.rollout.prompts import prompt_data


def digit_frac(prompts, completions, **kw):
    return [sum(ch.isdigit() for ch in c) / max(1, len(c)) for c in completions]


def digit_score(prompts, completions, **kw):
    # on the scale of a reward model's scores (a few units), which the value model starts near
    return [10.0 * r for r in digit_frac(prompts, completions)]


@pytest.fixture
def prompts_file(tmp_path):
    p = tmp_path / "prompts.jsonl"
    p.write_text("\n".join(json.dumps({"prompt": f"Hello {i} how"}) for i in range(40)))
    return p


def _cfg(model_dir, prompts_file, out, *extra):
    return load_config("ppo", overrides=[
        f"model={model_dir}", f"data.train={prompts_file}", f"output_dir={out}", "train.batch_size=8",
        "train.progress=false", "train.warmup_steps=0", "train.schedule=constant", "ppo.max_new_tokens=12",
        *extra])


def _train_metrics(run_dir):
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if r.get("split") == "train"]


@pytest.fixture(scope="module")
def reward_model_dir(tiny_models, tmp_path_factory):
    """A reward model with a random head on the tiny trunk: a fixed, learnable scoring function."""
    rm, tok = reward_model_from_lm(tiny_models("qwen2"), device="cpu", seed=3)
    with torch.no_grad():
        rm.score.weight.mul_(20.0)  # scores spread over a few units, like a trained reward model's
    d = tmp_path_factory.mktemp("rm")
    rm.save_pretrained(str(d))
    tok.save_pretrained(str(d))
    return d


def _held_out_reward(model, tok, prompts, seed=0):
    ro = RolloutEngine(model, tok).generate(prompts, SamplingParams(max_new_tokens=12, n=4, seed=seed))
    return sum(digit_frac(None, ro.completions)) / len(ro)


KL_BOUND = 12.0  # nats per 12-token completion (k1) at the end of the run; measured 6.5-8.8 (entropy ~6 nats/token)


def test_ppo_raises_held_out_reward_with_bounded_kl(tiny_models, prompts_file, tmp_path):
    base = tiny_models("qwen2")
    cfg = _cfg(base, prompts_file, tmp_path / "run", "train.max_steps=20", "train.lr=1e-2", "ppo.epochs=2",
               "train.batch_size=16", "ppo.kl_coef=0.1", "ppo.target_kl=2.0", "ppo.kl_horizon=64")
    model, tok = load(base, device="cpu")
    held_out = [f"Goodbye {i} then" for i in range(8)]
    before = _held_out_reward(model, tok, held_out)
    res = ppo.run(cfg, reward_fns=[digit_score])
    res.model.eval()
    after = _held_out_reward(res.model, tok, held_out)
    m = _train_metrics(res.output_dir)
    # measured: 0.05 -> 0.14 (digit fraction of sampled held-out completions)
    assert after > 2 * before and after > before + 0.05, (before, after)
    assert 0 < m[-1]["kl"] < KL_BOUND
    for k in ("score", "kl", "kl_coef", "entropy", "clip_frac", "value_loss", "explained_variance",
              "rollout_time_s", "update_time_s", "policy_loss"):
        assert k in m[-1]
    assert m[-1]["kl_coef"] != 0.1  # the adaptive controller moved beta
    # the value model trains with the policy but is not part of the published model
    with safe_open(str(res.model_dir / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if "ppo_value" in k]


def test_reward_model_scores_and_value_head(tiny_models, reward_model_dir, prompts_file, tmp_path):
    cfg = _cfg(tiny_models("qwen2"), prompts_file, tmp_path / "r", f"ppo.reward_model={reward_model_dir}",
               "ppo.value_model=reward", "ppo.missing_eos_penalty=1.0")
    model, tok = ppo.prepare_model(cfg)
    rm, _ = reward_model_from_lm(reward_model_dir, device="cpu")
    assert torch.equal(model.ppo_value.head.weight, rm.score.weight)  # values start at the RM's scale
    stage = ppo.PPOStage(cfg, tok)
    data = prompt_data(cfg, tok)
    steps = stage.rollout(model, data.collate(data.train[:8]))
    ro = stage.session.last
    with torch.no_grad():
        want = reward_scores(rm, ro.input_ids, ro.attention_mask)
    m = steps[0][0]["rollout_metrics"]
    assert m["rm_score"] == pytest.approx(float(want.mean()), abs=1e-5)
    assert m["score"] == pytest.approx(float((want - ro.finished.logical_not().float()).mean()), abs=1e-5)


def test_ppo_reward_function_adapter_policy(tiny_models, prompts_file, tmp_path):
    cfg = _cfg(tiny_models("qwen2"), prompts_file, tmp_path / "run", "train.max_steps=6", "train.lr=1e-2",
               "adapter.type=lora", "adapter.r=8", "ppo.epochs=2", "ppo.kl_estimator=k3",
               "ppo.missing_eos_penalty=0.5")
    res = ppo.run(cfg, reward_fns=[digit_frac])
    m = _train_metrics(res.output_dir)
    assert m[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # adapter starts as the reference (B = 0)
    assert m[-1]["kl"] > 1e-4
    # every completion of a random model runs to the limit: the score is the reward minus the penalty
    assert m[0]["eos_missing_frac"] == pytest.approx(1.0, abs=0.2)
    assert m[0]["score"] == pytest.approx(m[0]["reward/digit_frac"] - 0.5 * m[0]["eos_missing_frac"], abs=1e-6)
    assert (res.output_dir / "adapter" / "adapter_model.safetensors").exists()


def test_adaptive_kl_controller_follows_ziegler():
    c = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    assert c.update(12.0, 256) == pytest.approx(0.1 * (1 + 0.2 * 256 / 10000))  # error clipped at +0.2
    c = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    assert c.update(5.4, 100) == pytest.approx(0.1 * (1 - 0.1 * 100 / 10000))
    fixed = AdaptiveKLController(0.1, target=None, horizon=10000)
    assert fixed.update(100.0, 1000) == 0.1


def test_rollout_targets_follow_gae(tiny_models, prompts_file, tmp_path):
    from posttrain.losses.rl import gae, token_rewards

    cfg = _cfg(tiny_models("qwen2"), prompts_file, tmp_path / "r", "ppo.whiten_advantages=false",
               "ppo.gamma=0.9", "ppo.lam=0.8", "ppo.kl_coef=0.0")
    model, tok = ppo.prepare_model(cfg)
    stage = ppo.PPOStage(cfg, tok, [digit_frac])
    data = prompt_data(cfg, tok)
    steps = stage.rollout(model, data.collate(data.train[:8]))
    assert len(steps) == cfg.ppo.epochs * cfg.ppo.minibatches
    b = steps[0][0]
    mask = b["completion_mask"].bool()
    score = torch.tensor(digit_frac(None, stage.session.last.completions))[b["row"]]  # minibatch rows are shuffled
    want_adv, want_ret = gae(token_rewards(score, torch.zeros_like(b["old_values"]), mask, kl_coef=0.0),
                             b["old_values"], mask, gamma=0.9, lam=0.8)
    assert torch.allclose(b["advantages"], want_adv, atol=1e-5)
    assert torch.allclose(b["returns"], want_ret, atol=1e-5)
    assert sorted(b["row"].tolist()) == list(range(8))


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="ppo.kl_coeff'.*did you mean 'ppo.kl_coef'"):
        load_config("ppo", overrides=["ppo.kl_coeff=0.1"])
    with pytest.raises(ConfigError, match="value_model=reward needs ppo.reward_model"):
        load_config("ppo", overrides=["ppo.value_model=reward"])
    with pytest.raises(ConfigError, match="kl_estimator"):
        load_config("ppo", overrides=["ppo.kl_estimator=k9"])
    with pytest.raises(ValueError, match="no reward"):
        ppo.PPOStage(load_config("ppo", overrides=["model=x"]), None)
