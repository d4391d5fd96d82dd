"""The Report page's training controls under AppTest, on the real tiny run: temperature scaling in the
Calibration section (T, test ECE after scaling, the scaled line in the reliability diagram), the
controls with each split's class balance, and the early-stopping line of a run that stopped early."""

from __future__ import annotations

import json
import shutil

from tests.helpers import start, text_of


def test_the_report_page_shows_temperature_scaling_controls_and_early_stopping(tiny_run, tmp_path, monkeypatch):
    root = tmp_path / "runs"
    run = shutil.copytree(tiny_run, root / tiny_run.name, ignore=shutil.ignore_patterns("state-*"))
    report = json.loads((run / "report.json").read_text())
    ts = report["temperature_scaling"]
    report["early_stop"] = {
        "epoch": 2,
        "best_epoch": 1,
        "patience": 1,
        "epochs": 4,
        "reason": "no epoch beat epoch 1's validation accuracy (50.0%, or matched it with a lower loss) in the 1 "
        "epoch after it",
    }
    report["controls"]["early_stopping_patience"] = 1
    (run / "report.json").write_text(json.dumps(report))
    at = start(root, monkeypatch, page="report", run=run.name)
    metrics = {m.label: m for m in at.metric}
    assert metrics["Temperature T"].value == f"{ts['temperature']:.2f}"
    assert metrics["Test ECE after scaling"].value == f"{ts['test']['ece_after']:.3f}"
    specs = [json.loads(e.proto.spec) for e in at.get("plotly_chart")]
    reliability = next(s for s in specs if s["layout"]["title"]["text"].startswith("Reliability diagram"))
    assert any(str(t.get("name", "")).startswith("after-T-scaled (ECE") for t in reliability["data"])
    text = text_of(at)
    assert "Early stopping: stopped after epoch 2 of 4: no epoch beat epoch 1's validation accuracy" in text
    tables = [d.value for d in at.dataframe]
    controls = next(t for t in tables if list(t.columns) == ["control", "value"])
    assert dict(zip(controls["control"], controls["value"]))["LoRA variant"] == "LoRA"
    balance = next(t for t in tables if "weight in the loss" in t.columns)
    assert list(balance["class"]) == report["labels"] and set(balance["weight in the loss"]) == {"1"}
