"""Line charts as SVG, written by hand: the loss curve of a run, readable in any browser.

Why not matplotlib: it would be a heavy dependency for one picture, and SVG is a text format simple
enough to write directly: axes with "nice" round ticks, one polyline per series, a legend.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from html import escape
from pathlib import Path

from minillm.runlog import read_metrics

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e")


@dataclass
class Series:
    label: str
    xs: list[float]
    ys: list[float]


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About `count` round tick values (1, 2 or 5 times a power of ten apart) covering [lo, hi]."""
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)  # in units of `step`
    return [round(i * step, 12) for i in range(first, last + 1)]


def _label(value: float) -> str:
    if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
        return f"{value:.0e}" if abs(value) >= 1e5 else f"{value:.1e}"
    return f"{value:g}"


def line_chart(series: list[Series], *, title: str, xlabel: str, ylabel: str, width: int = 720, height: int = 420) -> str:
    """An SVG document with one line per series (series without points are left out)."""
    series = [s for s in series if s.xs]
    left, right, top, bottom = 70, 20, 40, 50
    xs = [x for s in series for x in s.xs] or [0.0, 1.0]
    ys = [y for s in series for y in s.ys if math.isfinite(y)] or [0.0, 1.0]
    xticks, yticks = nice_ticks(min(xs), max(xs)), nice_ticks(min(ys), max(ys))
    x0, x1, y0, y1 = xticks[0], xticks[-1], yticks[0], yticks[-1]

    def px(x: float) -> float:
        return left + (x - x0) / ((x1 - x0) or 1.0) * (width - left - right)

    def py(y: float) -> float:
        return height - bottom - (y - y0) / ((y1 - y0) or 1.0) * (height - top - bottom)

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{width / 2}" y="22" text-anchor="middle" font-size="15">{escape(title)}</text>',
    ]
    for t in xticks:
        out.append(f'<line x1="{px(t):.1f}" y1="{top}" x2="{px(t):.1f}" y2="{height - bottom}" stroke="#eee"/>')
        out.append(f'<text x="{px(t):.1f}" y="{height - bottom + 16}" text-anchor="middle">{_label(t)}</text>')
    for t in yticks:
        out.append(f'<line x1="{left}" y1="{py(t):.1f}" x2="{width - right}" y2="{py(t):.1f}" stroke="#eee"/>')
        out.append(f'<text x="{left - 6}" y="{py(t) + 4:.1f}" text-anchor="end">{_label(t)}</text>')
    out.append(f'<rect x="{left}" y="{top}" width="{width - left - right}" height="{height - top - bottom}" fill="none" stroke="#333"/>')
    out.append(f'<text x="{(left + width - right) / 2}" y="{height - 12}" text-anchor="middle">{escape(xlabel)}</text>')
    out.append(f'<text transform="translate(16 {(top + height - bottom) / 2}) rotate(-90)" text-anchor="middle">{escape(ylabel)}</text>')
    for i, s in enumerate(series):
        color = COLORS[i % len(COLORS)]
        points = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in zip(s.xs, s.ys) if math.isfinite(y))
        out.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.6" points="{points}"/>')
        if len(s.xs) < 40:  # sparse series (evaluations): mark each point
            out += [f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2.5" fill="{color}"/>' for x, y in zip(s.xs, s.ys) if math.isfinite(y)]
        ly = top + 16 + 18 * i
        out.append(f'<line x1="{width - right - 130}" y1="{ly - 4}" x2="{width - right - 110}" y2="{ly - 4}" stroke="{color}" stroke-width="2"/>')
        out.append(f'<text x="{width - right - 104}" y="{ly}">{escape(s.label)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def plot_loss_curve(metrics_path: Path, svg_path: Path, title: str = "loss") -> Path:
    """Train and val loss against tokens seen, from a run's metrics.jsonl, written to `svg_path`."""
    records = read_metrics(metrics_path)
    train = [r for r in records if r.get("kind") == "train"]
    val = [r for r in records if r.get("kind") == "val"]
    chart = line_chart(
        [
            Series("train loss", [r["tokens"] for r in train], [r["loss"] for r in train]),
            Series("val loss", [r["tokens"] for r in val], [r["val_loss"] for r in val]),
        ],
        title=title, xlabel="tokens seen", ylabel="cross-entropy (nats/token)",
    )
    tmp = Path(svg_path).with_suffix(".tmp")
    tmp.write_text(chart)
    tmp.replace(svg_path)
    return Path(svg_path)
