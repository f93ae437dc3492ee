"""Held-out episodes on gym:lookup: the bundled base, which never saw a tool trace, solves none."""

import posttrain
from posttrain import gym
from posttrain.eval.episodes import lookup_eval


def test_the_base_model_cannot_answer_lookup_questions_without_tools():
    model, tok = posttrain.load(gym.base_model_path())
    m = lookup_eval(model, tok, n=4)
    # measured: no call, one turn, a wrong guess (the counts appear nowhere in its pretraining corpus)
    assert m["episode_reward"] == 0.0 and m["tool_calls_per_episode"] == 0.0 and m["turns_per_episode"] == 1.0
