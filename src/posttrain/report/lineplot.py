"""One PNG per metric over steps, drawn with Pillow: the curves of every run report.

Why not matplotlib: a matplotlib figure costs about 0.2 s here (tick and text layout, drawn twice by
``tight_layout`` and ``savefig``), and a GRPO run logs 19 curves, so every run spent about 4 s of its
sign-off on its report (docs/benchmarks.md, "Fixed costs of a run"). This draws the same figure (the
matplotlib colours, DejaVu Sans, train solid and eval dashed, markers on sparse series, a legend in the
emptiest corner) at twice the size and halves it, which anti-aliases lines and text, in a few
milliseconds. The evaluation plots (bars with error bars, `report.plots`) stay on matplotlib.
"""

from __future__ import annotations

import importlib.util
import io
import math
from functools import lru_cache
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

# matplotlib's default cycle ("tab10"): C0 is the first run, C1 the second...
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
           "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]
_TITLES = {"lr": "learning rate", "learning_rate": "learning rate"}
_DASH = {"train": None, "eval": (14, 8)}  # other splits dotted
_WIDTH, _HEIGHT, _SS = 500, 320, 2  # PNG size; drawn _SS times larger, then reduced (anti-aliasing)


def title_of(key: str) -> str:
    return _TITLES.get(key, key.replace("_", " "))


@lru_cache(maxsize=None)
def _font(size: int):
    spec = importlib.util.find_spec("matplotlib")  # its DejaVu Sans, without importing matplotlib
    if spec is not None and spec.submodule_search_locations:
        ttf = Path(spec.submodule_search_locations[0]) / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf"
        if ttf.is_file():
            return ImageFont.truetype(str(ttf), size)
    return ImageFont.load_default(size)


def nice_ticks(lo: float, hi: float, n: int = 6) -> list[float]:
    """At most about ``n`` round values (1, 2, 2.5 or 5 × 10^k apart) within [lo, hi]."""
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9)
    return [float(f"{k * step:.12g}") for k in range(first, int(math.floor(hi / step + 1e-9)) + 1)]


def tick_label(v: float, step: float) -> str:
    """A tick value with as many decimals as the spacing needs (6.13012 next to 6.13014); tiny or huge
    values in %g form."""
    if v == 0:
        return "0"
    if 1e-3 <= abs(v) < 1e5:
        k = math.floor(math.log10(step) + 1e-9)
        decimals = min(8, max(0, -k + (1 if round(step / 10 ** k, 6) == 2.5 else 0)))
        return f"{v:.{decimals}f}"
    return f"{v:.3g}"


def _limits(values: list[float]) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    pad = (hi - lo) * 0.05 or (abs(lo) * 0.05 or 1.0)  # matplotlib's 5% margins; a flat line gets room
    return lo - pad, hi + pad


def _dashed(draw, pts, color, width, dash):
    """A polyline drawn as dashes of ``dash = (on, off)`` pixels, the pattern running on across vertices."""
    on, off = dash
    pos = 0.0  # where in the on+off period the pen is
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        seg = math.hypot(x1 - x0, y1 - y0)
        t = 0.0
        while t < seg:
            phase = pos % (on + off)
            run = (on - phase) if phase < on else (on + off - phase)
            t1 = min(seg, t + run)
            if phase < on:
                a, b = t / seg, t1 / seg
                draw.line([(x0 + (x1 - x0) * a, y0 + (y1 - y0) * a), (x0 + (x1 - x0) * b, y0 + (y1 - y0) * b)],
                          fill=color, width=width)
            pos += t1 - t
            t = t1


def plot_metric(key: str, lines: list[tuple[str, str, list[float], list[float]]], *, color_of: dict[str, int]) -> bytes:
    """PNG (500 x 320) of one metric over steps.

    ``lines`` holds ``(run_name, split, steps, values)``. Colour says which run, line style says
    which split, so train and eval loss of several runs share one set of axes. Non-finite values
    break their line.
    """
    s = _SS
    W, H = _WIDTH * s, _HEIGHT * s
    img = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(img)
    finite = [(x, y) for *_, xs, ys in lines for x, y in zip(xs, ys) if math.isfinite(y) and math.isfinite(x)]
    xs_all = [x for x, _ in finite] or [0.0]
    ys_all = [y for _, y in finite] or [0.0]
    x_lo, x_hi = _limits(xs_all)
    y_lo, y_hi = _limits(ys_all)
    x_ticks, y_ticks = nice_ticks(x_lo, x_hi), nice_ticks(y_lo, y_hi, 5)
    x_step = x_ticks[1] - x_ticks[0] if len(x_ticks) > 1 else 1.0
    y_step = y_ticks[1] - y_ticks[0] if len(y_ticks) > 1 else 1.0
    tick_font, title_font, legend_font = _font(10 * s + 4), _font(11 * s + 6), _font(8 * s + 2)
    y_labels = [tick_label(v, y_step) for v in y_ticks]
    label_w = max((draw.textlength(t, font=tick_font) for t in y_labels), default=0)
    left, right = int(label_w) + 14 * s, W - 12 * s
    top, bottom = 30 * s, H - 44 * s

    def px(x, y):
        return (left + (x - x_lo) / (x_hi - x_lo) * (right - left), bottom - (y - y_lo) / (y_hi - y_lo) * (bottom - top))

    grid, ink = (222, 222, 222), (29, 36, 51)
    for v, label in zip(y_ticks, y_labels):
        y = px(x_lo, v)[1]
        draw.line([(left, y), (right, y)], fill=grid, width=s)
        draw.line([(left - 4 * s, y), (left, y)], fill=ink, width=s)
        draw.text((left - 6 * s, y), label, fill=ink, font=tick_font, anchor="rm")
    for v in x_ticks:
        x = px(v, y_lo)[0]
        draw.line([(x, top), (x, bottom)], fill=grid, width=s)
        draw.line([(x, bottom), (x, bottom + 4 * s)], fill=ink, width=s)
        draw.text((x, bottom + 6 * s), tick_label(v, x_step), fill=ink, font=tick_font, anchor="ma")
    draw.text(((left + right) / 2, H - 4 * s), "step", fill=ink, font=tick_font, anchor="md")
    draw.text(((left + right) / 2, top - 8 * s), title_of(key), fill=ink, font=title_font, anchor="md")

    several_runs = len({run for run, *_ in lines}) > 1
    several_splits = len({split for _, split, *_ in lines}) > 1
    legend = []
    for run, split, steps, values in lines:
        color = PALETTE[color_of[run] % len(PALETTE)]
        dash = _DASH.get(split, (3 * s, 5 * s))
        width = 2 * s
        pieces, cur = [], []
        for x, y in zip(steps, values):
            if math.isfinite(x) and math.isfinite(y):
                cur.append(px(x, y))
            elif cur:
                pieces.append(cur)
                cur = []
        pieces.append(cur)
        for pts in pieces:
            if len(pts) > 1:
                if dash is None:
                    draw.line(pts, fill=color, width=width, joint="curve")
                else:
                    _dashed(draw, pts, color, width, dash)
            if len(steps) <= 40 or len(pts) == 1:  # sparse series (eval every N steps) need markers
                r = 2.2 * s
                for x, y in pts:
                    draw.ellipse([x - r, y - r, x + r, y + r], fill=color)
        label = " / ".join(x for x, show in ((run, several_runs), (split, several_splits)) if show) or split
        legend.append((label, color, dash))
    draw.rectangle([left, top, right, bottom], outline=ink, width=s)

    if len(lines) > 1:
        row = 15 * s
        box_w = 30 * s + max(draw.textlength(t, font=legend_font) for t, *_ in legend)
        box_h = row * len(legend)
        # the corner with the fewest points under it, as matplotlib's loc="best" would choose
        corners = [(right - box_w - 8 * s, top + 6 * s), (left + 8 * s, top + 6 * s),
                   (right - box_w - 8 * s, bottom - box_h - 6 * s), (left + 8 * s, bottom - box_h - 6 * s)]
        pts = [px(x, y) for x, y in finite]

        def covered(c):
            return sum(c[0] <= x <= c[0] + box_w and c[1] <= y <= c[1] + box_h for x, y in pts)

        bx, by = min(corners, key=covered)
        for i, (label, color, dash) in enumerate(legend):
            y = by + i * row + row / 2
            swatch = [(bx, y), (bx + 22 * s, y)]
            if dash is None:
                draw.line(swatch, fill=color, width=2 * s)
            else:
                _dashed(draw, swatch, color, 2 * s, dash)
            draw.text((bx + 28 * s, y), label, fill=ink, font=legend_font, anchor="lm")

    buf = io.BytesIO()
    img.reduce(s).save(buf, format="png")
    return buf.getvalue()
