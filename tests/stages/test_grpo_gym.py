"""The gym's verifier as a GRPO reward (the demo's `grpo` stage uses it: `grpo.rewards: [gym:reasoning]`).

The GRPO gym measurement itself is the demo's reasoning chain: tests/demo/test_demo_grpo.py.
"""

from posttrain import gym


def test_gym_reward_is_the_verifier():
    rows = gym.load_task_rows("reasoning", "validation", n=3)
    cols = {k: [r[k] for r in rows] for k in rows[0]}
    right = [f"work\nAnswer: {r['answer']}" for r in rows]
    wrong = [f"Answer: {int(r['answer']) + 1}" for r in rows]
    f = gym.verifier_reward("reasoning")
    assert f(None, right, **cols) == [1.0, 1.0, 1.0]
    assert f(None, wrong, **cols) == [0.0, 0.0, 0.0]
