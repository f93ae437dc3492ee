"""The loss-mask and template audit on four template families (our own Jinja strings, tokenizers built locally)."""

import re

import pytest

from posttrain.data import audit as A
from posttrain.data import render
from posttrain.data.formats import to_example
from posttrain.data.sources import DataError, Record
from posttrain.models.tiny import build_tokenizer

# Our own renderings of each family's published chat format (not copies of their template files).
FAMILIES = {
    "chatml": (None, "<|im_end|>", []),
    "llama3": ("{{ bos_token }}{% for m in messages %}"
               "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] | trim + '<|eot_id|>' }}"
               "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}",
               "<|eot_id|>", ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]),
    "mistral": ("{{ bos_token }}{% for m in messages %}"
                "{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
                "{% elif m['role'] == 'assistant' %}{{ ' ' + m['content'] + eos_token }}"
                "{% else %}{{ raise_exception('Only user and assistant roles are supported') }}{% endif %}{% endfor %}",
                "</s>", ["<s>", "</s>", "[INST]", "[/INST]"]),
    "gemma": ("{{ bos_token }}{% for m in messages %}"
              "{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
              "{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
              "{{ '<start_of_turn>' + role + '\n' + m['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
              "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}",
              "<end_of_turn>", ["<bos>", "<start_of_turn>", "<end_of_turn>"]),
}
BOS = {"llama3": "<|begin_of_text|>", "mistral": "<s>", "gemma": "<bos>"}


def family_tokenizer(name, template=None):
    chat, eos, special = FAMILIES[name]
    tok = build_tokenizer()
    if special:
        tok.add_special_tokens({"additional_special_tokens": special})
        tok.eos_token = eos
        tok.bos_token = BOS[name]
    tok.chat_template = template or chat or tok.chat_template
    return tok


GOOD = [
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"},
                  {"role": "assistant", "content": "The answer is 5."}, {"role": "user", "content": "Hello"},
                  {"role": "assistant", "content": "Hello, how can I help you today?"}]},
    {"prompt": [{"role": "user", "content": "Reverse the word apple."}],
     "completion": [{"role": "assistant", "content": "elppa"}]},
    {"prompt": "Reverse the word apple:", "completion": " elppa"},
    {"text": "The quick brown fox jumps over the lazy dog."},
]


def _examples(rows):
    return [to_example(Record(r, f"train.jsonl line {i + 1}")) for i, r in enumerate(rows)]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_clean_data_passes_every_family(family):
    tok = family_tokenizer(family)
    rep = A.audit_examples(_examples(GOOD), tok, max_length=256)
    assert rep.violations == [], [str(v) for v in rep.violations]
    assert rep.counts["examples"] == 4 and rep.counts["violations"] == 0
    ids, labels = render._render_all(_examples(GOOD[:1]), tok, {})[0]
    marked = A.mark_loss(tok, ids, labels)
    eot = FAMILIES[family][1]
    assert f"[[The answer is 5.{eot}]]" in marked.replace("[[ ", "[[")  # Mistral trains the space before the answer
    assert marked.count("[[") == 2 and "[[Be brief" not in marked


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_mask_that_trains_everything_is_caught(family):
    tok = family_tokenizer(family)
    ex = _examples(GOOD[:1])[0]
    ids, _ = render._render_all([ex], tok, {})[0]
    found = A.check_example(ex, ids, list(ids), tok)  # the "fell back to training on all tokens" bug
    context = [v for v in found if v.check == "no_loss_on_context"]
    roles = ["system", "user", "user"] if family not in ("mistral", "gemma") else ["user", "user"]  # folded system
    assert [re.search(r"messages\[\d\] \((\w+)\)", v.message).group(1) for v in context] == roles
    assert context[0].origin == "train.jsonl line 1"


def test_untrained_stop_token_is_caught():
    # a template that leaves the end-of-turn marker off the last assistant turn
    tok = family_tokenizer("chatml", "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] }}"
                           "{% if not loop.last %}{{ '<|im_end|>\n' }}{% endif %}{% endfor %}"
                           "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    rep = A.audit_examples(_examples(GOOD[:1]), tok, max_length=256)
    # no turn trains it: each turn's span ends where the partial conversation's rendering ends
    assert [v.check for v in rep.violations] == ["eos_trained", "eos_trained"]
    assert rep.violations[1].message.startswith("assistant turn 2 does not end with the trained end-of-turn marker "
                                                "'<|im_end|>'")


def test_trailing_space_generation_prompt_is_caught():
    # "Assistant: " alone ends in a space token; in training the space belongs to the answer's first word
    tok = family_tokenizer("chatml", "{% for m in messages %}{{ m['role'] | capitalize + ': ' + m['content'] + "
                           "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}")
    rep = A.audit_examples(_examples(GOOD[:1]), tok, max_length=256)
    assert [v.check for v in rep.violations] == ["generation_prompt", "generation_prompt"]
    assert "tokenizes differently alone than inside the training render (ends '3?<|im_end|>\\nAssistant: ')" in rep.violations[0].message


def test_truncation_that_leaves_no_loss_is_caught():
    rows = [{"prompt": "word " * 80, "completion": " done"}]
    rep = A.audit_examples(_examples(rows), family_tokenizer("chatml"), max_length=32)
    assert [str(v) for v in rep.violations] == [
        "train.jsonl line 1: loss_after_truncation: no loss token left: 86 tokens truncated to data.max_length=32; "
        "raise max_length or shorten the prompt"]
    with pytest.raises(DataError, match=r"^data audit: 1 violation\(s\) in 1 examples \(loss_after_truncation: 1\)\n"
                                        r"  train.jsonl line 1: loss_after_truncation"):
        rep.raise_if_any()


def test_reasoning_tags():
    empty = [{"messages": [{"role": "user", "content": "What is 2 + 3?"},
                           {"role": "assistant", "content": "<think></think>The answer is 5."}]}]
    rep = A.audit_examples(_examples(empty), family_tokenizer("chatml"), max_length=256)
    assert [v.check for v in rep.violations] == ["reasoning"] and "'<think></think>'" in rep.violations[0].message
    # a template that strips reasoning from every assistant turn, the last one included
    strip = ("{% for m in messages %}{% set c = m['content'].split('</think>')[-1] if m['role'] == 'assistant' "
             "else m['content'] %}{{ '<|im_start|>' + m['role'] + '\n' + c + '<|im_end|>\n' }}{% endfor %}"
             "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    kept = [{"messages": [{"role": "user", "content": "What is 2 + 3?"},
                          {"role": "assistant", "content": "<think>2 plus 3 is 5.</think>The answer is 5."}]}]
    assert A.audit_examples(_examples(kept), family_tokenizer("chatml"), max_length=256).violations == []
    rep = A.audit_examples(_examples(kept), family_tokenizer("chatml", strip), max_length=256)
    assert [v.check for v in rep.violations] == ["reasoning"]
    assert rep.violations[0].message.startswith("the last assistant turn's reasoning is not in its trained text")


def test_audit_dataset_errors_or_warns(tmp_path, caplog):
    import json

    from posttrain.config import DataConfig

    f = tmp_path / "train.jsonl"
    f.write_text(json.dumps({"prompt": "word " * 80, "completion": " done"}) + "\n" + json.dumps(GOOD[2]) + "\n")
    cfg = DataConfig(train=str(f), max_length=32)
    with pytest.raises(DataError, match="train.jsonl line 1: loss_after_truncation"):
        A.audit_dataset(cfg, family_tokenizer("chatml"))
    rep = A.audit_dataset(cfg, family_tokenizer("chatml"), strict=False)
    assert rep.counts["examples"] == 2 and rep.counts["loss_after_truncation"] == 1
    assert "data audit: 1 violation(s) in 2 examples" in caplog.text


def test_a_short_tool_result_inside_the_call_before_it_is_not_flagged():
    """A tool result ("1") that also occurs in the trained call before it ("2 - 1") is the tool's turn, not
    trained text: the search for context moves past each trained assistant span (gym:lookup's case)."""
    from posttrain.gym.chat_template import CHAT_TEMPLATE

    tok = build_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    call = {"type": "function", "function": {"name": "calc", "arguments": {"expression": "2 - 1"}}}
    row = {"messages": [{"role": "user", "content": "What is 2 - 1?"},
                        {"role": "assistant", "content": "", "tool_calls": [call]},
                        {"role": "tool", "content": "1"},
                        {"role": "assistant", "content": "It is 1."}],
           "tools": [{"type": "function", "function": {"name": "calc", "description": "Arithmetic",
                                                        "parameters": {"type": "object", "properties": {
                                                            "expression": {"type": "string"}}}}}]}
    rep = A.audit_examples(_examples([row]), tok, max_length=256)
    assert [v.check for v in rep.violations] == [], [str(v) for v in rep.violations]
    ids, labels = render._render_all(_examples([row]), tok, {})[0]
    marked = A.mark_loss(tok, ids, labels)
    assert "[[It is 1." in marked.replace("[[ ", "[[") and marked.count("[[") == 2  # the call and the answer
