"""Units of the report (core/results/render.py, core/results/report.py, core/results/stats.py):
the parameter, resource and speed tables, the Wilson interval, the before/after categories."""

import pytest

from core.results.render import parameter_rows, resource_rows
from core.results.report import compare_predictions
from core.results.stats import wilson as wilson_interval

LABELS = ["entailment", "neutral", "contradiction"]


def test_parameter_and_resource_rows_are_the_report_tables():
    report = {
        "params": {"total": 1_234_567, "packed": 654_321, "trainable": 4_321},
        "resources": {
            "torch_peak_gb": 1.23456,
            "gpu_util": 87.4,
            "rss_gb": 3.14159,
            "cpu_percent": 190.55,
            "checkpoints_mb": 12.345,
        },
    }
    assert parameter_rows(report) == [
        ("total (4-bit weights at full size)", "1,234,567"),
        ("packed 4-bit (naive numel sum)", "654,321"),
        ("trainable (LoRA + head)", "4,321 (0.35%)"),
    ]
    assert resource_rows(report) == [
        ("GPU memory (torch allocated)", "1.23 GiB"),
        ("GPU memory (device, NVML)", "n/a"),
        ("GPU utilisation", "87%"),
        ("process RAM (RSS)", "3.14 GiB"),
        ("CPU (100% = one core)", "191%"),
        ("disk used by checkpoints", "12.3 MB"),
    ]
    assert parameter_rows({}) == []
    assert [peak for _, peak in resource_rows({})] == ["n/a"] * 6
    # the Markdown report prints exactly these rows
    from core.results.render import render_markdown

    md = render_markdown({"run_id": "r", **report})
    for name, value in parameter_rows(report) + resource_rows(report):
        assert f"| {name} | {value} |" in md


def test_speed_rows_show_how_the_run_ran():
    from dataclasses import asdict

    from core.config import SpeedConfig
    from core.results.render import render_markdown, speed_rows

    report = {"speed": asdict(SpeedConfig(pack="off", micro_tokens=None)), "speedups": ["gelu_new->fused tanh gelu"]}
    rows = dict(speed_rows(report))
    assert rows["pack"] == "off" and rows["micro_tokens"] == "auto" and rows["cuda_graphs"] == "true"
    assert rows["applied"] == "gelu_new->fused tanh gelu"
    assert len(rows) == len(SpeedConfig.__dataclass_fields__) + 1
    assert speed_rows({}) == []  # a run from before the speed settings
    md = render_markdown({"run_id": "r", **report})
    assert "## Speed settings" in md and "| pack | off |" in md


def test_wilson_interval_known_values():
    lo, hi = wilson_interval(75, 100)
    assert lo == pytest.approx(0.6569, abs=1e-3) and hi == pytest.approx(0.8245, abs=1e-3)
    assert wilson_interval(0, 10)[0] == 0.0


def test_compare_predictions_categories():
    def row(i, gold, pred, p):
        return {
            "id": str(i),
            "premise": "p",
            "hypothesis": "h",
            "gold": gold,
            "pred": pred,
            "correct": gold == pred,
            "probs": p,
        }

    before = [
        row(0, "neutral", "entailment", [0.6, 0.3, 0.1]),
        row(1, "neutral", "neutral", [0.1, 0.8, 0.1]),
        row(2, "entailment", "neutral", [0.2, 0.7, 0.1]),
        row(3, "entailment", "entailment", [0.9, 0.05, 0.05]),
    ]
    after = [
        row(0, "neutral", "neutral", [0.1, 0.8, 0.1]),
        row(1, "neutral", "entailment", [0.5, 0.4, 0.1]),
        row(2, "entailment", "contradiction", [0.1, 0.2, 0.7]),
        row(3, "entailment", "entailment", [1, 0, 0]),
    ]
    rows = compare_predictions(before, after, LABELS)
    assert [r["category"] for r in rows] == ["fixed", "regressed", "still failing", "still right"]
    assert rows[0]["gold_prob_change"] == pytest.approx(0.5)
