"""Format rewards: a reasoning block followed by a final answer (the DeepSeek-R1 layout).

``think_format_reward`` accepts ``<think>reasoning</think> final answer``: exactly one reasoning
block, opened at the start, closed once, with non-empty reasoning and a non-empty answer after
it. ``make_format_reward`` builds variants: other tag names, an explicit
``<answer>...</answer>`` block, or a prompt that already opened ``<think>``.
"""

from __future__ import annotations

import re

from posttrain.rewards.base import completion_text

_TAG_NAME = re.compile(r"[A-Za-z_][\w.-]*")


def make_format_reward(think_tag: str = "think", answer_tag: str | None = None, *,
                       think_opened_in_prompt: bool = False):
    """A reward function returning 1.0 for well-formed completions and 0.0 otherwise.

    ``think_tag``: name of the reasoning block (``<think>``). ``answer_tag``: when set, the text
    after the reasoning block must be exactly one ``<answer_tag>...</answer_tag>`` block with
    non-empty content (surrounding whitespace allowed). ``think_opened_in_prompt``: the chat
    template already emitted ``<think>`` at the end of the prompt, so the completion starts
    inside the block and must not open it again.
    """
    for tag in (think_tag, answer_tag):
        if tag is not None and not _TAG_NAME.fullmatch(tag):
            raise ValueError(f"make_format_reward: tag must be a plain XML name, got {tag!r}")
    t_open, t_close = f"<{think_tag}>", f"</{think_tag}>"
    a_open, a_close = (f"<{answer_tag}>", f"</{answer_tag}>") if answer_tag else (None, None)
    markers = [t for t in (t_open, t_close, a_open, a_close) if t]

    # plain string checks rather than one regex: lazy-match patterns backtrack quadratically on
    # long completions that fail to match
    def well_formed(text: str) -> bool:
        text = text.strip()
        if text.count(t_close) != 1 or text.count(t_open) != (0 if think_opened_in_prompt else 1):
            return False
        if not think_opened_in_prompt:
            if not text.startswith(t_open):
                return False
            text = text[len(t_open):]
        reasoning, answer = text.split(t_close)
        answer = answer.strip()
        if a_open:
            if not (answer.startswith(a_open) and answer.endswith(a_close)):
                return False
            answer = answer[len(a_open):-len(a_close)]
        return bool(reasoning.strip()) and bool(answer.strip()) and not any(m in answer for m in markers)

    def format_reward(prompts, completions, **_columns) -> list[float]:
        return [1.0 if well_formed(completion_text(c)) else 0.0 for c in completions]

    format_reward.__name__ = f"format_reward_{think_tag}" + (f"_{answer_tag}" if answer_tag else "")
    return format_reward


think_format_reward = make_format_reward()
think_format_reward.__name__ = "think_format_reward"
think_format_reward.__doc__ = """1.0 for ``<think>reasoning</think> answer``, else 0.0 (see make_format_reward)."""
