"""Small line charts as inline SVG, for the live view.

A Plotly chart costs the browser its library (about 3 CPU-seconds to load in each tab) and
0.1-0.2 s of CPU for every redraw; an SVG of a few hundred points is drawn by the browser's own
renderer in a few ms. While a run trains on the CPU, that CPU is the trainer's (bench/live_view.py),
so the live view draws these, and the finished run's views keep the interactive Plotly figures.

    svg = line_chart("Training loss", [Series("step loss", points, "#4f46e5")], "optimiser step", "cross-entropy")
    st.image(svg, width="stretch")  # an <img> of the SVG: st.html would strip SVG elements

Everything drawn here is numbers and the app's own titles; names are escaped all the same.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from html import escape

WIDTH = 480
MARGIN = {"left": 50, "right": 12, "top": 40, "bottom": 40}
GRID, AXIS_TEXT, TITLE_TEXT = "#e5e7eb", "#6b7280", "#1f2937"
FONT = "font-family:'Source Sans Pro','Helvetica Neue',Arial,sans-serif"


@dataclass
class Series:
    name: str
    points: list[tuple[float, float]]
    color: str
    lines: bool = True
    markers: bool = False
    marker_size: float = 2.5
    labels: list[str] = field(default_factory=list)  # a text above each point (same order), or none


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About n round tick values covering [lo, hi] (steps of 1, 2 or 5 times a power of ten)."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return []
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / max(1, n)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.floor(lo / step + 1e-9) * step
    ticks, t = [], first
    while t <= hi + step * 1e-6 and len(ticks) < 50:
        ticks.append(round(t, 12))
        t += step
    if ticks[-1] < hi:
        ticks.append(round(ticks[-1] + step, 12))
    return ticks


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.4g}"


def line_chart(
    title: str,
    series: list[Series],
    x_title: str,
    y_title: str,
    height: int = 260,
    y_range: tuple[float, float] | None = None,
    integer_x: bool = False,
) -> str:
    """One chart: a title, a legend when there are several series, gridlines with round ticks,
    axis titles, and each series as a line and/or markers. Non-finite points are left out."""
    finite = [
        [
            (float(x), float(y))
            for x, y in s.points
            if x is not None and y is not None and math.isfinite(x) and math.isfinite(y)
        ]
        for s in series
    ]
    pts = [p for ps in finite for p in ps]
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {height}" width="{WIDTH}" '
        f'height="{height}" style="{FONT}">',
        f'<text x="{MARGIN["left"]}" y="18" font-size="14" fill="{TITLE_TEXT}">{escape(title)}</text>',
    ]
    left, right = MARGIN["left"], WIDTH - MARGIN["right"]
    top, bottom = MARGIN["top"], height - MARGIN["bottom"]
    if not pts:
        parts.append(
            f'<text x="{(left + right) / 2}" y="{(top + bottom) / 2}" text-anchor="middle" '
            f'font-size="12" fill="{AXIS_TEXT}">no points yet</text></svg>'
        )
        return "".join(parts)
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    xt = nice_ticks(min(xs), max(xs), 5)
    if integer_x:
        xt = [t for t in xt if float(t).is_integer()] or xt
    yt = nice_ticks(*y_range, 6) if y_range else nice_ticks(min(ys), max(ys), 5)
    x0, x1 = (min(xt[0], min(xs)), max(xt[-1], max(xs)))
    y0, y1 = y_range or (yt[0], yt[-1])
    pad = 8  # the first and last points stay off the axes

    def sx(x: float) -> float:
        return left + pad + (x - x0) / ((x1 - x0) or 1) * (right - left - 2 * pad)

    def sy(y: float) -> float:
        return bottom - (y - y0) / ((y1 - y0) or 1) * (bottom - top)

    for t in yt:
        if y0 - 1e-9 <= t <= y1 + 1e-9:
            parts.append(
                f'<line x1="{left}" x2="{right}" y1="{sy(t):.1f}" y2="{sy(t):.1f}" stroke="{GRID}"/>'
                f'<text x="{left - 6}" y="{sy(t) + 4:.1f}" text-anchor="end" font-size="11" '
                f'fill="{AXIS_TEXT}">{_fmt(t)}</text>'
            )
    for t in xt:
        parts.append(
            f'<text x="{sx(t):.1f}" y="{bottom + 16}" text-anchor="middle" font-size="11" '
            f'fill="{AXIS_TEXT}">{_fmt(t)}</text>'
        )
    parts.append(f'<line x1="{left}" x2="{right}" y1="{bottom}" y2="{bottom}" stroke="{AXIS_TEXT}"/>')
    parts.append(
        f'<text x="{(left + right) / 2}" y="{height - 6}" text-anchor="middle" font-size="12" '
        f'fill="{AXIS_TEXT}">{escape(x_title)}</text>'
    )
    parts.append(
        f'<text transform="translate(13,{(top + bottom) / 2}) rotate(-90)" text-anchor="middle" '
        f'font-size="12" fill="{AXIS_TEXT}">{escape(y_title)}</text>'
    )
    for s, ps in zip(series, finite):
        sp = [(sx(x), sy(y)) for x, y in ps]
        if s.lines and len(sp) > 1:
            d = " ".join(f"{x:.1f},{y:.1f}" for x, y in sp)
            parts.append(
                f'<polyline points="{d}" fill="none" stroke="{s.color}" stroke-width="2" stroke-linejoin="round"/>'
            )
        if s.markers or len(sp) == 1:
            parts += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{s.marker_size}" fill="{s.color}"/>' for x, y in sp]
        for (x, y), label in zip(sp, s.labels):
            parts.append(
                f'<text x="{x:.1f}" y="{y - 8:.1f}" text-anchor="middle" font-size="11" '
                f'fill="{TITLE_TEXT}">{escape(label)}</text>'
            )
    if len(series) > 1:  # the legend, right-aligned on the title's line
        x = right
        for s in reversed(series):
            w = 6.5 * len(s.name) + 24
            x -= w
            parts.append(
                f'<rect x="{x}" y="9" width="10" height="10" rx="2" fill="{s.color}"/>'
                f'<text x="{x + 14}" y="18" font-size="11" fill="{AXIS_TEXT}">{escape(s.name)}</text>'
            )
    parts.append("</svg>")
    return "".join(parts)
