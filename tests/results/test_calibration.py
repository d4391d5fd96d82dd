"""Temperature scaling (core/results/calibration.py): the fit against scipy's bounded minimiser, the
report's section from a run folder written by hand, its check in report_problem, and on the real
tiny run: the temperature in the selected checkpoint's classifier.json, applied by load_classifier
(and not with temperature=False)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from core.results import calibration
from core.results.calibration import apply_temperature, fit_temperature, nll, temperature_section
from core.results.report import build_report, report_problem
from core.runs import rundir

LABELS = ["entailment", "neutral", "contradiction"]


def overconfident(n: int, sharpen: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from softmax(z), probabilities reported as softmax(sharpen * z): a model that
    is too sure by the factor `sharpen` (the temperature that undoes it)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 3)) * 2
    p_true = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    gold = np.array([rng.choice(3, p=p) for p in p_true])
    said = np.exp(sharpen * z)
    return said / said.sum(1, keepdims=True), gold


def rows(probs: np.ndarray, gold: np.ndarray, split: str) -> list[dict]:
    out = []
    for i, (p, g) in enumerate(zip(probs, gold)):
        pred = int(p.argmax())
        out.append(
            {
                "id": f"{split}-{i}",
                "premise": "p",
                "hypothesis": "h",
                "gold": LABELS[g],
                "pred": LABELS[pred],
                "correct": bool(pred == g),
                "probs": [round(float(x), 5) for x in p],
            }
        )
    return out


def test_the_fit_finds_the_nll_minimum_and_undoes_overconfidence():
    from scipy.optimize import minimize_scalar

    probs, gold = overconfident(3000, 2.0, seed=0)
    t = fit_temperature(probs, gold)
    best = minimize_scalar(
        lambda log_t: nll(apply_temperature(probs, np.exp(log_t)), gold),
        bounds=np.log(calibration.T_RANGE),
        method="bounded",
        options={"xatol": 1e-10},
    )
    assert t == pytest.approx(float(np.exp(best.x)), rel=1e-5)
    assert 1.8 < t < 2.2  # the sharpening it undoes
    assert nll(apply_temperature(probs, t), gold) < nll(probs, gold)
    assert (apply_temperature(probs, t).argmax(1) == probs.argmax(1)).all()  # accuracy cannot change
    np.testing.assert_allclose(apply_temperature(probs, 1.0), probs, atol=1e-5)
    under, gold_u = overconfident(3000, 0.5, seed=1)
    assert fit_temperature(under, gold_u) < 1  # an under-confident model is sharpened
    assert fit_temperature(np.zeros((0, 3)), np.zeros(0, dtype=int)) is None


def test_a_probability_written_as_zero_is_read_as_half_the_last_decimal():
    probs = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    assert nll(probs, np.array([1, 1])) == pytest.approx(-np.log(calibration.EPS) / 2)
    assert np.isfinite(fit_temperature(probs, np.array([1, 1])))


def test_the_report_fits_on_validation_and_scores_test(tmp_path):
    """A run folder by hand: validation_after and test_after from the same over-confident model;
    T comes from validation alone, and test ECE and NLL drop with it."""
    run = tmp_path / "run"
    (run / "predictions").mkdir(parents=True)
    val_p, val_g = overconfident(600, 2.5, seed=2)
    test_p, test_g = overconfident(600, 2.5, seed=3)
    for split, stage, p, g in (
        ("validation", "after", val_p, val_g),
        ("test", "after", test_p, test_g),
        ("test", "before", test_p, test_g),
    ):
        rundir.atomic_write_jsonl(rundir.predictions_file(run, split, stage), rows(p, g, split))
    rundir.append_jsonl(run / "metrics.jsonl", {"kind": "setup", "labels": LABELS})
    report = build_report(run)
    ts = report["temperature_scaling"]
    assert ts["temperature"] == pytest.approx(fit_temperature(np.round(val_p, 5), val_g))
    assert ts["n_fit"] == 600 and ts["test"]["n"] == 600
    assert ts["test"]["ece_after"] < ts["test"]["ece_before"] and ts["test"]["nll_after"] < ts["test"]["nll_before"]
    assert ts["validation"]["nll_after"] < ts["validation"]["nll_before"]
    assert ts["calibration_after"]["ece"] == ts["test"]["ece_after"]
    assert report_problem(report) is None
    from core.results.render import render_markdown

    assert f"Temperature scaling: T = {ts['temperature']:.3f}, fitted on the 600 validation rows" in render_markdown(
        report
    )
    broken = {**report, "temperature_scaling": {**ts, "temperature": "hot"}}
    assert report_problem(json.loads(json.dumps(broken))) == '"temperature_scaling" is malformed'
    (run / "predictions" / "validation_after.jsonl").unlink()  # a run from before: no section, no error
    assert build_report(run)["temperature_scaling"] is None
    assert temperature_section([], rows(test_p, test_g, "test"), LABELS) is None


def test_the_selected_checkpoint_carries_the_temperature_and_load_classifier_applies_it(tiny_run, tmp_path):
    from core.classifier import load_classifier

    report = json.loads((tiny_run / "report.json").read_text())
    ts = report["temperature_scaling"]
    assert ts["fitted_on"] == "validation" and ts["n_fit"] == 32 and ts["test"]["n"] == 48
    folder = tiny_run / "checkpoints" / f"epoch-{report['best_epoch']}"
    info = json.loads((folder / "classifier.json").read_text())
    assert info["temperature"] == pytest.approx(ts["temperature"])
    assert "- Temperature: " in (folder / "README.md").read_text()
    other = next(p for p in (tiny_run / "checkpoints").glob("epoch-*") if p != folder)
    assert "temperature" not in json.loads((other / "classifier.json").read_text())  # fitted for one epoch only
    test = [json.loads(line) for line in (tiny_run / "predictions" / "test_after.jsonl").read_text().splitlines()]
    some = [{"premise": r["premise"], "hypothesis": r["hypothesis"]} for r in test[:6]]
    raw = load_classifier(folder, device="cpu", temperature=False)
    assert raw.temperature == 1.0
    raw_probs = raw.predict(some)
    np.testing.assert_allclose(raw_probs, [r["probs"] for r in test[:6]], atol=2e-4)  # what the run scored
    calibrated = load_classifier(folder, device="cpu")
    assert calibrated.temperature == pytest.approx(ts["temperature"])
    np.testing.assert_allclose(calibrated.predict(some), apply_temperature(raw_probs, ts["temperature"]), atol=1e-4)
    # and `python -m core predict` (core/predict.py), unless told --no-temperature
    from core.predict import predict_file

    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in some))
    quiet = {"progress": lambda done, speed: None}
    hot = predict_file(tiny_run, data, out=tmp_path / "hot.jsonl", **quiet)
    cold = predict_file(tiny_run, data, out=tmp_path / "cold.jsonl", temperature=False, **quiet)
    assert hot["temperature"] == pytest.approx(ts["temperature"]) and cold["temperature"] is None

    def probs(path):
        return np.array([list(json.loads(line)["probs"].values()) for line in path.read_text().splitlines()])

    np.testing.assert_allclose(probs(tmp_path / "cold.jsonl"), raw_probs, atol=2e-4)
    np.testing.assert_allclose(
        probs(tmp_path / "hot.jsonl"), apply_temperature(probs(tmp_path / "cold.jsonl"), ts["temperature"]), atol=2e-4
    )
