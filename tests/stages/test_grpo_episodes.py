"""GRPO with an environment (`grpo.environment`): multi-turn episodes through the stage, their metrics,
their config errors, and resume bit for bit from checkpoints taken inside and between rollouts."""

import json

import pytest
import torch
from safetensors.torch import load_file

from posttrain import gym
from posttrain.stages import grpo, load_config
from tests.stages.test_rl_resume import _cut_back_to

STEPS = 4
NOOP = {"type": "function", "function": {"name": "note", "description": "Write a note",
                                         "parameters": {"type": "object", "properties": {}}}}


class ThreeTurns:
    """Every episode lasts three turns whatever the model writes (each turn gets a tool message back);
    turn k is rewarded by the fraction of digits in the model's text, so rewards vary within groups."""

    tools = [NOOP]

    def __init__(self, bonus: float = 0.0):
        self.turns, self.bonus = 0, bonus

    def reset(self, row):
        return [{"role": "user", "content": row["prompt"]}]

    def step(self, messages, assistant_turn):
        self.turns += 1
        text = assistant_turn["content"] or ""
        reward = sum(ch.isdigit() for ch in text) / max(1, len(text)) + self.bonus
        if self.turns == 3:
            return [], reward, True
        return [{"role": "tool", "content": f"noted {self.turns}"}], reward, False


@pytest.fixture
def prompts_file(tmp_path):
    p = tmp_path / "prompts.jsonl"
    p.write_text("".join(json.dumps({"prompt": f"Count to {i} in digits."}) + "\n" for i in range(16)))
    return p


def _config(prompts, out, *extra):
    return load_config("grpo", overrides=[
        f"model={gym.base_model_path()}", f"data.train={prompts}", f"output_dir={out}", "train.batch_size=2",
        f"train.max_steps={STEPS}", "train.save_every=1", "train.keep_last=100", "train.lr=1e-3",
        "train.warmup_steps=0", "train.progress=false", "train.seed=3", "grpo.num_generations=4",
        "grpo.max_new_tokens=24", "grpo.temperature=1.0", "grpo.minibatches=2", "grpo.beta=0.1",
        "grpo.micro_batch_size=4", "grpo.environment=tests.stages.test_grpo_episodes:ThreeTurns",
        "grpo.environment_args={bonus: 0.5}", "grpo.max_turns=3", *extra])


def _train_records(run):
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r.get("split") == "train"]


def test_multi_turn_grpo_logs_episode_metrics_and_resumes_bit_for_bit(prompts_file, tmp_path):
    full = tmp_path / "full"
    res = grpo.run(_config(prompts_file, full))
    want = load_file(str(res.model_dir / "model.safetensors"))
    recs = _train_records(full)
    losses = [r["loss"] for r in recs]
    assert len(losses) == STEPS and len(set(losses)) > 1
    for r in recs:
        # 8 episodes of at most 3 turns; a turn cut at max_new_tokens ends its episode early (truncated)
        assert 1 <= r["turns_per_episode"] <= 3 and r["tool_calls_per_episode"] == 0.0
        assert r["env_tokens_per_episode"] > 0 and 0 < r["completion_length"] <= 3 * 24
        assert r["reward"] >= 0.5 and r["reward_per_turn"] >= 0.5  # the bonus comes every turn
        assert {"invalid_call_rate", "tool_errors_per_episode", "truncated_frac", "kl", "rollout_time_s"} <= set(r)
    assert any(r["turns_per_episode"] > 1 for r in recs)
    # kill points: 1 = between the two steps of the first rollout, 3 = inside the second
    for k in (1, 3):
        killed = tmp_path / f"killed-{k}"
        _cut_back_to(full, k, killed)
        got = grpo.run(_config(prompts_file, killed), resume=True)
        weights = load_file(str(got.model_dir / "model.safetensors"))
        assert weights.keys() == want.keys()
        assert all(torch.equal(weights[n], want[n]) for n in want), k
        assert [r["loss"] for r in _train_records(killed)] == losses, k


def test_environment_config_errors(prompts_file, tmp_path, capsys):
    with pytest.raises(ValueError, match="grpo.environment gives the episode reward: leave grpo.rewards empty"):
        _config(prompts_file, tmp_path / "a", "grpo.rewards=[math]")
    with pytest.raises(ValueError, match="environment 'nowhere:Env': cannot import it"):  # at load, a config error
        _config(prompts_file, tmp_path / "b", "grpo.environment=nowhere:Env")
    with pytest.raises(ValueError, match="grpo: grpo.environment gives the episode reward: pass no reward_fns"):
        grpo.run(_config(prompts_file, tmp_path / "c"), reward_fns=[lambda p, c, **k: [0.0] * len(c)])
    # through the CLI: one line naming the key's problem, no traceback
    from posttrain.cli import main

    assert main(["grpo", f"model={gym.base_model_path()}", f"data.train={prompts_file}",
                 f"output_dir={tmp_path / 'd'}", "grpo.environment=nowhere:Env"]) == 2
    err = capsys.readouterr().err
    assert "environment 'nowhere:Env': cannot import it (No module named 'nowhere')" in err and "Traceback" not in err


SHAPED = "tests.stages.test_grpo_episodes:Shaped"


class Shaped:
    """Reward hacking by shaping, scripted: turn 1 is paid 0.3 k (a per-turn reward that grows with k, the
    rollout: `per_rollout` episodes each) and gets a tool message back; turn 2 ends the episode with the
    outcome reward 1 - 0.2 k. The training reward rises while the environment's verdict falls."""

    tools = [NOOP]
    played = 0  # episodes so far, over the run (a test resets it)

    def __init__(self, per_rollout: int = 8):
        self.k, self.turns = Shaped.played // per_rollout, 0
        Shaped.played += 1

    def reset(self, row):
        return [next(m for m in row["messages"] if m["role"] == "user")]

    def step(self, messages, assistant_turn):
        self.turns += 1
        if self.turns == 1:
            return [{"role": "tool", "content": "noted"}], 0.3 * self.k, False
        return [], max(0.0, 1.0 - 0.2 * self.k), True


def test_hacking_verifier_environment_watches_the_outcome_reward_and_stops_a_shaping_hack(tmp_path, capsys):
    """`grpo.hacking_verifier=environment`: the verifier is `episode_outcome`, the reward of the turn at
    which the environment ended each episode (0 when cut off), per-turn shaping left out. Here shaping
    rises and the outcome falls, so reward_vs_verifier fires and stops the run."""
    from posttrain.rollout.episodes import resolve_environment

    resolve_environment(SHAPED).played = 0
    cfg = load_config("grpo", overrides=[
        f"model={gym.base_model_path()}", "data.train=gym:instruct", "data.limit=32", f"output_dir={tmp_path / 'r'}",
        "train.batch_size=2", "train.max_steps=8", "train.lr=1e-5", "train.warmup_steps=0", "train.progress=false",
        "train.seed=3", "eval.guard=off", "grpo.num_generations=4", "grpo.max_new_tokens=32", f"grpo.environment={SHAPED}",
        "grpo.max_turns=2", "grpo.hacking_verifier=environment", "grpo.hacking_window=2",
        "grpo.hacking_stop_on=[reward_vs_verifier]"])
    res = grpo.run(cfg)
    recs = _train_records(res.output_dir)
    for r in recs:  # an episode the environment ended scored 1 - 0.2 k at its end; a cut-off one 0
        k = r["step"] - 1
        assert r["episode_outcome"] == pytest.approx((1 - r["truncated_frac"]) * (1 - 0.2 * k)), r
    step = res.result["hacking"]["fired"]["reward_vs_verifier"]["step"]
    assert res.result["steps"] == step == len(recs) < 8 and recs[-1]["hack/reward_vs_verifier"] == 1.0
    assert res.result["stop_reason"].startswith("reward-hacking guard: reward rose ")
    assert " while the verifier fell " in res.result["stop_reason"]
    assert f"posttrain: reward hacking? step {step}: reward rose" in capsys.readouterr().err


def test_hacking_verifier_environment_config_errors(prompts_file, tmp_path):
    with pytest.raises(ValueError, match=r"grpo.hacking_verifier 'gym:lookup': with grpo.environment the verifier "
                                         r"is the environment's outcome reward: set grpo.hacking_verifier=environment"):
        _config(prompts_file, tmp_path / "a", "grpo.hacking_verifier=gym:lookup")
    for stage in ("grpo", "ppo"):
        with pytest.raises(ValueError, match=fr"{stage}.hacking_verifier=environment watches the outcome reward of a "
                                             fr"multi-turn environment \(grpo.environment\), and this run has none: "
                                             fr"name one of {stage}.rewards \['length'\]"):
            load_config(stage, None, [f"{stage}.rewards=[length]", f"{stage}.hacking_verifier=environment"])
    assert _config(prompts_file, tmp_path / "b", "grpo.hacking_verifier=environment").grpo.hacking_verifier == "environment"
