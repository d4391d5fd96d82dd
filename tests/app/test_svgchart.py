"""The live view's SVG charts (app_pages/svgchart.py): round ticks, points where they belong,
escaped names, and charts without points. Parsed as XML, as a browser would."""

import math
import xml.etree.ElementTree as ET

import pytest

from app_pages import svgchart
from app_pages.svgchart import Series, line_chart, nice_ticks

NS = {"s": "http://www.w3.org/2000/svg"}


@pytest.mark.parametrize(
    "lo, hi, n, expected",
    [
        (0, 100, 5, [0, 20, 40, 60, 80, 100]),
        (0, 105, 6, [0, 20, 40, 60, 80, 100, 120]),
        (0.73, 1.1, 5, [0.7, 0.8, 0.9, 1.0, 1.1]),
        (1, 1, 5, [1.0, 1.2, 1.4, 1.6, 1.8, 2.0]),  # one value: a range above it
        (0, 4, 5, [0, 1, 2, 3, 4]),
    ],
)
def test_nice_ticks_are_round_and_cover_the_range(lo, hi, n, expected):
    ticks = nice_ticks(lo, hi, n)
    assert ticks == pytest.approx(expected)
    assert ticks[0] <= lo and ticks[-1] >= hi


def test_nice_ticks_of_non_finite_values_are_none():
    assert nice_ticks(0, math.inf) == [] and nice_ticks(math.nan, 1) == []


def test_line_chart_places_points_in_order_and_in_the_plot():
    points = [(s, 1.1 - 0.01 * s) for s in range(1, 101)]
    svg = line_chart(
        "Training loss",
        [
            Series("step loss", points, "#4f46e5"),
            Series("epoch mean", [(50, 0.8), (100, 0.6)], "#f59e0b", lines=False, markers=True),
        ],
        "optimiser step",
        "cross-entropy",
    )
    root = ET.fromstring(svg)
    (line,) = root.findall("s:polyline", NS)
    xy = [tuple(map(float, p.split(","))) for p in line.get("points").split()]
    assert len(xy) == 100
    assert all(a[0] < b[0] for a, b in zip(xy, xy[1:]))  # x grows with the step
    assert all(a[1] < b[1] for a, b in zip(xy, xy[1:]))  # the loss falls: SVG y grows downwards
    width, height = (float(v) for v in root.get("viewBox").split()[2:])
    assert all(svgchart.MARGIN["left"] <= x <= width - svgchart.MARGIN["right"] for x, _ in xy)
    assert all(svgchart.MARGIN["top"] <= y <= height - svgchart.MARGIN["bottom"] for _, y in xy)
    assert len(root.findall("s:circle", NS)) == 2  # the epoch means, markers only
    texts = [t.text for t in root.iter(f"{{{NS['s']}}}text")]
    assert {"Training loss", "optimiser step", "cross-entropy", "step loss", "epoch mean"} <= set(texts)


def test_line_chart_escapes_names_and_leaves_out_non_finite_points():
    svg = line_chart(
        '<script>alert(1)</script> & "x"', [Series("<b>a</b>", [(0, 1), (1, math.nan), (2, 3)], "#000")], "x", "y"
    )
    root = ET.fromstring(svg)  # still well-formed XML
    assert "<script>" not in svg and "<b>" not in svg
    texts = [t.text for t in root.iter(f"{{{NS['s']}}}text")]
    assert '<script>alert(1)</script> & "x"' in texts
    (line,) = root.findall("s:polyline", NS)
    assert len(line.get("points").split()) == 2


def test_line_chart_without_points_says_so():
    root = ET.fromstring(line_chart("GPU", [Series("memory", [], "#000")], "seconds", "GiB"))
    assert "no points yet" in [t.text for t in root.iter(f"{{{NS['s']}}}text")]
    assert not root.findall("s:polyline", NS)


def test_labels_are_drawn_above_their_points():
    root = ET.fromstring(
        line_chart(
            "Validation",
            [Series("v", [(0, 35.0), (1, 70.0)], "#000", markers=True, labels=["35.0%", "70.0%"])],
            "epoch",
            "%",
            y_range=(0, 105),
            integer_x=True,
        )
    )
    circles = root.findall("s:circle", NS)
    labels = {t.text: t for t in root.iter(f"{{{NS['s']}}}text") if t.text and t.text.endswith("%") and t.text != "%"}
    assert len(circles) == 2 and set(labels) == {"35.0%", "70.0%"}
    for c, name in zip(circles, ("35.0%", "70.0%")):
        assert float(labels[name].get("y")) < float(c.get("cy"))
        assert float(labels[name].get("x")) == pytest.approx(float(c.get("cx")))
