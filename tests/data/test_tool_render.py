"""Tool conversations rendered and masked token by token: the template's own tool format when it has
one (the bundled ChatML-with-tools template), the documented fallback when it has none (Llama 3.0,
Mistral v0.1). Calls and final answers are trained; tool results and schemas never are."""

import json

import pytest
from transformers import AutoTokenizer

from posttrain.data import Record, to_example, tokenize_example
from posttrain.data.render import IGNORE_INDEX
from posttrain.data.tools import FALLBACK_HEADER, FALLBACK_INSTRUCTION, render_prompt, supports_tools, to_fallback
from posttrain.gym import base_model_path
from posttrain.gym.chat_template import TOOL_INSTRUCTIONS
from posttrain.models.tiny import build_tokenizer
from posttrain.rewards import parse_tool_calls
from tests.data.data_chat_templates import FAMILIES

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
CALL = {"name": "get_weather", "arguments": {"city": "Paris"}}
CALL_TEXT = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
RESULT = '{"temp": 21, "sky": "clear"}'
ANSWER = "It is 21 degrees and clear in Paris."
CONVERSATION = [
    {"role": "user", "content": "What is the weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": CALL}]},
    {"role": "tool", "content": RESULT},
    {"role": "assistant", "content": ANSWER},
]


def tokenized(tok, row):
    return tokenize_example(to_example(Record(row, "row 0")), tok, max_length=1024)


def expected_from_segments(tok, segments):
    """Token ids and the trained/not-trained flag of each token, from (text, trained) pieces tokenized apart."""
    ids, flags = [], []
    for text, trained in segments:
        piece = tok(text, add_special_tokens=False)["input_ids"]
        ids += piece
        flags += [trained] * len(piece)
    return ids, flags


def assert_mask(t, ids, flags):
    assert t.input_ids == ids  # the segments are exactly the rendering, token for token
    for pos, (i, lab, want) in enumerate(zip(t.input_ids, t.labels, flags)):
        if pos == 0:
            assert lab == IGNORE_INDEX or not want
            continue
        assert (lab != IGNORE_INDEX) == want, (pos, i, lab, want)
        if want:
            assert lab == i


def test_bundled_template_renders_tools_and_masks_results_token_by_token():
    tok = AutoTokenizer.from_pretrained(str(base_model_path()))
    assert supports_tools(tok)
    t = tokenized(tok, {"messages": CONVERSATION, "tools": [WEATHER]})
    ids, flags = expected_from_segments(tok, [
        ("<|im_start|>system\nTools:\n- get_weather(city: string): Current weather in a city\n" + TOOL_INSTRUCTIONS
         + "<|im_end|>\n<|im_start|>user\nWhat is the weather in Paris?<|im_end|>\n<|im_start|>assistant\n", False),
        (CALL_TEXT + "<|im_end|>", True),
        ("\n<|im_start|>tool\n" + RESULT + "<|im_end|>\n<|im_start|>assistant\n", False),
        (ANSWER + "<|im_end|>", True),
        ("\n", False),
    ])
    assert_mask(t, ids, flags)
    # what the model learns to write is what the parser reads back
    trained = tok.decode([i for i, lab in zip(t.input_ids, t.labels) if lab != IGNORE_INDEX])
    assert [c.to_dict() for c in parse_tool_calls(trained.split("<|im_end|>")[0])] == [CALL]


def llama3_tokenizer():
    template, special, _ = FAMILIES["llama3"]
    tok = build_tokenizer()
    tok.add_special_tokens(special)
    tok.chat_template = template
    return tok


def test_fallback_for_a_template_without_tools_token_by_token():
    tok = llama3_tokenizer()
    assert not supports_tools(tok)
    system = "\n".join([FALLBACK_HEADER, json.dumps(WEATHER), FALLBACK_INSTRUCTION])
    t = tokenized(tok, {"messages": CONVERSATION, "tools": [WEATHER]})

    def head(role):
        return "<|start_header_id|>" + role + "<|end_header_id|>\n\n"

    ids, flags = expected_from_segments(tok, [
        ("<|begin_of_text|>" + head("system") + system + "<|eot_id|>" + head("user")
         + "What is the weather in Paris?<|eot_id|>" + head("assistant"), False),
        (CALL_TEXT + "<|eot_id|>", True),
        (head("user") + "<tool_response>\n" + RESULT + "\n</tool_response><|eot_id|>" + head("assistant"), False),
        (ANSWER + "<|eot_id|>", True),
    ])
    assert_mask(t, ids, flags)
    # generation prompts go through the same fallback: the model sees the tools it was trained with
    prompt = render_prompt(tok, CONVERSATION[:1], [WEATHER])
    assert prompt == tok.decode(ids[:flags.index(True)])


def test_fallback_keeps_alternation_for_strict_templates():
    """Mistral v0.1 accepts only alternating user/assistant turns: the system turn is folded into the
    first user turn, and two tool results share one user turn."""
    template, special, eot = FAMILIES["mistral"]
    tok = build_tokenizer()
    tok.add_special_tokens(special)
    tok.chat_template = template
    calls = [{"type": "function", "function": CALL},
             {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]
    msgs = [CONVERSATION[0], {"role": "assistant", "content": "", "tool_calls": calls},
            {"role": "tool", "content": "21"}, {"role": "tool", "content": "3"}, CONVERSATION[3]]
    t = tokenized(tok, {"messages": msgs, "tools": [WEATHER]})
    runs, cur = [], []
    for pos, (i, lab) in enumerate(zip(t.input_ids, t.labels)):
        if lab != IGNORE_INDEX and pos > 0:
            cur.append(i)
        elif cur:
            runs, cur = runs + [cur], []
    runs += [cur] if cur else []
    two_calls = CALL_TEXT + "\n" + CALL_TEXT.replace("Paris", "Oslo")
    assert [tok.decode(r) for r in runs] == [two_calls + eot, ANSWER + eot]
    text = tok.decode(t.input_ids)
    assert "[INST] <tool_response>\n21\n</tool_response>\n<tool_response>\n3\n</tool_response> [/INST]" in text
    assert text.startswith("<s>[INST] " + FALLBACK_HEADER)
    assert [c.to_dict()["arguments"]["city"] for c in parse_tool_calls(two_calls)] == ["Paris", "Oslo"]


def test_fallback_prompt_completion_trains_the_completion_only():
    tok = llama3_tokenizer()
    row = {"prompt": CONVERSATION[:3], "completion": CONVERSATION[3:], "tools": [WEATHER]}
    t = tokenized(tok, row)
    trained = tok.decode([i for pos, (i, lab) in enumerate(zip(t.input_ids, t.labels)) if lab != IGNORE_INDEX])
    assert trained == ANSWER + "<|eot_id|>"
    assert "<tool_response>" in tok.decode(t.input_ids)


def test_to_fallback_leaves_plain_conversations_alone_and_appends_to_a_system_turn():
    msgs = [{"role": "system", "content": "Be brief."}] + CONVERSATION
    out = to_fallback(msgs, [WEATHER])
    assert out[0]["content"].startswith("Be brief.\n\n" + FALLBACK_HEADER)
    assert [m["role"] for m in out] == ["system", "user", "assistant", "user", "assistant"]
    assert all("tool_calls" not in m for m in out)
    tok = llama3_tokenizer()
    plain = [{"role": "user", "content": "hi"}]
    assert render_prompt(tok, plain) == tok.apply_chat_template(plain, tokenize=False, add_generation_prompt=True)


@pytest.mark.parametrize("family", ["qwen2.5"])
def test_templates_with_tools_are_not_rewritten(family):
    template, special, _ = FAMILIES[family]
    tok = build_tokenizer()
    tok.chat_template = template
    assert supports_tools(tok)
    prompt = render_prompt(tok, CONVERSATION[:1], [WEATHER])
    assert "<tools>" in prompt and FALLBACK_HEADER not in prompt
