"""The run log (metrics.jsonl, MFU's peak table) and the hand-written SVG chart."""

import json
import xml.etree.ElementTree as ET

import pytest
import torch

from minillm.plot import Series, line_chart, nice_ticks, plot_loss_curve
from minillm.runlog import MetricsLog, peak_flops, read_metrics


@pytest.mark.parametrize(
    "lo,hi,expected",
    [(0, 10, [0, 2, 4, 6, 8, 10]), (3.2, 7.9, [3, 4, 5, 6, 7, 8]), (0, 2_500_000, [0, 500_000, 1_000_000, 1_500_000, 2_000_000, 2_500_000])],
)
def test_nice_ticks(lo, hi, expected):
    assert nice_ticks(lo, hi) == pytest.approx(expected)


def test_line_chart_is_valid_svg_with_every_point():
    svg = line_chart([Series("a", [0, 1, 2], [3.0, 2.0, 1.5]), Series("b", [], [])], title="t <&>", xlabel="x", ylabel="y")
    root = ET.fromstring(svg)  # well-formed XML, title escaped
    polylines = root.findall("{http://www.w3.org/2000/svg}polyline")
    assert len(polylines) == 1 and len(polylines[0].get("points").split()) == 3


def test_metrics_log_truncates_and_ignores_a_torn_line(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    for step in range(1, 6):
        log.write({"kind": "train", "step": step, "tokens": 10 * step, "loss": 5.0 - step})
    log.write({"kind": "val", "step": 5, "tokens": 50, "val_loss": 1.5})
    with open(log.path, "a") as f:
        f.write('{"kind": "train", "st')  # a crash mid-write
    assert len(read_metrics(log.path)) == 6
    log.truncate_after(3)
    assert [r["step"] for r in read_metrics(log.path)] == [1, 2, 3]
    svg = plot_loss_curve(log.path, tmp_path / "loss.svg").read_text()
    assert "train loss" in svg and json.loads(log.path.read_text().splitlines()[0])["step"] == 1


def test_no_mfu_without_a_known_peak():
    assert peak_flops(torch.device("cpu"), torch.bfloat16) is None
    assert peak_flops(torch.device("cpu"), torch.float32) is None
