"""The report's pictures: line plots of a run's metrics and predicted formulas drawn back with mathtext, as PNG
bytes and ``data:`` URIs (the report embeds every image, so it opens offline, anywhere).

Figures are standalone matplotlib ``Figure``s on the Agg canvas (no pyplot state, no rcParams changes) saved
without the software stamp, so the same numbers give the same bytes.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from vlmtune.data.latex_ocr import render_formula

PLOT_SIZE = (5.6, 3.2)
"""Inches; at ``PLOT_DPI`` two plots sit side by side in a laptop browser."""
PLOT_DPI = 100
FORMULA_FONTSIZE, FORMULA_DPI = 16, 100
MAX_FORMULA_CHARS = 400
"""Longer predictions (a model that never stops) are shown as text: drawn, they would be metres wide."""


def png_uri(png: bytes) -> str:
    """A ``data:image/png;base64,...`` URI of PNG bytes."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def line_plot(
    title: str, series: Sequence[tuple[str, Sequence[float], Sequence[float | None], str]], ylabel: str = ""
) -> bytes | None:
    """A PNG line plot of ``series`` over steps, or None when no series has a value.

    Args:
        title: the plot's title.
        series: ``(label, steps, values, style)`` each; ``None`` values are left out; style is a matplotlib
            format string (``"-"`` a line, ``"o-"`` a line with markers).
        ylabel: the y axis label.
    """
    points = [
        (label, [(x, y) for x, y in zip(xs, ys, strict=True) if y is not None], style)
        for label, xs, ys, style in series
    ]
    points = [(label, pairs, style) for label, pairs, style in points if pairs]
    if not points:
        return None
    figure = Figure(figsize=PLOT_SIZE)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for label, pairs, style in points:
        axes.plot([x for x, _ in pairs], [y for _, y in pairs], style, label=label, markersize=4)
    axes.set_title(title)
    axes.set_xlabel("step")
    axes.set_ylabel(ylabel)
    axes.grid(alpha=0.3)
    if len(points) > 1:
        axes.legend()
    figure.tight_layout()
    return _png(figure)


def formula_png(latex: str) -> bytes | None:
    """``latex`` drawn by matplotlib mathtext, or None when mathtext cannot parse it (or it is empty or huge)."""
    if not latex.strip() or len(latex) > MAX_FORMULA_CHARS:
        return None
    try:
        return render_formula(latex, FORMULA_FONTSIZE, FORMULA_DPI)
    except ValueError:  # mathtext's parse errors (unknown symbol, unbalanced braces, double superscript ...)
        return None


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=PLOT_DPI, metadata={"Software": None})
    return buffer.getvalue()
