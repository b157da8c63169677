"""Line plots as inline SVG: drawn on the server, no script or library in the browser."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape
from typing import Any

DISCARDED = "#b0b0b0"  # what a rewind threw away: greyed, under the curves that count
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22")
WIDTH, HEIGHT = 640, 320
LEFT, RIGHT, TOP, BOTTOM = 58, 12, 14, 40
DRAWN_POINTS = 200  # per series: about one per 3 pixels of the plot's width


@dataclass(frozen=True)
class Series:
    label: str
    points: Sequence[tuple[float, float]]
    color: str
    dashed: bool = False
    discarded: bool = False  # drawn grey and thin, first (under the rest)
    marks: Sequence[tuple[float, float, str]] = ()  # (x, y, what): a rewind's point on the curve


def downsampled(points: Sequence[Sequence[float]], limit: int) -> list[Any]:
    """At most `limit` (2 or more) of `points`, in their order: the first and the last, and from each of the equal
    runs of points between them its lowest and its highest, so that a spike stays in the drawing (evenly spread
    points would step over it). A point without a finite height counts as the highest of its run."""
    if limit < 2:
        raise ValueError(f"a curve keeps at least its 2 ends, not {limit} points")
    if len(points) <= limit:
        return list(points)
    inner, runs = points[1:-1], (limit - 2) // 2
    kept = [points[0]]
    for index in range(runs):
        part = inner[index * len(inner) // runs : (index + 1) * len(inner) // runs]
        heights = [_height(p) for p in part]
        lowest, highest = heights.index(min(heights)), heights.index(max(heights))
        kept += [part[i] for i in sorted({lowest, highest})]
    kept.append(points[-1])
    return kept


def _height(point: Sequence[float]) -> float:
    y = point[1]
    return float(y) if isinstance(y, int | float) and math.isfinite(y) else math.inf


def step_points(edges: Sequence[float], counts: Sequence[int]) -> list[tuple[float, float]]:
    """A histogram's outline, from 0 at its first edge over each bin's count to 0 at its last edge."""
    if not counts:
        return []
    tops = [point for i, count in enumerate(counts) for point in ((edges[i], count), (edges[i + 1], count))]
    return [(edges[0], 0), *tops, (edges[len(counts)], 0)]


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values covering [low, high]."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return []
    if high <= low:
        high = low + (abs(low) or 1.0)
    raw = (high - low) / max(count, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.floor(low / step) * step
    ticks = [round(first, 12)]
    while ticks[-1] < high - step * 1e-9 or len(ticks) < 2:
        ticks.append(round(first + len(ticks) * step, 12))
    return ticks


def tick_label(value: float) -> str:
    magnitude = abs(value)
    if magnitude >= 1e9:
        return f"{value / 1e9:g}G"
    if magnitude >= 1e6:
        return f"{value / 1e6:g}M"
    if magnitude >= 1e4:
        return f"{value / 1e3:g}k"
    return f"{value:.4g}"


def line_plot(element_id: str, series: Sequence[Series], x_label: str, y_label: str) -> str:
    """An SVG element with one polyline per series (`data-series` = its label), axes and a legend."""
    drawn = [s for s in series if s.points]
    points = [p for s in drawn for p in s.points if all(math.isfinite(v) for v in p)]
    head = f'<svg id="{escape(element_id)}" class="plot" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
    head += f'aria-label="{escape(y_label)} vs {escape(x_label)}" xmlns="http://www.w3.org/2000/svg">'
    if not points:
        return (
            head + f'<text x="{WIDTH / 2}" y="{HEIGHT / 2}" text-anchor="middle" class="empty">no data yet</text></svg>'
        )
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x_ticks, y_ticks = nice_ticks(min(xs), max(xs)), nice_ticks(min(ys), max(ys))
    x0, x1, y0, y1 = x_ticks[0], x_ticks[-1], y_ticks[0], y_ticks[-1]
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    kx, ky = plot_w / ((x1 - x0) or 1), plot_h / ((y1 - y0) or 1)
    bx, by = LEFT - x0 * kx, TOP + plot_h + y0 * ky

    def sx(x: float) -> float:
        return bx + x * kx

    def sy(y: float) -> float:
        return by - y * ky

    parts = [head, f'<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" class="frame"/>']
    for x in x_ticks:
        parts.append(f'<line x1="{sx(x):.1f}" y1="{TOP}" x2="{sx(x):.1f}" y2="{TOP + plot_h}" class="grid"/>')
        parts.append(f'<text x="{sx(x):.1f}" y="{TOP + plot_h + 14}" text-anchor="middle">{tick_label(x)}</text>')
    for y in y_ticks:
        parts.append(f'<line x1="{LEFT}" y1="{sy(y):.1f}" x2="{LEFT + plot_w}" y2="{sy(y):.1f}" class="grid"/>')
        parts.append(f'<text x="{LEFT - 5}" y="{sy(y) + 4:.1f}" text-anchor="end">{tick_label(y)}</text>')
    parts.append(f'<text x="{LEFT + plot_w / 2}" y="{HEIGHT - 6}" text-anchor="middle">{escape(x_label)}</text>')
    parts.append(
        f'<text transform="translate(13 {TOP + plot_h / 2}) rotate(-90)" text-anchor="middle">{escape(y_label)}</text>'
    )
    for s in sorted(drawn, key=lambda s: not s.discarded):
        finite = [(x, y) for x, y in s.points if math.isfinite(x) and math.isfinite(y)]
        coords = " ".join(f"{bx + x * kx:.1f},{by - y * ky:.1f}" for x, y in downsampled(finite, DRAWN_POINTS))
        dash = ' stroke-dasharray="5 3"' if s.dashed else ""
        look = f'stroke="{DISCARDED}" stroke-width="1.2" data-discarded="true"' if s.discarded else ""
        look = look or f'stroke="{s.color}" stroke-width="1.6"'
        parts.append(
            f'<polyline data-series="{escape(s.label)}" points="{coords}" fill="none" {look}{dash}>'
            f"<title>{escape(s.label)}</title></polyline>"
        )
    for s in drawn:
        for x, y, what in s.marks:
            if math.isfinite(x) and math.isfinite(y):
                parts.append(
                    f'<circle class="rewind" data-rewind="{escape(what)}" cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="4" '
                    f'fill="white" stroke="{s.color}" stroke-width="2"><title>{escape(what)}</title></circle>'
                )
    parts.append("</svg>")
    return "".join(parts)
