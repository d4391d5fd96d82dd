"""Temperature scaling: one number, fitted on the validation split, that makes the probabilities honest.

    t = fit_temperature(val_probs, val_gold)          # argmin over T of the validation NLL of softmax(z / T)
    scaled = apply_temperature(test_probs, t)         # the same argmax, other confidences
    nll(scaled, test_gold)                            # mean negative log-likelihood of the gold labels
    temperature_section(val_rows, test_rows, labels)  # the report's "temperature_scaling"

A fine-tuned classifier is usually over-confident: it says 0.97 where it is right 85% of the time.
Dividing its logits z by one scalar T > 1 softens every prediction alike and never changes which
class wins, so accuracy stays and the expected calibration error (ECE) drops. T is chosen on
validation (never on test), by the validation NLL; test ECE and NLL before and after show
whether it carried over. The trainer writes the report's T into the selected checkpoint's
classifier.json, and core.classifier.load_classifier applies it.

The inputs are probabilities as the predictions files hold them (5 decimals): log p stands in for
the logits (softmax(log p / T) = softmax(z / T), the softmax forgets a constant per row), and a
probability written as 0 is read as EPS, half the last decimal. Pure numpy, no I/O.

Reference: C. Guo, G. Pleiss, Y. Sun, K. Q. Weinberger (2017), "On calibration of modern neural
networks", ICML, section 4.2.
"""

from __future__ import annotations

import math

import numpy as np

from .slices import calibration

EPS = 5e-6  # half the rounding step of the 5-decimal probabilities of predictions/*.jsonl
T_RANGE = (0.05, 20.0)  # the temperatures searched; the NLL's minimum is inside for any sane model
METHOD = "golden-section search of the validation NLL over log T in [0.05, 20]"


def _log_probs(probs: np.ndarray) -> np.ndarray:
    return np.log(np.clip(np.asarray(probs, dtype=float), EPS, 1.0))


def apply_temperature(probs: np.ndarray, temperature: float, eps: float = EPS) -> np.ndarray:
    """softmax(log p / T) row by row: the probabilities of logits divided by T (a probability
    below `eps` counts as eps: EPS for the 5-decimal files, less for a model's own output)."""
    z = np.log(np.clip(np.asarray(probs, dtype=float), eps, 1.0)) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def nll(probs: np.ndarray, gold: np.ndarray) -> float | None:
    """Mean negative log-likelihood of the gold labels (a probability below EPS counts as EPS);
    None without rows."""
    probs = np.asarray(probs, dtype=float)
    if len(probs) == 0:
        return None
    return float(-_log_probs(probs)[np.arange(len(probs)), np.asarray(gold)].mean())


def fit_temperature(probs: np.ndarray, gold: np.ndarray, iterations: int = 80) -> float | None:
    """The T in T_RANGE that minimises nll(apply_temperature(probs, T), gold); None without rows.

    The NLL is convex in 1/T (a log-sum-exp of linear functions of 1/T minus a linear one), so
    it has one minimum along log T too, which a golden-section search brackets exactly: no
    gradient, no learning rate, 80 steps shrink the interval below 1e-15."""
    probs = np.asarray(probs, dtype=float)
    if len(probs) == 0:
        return None
    z = _log_probs(probs)
    gold = np.asarray(gold)
    picked = z[np.arange(len(z)), gold]

    def loss(log_t: float) -> float:
        scaled = z / math.exp(log_t)
        top = scaled.max(axis=1)
        lse = top + np.log(np.exp(scaled - top[:, None]).sum(axis=1))
        return float((lse - picked / math.exp(log_t)).mean())

    ratio = (math.sqrt(5) - 1) / 2
    a, b = math.log(T_RANGE[0]), math.log(T_RANGE[1])
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = loss(c), loss(d)
    for _ in range(iterations):
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = loss(c)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = loss(d)
    return float(math.exp((a + b) / 2))


def _arrays(rows: list[dict], labels: list[str]) -> tuple[np.ndarray, np.ndarray]:
    probs = np.array([r["probs"] for r in rows], dtype=float).reshape(len(rows), len(labels))
    gold = np.array([labels.index(r["gold"]) for r in rows], dtype=int)
    return probs, gold


def temperature_section(validation: list[dict], test: list[dict], labels: list[str]) -> dict | None:
    """The report's temperature scaling: T fitted on the validation rows of the selected model
    (predictions/validation_after.jsonl), applied to its test rows (test_after.jsonl). Returns
    {"temperature", "fitted_on", "n_fit", "method", "validation": {"nll_before", "nll_after"},
    "test": {"n", "ece_before", "ece_after", "nll_before", "nll_after"}, "calibration_after"
    (slices.calibration of the scaled test rows: ECE and bins, for a reliability diagram)}; None
    when either split has no rows."""
    if not validation or not test:
        return None
    val_probs, val_gold = _arrays(validation, labels)
    test_probs, test_gold = _arrays(test, labels)
    t = fit_temperature(val_probs, val_gold)
    scaled = apply_temperature(test_probs, t)
    scaled_rows = [{**r, "probs": p.tolist()} for r, p in zip(test, scaled)]
    after = calibration(scaled_rows, labels)
    return {
        "temperature": t,
        "fitted_on": "validation",
        "n_fit": len(validation),
        "method": METHOD,
        "validation": {
            "nll_before": nll(val_probs, val_gold),
            "nll_after": nll(apply_temperature(val_probs, t), val_gold),
        },
        "test": {
            "n": len(test),
            "ece_before": calibration(test, labels)["ece"],
            "ece_after": after["ece"],
            "nll_before": nll(test_probs, test_gold),
            "nll_after": nll(scaled, test_gold),
        },
        "calibration_after": after,
    }
