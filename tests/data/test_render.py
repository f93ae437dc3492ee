"""Loss masks on real chat templates: exactly the assistant turns (and their end-of-turn marker) are trained."""

import pytest

from posttrain.data import DataError, Record, to_example, tokenize_example, tokenize_examples
from posttrain.data.render import IGNORE_INDEX
from posttrain.models.tiny import build_tokenizer
from tests.data.data_chat_templates import FAMILIES, MISTRAL_V3

CHAT = [
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "The answer is 5."},
    {"role": "user", "content": "Reverse the word apple."},
    {"role": "assistant", "content": "elppa"},
    {"role": "user", "content": "Thanks"},
    {"role": "assistant", "content": "Hello, how can I help you today?"},
]


def family_tokenizer(family):
    template, special, _ = FAMILIES[family]
    tok = build_tokenizer()
    if special:
        tok.add_special_tokens(special)
    tok.chat_template = template
    return tok


def trained_spans(t):
    """Decoded runs of consecutive labelled tokens (position 0 is never a target, so skip it)."""
    runs, cur = [], []
    for pos, (i, lab) in enumerate(zip(t.input_ids, t.labels)):
        if lab != IGNORE_INDEX and pos > 0:
            assert lab == i
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return runs


def example(data):
    return to_example(Record(data, "row 0"))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_assistant_turn_and_end_of_turn_trained(family):
    tok = family_tokenizer(family)
    eot = FAMILIES[family][2]
    t = tokenize_example(example({"messages": CHAT}), tok, max_length=512)
    # same tokens as the tokenizer's own rendering
    assert t.input_ids == tok.apply_chat_template(CHAT, tokenize=True)["input_ids"]
    got = [tok.decode(run) for run in trained_spans(t)]
    assert got == [m["content"] + eot for m in CHAT if m["role"] == "assistant"]


@pytest.mark.parametrize("family", ["mistral", "gemma"])
def test_system_prompt_folded_for_templates_without_system_role(family):
    tok = family_tokenizer(family)
    stats = {}
    msgs = [{"role": "system", "content": "Be brief."}] + CHAT[:2]
    [t] = tokenize_examples([example({"messages": msgs})], tok, max_length=512, stats=stats)
    assert stats["system_folded"] == 1
    text = tok.decode(t.input_ids)
    assert "Be brief.\n\nWhat is 2 + 3?" in text
    assert [tok.decode(r) for r in trained_spans(t)] == ["The answer is 5." + FAMILIES[family][2]]


def test_template_that_rewrites_history_uses_content_search():
    tok = family_tokenizer("mistral")
    tok.chat_template = MISTRAL_V3
    # the user's text contains the later answer: the search must not match inside it
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say elppa and The answer is 5."}] + CHAT[1:]
    t = tokenize_example(example({"messages": msgs}), tok, max_length=512)
    text = tok.decode(t.input_ids)
    assert "[INST] Be brief.\n\nThanks[/INST]" in text  # system moved into the last user turn
    assert [tok.decode(r) for r in trained_spans(t)] == [
        " " + m["content"] + "</s>" for m in CHAT if m["role"] == "assistant"]


def test_tool_calls_and_tool_results_qwen25():
    tok = family_tokenizer("qwen2.5")
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    msgs = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "sunny"},
        {"role": "assistant", "content": "It is sunny."},
    ]
    t = tokenize_example(example({"messages": msgs, "tools": tools}), tok, max_length=1024)
    assert "get_weather" in tok.decode(t.input_ids).split("<|im_end|>")[0]  # the tool schema is in the system prompt
    assert [tok.decode(r) for r in trained_spans(t)] == [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
        "It is sunny.<|im_end|>",
    ]


def test_conversational_prompt_completion_trains_completion_only():
    tok = family_tokenizer("qwen2.5")
    row = {"prompt": CHAT[:3], "completion": [{"role": "assistant", "content": "elppa"}]}
    t = tokenize_example(example(row), tok, max_length=512)
    assert [tok.decode(r) for r in trained_spans(t)] == ["elppa<|im_end|>"]


def test_plain_prompt_completion_and_text():
    tok = build_tokenizer()
    t = tokenize_example(example({"prompt": "What is 2 + 3?", "completion": " The answer is 5."}), tok, max_length=64)
    assert [tok.decode(r) for r in trained_spans(t)] == [" The answer is 5.<|im_end|>"]
    assert tok.decode(t.input_ids) == "What is 2 + 3? The answer is 5.<|im_end|>"
    t = tokenize_example(example({"text": "The quick brown fox"}), tok, max_length=64)
    assert t.labels == t.input_ids and t.input_ids[-1] == tok.eos_token_id


def test_overflow_truncate_drop_and_no_loss_left():
    tok = build_tokenizer()
    long_answer = {"prompt": "Numbers 0 1 2 3 4 5 6 7 8 9", "completion": " 10 11 12 13 14 15 16 17 18 19 20"}
    long_prompt = {"prompt": "Numbers 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15", "completion": " 16"}
    exs = [example(long_answer), example(long_prompt), example({"prompt": "Hi", "completion": " 5"})]
    n_prompt = len(tok("Numbers 0 1 2 3 4 5 6 7 8 9")["input_ids"])
    stats = {}
    out = tokenize_examples(exs, tok, max_length=n_prompt + 3, overflow="truncate", stats=stats)
    assert [len(t) for t in out] == [n_prompt + 3, len(out[1])] and out[0].truncated
    assert stats["truncated"] == 2 and stats["dropped_no_loss"] == 1  # the long prompt kept no completion
    stats = {}
    out = tokenize_examples(exs, tok, max_length=n_prompt + 3, overflow="drop", stats=stats)
    assert len(out) == 1 and stats["dropped_overflow"] == 2 and stats["truncated"] == 0


def test_cpt_split_long_text_keeps_every_token():
    tok = build_tokenizer()
    text = "Numbers 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20. " * 3
    full = tok(text)["input_ids"] + [tok.eos_token_id]
    stats = {}
    out = tokenize_examples([example({"text": text})], tok, max_length=16, split_long=True, stats=stats)
    assert [i for t in out for i in t.input_ids] == full[: len(full) - (len(full) % 16 == 1)]
    assert all(len(t) <= 16 for t in out) and stats["split_into_chunks"] == 1


def test_template_rejection_is_a_clear_error():
    tok = family_tokenizer("gemma")
    msgs = [{"role": "user", "content": "Hi"}, {"role": "user", "content": "again"}, {"role": "assistant", "content": "Hello"}]
    with pytest.raises(DataError, match=r"^row 0: the chat template rejected this conversation: .*alternate"):
        tokenize_example(example({"messages": msgs}), tok, max_length=64)
    plain = build_tokenizer()
    plain.chat_template = None
    with pytest.raises(DataError, match="needs a chat template"):
        tokenize_example(example({"messages": CHAT[:2]}), plain, max_length=64)
