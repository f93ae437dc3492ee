"""The demo's closing table in at most 100 columns: a few common columns, each stage's own measures beneath.

    stage   task acc  regression  train s  final loss
    ------  --------  ----------  -------  ----------
    base       0.355       0.790        -           -
    dpo        0.540       0.785       62       0.412
              preference_accuracy 0.955   preference_correctness 0.645

Every stage measures the common columns; what only some stages measure (refusal rates, valid
tool calls, preference accuracy) goes on indented lines under that stage's row instead of
becoming a column that is empty for every other stage.
"""

from __future__ import annotations

import textwrap

WIDTH = 100
COMMON = {"task_accuracy": "task acc", "regression_score": "regression", "regression_delta": "vs base",
          "train_time_s": "train s", "final_train_loss": "final loss"}


def _cell(key: str, value) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if key == "regression_delta":
        return f"{value:+.3f}"
    return f"{value:.0f}" if key == "train_time_s" else f"{value:.3f}"


def format_summary_table(summary: dict[str, dict], width: int = WIDTH) -> str:
    """`summary` {stage: {measure: value}} (the demo's summary.json) as a table of at most `width` columns."""
    cols = [k for k in COMMON if any(k in row for row in summary.values())]
    head = ["stage"] + [COMMON[k] for k in cols]
    cells = [[name] + [_cell(k, row.get(k)) for k in cols] for name, row in summary.items()]
    widths = [max(len(r[i]) for r in [head, *cells]) for i in range(len(head))]

    def line(r):  # the stage name left-aligned, numbers right-aligned
        return "  ".join([r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]).rstrip()

    out = [line(head), "  ".join("-" * w for w in widths)]
    indent = " " * (widths[0] + 2)
    for (name, row), r in zip(summary.items(), cells):
        out.append(line(r))
        # "\xa0" keeps a name and its value on one line (textwrap breaks only at ASCII whitespace)
        own = [f"{k}\xa0{_cell(k, v)}" for k, v in row.items() if k not in COMMON and isinstance(v, (int, float))]
        if own:
            out += [x.replace("\xa0", " ") for x in textwrap.wrap(
                "   ".join(own), width, initial_indent=indent, subsequent_indent=indent, break_on_hyphens=False,
                break_long_words=False)]
    return "\n".join(out)
