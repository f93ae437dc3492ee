"""The evaluation plots (bars with error bars), rendered with matplotlib's Agg canvas and returned as PNG bytes.

The object-oriented API (``Figure`` + ``FigureCanvasAgg``) is used instead of ``pyplot``: it
never touches the process-wide backend or pyplot's figure registry, so building a report inside
a notebook or a training process leaks no figures and changes no global state.
"""

from __future__ import annotations

import io

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

# The curves over steps are drawn without matplotlib (`report.lineplot`); `title_of` stays importable here.
from posttrain.report.lineplot import title_of  # noqa: F401  (the studio's titles)


def plot_bars(title: str, labels: list[str], groups: list[tuple[str, list[float], list[float]]], *,
              xlabel: str = "") -> bytes:
    """PNG of horizontal bars with error bars: one row per label, one bar per group.

    ``groups`` holds ``(name, values, errors)`` (errors are half-widths, e.g. one standard error).
    Used for evaluation results, where the x axis is a score rather than a step.
    """
    n, k = len(labels), max(1, len(groups))
    fig = Figure(figsize=(6.0, max(2.4, 0.9 + 0.32 * n * k)), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    height = 0.8 / k
    for j, (name, values, errors) in enumerate(groups):
        ys = [i + (j - (k - 1) / 2) * height for i in range(n)]
        ax.barh(ys, values, height=height * 0.9, xerr=errors, color=f"C{j % 10}", label=name,
                error_kw={"elinewidth": 1, "capsize": 2})
    ax.set_yticks(range(n), labels, fontsize=8)
    ax.invert_yaxis()  # first label on top, as in the table
    ax.set_title(title, fontsize=11)
    ax.set_xlabel(xlabel)
    ax.grid(True, axis="x", alpha=0.3)
    if len(groups) > 1:  # outside the axes: a bar may reach any corner
        ax.legend(fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def plot_deltas(title: str, labels: list[str], deltas: list[float], errors: list[float], flagged: list[bool], *,
                threshold: float | None = None, xlabel: str = "tuned − base") -> bytes:
    """PNG of one horizontal bar per delta with its error bar; flagged bars are red.

    ``threshold`` draws the tolerated loss (``-threshold``) as a dashed line, so a bar that crosses
    it is visibly a regression.
    """
    n = len(labels)
    fig = Figure(figsize=(6.0, max(2.4, 0.9 + 0.3 * n)), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    colors = ["#c62828" if f else "C0" for f in flagged]
    ax.barh(range(n), deltas, xerr=errors, color=colors, height=0.7, error_kw={"elinewidth": 1, "capsize": 2})
    ax.axvline(0.0, color="#1d2433", linewidth=0.8)
    if threshold is not None:
        ax.axvline(-threshold, color="#c62828", linestyle="--", linewidth=1, label=f"−{threshold:g} (max drop)")
        ax.legend(fontsize=8, frameon=False)
    ax.set_yticks(range(n), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_title(title, fontsize=11)
    ax.set_xlabel(xlabel)
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
