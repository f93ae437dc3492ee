"""Loss-mask and chat-template audit: catch the silent mistakes before a run trains on them.

Each example is rendered exactly as training renders it (data/render.py) and checked:

- `eos_trained`: the end-of-turn marker after every trained assistant turn (`<|im_end|>`,
  `<|eot_id|>`, `</s>`, `<end_of_turn>`), or the EOS after a completion / text, carries loss;
  a model that never trains its stop token never stops.
- `loss_after_truncation`: at least one loss token is left within `data.max_length`.
- `no_loss_on_context`: no system, user or tool content carries loss.
- `generation_prompt`: the prompt the model will see at inference (`add_generation_prompt=True`)
  tokenizes to the same ids that precede the assistant turn in training; a template whose
  header merges with the answer's first token trains a boundary inference never produces.
- `reasoning`: no trained turn holds an empty reasoning block (`<think></think>`), and the last
  assistant turn's reasoning, when its message has one, is trained (templates may drop the
  reasoning of *earlier* turns, as documented in docs/data.md; the last turn must keep it).

    report = audit_examples(examples, tokenizer, max_length=1024)
    report.counts        # {"examples": 200, "loss_tokens": 9120, "violations": 0, ...}
    report.raise_if_any()    # DataError naming each failing example's origin (or .warn())
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Optional, Sequence

from posttrain.data import render
from posttrain.data.formats import Example, to_example
from posttrain.data.render import IGNORE_INDEX
from posttrain.data.hub import as_list, load_records
from posttrain.data.sources import DataError

log = logging.getLogger(__name__)

CHECKS = ("eos_trained", "loss_after_truncation", "no_loss_on_context", "generation_prompt", "reasoning")
THINK = ("<think>", "</think>")
_EMPTY_THINK = re.compile(r"<think>\s*</think>")


@dataclass
class Violation:
    origin: str
    check: str
    message: str

    def __str__(self) -> str:
        return f"{self.origin}: {self.check}: {self.message}"


@dataclass
class AuditReport:
    counts: dict = field(default_factory=dict)
    violations: list[Violation] = field(default_factory=list)

    def raise_if_any(self, show: int = 5) -> None:
        """A DataError listing the first `show` violations (with origins) and the count per check."""
        if self.violations:
            raise DataError(self._summary(show))

    def warn(self) -> None:
        """One warning line: the counts per check and the first violation with its origin."""
        if self.violations:
            log.warning("%s; first: %s (data.audit: warn; posttrain data inspect CONFIG shows them all)",
                        self._summary(0).splitlines()[0], self.violations[0])

    def _summary(self, show: int) -> str:
        per = {c: sum(v.check == c for v in self.violations) for c in CHECKS}
        head = ", ".join(f"{c}: {n}" for c, n in per.items() if n)
        n = self.counts.get("examples", 0)
        lines = [f"data audit: {len(self.violations)} violation(s) in {n} examples ({head})"]
        lines += [f"  {v}" for v in self.violations[:show]]
        if show and len(self.violations) > show:
            lines.append(f"  ... and {len(self.violations) - show} more (posttrain data inspect CONFIG shows them all)")
        return "\n".join(lines)


def _runs(labels: Sequence[int]) -> list[tuple[int, int]]:
    """Maximal [start, end) runs of labelled (loss) positions."""
    runs, start = [], None
    for i, y in enumerate(list(labels) + [IGNORE_INDEX]):
        if y != IGNORE_INDEX and start is None:
            start = i
        elif y == IGNORE_INDEX and start is not None:
            runs.append((start, i))
            start = None
    return runs


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _audit_plain(ex: Example, ids, labels, tokenizer) -> list[Violation]:
    eos = tokenizer.eos_token_id
    if eos is None or not ids:
        return []
    if labels[-1] != eos:
        what = "text" if ex.kind == "text" else "completion"
        return [Violation(ex.origin, "eos_trained", f"the {what} does not end with a trained EOS "
                          f"({tokenizer.eos_token!r}); the model would not learn to stop")]
    return []


def check_example(ex: Example, ids: Sequence[int], labels: Sequence[int], tokenizer) -> list[Violation]:
    """Every check but truncation on one example's full (untruncated) ids and labels."""
    if ex.kind == "text" or isinstance(ex.prompt, str):
        return _audit_plain(ex, ids, labels, tokenizer)
    return _audit_chat(ex, ids, labels, tokenizer)


def _audit_chat(ex: Example, ids, labels, tokenizer) -> list[Violation]:
    out: list[Violation] = []
    stats: dict = {}
    full, spans = render._chat_spans(ex, tokenizer, stats)  # the same rendering and spans as training
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    messages = ex.messages if ex.messages is not None else ex.prompt + ex.completion
    if stats.get("system_folded"):  # as render folds it for templates without a system role
        messages = [dict(messages[1], content=messages[0]["content"] + "\n\n" + messages[1]["content"])] + messages[2:]
    trained_text = [full[a:b] for a, b in spans]

    # the end-of-turn marker closes every trained turn, and carries loss
    marker = render.end_of_turn_marker(tokenizer)
    marker_ids = _ids(tokenizer, marker) if marker else []
    for k, (a, b) in enumerate(spans):
        toks = [t for t, (s, e) in enumerate(offsets) if a <= s < b and e > s]
        last = toks[-len(marker_ids):] if marker_ids else []
        if marker_ids and ([ids[t] for t in last] != marker_ids or any(labels[t] == IGNORE_INDEX for t in last)):
            out.append(Violation(ex.origin, "eos_trained", f"assistant turn {k + 1} does not end with the trained "
                                 f"end-of-turn marker {marker!r} as tokens of its own (its trained tokens end "
                                 f"{tokenizer.decode([ids[t] for t in toks[-3:]])!r}); the model may never learn "
                                 "to stop"))

    # no loss on system / user / tool content
    # the search moves past each trained assistant turn's whole span (tool calls included: a short tool
    # result such as "1" must not be found inside the call before it, "2 - 1")
    assistant_idx = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    span_of = dict(zip(assistant_idx[-len(spans):], spans)) if spans else {}
    cursor = 0
    for i, m in enumerate(messages):
        content = (m.get("content") or "").strip()
        if m["role"] == "assistant" or not content:
            if i in span_of:
                cursor = max(cursor, span_of[i][1])
            elif m["role"] == "assistant" and content:
                pos = full.find(content, cursor)
                cursor = pos + len(content) if pos >= 0 else cursor
            continue
        pos = full.find(content, cursor)
        if pos < 0:
            continue  # a template that moves or rewrites this turn (e.g. the system prompt): nothing to check
        cursor = pos + len(content)
        end = pos + len(content)
        # a token overlapping the content with a visible character of it (" Hello" starts at its space)
        hit = [t for t, (s, e) in enumerate(offsets)
               if s < end and e > pos and labels[t] != IGNORE_INDEX and full[max(s, pos):min(e, end)].strip()]
        if hit:
            shown = tokenizer.decode(list(ids[hit[0]:hit[min(7, len(hit) - 1)] + 1]))
            out.append(Violation(ex.origin, "no_loss_on_context", f"{len(hit)} token(s) of messages[{i}] "
                                 f"({m['role']}) carry loss: {shown!r}"))

    # the inference-time prompt is what training put before each assistant turn
    trained_idx = [i for i, m in enumerate(messages) if m["role"] == "assistant"][-len(spans):] if spans else []
    for k, i in enumerate(trained_idx):
        try:
            prompt = render._render(tokenizer, messages[:i], ex.tools, True)
        except Exception:  # a template that cannot render a partial conversation: nothing to compare
            continue
        if not full.startswith(prompt):
            continue  # history-rewriting templates (docs/data.md): the prefix is not comparable
        p_ids = _ids(tokenizer, prompt)
        if ids[:len(p_ids)] != p_ids:
            out.append(Violation(ex.origin, "generation_prompt", f"the generation prompt before assistant turn {k + 1} "
                                 f"tokenizes differently alone than inside the training render (ends "
                                 f"{prompt[-24:]!r}); inference would start from a boundary training never saw"))
    # reasoning blocks
    for k, text in enumerate(trained_text):
        if _EMPTY_THINK.search(text):
            out.append(Violation(ex.origin, "reasoning", f"assistant turn {k + 1} trains an empty reasoning block "
                                 f"{_EMPTY_THINK.search(text).group(0)!r}; drop the tags or write the reasoning"))
    last = next((m for m in reversed(messages) if m["role"] == "assistant"), None)
    if last and spans and THINK[0] in (last.get("content") or ""):
        inner = (last["content"].split(THINK[0], 1)[1].split(THINK[1], 1)[0]).strip()
        if inner and inner not in trained_text[-1]:
            out.append(Violation(ex.origin, "reasoning", "the last assistant turn's reasoning is not in its trained "
                                 "text: the chat template drops it, so the model would learn to answer without it"))
    return out


def audit_examples(examples: Sequence[Example], tokenizer, *, max_length: int,
                   overflow: str = "truncate") -> AuditReport:
    """Render every example as training does and run every check; counts and violations in a report."""
    report = AuditReport(counts={"examples": 0, "tokens": 0, "loss_tokens": 0, "truncated": 0,
                                 **dict.fromkeys(CHECKS, 0)})
    for ex in examples:
        c = report.counts
        c["examples"] += 1
        found: list[Violation] = []
        ids, labels = render._render_all([ex], tokenizer, {})[0]
        fit = render._fit(ids, labels, ex.origin, max_length, overflow, False, {"truncated": 0, "dropped_overflow": 0})
        kept = fit[0] if fit else None
        if kept is None or kept.num_loss_tokens == 0:
            why = "dropped as too long (data.overflow=drop)" if kept is None else "truncated"
            found.append(Violation(ex.origin, "loss_after_truncation", f"no loss token left: {len(ids)} tokens {why} "
                                   f"to data.max_length={max_length}; raise max_length or shorten the prompt"))
        elif kept.truncated:
            c["truncated"] += 1
        if kept is not None:
            c["tokens"] += len(kept)
            c["loss_tokens"] += kept.num_loss_tokens
        found += check_example(ex, ids, labels, tokenizer)
        for v in found:
            c[v.check] += 1
        report.violations += found
    report.counts["violations"] = len(report.violations)
    return report


def mark_loss(tokenizer, ids: Sequence[int], labels: Sequence[int], *, open_: str = "[[", close: str = "]]") -> str:
    """The decoded example with every run of loss tokens wrapped in `open_` ... `close`."""
    out, prev = [], 0
    for a, b in _runs(labels):
        out.append(tokenizer.decode(list(ids[prev:a])))
        out.append(open_ + tokenizer.decode(list(ids[a:b])) + close)
        prev = b
    out.append(tokenizer.decode(list(ids[prev:])))
    return "".join(out)


def _examples(data_cfg, tokenizer, limit: Optional[int]) -> list[Example]:
    """The first `limit` (else `data.limit`, else all) training examples of a DataConfig, validated;
    `data.chat_template`, when set, is put on the tokenizer as training does."""
    if not data_cfg.train:
        raise DataError("no training data: set data.train (a file, a list of files, or gym:TASK)")
    n = min(x for x in (limit, data_cfg.limit) if x) if (limit or data_cfg.limit) else None
    # read as training reads them: Hub sources, data.columns (Alpaca, Q/A and ShareGPT rows mapped)
    records = [r for s in as_list(data_cfg.train) for r in load_records(s, columns=data_cfg.columns,
                                                                          streaming=data_cfg.streaming, limit=n)[0]]
    if data_cfg.chat_template:
        tokenizer.chat_template = data_cfg.chat_template
    return [to_example(r, data_cfg.format) for r in (records[:n] if n else records)]


def audit_dataset(data_cfg, tokenizer, *, limit: Optional[int] = 1000, strict: bool = True) -> AuditReport:
    """The audit of a run's training data (`data.train`, its first `limit` rows: a template or mask
    mistake shows in any row, and 1000 rows take about 3 s): a DataError on any violation, or with
    `strict=False` one logged warning line. Every stage that trains on rendered chat, completion or
    text data (sft, cpt, safety's sft form) makes this call before training (`data.audit`)."""
    examples = _examples(data_cfg, tokenizer, limit)
    report = audit_examples(examples, tokenizer, max_length=data_cfg.max_length, overflow=data_cfg.overflow)
    report.raise_if_any() if strict else report.warn()
    return report


def inspect(data_cfg, tokenizer, *, show: int = 1, limit: Optional[int] = None, out=print) -> AuditReport:
    """`posttrain data inspect`: print the first `show` examples rendered with their loss tokens in
    [[...]], then the audit's counts and every violation. Returns the report (no exception)."""
    examples = _examples(data_cfg, tokenizer, limit)
    for ex in examples[:show]:
        ids, labels = render._render_all([ex], tokenizer, {})[0]
        trained = sum(1 for y in labels[1:] if y != IGNORE_INDEX)
        out(f"--- {ex.origin} ({ex.kind}): {len(ids)} tokens, {trained} with loss, in [[...]]")
        out(mark_loss(tokenizer, ids, labels))
    report = audit_examples(examples, tokenizer, max_length=data_cfg.max_length, overflow=data_cfg.overflow)
    c = report.counts
    out(f"--- {c['examples']} examples, {c['tokens']} tokens, {c['loss_tokens']} with loss "
        f"({c['loss_tokens'] / max(c['tokens'], 1):.1%}), {c['truncated']} truncated to "
        f"data.max_length={data_cfg.max_length}")
    out("checks: " + ", ".join(f"{k} {'ok' if not c[k] else str(c[k]) + ' violation(s)'}" for k in CHECKS))
    for v in report.violations:
        out(f"  {v}")
    return report
