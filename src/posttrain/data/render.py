"""Render examples to token ids and build loss labels.

Labels are -100 everywhere except on the tokens the model should learn to produce:

- text: every token, plus an appended EOS;
- prompt-completion (strings): the completion tokens plus an appended EOS;
- conversational (and conversational prompt-completion): every assistant turn (of the completion
  part only, for prompt-completion), including the template's end-of-turn marker
  (``<|im_end|>``, ``<|eot_id|>``, ``</s>``, ``<end_of_turn>``) so the model learns to stop.

Finding the assistant tokens without ``{% generation %}`` markers: a chat template is a function
of the message list, and for nearly every template the rendering of ``messages[:i+1]`` is a
prefix of the rendering of the whole conversation. Assistant turn ``i`` is therefore the text
between ``render(messages[:i], add_generation_prompt=True)`` and ``render(messages[:i+1])``
(minus trailing whitespace after the end-of-turn marker). Templates that rewrite history (e.g.
dropping reasoning from earlier turns, or moving the system prompt into the last user turn) break
the prefix property; for those each assistant content is located in order in the full rendering
and the end-of-turn marker, learnt once per template from a sentinel conversation, is appended.
Character spans become token labels through the tokenizer's offset mapping.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from os.path import commonprefix
from typing import Optional

from posttrain.data.formats import Example
from posttrain.data.sources import DataError
from posttrain.data.tools import has_tool_content, supports_tools, to_fallback

IGNORE_INDEX = -100
log = logging.getLogger(__name__)


@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]
    origin: str
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_loss_tokens(self) -> int:
        # position 0 is never predicted (nothing precedes it), so it never counts
        return sum(1 for x in self.labels[1:] if x != IGNORE_INDEX)


COUNTERS = ("examples", "truncated", "dropped_overflow", "dropped_no_loss", "system_folded",
            "split_into_chunks", "tokens", "loss_tokens")


def tokenize_example(example: Example, tokenizer, *, max_length: int, overflow: str = "truncate") -> Optional[Tokenized]:
    """One example's tokens and labels; None when it is dropped (too long with overflow="drop",
    or no loss token left after truncation)."""
    out = tokenize_examples([example], tokenizer, max_length=max_length, overflow=overflow)
    return out[0] if out else None


def tokenize_examples(examples: list[Example], tokenizer, *, max_length: int, overflow: str = "truncate",
                      split_long: bool = False, stats: Optional[dict] = None) -> list[Tokenized]:
    """Tokenize many examples with batched tokenizer calls; update `stats` counters (see COUNTERS).

    overflow: "truncate" keeps the first `max_length` tokens, "drop" drops the example.
    split_long: cut long examples into consecutive `max_length` chunks instead (continued pretraining).
    An example left with no loss token is dropped and counted in ``dropped_no_loss``.
    """
    if overflow not in ("truncate", "drop"):
        raise ValueError(f"overflow must be 'truncate' or 'drop', got {overflow!r}")
    stats = stats if stats is not None else {}
    for k in COUNTERS:
        stats.setdefault(k, 0)
    pieces = _render_all(examples, tokenizer, stats)
    out: list[Tokenized] = []
    no_loss: list[str] = []
    dropped_before = stats["dropped_no_loss"]
    for ex, (ids, labels) in zip(examples, pieces):
        stats["examples"] += 1
        for tok in _fit(ids, labels, ex.origin, max_length, overflow, split_long, stats):
            if tok.num_loss_tokens == 0:
                stats["dropped_no_loss"] += 1
                if len(no_loss) < 3:
                    no_loss.append(tok.origin)
                continue
            stats["tokens"] += len(tok)
            stats["loss_tokens"] += tok.num_loss_tokens
            out.append(tok)
    if no_loss:
        log.warning("%d example(s) had no loss token left within max_length=%d and were dropped (e.g. %s)",
                    stats["dropped_no_loss"] - dropped_before, max_length, "; ".join(no_loss))
    return out


def _fit(ids, labels, origin, max_length, overflow, split_long, stats) -> list[Tokenized]:
    if len(ids) <= max_length:
        return [Tokenized(ids, labels, origin)]
    if split_long:
        stats["split_into_chunks"] += 1
        chunks = []
        for s in range(0, len(ids), max_length):
            if len(ids) - s >= 2:  # a 1-token chunk predicts nothing
                chunks.append(Tokenized(ids[s:s + max_length], labels[s:s + max_length], f"{origin} chunk {s // max_length}"))
        return chunks
    if overflow == "drop":
        stats["dropped_overflow"] += 1
        return []
    stats["truncated"] += 1
    return [Tokenized(ids[:max_length], labels[:max_length], origin, truncated=True)]


# ---------------------------------------------------------------- rendering


def _render_all(examples: list[Example], tokenizer, stats: dict) -> list[tuple[list[int], list[int]]]:
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    results: list = [None] * len(examples)
    plain_idx = [i for i, e in enumerate(examples) if e.kind == "text" or isinstance(e.prompt, str)]
    plain_set = set(plain_idx)
    chat_idx = [i for i in range(len(examples)) if i not in plain_set]

    if plain_idx:
        firsts = [examples[i].text if examples[i].kind == "text" else examples[i].prompt for i in plain_idx]
        first_ids = tokenizer(firsts, add_special_tokens=True)["input_ids"]
        comp_pos = [j for j, i in enumerate(plain_idx) if examples[i].kind != "text"]
        comps = [examples[plain_idx[j]].completion for j in comp_pos]
        comp_ids = tokenizer(comps, add_special_tokens=False)["input_ids"] if comps else []
        comp_of = dict(zip(comp_pos, comp_ids))
        for j, i in enumerate(plain_idx):
            head = list(first_ids[j])
            if j in comp_of:
                tail = list(comp_of[j])
                tail += eos if not tail or tail[-1] not in eos else []
                results[i] = (head + tail, [IGNORE_INDEX] * len(head) + tail)
            else:
                ids = head + (eos if not head or head[-1] not in eos else [])
                results[i] = (ids, list(ids))

    if chat_idx:
        rendered = [_chat_spans(examples[i], tokenizer, stats) for i in chat_idx]
        try:
            enc = tokenizer([r[0] for r in rendered], add_special_tokens=False, return_offsets_mapping=True)
        except NotImplementedError:
            raise DataError("conversational data needs a fast tokenizer (character offsets map the assistant "
                            f"turns to tokens); {type(tokenizer).__name__} has none") from None
        for j, i in enumerate(chat_idx):
            ids, offsets, spans = enc["input_ids"][j], enc["offset_mapping"][j], rendered[j][1]
            labels = [IGNORE_INDEX] * len(ids)
            k = 0
            for t, (start, end) in enumerate(offsets):
                while k < len(spans) and start >= spans[k][1]:
                    k += 1
                if k < len(spans) and spans[k][0] <= start < spans[k][1] and end > start:
                    labels[t] = ids[t]
            results[i] = (list(ids), labels)
    return results


def _render(tokenizer, messages, tools, gen: bool) -> str:
    return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=gen)


def _chat_spans(ex: Example, tokenizer, stats: dict) -> tuple[str, list[tuple[int, int]]]:
    """The full rendering of a conversation and the character spans of its trained assistant turns."""
    if ex.messages is not None:
        messages, first_trained = ex.messages, 0
    else:
        messages, first_trained = ex.prompt + ex.completion, len(ex.prompt)
    tools = ex.tools
    if not supports_tools(tokenizer) and has_tool_content(messages, tools):
        # a template that knows no tools: calls and results become plain turns (data/tools.py)
        if ex.messages is not None:
            messages, tools = to_fallback(messages, tools), None
        else:
            head = to_fallback(ex.prompt, tools)
            messages, first_trained, tools = head + to_fallback(ex.completion, None), len(head), None
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{ex.origin}: conversational data needs a chat template, and the tokenizer has none "
                        "(set data.chat_template)")
    try:
        full = _render(tokenizer, messages, tools, False)
    except Exception as e:  # jinja raise_exception(...) surfaces as TemplateError
        if messages[0]["role"] != "system" or len(messages) < 2 or messages[1]["role"] != "user":
            raise DataError(f"{ex.origin}: the chat template rejected this conversation: {e}") from None
        # templates without a system role (Gemma 1/2, Mistral v0.1): fold it into the first user turn
        sys_msg, user = messages[0], messages[1]
        messages = [dict(user, content=sys_msg["content"] + "\n\n" + user["content"])] + messages[2:]
        first_trained = max(0, first_trained - 1)
        try:
            full = _render(tokenizer, messages, tools, False)
        except Exception as e2:
            raise DataError(f"{ex.origin}: the chat template rejected this conversation: {e2}") from None
        stats["system_folded"] = stats.get("system_folded", 0) + 1
    trained = [i for i, m in enumerate(messages) if m["role"] == "assistant" and i >= first_trained]
    try:
        spans = _prefix_spans(tokenizer, messages, tools, full, trained)
    except Exception:  # a template that refuses partial conversations: locate the contents instead
        spans = None
    if spans is None:
        spans = _search_spans(tokenizer, messages, full, trained, ex.origin)
    for i, (start, end) in zip(trained, spans):
        for call in messages[i].get("tool_calls") or []:
            # a template that ignores tool_calls would train an empty turn: say so instead
            if call["function"]["name"] not in full[start:end]:
                raise DataError(f"{ex.origin}: messages[{i}].tool_calls are not written by the chat template "
                                "(the assistant turn renders without them); use a template that renders tool calls")
    return full, spans


def _prefix_spans(tokenizer, messages, tools, full, trained) -> Optional[list[tuple[int, int]]]:
    spans = []
    for i in trained:
        before = _render(tokenizer, messages[:i], tools, True) if i else ""
        upto = full if i == len(messages) - 1 else _render(tokenizer, messages[:i + 1], tools, False)
        if not full.startswith(upto):
            return None
        start = len(commonprefix([before, upto]))
        end = len(upto.rstrip())
        if end <= start or (spans and start < spans[-1][1]):
            return None
        spans.append((start, end))
    return spans


_EOT_CACHE: dict[tuple, str] = {}
_SENTINEL = "\u2063posttrain-sentinel\u2063"


def end_of_turn_marker(tokenizer) -> str:
    """The text a template writes right after an assistant message (stripped), e.g. '<|im_end|>'."""
    key = (tokenizer.chat_template, tokenizer.eos_token)
    if key not in _EOT_CACHE:
        msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _SENTINEL}]
        try:
            text = _render(tokenizer, msgs, None, False)
            after = text[text.rindex(_SENTINEL) + len(_SENTINEL):].strip()
        except Exception:  # a template that cannot render the probe: fall back to EOS
            after = ""
        _EOT_CACHE[key] = after or (tokenizer.eos_token or "")
    return _EOT_CACHE[key]


def _search_spans(tokenizer, messages, full, trained, origin) -> list[tuple[int, int]]:
    marker = end_of_turn_marker(tokenizer)
    spans, cursor, trained = [], 0, set(trained)
    for i, m in enumerate(messages):
        content = m["content"].strip()
        pos = full.find(content, cursor) if content else -1
        if m["role"] != "assistant":
            if pos >= 0 and m["role"] != "system":  # templates may move the system prompt anywhere
                cursor = pos + len(content)
            continue
        if pos < 0:
            raise DataError(f"{origin}: cannot locate messages[{i}] (assistant) in the rendered chat template; "
                            "the template rewrites assistant turns, so their loss mask cannot be derived")
        end = pos + len(content)
        rest = full[end:]
        if marker and rest.lstrip(" ").startswith(marker):
            end += len(rest) - len(rest.lstrip(" ")) + len(marker)
        cursor = end
        # a space the template puts before the content ("[/INST] answer") belongs to the answer's first token
        while pos > 0 and full[pos - 1] == " ":
            pos -= 1
        if i in trained:
            spans.append((pos, end))
    return spans
