"""Inline SVG charts for the evaluation report: axes (linear, probit for DET, categories), polylines,
bars, markers, legends as captions. No dependency, so the lean install draws them, and every string
is HTML-escaped on the way in.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from statistics import NormalDist

PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
REAL, FAKE, ALL = "#1f77b4", "#d62728", "#111111"


def esc(text: object) -> str:
    """HTML-escaped text, safe in element content and in quoted attributes."""
    return html.escape(str(text), quote=True)


def clip(text: str, limit: int) -> str:
    """At most ``limit`` characters: a long generator name must not run out of its figure."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


@dataclass(frozen=True)
class Axis:
    label: str
    lo: float
    hi: float
    ticks: tuple[tuple[float, str], ...]
    warp: Callable[[float], float] = float  # value -> linear position (the probit scale of a DET curve)
    slanted: bool = False  # long category names


def linear_axis(label: str, lo: float = 0.0, hi: float = 1.0, count: int = 5) -> Axis:
    """An axis with about ``count`` round ticks (steps of 1, 2 or 5 times a power of ten)."""
    magnitude = 10 ** math.floor(math.log10((hi - lo) / count))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= (hi - lo) / count)
    first = math.ceil(lo / step - 1e-9)
    values = [round(k * step, 10) for k in range(first, int(math.floor(hi / step + 1e-9)) + 1)]
    return Axis(label, lo, hi, tuple((v, f"{v:g}") for v in values))


_PROBIT = NormalDist().inv_cdf
DET_RANGE = (0.001, 0.95)


def _probit(p: float) -> float:
    return _PROBIT(min(max(p, DET_RANGE[0]), DET_RANGE[1]))


def det_axis(label: str) -> Axis:
    ticks = (0.001, 0.01, 0.05, 0.2, 0.5, 0.8, 0.95)
    return Axis(label, *DET_RANGE, tuple((t, f"{100 * t:g}%") for t in ticks), warp=_probit)


def category_axis(label: str, names: Sequence[str]) -> Axis:
    return Axis(label, -0.5, len(names) - 0.5, tuple(enumerate(names)), slanted=True)


class Chart:
    """A small x/y chart as an inline ``<svg>``: axes, grid, lines, markers, bars and a legend."""

    W, H = 440, 300
    LEFT, RIGHT, TOP = 52, 14, 26

    def __init__(self, title: str, x: Axis, y: Axis) -> None:
        self.title, self.x, self.y = title, x, y
        self.bottom = 92 if x.slanted else 44
        self.parts: list[str] = []
        self.legend: list[tuple[str, str, str]] = []  # (label, color, "line" | "dot" | "box")

    def _pos(self, axis: Axis, v: float, start: float, length: float) -> float:
        lo, hi = axis.warp(axis.lo), axis.warp(axis.hi)
        t = (axis.warp(min(max(v, axis.lo), axis.hi)) - lo) / (hi - lo)
        return start + t * length

    def px(self, v: float) -> float:
        return self._pos(self.x, v, self.LEFT, self.W - self.LEFT - self.RIGHT)

    def py(self, v: float) -> float:
        return self._pos(self.y, v, self.H - self.bottom, -(self.H - self.bottom - self.TOP))

    def line(self, xs, ys, color: str, label: str = "", width: float = 1.6, dash: str = "") -> None:
        """A polyline, broken where a value is NaN."""
        segment: list[str] = []
        for x, y in [*zip(xs, ys, strict=True), (math.nan, math.nan)]:
            if math.isnan(x) or math.isnan(y):
                if segment:
                    self.parts.append(
                        f'<polyline points="{" ".join(segment)}" fill="none" stroke="{color}" '
                        f'stroke-width="{width}"' + (f' stroke-dasharray="{dash}"' if dash else "") + "/>"
                    )
                segment = []
            else:
                segment.append(f"{self.px(x):.1f},{self.py(y):.1f}")
        if label:
            self.legend.append((label, color, "line"))

    def dots(self, xs, ys, color: str, label: str = "", radii=None) -> None:
        radii = [4.0] * len(xs) if radii is None else radii
        for x, y, r in zip(xs, ys, radii, strict=True):
            if not (math.isnan(x) or math.isnan(y)):
                self.parts.append(
                    f'<circle cx="{self.px(x):.1f}" cy="{self.py(y):.1f}" r="{r:.1f}" fill="{color}" '
                    'stroke="#000" stroke-width="0.8"/>'
                )
        if label:
            self.legend.append((label, color, "dot"))

    def bars(self, edges, heights, color: str, label: str = "") -> None:
        for x0, x1, h in zip(edges[:-1], edges[1:], heights, strict=True):
            top, base = self.py(h), self.py(self.y.lo)
            self.parts.append(
                f'<rect x="{self.px(x0):.1f}" y="{top:.1f}" width="{self.px(x1) - self.px(x0):.1f}" '
                f'height="{base - top:.1f}" fill="{color}" fill-opacity="0.45" stroke="{color}"/>'
            )
        if label:
            self.legend.append((label, color, "box"))

    def vline(self, x: float, label: str) -> None:
        self.line([x, x], [self.y.lo, self.y.hi], "#444", width=1.2, dash="5 3")
        self.parts.append(
            f'<text x="{self.px(x) + 4:.1f}" y="{self.TOP + 12}" font-size="11" fill="#444">{esc(label)}</text>'
        )

    def svg(self) -> str:
        x0, x1 = self.LEFT, self.W - self.RIGHT
        y0, y1 = self.H - self.bottom, self.TOP
        out = [
            f'<svg viewBox="0 0 {self.W} {self.H}" width="{self.W}" height="{self.H}" role="img" '
            f'aria-label="{esc(self.title)}" font-family="system-ui, sans-serif">',
            f'<text x="{self.W / 2}" y="16" font-size="13" font-weight="600" text-anchor="middle">'
            f"{esc(clip(self.title, 64))}</text>",
            f'<rect x="{x0}" y="{y1}" width="{x1 - x0}" height="{y0 - y1}" fill="#fff" stroke="#999"/>',
        ]
        for v, name in self.x.ticks:
            x = self.px(v)
            out.append(f'<line x1="{x:.1f}" y1="{y0}" x2="{x:.1f}" y2="{y1}" stroke="#e5e5e5"/>')
            if self.x.slanted:
                out.append(
                    f'<text transform="translate({x:.1f},{y0 + 12}) rotate(-35)" font-size="11" '
                    f'text-anchor="end">{esc(clip(name, 24))}</text>'
                )
            else:
                out.append(
                    f'<text x="{x:.1f}" y="{y0 + 15}" font-size="11" text-anchor="middle">{esc(name)}</text>'
                )
        for v, name in self.y.ticks:
            y = self.py(v)
            out.append(f'<line x1="{x0}" y1="{y:.1f}" x2="{x1}" y2="{y:.1f}" stroke="#e5e5e5"/>')
            out.append(
                f'<text x="{x0 - 5}" y="{y + 4:.1f}" font-size="11" text-anchor="end">{esc(name)}</text>'
            )
        out.append(
            f'<text x="{(x0 + x1) / 2}" y="{self.H - 6}" font-size="12" text-anchor="middle">'
            f"{esc(self.x.label)}</text>"
        )
        out.append(
            f'<text transform="translate(13,{(y0 + y1) / 2}) rotate(-90)" font-size="12" text-anchor="middle">'
            f"{esc(self.y.label)}</text>"
        )
        out += self.parts
        out.append("</svg>")
        return "\n".join(out)

    def figure(self) -> str:
        """The chart with its legend as a caption below (never over the data, however many entries)."""
        keys = "".join(
            f'<span class="key"><i class="{kind}" style="background:{color}"></i>{esc(label)}</span>'
            for label, color, kind in self.legend
        )
        return f"<figure>{self.svg()}<figcaption>{keys}</figcaption></figure>"


def message_svg(title: str, text: str) -> str:
    """A figure that could not be drawn says why, in the figure's place."""
    return (
        f'<svg viewBox="0 0 {Chart.W} 80" width="{Chart.W}" height="80" role="img" aria-label="{esc(title)}" '
        f'font-family="system-ui, sans-serif"><text x="10" y="22" font-size="13" font-weight="600">'
        f'{esc(title)}</text><text x="10" y="50" font-size="12" fill="#555">{esc(text)}</text></svg>'
    )
