"""A small SVG plotting module for the benchmark report: x–y charts and grouped bar charts.

The report needs a handful of plain figures and no plotting dependency, so this draws them
directly: axes with "nice" ticks and labels, scatter series with labelled points, polylines,
horizontal reference lines, grouped bars and a legend. Every text is escaped, and the output is
deterministic (same input, same bytes: coordinates are printed with two decimals and nothing
depends on the clock or on hashing), so reports can be diffed.

Each point is drawn as ``<g class="point" transform="translate(x,y)">`` holding its marker and,
when given, its ``<text class="point-label">``; a polyline is ``<polyline class="line">``. Tests
(and a reader of the SVG) find the drawn geometry there.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

#: Colours of successive series (colour-blind friendly, after Okabe and Ito).
PALETTE = (
    "#0072B2",
    "#E69F00",
    "#009E73",
    "#D55E00",
    "#CC79A7",
    "#56B4E9",
    "#F0E442",
    "#000000",
    "#999999",
    "#882255",
)
#: Marker shapes :meth:`Chart.scatter` draws.
MARKERS = ("circle", "square", "diamond", "triangle", "star")

_MARGIN_LEFT = 70
_MARGIN_TOP = 40
_MARGIN_BOTTOM = 56
_MARGIN_RIGHT = 20
_CHAR_WIDTH = 6.6  # average width of an 11px sans-serif character, for laying out the legend
_LEGEND_MAX_CHARS = 36


def escape(text: object) -> str:
    """``text`` made safe for SVG/XML content and attribute values."""
    return html.escape(str(text), quote=True)


def color(i: int) -> str:
    """The ``i``-th colour of :data:`PALETTE` (cycling)."""
    return PALETTE[i % len(PALETTE)]


def _f(v: float) -> str:
    out = f"{v:.2f}"
    return "0.00" if out == "-0.00" else out


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About ``count`` round tick values (steps of 1, 2, 2.5 or 5 × 10^k) covering ``[lo, hi]``.

    Raises
    ------
    ValueError
        For a bound that is not finite or a ``count`` below 2.
    """
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"tick bounds must be finite; got {lo}, {hi}")
    if count < 2:
        raise ValueError(f"count must be at least 2; got {count}")
    lo, hi = min(lo, hi), max(lo, hi)
    if hi == lo:
        pad = abs(lo) * 0.1 or 0.5
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / (count - 1)
    magnitude = 10.0 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1.0, 2.0, 2.5, 5.0, 10.0) if m * magnitude >= raw * (1 - 1e-9))
    start = math.floor(lo / step + 1e-9)
    stop = math.ceil(hi / step - 1e-9)
    return [round(i * step, 12) for i in range(start, stop + 1)]


def tick_text(value: float, ticks: Sequence[float]) -> str:
    """``value`` printed with as many decimals as the spacing of ``ticks`` needs."""
    step = abs(ticks[1] - ticks[0]) if len(ticks) > 1 else 1.0
    decimals = 0
    while decimals < 10 and abs(round(step, decimals) - step) > step * 1e-6:
        decimals += 1
    out = f"{value:.{decimals}f}"
    return out[1:] if out.startswith("-") and float(out) == 0 else out


def _marker(shape: str, fill: str, size: float = 4.5) -> str:
    s = size
    if shape == "circle":
        return f'<circle r="{_f(s)}" fill="{fill}" stroke="#fff" stroke-width="1"/>'
    if shape == "square":
        return f'<rect x="{_f(-s)}" y="{_f(-s)}" width="{_f(2 * s)}" height="{_f(2 * s)}" fill="{fill}" stroke="#fff" stroke-width="1"/>'
    if shape == "diamond":
        d = f"M0,{_f(-s * 1.4)} L{_f(s * 1.4)},0 L0,{_f(s * 1.4)} L{_f(-s * 1.4)},0 Z"
    elif shape == "triangle":
        d = f"M0,{_f(-s * 1.3)} L{_f(s * 1.2)},{_f(s)} L{_f(-s * 1.2)},{_f(s)} Z"
    elif shape == "star":
        corners = []
        for k in range(10):
            r = s * 1.8 if k % 2 == 0 else s * 0.8
            angle = math.pi / 2 + k * math.pi / 5
            corners.append(f"{_f(r * math.cos(angle))},{_f(-r * math.sin(angle))}")
        d = "M" + " L".join(corners) + " Z"
    else:
        raise ValueError(f"unknown marker {shape!r}; choose one of {', '.join(MARKERS)}")
    return f'<path d="{d}" fill="{fill}" stroke="#fff" stroke-width="1"/>'


def _shorten(text: str, limit: int = _LEGEND_MAX_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


@dataclass
class _LegendEntry:
    name: str
    color: str
    kind: str  # a marker shape, "line", "dashed" or "bar"


@dataclass
class _Frame:
    """What every figure shares: a title, a value (y) axis, a legend, the SVG wrapper."""

    title: str
    y_label: str
    width: int
    height: int
    legend: list[_LegendEntry] = field(default_factory=list)

    def _legend_width(self) -> float:
        if not self.legend:
            return 0.0
        longest = max(len(_shorten(e.name)) for e in self.legend)
        return 34 + longest * _CHAR_WIDTH

    def _size(self, extra_bottom: float = 0.0) -> tuple[float, float]:
        w = _MARGIN_LEFT + self.width + _MARGIN_RIGHT + self._legend_width()
        h = _MARGIN_TOP + self.height + _MARGIN_BOTTOM + extra_bottom
        return w, h

    def _open(self, w: float, h: float) -> list[str]:
        return [
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{math.ceil(w)}" height="{math.ceil(h)}" '
            f'viewBox="0 0 {math.ceil(w)} {math.ceil(h)}" font-family="Helvetica, Arial, sans-serif" '
            f'font-size="11" role="img" aria-label="{escape(self.title)}">',
            f"<title>{escape(self.title)}</title>",
            f'<rect x="0" y="0" width="{math.ceil(w)}" height="{math.ceil(h)}" fill="#ffffff"/>',
            f'<text class="title" x="{_f(_MARGIN_LEFT)}" y="22" font-size="14" font-weight="bold">'
            f"{escape(self.title)}</text>",
        ]

    def _y_axis(self, ticks: Sequence[float], to_y: _Scale) -> list[str]:
        x0, x1 = _MARGIN_LEFT, _MARGIN_LEFT + self.width
        out = ['<g class="y-axis">']
        for t in ticks:
            y = to_y(t)
            out.append(f'<line x1="{_f(x0)}" y1="{_f(y)}" x2="{_f(x1)}" y2="{_f(y)}" stroke="#e5e5e5"/>')
            out.append(
                f'<text class="tick" x="{_f(x0 - 6)}" y="{_f(y + 4)}" text-anchor="end">'
                f"{escape(tick_text(t, ticks))}</text>"
            )
        mid = _MARGIN_TOP + self.height / 2
        out.append(
            f'<text class="axis-label" x="16" y="{_f(mid)}" text-anchor="middle" '
            f'transform="rotate(-90 16 {_f(mid)})">{escape(self.y_label)}</text>'
        )
        out.append("</g>")
        return out

    def _box(self) -> str:
        return (
            f'<rect class="plot-area" x="{_MARGIN_LEFT}" y="{_MARGIN_TOP}" width="{self.width}" '
            f'height="{self.height}" fill="none" stroke="#444"/>'
        )

    def _legend_svg(self) -> list[str]:
        if not self.legend:
            return []
        x = _MARGIN_LEFT + self.width + _MARGIN_RIGHT
        out = ['<g class="legend">']
        for i, entry in enumerate(self.legend):
            y = _MARGIN_TOP + 8 + i * 18
            if entry.kind in ("line", "dashed"):
                dash = ' stroke-dasharray="6 4"' if entry.kind == "dashed" else ""
                swatch = (
                    f'<line x1="{_f(x)}" y1="{_f(y)}" x2="{_f(x + 20)}" y2="{_f(y)}" stroke="{entry.color}" '
                    f'stroke-width="2"{dash}/>'
                )
            elif entry.kind == "bar":
                swatch = (
                    f'<rect x="{_f(x + 4)}" y="{_f(y - 6)}" width="12" height="12" fill="{entry.color}"/>'
                )
            else:
                swatch = (
                    f'<g transform="translate({_f(x + 10)},{_f(y)})">{_marker(entry.kind, entry.color)}</g>'
                )
            short = _shorten(entry.name)
            hover = f"<title>{escape(entry.name)}</title>" if short != entry.name else ""
            out.append(
                f'<g class="legend-entry">{swatch}<text x="{_f(x + 26)}" y="{_f(y + 4)}">'
                f"{escape(short)}{hover}</text></g>"
            )
        out.append("</g>")
        return out


class _Scale:
    """A linear map from data values to pixels."""

    def __init__(self, lo: float, hi: float, start: float, stop: float) -> None:
        self.lo, self.hi, self.start, self.stop = lo, hi, start, stop

    def __call__(self, v: float) -> float:
        span = self.hi - self.lo or 1.0
        return self.start + (v - self.lo) / span * (self.stop - self.start)


def _range(values: Sequence[float], ticks: int = 5) -> list[float]:
    """Round ticks over ``values``, padded so no point sits on the frame (non-negative data stays so)."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return [0.0, 0.5, 1.0]
    lo, hi = min(finite), max(finite)
    pad = (hi - lo) * 0.04
    padded_lo = lo - pad if lo - pad >= 0 or lo < 0 else 0.0
    return nice_ticks(padded_lo, hi + pad, ticks)


@dataclass
class _Points:
    points: list[tuple[float, float]]
    name: str
    color: str
    marker: str
    labels: list[str] | None
    css_class: str


@dataclass
class _Line:
    points: list[tuple[float, float]]
    name: str
    color: str
    dashed: bool
    markers: bool


@dataclass
class _HLine:
    y: float
    name: str
    color: str


class Chart:
    """An x–y chart: scatter series with labelled points, polylines, horizontal reference lines.

    Axis ranges cover everything added (extended to round ticks). Series are drawn in layers
    (reference lines, then polylines, then points) so points stay visible.

    Parameters
    ----------
    title : str
    x_label, y_label : str
        Axis titles.
    width, height : int, default 480, 320
        Size of the plot area in pixels (the SVG adds margins and the legend).
    x_ticks : sequence of float, optional
        Ticks of the x axis (default: round values over the data), e.g. the split points.
    include_x, include_y : sequence of float, optional
        Values the axes must cover besides the data (e.g. 0).
    """

    def __init__(
        self,
        *,
        title: str,
        x_label: str,
        y_label: str,
        width: int = 480,
        height: int = 320,
        x_ticks: Sequence[float] | None = None,
        include_x: Sequence[float] = (),
        include_y: Sequence[float] = (),
    ) -> None:
        self._frame = _Frame(title, y_label, width, height)
        self.x_label = x_label
        self._x_ticks = list(x_ticks) if x_ticks is not None else None
        self._include_x, self._include_y = list(include_x), list(include_y)
        self._points: list[_Points] = []
        self._lines: list[_Line] = []
        self._hlines: list[_HLine] = []

    def scatter(
        self,
        points: Sequence[tuple[float, float]],
        *,
        name: str,
        color: str,
        labels: Sequence[str] | None = None,
        marker: str = "circle",
        css_class: str = "",
    ) -> None:
        """Add points (``(x, y)`` pairs), optionally each with a label drawn beside it.

        Raises
        ------
        ValueError
            For labels that do not match the points one to one, or an unknown marker.
        """
        if labels is not None and len(labels) != len(points):
            raise ValueError(f"{len(labels)} labels for {len(points)} points in series {name!r}")
        if marker not in MARKERS:
            raise ValueError(f"unknown marker {marker!r}; choose one of {', '.join(MARKERS)}")
        self._points.append(
            _Points(list(points), name, color, marker, list(labels) if labels else None, css_class)
        )
        self._frame.legend.append(_LegendEntry(name, color, marker))

    def line(
        self,
        points: Sequence[tuple[float, float]],
        *,
        name: str,
        color: str,
        dashed: bool = False,
        markers: bool = False,
        legend: bool = True,
    ) -> None:
        """Add a polyline through ``points`` in the given order (with a dot at each, if ``markers``)."""
        self._lines.append(_Line(list(points), name, color, dashed, markers))
        if legend:
            self._frame.legend.append(_LegendEntry(name, color, "dashed" if dashed else "line"))

    def hline(self, y: float, *, name: str, color: str = "#666666") -> None:
        """Add a dashed horizontal reference line at ``y``, labelled in the legend."""
        self._hlines.append(_HLine(y, name, color))
        self._frame.legend.append(_LegendEntry(name, color, "dashed"))

    def render(self) -> str:
        """The chart as a standalone SVG document."""
        frame = self._frame
        xs = [p[0] for s in self._points for p in s.points] + [p[0] for s in self._lines for p in s.points]
        ys = [p[1] for s in self._points for p in s.points] + [p[1] for s in self._lines for p in s.points]
        ys += [h.y for h in self._hlines] + self._include_y
        x_ticks = self._x_ticks or _range(xs + self._include_x)
        y_ticks = _range(ys)
        x_lo, x_hi = min([*x_ticks, *xs]), max([*x_ticks, *xs])
        if self._x_ticks is not None and x_lo == x_hi:
            x_lo, x_hi = x_lo - 1, x_hi + 1
        elif self._x_ticks is not None:  # explicit ticks: pad so end points do not sit on the frame
            pad = (x_hi - x_lo) * 0.06
            x_lo, x_hi = x_lo - pad, x_hi + pad
        to_x = _Scale(x_lo, x_hi, _MARGIN_LEFT, _MARGIN_LEFT + frame.width)
        to_y = _Scale(y_ticks[0], y_ticks[-1], _MARGIN_TOP + frame.height, _MARGIN_TOP)
        w, h = frame._size()
        out = frame._open(w, h)
        out += frame._y_axis(y_ticks, to_y)
        out.append('<g class="x-axis">')
        bottom = _MARGIN_TOP + frame.height
        for t in x_ticks:
            x = to_x(t)
            out.append(
                f'<line x1="{_f(x)}" y1="{_MARGIN_TOP}" x2="{_f(x)}" y2="{_f(bottom)}" stroke="#e5e5e5"/>'
            )
            out.append(
                f'<text class="tick" x="{_f(x)}" y="{_f(bottom + 16)}" text-anchor="middle">'
                f"{escape(tick_text(t, x_ticks))}</text>"
            )
        out.append(
            f'<text class="axis-label" x="{_f(_MARGIN_LEFT + frame.width / 2)}" y="{_f(bottom + 40)}" '
            f'text-anchor="middle">{escape(self.x_label)}</text>'
        )
        out.append("</g>")
        out.append(frame._box())
        for ref in self._hlines:
            y = to_y(ref.y)
            out.append(
                f'<line class="reference" data-name="{escape(ref.name)}" x1="{_MARGIN_LEFT}" y1="{_f(y)}" '
                f'x2="{_MARGIN_LEFT + frame.width}" y2="{_f(y)}" stroke="{ref.color}" stroke-width="1.5" '
                f'stroke-dasharray="6 4"/>'
            )
        for line in self._lines:
            coords = " ".join(f"{_f(to_x(x))},{_f(to_y(y))}" for x, y in line.points)
            dash = ' stroke-dasharray="6 4"' if line.dashed else ""
            out.append(
                f'<polyline class="line" data-name="{escape(line.name)}" points="{coords}" fill="none" '
                f'stroke="{line.color}" stroke-width="2"{dash}/>'
            )
            if line.markers:
                for x, y in line.points:
                    out.append(
                        f'<circle class="vertex" cx="{_f(to_x(x))}" cy="{_f(to_y(y))}" r="3" fill="{line.color}"/>'
                    )
        for series in self._points:
            css = f"point {series.css_class}".strip()
            for i, (x, y) in enumerate(series.points):
                label = series.labels[i] if series.labels else None
                hover = f"{label}: " if label else f"{series.name}: "
                # Labels of points in the right third go to their left, to stay inside the figure.
                right = to_x(x) > _MARGIN_LEFT + frame.width * 0.66
                place = 'x="-7" y="-7" text-anchor="end"' if right else 'x="7" y="-7"'
                text = (
                    f'<text class="point-label" {place} fill="#222">{escape(label)}</text>'
                    if label is not None
                    else ""
                )
                out.append(
                    f'<g class="{escape(css)}" data-series="{escape(series.name)}" '
                    f'transform="translate({_f(to_x(x))},{_f(to_y(y))})">'
                    f"<title>{escape(hover)}({x:.4g}, {y:.4g})</title>"
                    f"{_marker(series.marker, series.color)}{text}</g>"
                )
        out += frame._legend_svg()
        out.append("</svg>")
        return "\n".join(out) + "\n"


class BarChart:
    """Grouped bars: one group per category, one bar per series, and optional reference lines.

    Parameters
    ----------
    title : str
    categories : sequence of str
        The groups along the x axis (their labels are drawn slanted).
    y_label : str
    width, height : int, default 480, 300
        Size of the plot area in pixels.
    """

    def __init__(
        self, *, title: str, categories: Sequence[str], y_label: str, width: int = 480, height: int = 300
    ) -> None:
        self._frame = _Frame(title, y_label, width, height)
        self.categories = list(categories)
        self._series: list[tuple[str, str, list[float | None]]] = []
        self._hlines: list[_HLine] = []

    def bars(self, values: Sequence[float | None], *, name: str, color: str) -> None:
        """Add a series: one value per category (``None`` draws no bar there).

        Raises
        ------
        ValueError
            For a number of values other than the number of categories.
        """
        if len(values) != len(self.categories):
            raise ValueError(f"{len(values)} values for {len(self.categories)} categories in series {name!r}")
        self._series.append((name, color, list(values)))
        self._frame.legend.append(_LegendEntry(name, color, "bar"))

    def hline(self, y: float, *, name: str, color: str = "#666666") -> None:
        """Add a dashed horizontal reference line at ``y``, labelled in the legend."""
        self._hlines.append(_HLine(y, name, color))
        self._frame.legend.append(_LegendEntry(name, color, "dashed"))

    def render(self) -> str:
        """The chart as a standalone SVG document."""
        frame = self._frame
        values = [v for _, _, vs in self._series for v in vs if v is not None]
        y_ticks = _range([0.0, *values, *(h.y for h in self._hlines)])
        to_y = _Scale(y_ticks[0], y_ticks[-1], _MARGIN_TOP + frame.height, _MARGIN_TOP)
        longest = max((len(_shorten(c, 28)) for c in self.categories), default=0)
        extra = longest * _CHAR_WIDTH * 0.6
        w, h = frame._size(extra)
        out = frame._open(w, h)
        out += frame._y_axis(y_ticks, to_y)
        bottom = _MARGIN_TOP + frame.height
        group = frame.width / max(len(self.categories), 1)
        bar = group * 0.8 / max(len(self._series), 1)
        out.append('<g class="x-axis">')
        for i, category in enumerate(self.categories):
            x = _MARGIN_LEFT + (i + 0.5) * group
            short = _shorten(category, 28)
            out.append(
                f'<text class="tick" x="{_f(x)}" y="{_f(bottom + 14)}" text-anchor="end" '
                f'transform="rotate(-30 {_f(x)} {_f(bottom + 14)})">{escape(short)}'
                f"<title>{escape(category)}</title></text>"
            )
        out.append("</g>")
        out.append(frame._box())
        zero = to_y(max(y_ticks[0], 0.0))
        for k, (name, fill, vs) in enumerate(self._series):
            for i, v in enumerate(vs):
                if v is None:
                    continue
                x = _MARGIN_LEFT + i * group + group * 0.1 + k * bar
                y = to_y(v)
                out.append(
                    f'<rect class="bar" data-series="{escape(name)}" data-category="{escape(self.categories[i])}" '
                    f'x="{_f(x)}" y="{_f(min(y, zero))}" width="{_f(bar)}" height="{_f(abs(zero - y))}" '
                    f'fill="{fill}"><title>{escape(self.categories[i])}, {escape(name)}: {v:.4g}</title></rect>'
                )
        for ref in self._hlines:
            y = to_y(ref.y)
            out.append(
                f'<line class="reference" data-name="{escape(ref.name)}" x1="{_MARGIN_LEFT}" y1="{_f(y)}" '
                f'x2="{_MARGIN_LEFT + frame.width}" y2="{_f(y)}" stroke="{ref.color}" stroke-width="1.5" '
                f'stroke-dasharray="6 4"/>'
            )
        out += frame._legend_svg()
        out.append("</svg>")
        return "\n".join(out) + "\n"
