"""The playground answers through the serving engine: the same text as greedy generation elsewhere."""

from posttrain.data.tools import render_prompt
from posttrain.eval.lm import generate
from posttrain.gym import base_model_path
from posttrain.models.loading import load
from posttrain.studio.chat import ChatError, Playground, adapter_dir
from tests.serve.conftest import make_adapter

import pytest


def test_base_and_adapter_side_by_side_match_greedy_generation(tmp_path):
    base = str(base_model_path())
    run = tmp_path / "run"
    make_adapter(run / "adapter", "lora", seed=3)
    assert adapter_dir(run) == run / "adapter" and adapter_dir(tmp_path) is None
    msgs = [{"role": "user", "content": "Reverse the word: apple"}]
    pg = Playground()
    try:
        got = pg.answer(base, {"base": msgs, "mine": msgs}, adapters={"mine": run / "adapter"}, max_tokens=12)
        with pytest.raises(ChatError, match="column 'other': not 'base'"):
            pg.answer(base, {"other": msgs}, adapters={})
        with pytest.raises(ChatError, match="max_tokens: must be between 1 and 1024, got 0"):
            pg.answer(base, {"base": msgs}, adapters={}, max_tokens=0)
        with pytest.raises(ChatError, match=r"base: expected a list of \{role"):
            pg.answer(base, {"base": [{"role": "robot", "content": "x"}]}, adapters={})
    finally:
        pg.close()
    expected = {}
    for name, adapter in (("base", None), ("mine", run / "adapter")):
        model, tok = load(base, adapter)
        expected[name] = generate(model, tok, [render_prompt(tok, msgs)], max_new_tokens=12)[0]
    assert got == expected
    assert got["base"] != got["mine"]  # the adapter changes the answer
