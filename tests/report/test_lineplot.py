"""report.lineplot: tick values and labels, and the drawn PNG."""

import io
import math

import numpy as np
from PIL import Image

from posttrain.report.lineplot import PALETTE, nice_ticks, plot_metric, tick_label


def test_nice_ticks_and_labels():
    assert nice_ticks(-0.2, 41.9) == [0, 10, 20, 30, 40]
    assert nice_ticks(0.52, 0.69, 5) == [0.55, 0.6, 0.65]
    assert nice_ticks(0, 1e-4, 5) == [0, 2e-5, 4e-5, 6e-5, 8e-5, 1e-4]
    assert [tick_label(v, 10) for v in (0, 10, 40)] == ["0", "10", "40"]
    assert [tick_label(v, 0.05) for v in (0.55, 0.6)] == ["0.55", "0.60"]
    assert tick_label(2.5, 2.5) == "2.5" and tick_label(6.13012, 2e-5) == "6.13012"  # distinct on a flat curve
    assert [tick_label(v, 2e-5) for v in (2e-5, 1e-4)] == ["2e-05", "0.0001"]
    assert tick_label(2e6, 5e5) == "2e+06"


def _pixels(png):
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)


def _count(pixels, hex_rgb, tol=40):
    rgb = np.array([int(hex_rgb[i:i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(pixels - rgb).sum(axis=2) < tol).sum())


def test_runs_in_their_colours_and_broken_at_nan():
    steps = list(range(1, 101))
    one = [("a", "train", steps, [2.5 * math.exp(-s / 40) for s in steps])]
    two = one + [("b", "eval", steps[9::10], [3.0 * math.exp(-s / 50) for s in steps[9::10]])]
    p1, p2 = _pixels(plot_metric("loss", one, color_of={"a": 0})), _pixels(plot_metric("loss", two, color_of={"a": 0, "b": 1}))
    assert p1.shape == (320, 500, 3) == p2.shape
    assert _count(p1, PALETTE[0]) > 300 and _count(p1, PALETTE[1]) == 0
    assert _count(p2, PALETTE[1]) > 100  # the dashed eval curve with its markers and legend swatch
    with_gap = [("a", "train", steps, [float("nan") if 40 <= s < 60 else 1.0 + s for s in steps])]
    gap = _pixels(plot_metric("loss", with_gap, color_of={"a": 0}))
    assert 0 < _count(gap, PALETTE[0]) < _count(_pixels(plot_metric("loss", [("a", "train", steps, [1.0 + s for s in steps])],
                                                                    color_of={"a": 0})), PALETTE[0])
    flat = _pixels(plot_metric("x", [("a", "train", [1], [float("inf")])], color_of={"a": 0}))
    assert flat.shape == (320, 500, 3)  # nothing finite: empty axes, no error
