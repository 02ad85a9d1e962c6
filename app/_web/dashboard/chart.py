"""The overview's chart, drawn on the server as SVG: events and duplicates per hour.

No script and no inline style (the page's Content-Security-Policy allows neither):
the template draws these rectangles, coloured by classes of the dashboard's CSS.
"""

from __future__ import annotations

from dataclasses import dataclass

from idemhook._web.dashboard.overview import Hour

WIDTH = 760
HEIGHT = 200
LEFT = 56  # room for the axis labels
BOTTOM = 22
TOP = 8


@dataclass(frozen=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    css: str
    title: str


@dataclass(frozen=True)
class Label:
    x: float
    y: float
    text: str


@dataclass(frozen=True)
class Chart:
    width: int
    height: int
    bars: list[Bar]
    x_labels: list[Label]
    y_labels: list[Label]
    gridlines: list[float]
    left: int
    plot_bottom: float


def nice_ceiling(value: float) -> int:
    """The smallest 1, 2 or 5 times a power of ten that is at least ``value``."""
    if value <= 0:
        return 1
    step = 1
    while True:
        for factor in (1, 2, 5):
            if factor * step >= value:
                return factor * step
        step *= 10


def draw(hours: list[Hour]) -> Chart:
    top_value = nice_ceiling(max([h.events.value for h in hours] + [1]))
    plot_height = HEIGHT - BOTTOM - TOP
    slot = (WIDTH - LEFT) / max(len(hours), 1)
    bar = slot * 0.4
    bars: list[Bar] = []
    x_labels: list[Label] = []
    for i, hour in enumerate(hours):
        x = LEFT + i * slot + slot * 0.1
        label = hour.start.strftime("%H:00")
        for offset, count, css, what in (
            (0.0, hour.events, "events", "events"),
            (bar, hour.duplicates, "duplicates", "duplicates"),
        ):
            height = plot_height * count.value / top_value
            bars.append(
                Bar(
                    x=round(x + offset, 1),
                    y=round(TOP + plot_height - height, 1),
                    width=round(bar, 1),
                    height=round(height, 1),
                    css=css if count.exact else f"{css} estimated",
                    title=f"{label} UTC: {count} {what}",
                )
            )
        if i % 3 == 0:
            x_labels.append(Label(round(x + bar, 1), HEIGHT - 6, label))
    gridlines, y_labels = [], []
    for fraction in (0.0, 0.5, 1.0):
        y = round(TOP + plot_height * (1 - fraction), 1)
        gridlines.append(y)
        y_labels.append(Label(LEFT - 6, y + 4, f"{round(top_value * fraction):,}"))
    return Chart(WIDTH, HEIGHT, bars, x_labels, y_labels, gridlines, LEFT, TOP + plot_height)
