"""Statistics for the before/after comparison of a run: pure functions, no I/O, no streamlit.

The inputs are the rows of predictions/test_before.jsonl and predictions/test_after.jsonl
(one dict per test example, same order: id, premise, hypothesis or text, tag, gold, pred,
probs in label order, correct). Every function returns plain Python numbers, lists and dicts
(JSON-ready); "no data" reads None. Calibration, slices, label-noise hints, forgetting and
seeds are in core/results/slices.py.

    from core.results import stats
    before, after = stats.pair_rows(before_rows, after_rows)     # align by id (same order -> unchanged)
    b_ok = [r["correct"] for r in before]; a_ok = [r["correct"] for r in after]

    stats.accuracy_summary(a_ok)                   # {"n", "k", "accuracy", "ci95": [lo, hi]}  (Wilson)
    stats.paired_bootstrap(b_ok, a_ok)             # {"delta", "ci95"}: acc_after - acc_before, 95% percentile CI
    t = stats.transitions(before, after, labels)   # 2x2 right/wrong table + KxK label moves, with indices
    p = stats.mcnemar_exact(t["b"], t["c"])        # exact McNemar on the discordant pairs
    stats.verdict(p)                               # "significant at 5%" / "not distinguishable from noise at this n"
    stats.accuracy_change(b_ok, a_ok)              # all of the above in one dict, plus the detectable change
    stats.minimum_detectable_change(len(a_ok), sum(b_ok) / len(b_ok))
    stats.per_class_f1_change(before, after, labels)   # per-class (and macro) F1 before/after, bootstrap CI
    m = stats.confusion_matrix(after, labels)      # counts [gold, pred]
    stats.class_scores(m)                          # per-class precision, recall, F1, support

Rows are paired by position: before_rows[i] and after_rows[i] must be the same example (their
ids, where present, are checked). Indices returned anywhere are positions in those lists.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np

# scipy is imported where it is used (mcnemar_exact, minimum_detectable_change): core.results.report
# (and the app's pages, the model card) take wilson() from here without paying for it. scikit-learn is
# no dependency of this file: the tests check F1, calibration and the confusion counts against it.

__all__ = [
    "wilson",
    "accuracy_summary",
    "paired_bootstrap",
    "mcnemar_exact",
    "verdict",
    "accuracy_change",
    "minimum_detectable_change",
    "pair_rows",
    "transitions",
    "check_paired",
    "label_codes",
    "row_correct",
    "confusion_matrix",
    "class_scores",
    "per_class_f1_change",
]

Z95 = 1.96


def _z(q: float) -> float:
    return NormalDist().inv_cdf(q)


# --- accuracy and its change -------------------------------------------------------------------


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of the proportion k/n: (lo, hi); (nan, nan) when n == 0.

    centre = (p + z^2/2n) / (1 + z^2/n),  half = z * sqrt(p(1-p)/n + z^2/4n^2) / (1 + z^2/n),
    p = k/n, z = 1.96 for 95%. Unlike the Wald interval p +- z*sqrt(p(1-p)/n) it stays inside
    [0, 1] and keeps close to its nominal coverage for small n and p near 0 or 1.

    References: E. B. Wilson (1927), "Probable inference, the law of succession, and statistical
    inference", JASA 22:209-212; L. D. Brown, T. T. Cai, A. DasGupta (2001), "Interval estimation
    for a binomial proportion", Statistical Science 16:101-133.
    """
    if not (0 <= k <= n):
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return (float("nan"), float("nan"))
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # exact at the ends (k = 0 gives lo = 0, k = n gives hi = 1; rounding can miss by 1 ulp)
    return (0.0 if k == 0 else max(0.0, centre - half), 1.0 if k == n else min(1.0, centre + half))


def accuracy_summary(correct: list[bool]) -> dict:
    """{"n", "k", "accuracy", "ci95": [lo, hi]}: k = number correct, accuracy = k/n, ci95 the
    Wilson score interval (see `wilson`). With n == 0, accuracy and both bounds are None."""
    c = [bool(x) for x in correct]
    n, k = len(c), sum(c)
    if n == 0:
        return {"n": 0, "k": 0, "accuracy": None, "ci95": [None, None]}
    lo, hi = wilson(k, n)
    return {"n": n, "k": k, "accuracy": k / n, "ci95": [lo, hi]}


def _bools(x, name: str) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 1:
        raise ValueError(f"{name} must be a flat list of booleans")
    return a.astype(bool)


def paired_bootstrap(before_correct: list[bool], after_correct: list[bool], n_boot: int = 10000, seed: int = 0) -> dict:
    """Paired bootstrap of the accuracy change: {"delta", "ci95": [lo, hi]}.

    delta = acc_after - acc_before on the test set. Each bootstrap replicate draws n examples with
    replacement (the same draw for before and after: the pairing is kept) and recomputes delta;
    ci95 is the 2.5th and 97.5th percentile of the n_boot replicates (percentile interval).

    Method: per example d_i = after_i - before_i is -1 (regressed), 0 or +1 (fixed), and delta is
    the mean of d. A with-replacement resample of n examples is fully described by how many of
    the drawn examples are of each of the three kinds, and those counts are exactly
    Multinomial(n; regressed/n, unchanged/n, fixed/n); so the replicates are drawn as multinomial
    counts (numpy Generator, seeded), which is the same bootstrap distribution as drawing indices
    but costs O(n_boot), not O(n_boot * n). Seeded: the same inputs and seed give the same interval.
    Identical before/after gives [0, 0]. n == 0 gives delta None and ci95 [None, None].

    References: B. Efron, R. Tibshirani (1993), "An Introduction to the Bootstrap", ch. 13
    (percentile interval); for paired test sets in NLP: T. Berg-Kirkpatrick, D. Burkett, D. Klein
    (2012), "An empirical investigation of statistical significance in NLP", EMNLP;
    R. Dror et al. (2018), "The hitchhiker's guide to testing statistical significance in NLP", ACL.
    """
    b = _bools(before_correct, "before_correct")
    a = _bools(after_correct, "after_correct")
    if len(a) != len(b):
        raise ValueError(f"before and after have different lengths ({len(b)} vs {len(a)})")
    n = len(a)
    if n == 0:
        return {"delta": None, "ci95": [None, None]}
    if n_boot < 1:
        raise ValueError("n_boot must be >= 1")
    regressed = int(np.sum(b & ~a))
    fixed = int(np.sum(~b & a))
    delta = (fixed - regressed) / n
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n, [regressed / n, (n - regressed - fixed) / n, fixed / n], size=n_boot)
    deltas = (counts[:, 2] - counts[:, 0]) / n
    lo, hi = np.percentile(deltas, [2.5, 97.5])
    return {"delta": delta, "ci95": [float(lo), float(hi)]}


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar test on the discordant pairs: the p-value.

    b = examples right before and wrong after, c = wrong before and right after. Under H0 (the
    fine-tuning did not change accuracy) each discordant pair is equally likely to go either way,
    so min(b, c) ~ Bin(b + c, 1/2) and
        p = min(1, 2 * P(X <= min(b, c))),  X ~ Bin(b + c, 0.5),
    computed as scipy.stats.binomtest(min(b, c), b + c, 0.5).pvalue (for p = 1/2 scipy's
    two-sided p-value equals this formula; the tests check it). b + c == 0 gives 1.0.
    Concordant pairs (right-right, wrong-wrong) carry no information about the change.

    References: Q. McNemar (1947), "Note on the sampling error of the difference between
    correlated proportions or percentages", Psychometrika 12:153-157; exact (binomial) form:
    A. Agresti (2013), "Categorical Data Analysis", 3rd ed., sec. 11.1; T. G. Dietterich (1998),
    "Approximate statistical tests for comparing supervised classification learning algorithms",
    Neural Computation 10:1895-1923.
    """
    b, c = int(b), int(c)
    if b < 0 or c < 0:
        raise ValueError("b and c must be >= 0")
    if b + c == 0:
        return 1.0
    from scipy.stats import binomtest  # here, not at the top: see the imports

    return float(min(1.0, binomtest(min(b, c), b + c, 0.5).pvalue))


def verdict(p: float | None, alpha: float = 0.05) -> str:
    """Plain words for a p-value: "significant at 5%" when p < alpha (alpha = 0.05; another alpha
    reads e.g. "significant at 1%"), else "not distinguishable from noise at this n" (also for a
    missing p). "Not significant" is not "no effect": it means this test set is too small to tell
    the change from chance (see minimum_detectable_change)."""
    if p is not None and not (isinstance(p, float) and math.isnan(p)) and p < alpha:
        return f"significant at {100 * alpha:g}%"
    return "not distinguishable from noise at this n"


def minimum_detectable_change(
    n: int, p_before: float, alpha: float = 0.05, power: float = 0.8, discordance: float | None = None
) -> float:
    """The smallest accuracy gain (after - before, as a fraction) that a test set of n examples
    detects with the given power by a two-sided test at level alpha. An approximation for
    planning and for reading a "not significant" result, not an exact power analysis.

    Default (discordance None), two proportions, normal approximation: the smallest delta with
        delta * sqrt(n) = z_{1-alpha/2} * sqrt(2 pbar (1 - pbar)) + z_{power} * sqrt(p1 q1 + p2 q2),
    p1 = p_before, p2 = p_before + delta, pbar = (p1 + p2) / 2, q = 1 - p (solved numerically;
    Fleiss, Levin & Paik 2003, eq. 4.14, without continuity correction). It treats before and
    after as two independent samples of n; our before/after share the same examples, and a paired
    test (McNemar) is more powerful when the two models tend to be right on the same examples, so
    this is a conservative (larger) figure.

    With discordance psi (the expected share of examples whose correctness changes, (b+c)/n;
    e.g. from a pilot run), the paired formula for McNemar's test (Connor 1987):
        n = (z_{1-alpha/2} sqrt(psi) + z_{power} sqrt(psi - delta^2))^2 / delta^2,
    solved in closed form: delta = sqrt(psi) (z_a sqrt(n) + z_b sqrt(n - z_a^2 + z_b^2)) / (n + z_b^2).
    p_before is then used only to check that the change is possible.

    Returns math.inf when no gain is detectable at this n (it would need p_before + delta > 1,
    or delta > psi); n <= 0 gives math.inf too.

    References: J. L. Fleiss, B. Levin, M. C. Paik (2003), "Statistical Methods for Rates and
    Proportions", 3rd ed., sec. 4.2; R. J. Connor (1987), "Sample size for testing differences in
    proportions for the paired-sample design", Biometrics 43:207-211.
    """
    if not (0.0 <= p_before <= 1.0):
        raise ValueError("p_before must be in [0, 1]")
    if not (0 < alpha < 1 and 0 < power < 1):
        raise ValueError("alpha and power must be in (0, 1)")
    if n <= 0:
        return math.inf
    za, zb = _z(1 - alpha / 2), _z(power)
    if discordance is not None:
        psi = float(discordance)
        if not (0.0 < psi <= 1.0):
            raise ValueError("discordance must be in (0, 1]")
        if n - za * za + zb * zb <= 0:
            return math.inf
        delta = math.sqrt(psi) * (za * math.sqrt(n) + zb * math.sqrt(n - za * za + zb * zb)) / (n + zb * zb)
        # a gain delta needs (psi + delta)/2 of the examples to flip wrong -> right
        if delta > psi or (psi + delta) / 2 > 1 - p_before + 1e-12:
            return math.inf
        return float(delta)

    p1 = p_before

    def gap(d: float) -> float:
        p2 = p1 + d
        pbar = (p1 + p2) / 2
        return za * math.sqrt(2 * pbar * (1 - pbar)) + zb * math.sqrt(p1 * (1 - p1) + p2 * (1 - p2)) - d * math.sqrt(n)

    top = 1.0 - p1
    if top <= 0 or gap(top) > 0:
        return math.inf
    # gap is concave in d and positive near 0: exactly one root in (0, top]
    from scipy import optimize  # here, not at the top: see the imports

    return float(optimize.brentq(gap, 1e-12, top, xtol=1e-12))


def accuracy_change(
    before_correct: list[bool], after_correct: list[bool], n_boot: int = 10000, seed: int = 0, alpha: float = 0.05
) -> dict:
    """Everything about the accuracy change in one dict: {"before", "after"} (accuracy_summary),
    "delta" and "ci95" (paired_bootstrap), "b" (right -> wrong), "c" (wrong -> right), "p"
    (mcnemar_exact), "verdict", and "mdc" (minimum_detectable_change at this n and the before
    accuracy, default two-proportion approximation; math.inf when none is detectable)."""
    b = _bools(before_correct, "before_correct")
    a = _bools(after_correct, "after_correct")
    boot = paired_bootstrap(b, a, n_boot=n_boot, seed=seed)
    regressed, fixed = int(np.sum(b & ~a)), int(np.sum(~b & a))
    p = mcnemar_exact(regressed, fixed)
    before = accuracy_summary(b.tolist())
    return {
        "before": before,
        "after": accuracy_summary(a.tolist()),
        "delta": boot["delta"],
        "ci95": boot["ci95"],
        "b": regressed,
        "c": fixed,
        "p": p,
        "verdict": verdict(p, alpha),
        "mdc": (minimum_detectable_change(len(b), before["accuracy"], alpha=alpha) if len(b) else math.inf),
    }


# --- pairing, transitions, confusion counts, per-class F1 --------------------------------------------------------


def pair_rows(before_rows: list[dict], after_rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """The before and after rows aligned by "id", in the order of before_rows; examples missing
    from either side are left out. Rows without ids are paired by position (lists of equal
    length required)."""
    if all("id" in r for r in before_rows) and all("id" in r for r in after_rows):
        by_id = {r["id"]: r for r in after_rows}
        pairs = [(r, by_id[r["id"]]) for r in before_rows if r["id"] in by_id]
        return [p[0] for p in pairs], [p[1] for p in pairs]
    check_paired(before_rows, after_rows)
    return list(before_rows), list(after_rows)


def check_paired(before_rows: list[dict], after_rows: list[dict]) -> None:
    """The input check of every function over paired rows: same length, and the same id at each
    position where both rows have one (ValueError otherwise)."""
    if len(before_rows) != len(after_rows):
        raise ValueError(
            f"before and after have different lengths ({len(before_rows)} vs {len(after_rows)});"
            " align them with pair_rows"
        )
    for i, (b, a) in enumerate(zip(before_rows, after_rows)):
        if "id" in b and "id" in a and b["id"] != a["id"]:
            raise ValueError(f"row {i}: before id {b['id']!r} != after id {a['id']!r}; align them with pair_rows")


def row_correct(row: dict) -> bool:
    """Whether a prediction row is right: its "correct", else pred == gold."""
    return bool(row["correct"]) if row.get("correct") is not None else row["pred"] == row["gold"]


def label_codes(rows: list[dict], key: str, labels: list[str]) -> np.ndarray:
    """The position in `labels` of each row's `key` ("gold" or "pred"); ValueError for another label."""
    index = {l: i for i, l in enumerate(labels)}
    try:
        return np.array([index[r[key]] for r in rows], dtype=np.int64)
    except KeyError as e:
        raise ValueError(f"label {e.args[0]!r} is not among {labels}") from None


CELLS = (
    ("still right", True, True),
    ("regressed", True, False),
    ("fixed", False, True),
    ("still failing", False, False),
)


def transitions(before_rows: list[dict], after_rows: list[dict], labels: list[str]) -> dict:
    """Where the examples went between before and after.

    Returns {"n", "correctness", "b", "c", "labels"}:
    - correctness: the 2x2 table of right/wrong before x right/wrong after: {"table":
      [[right->right, right->wrong], [wrong->right, wrong->wrong]], "cells": {"still right",
      "regressed", "fixed", "still failing"} each {"count", "indices"}}; "b" = regressed
      (right -> wrong) and "c" = fixed (wrong -> right) are the discordant counts for mcnemar_exact.
      Right means the row's "correct" (pred == gold when it is missing).
    - labels: the KxK table of label moves, before prediction -> after prediction:
      {"labels", "counts": KxK (row = before pred, column = after pred), "indices": KxK lists,
      "moves": the off-diagonal cells with count > 0, most frequent first, each {"from", "to",
      "count", "indices"}} (e.g. neutral -> entailment).
    Indices are positions in the (paired) row lists; the counts of each table sum to n.
    """
    check_paired(before_rows, after_rows)
    n = len(before_rows)
    b_ok = np.array([row_correct(r) for r in before_rows], dtype=bool)
    a_ok = np.array([row_correct(r) for r in after_rows], dtype=bool)
    cells = {}
    for name, before_right, after_right in CELLS:
        idx = np.flatnonzero((b_ok == before_right) & (a_ok == after_right)).tolist()
        cells[name] = {"count": len(idx), "indices": idx}
    table = [
        [cells["still right"]["count"], cells["regressed"]["count"]],
        [cells["fixed"]["count"], cells["still failing"]["count"]],
    ]

    k = len(labels)
    pb = label_codes(before_rows, "pred", labels)
    pa = label_codes(after_rows, "pred", labels)
    counts = np.bincount(pb * k + pa, minlength=k * k).reshape(k, k) if n else np.zeros((k, k), dtype=int)
    indices = [[[] for _ in range(k)] for _ in range(k)]
    for i, (x, y) in enumerate(zip(pb.tolist(), pa.tolist())):
        indices[x][y].append(i)
    moves = [
        {"from": labels[x], "to": labels[y], "count": int(counts[x, y]), "indices": indices[x][y]}
        for x in range(k)
        for y in range(k)
        if x != y and counts[x, y] > 0
    ]
    moves.sort(key=lambda m: -m["count"])
    return {
        "n": n,
        "correctness": {"table": table, "cells": cells},
        "b": cells["regressed"]["count"],
        "c": cells["fixed"]["count"],
        "labels": {"labels": list(labels), "counts": counts.tolist(), "indices": indices, "moves": moves},
    }


def confusion_matrix(rows: list[dict], labels: list[str]) -> np.ndarray:
    """Confusion counts of prediction rows: m[i, j] = rows with gold labels[i] predicted labels[j]
    (rows = gold, columns = predicted; sklearn.metrics.confusion_matrix's layout)."""
    k = len(labels)
    codes = label_codes(rows, "gold", labels) * k + label_codes(rows, "pred", labels)
    return np.bincount(codes, minlength=k * k).reshape(k, k)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.where(den > 0, num / np.maximum(den, 1), 0.0)


def class_scores(confusion) -> dict[str, np.ndarray]:
    """Per-class precision, recall, F1 and support from confusion counts [..., gold, pred] (leading
    axes, if any, are resamples: the bootstrap scores all of them at once):

        precision_j = TP_j / predicted_j,  recall_j = TP_j / support_j,
        F1_j = 2 TP_j / (2 TP_j + FP_j + FN_j) = 2 TP_j / (support_j + predicted_j),

    support_j = examples of gold class j, predicted_j = examples predicted j. A score whose
    denominator is 0 is 0 (sklearn's zero_division=0). sklearn.metrics.f1_score computes F1 by the
    same formula, so the two agree to the last bit.

    Returns {"precision", "recall", "f1"} (floats) and "support" (counts), each of shape [..., k].
    """
    conf = np.asarray(confusion)
    tp = np.diagonal(conf, axis1=-2, axis2=-1).astype(float)
    support = conf.sum(axis=-1)
    predicted = conf.sum(axis=-2)
    return {
        "precision": _ratio(tp, predicted),
        "recall": _ratio(tp, support),
        "f1": _ratio(2 * tp, support + predicted),
        "support": support,
    }


def _boot_confusions(gold: np.ndarray, pred: np.ndarray, idx: np.ndarray, k: int) -> np.ndarray:
    """Confusion counts (n_resamples, k, k) of the resamples idx (n_resamples, n), by one bincount."""
    r = idx.shape[0]
    codes = gold[idx] * k + pred[idx] + (np.arange(r) * k * k)[:, None]
    return np.bincount(codes.ravel(), minlength=r * k * k).reshape(r, k, k)


def per_class_f1_change(
    before_rows: list[dict], after_rows: list[dict], labels: list[str], n_boot: int = 2000, seed: int = 0
) -> dict:
    """Per-class F1 before and after fine-tuning, and its change with a paired bootstrap 95% CI.

    F1 of class j = 2 TP_j / (2 TP_j + FP_j + FN_j) (class_scores; what sklearn.metrics.f1_score
    gives with average=None, zero_division=0). The bootstrap draws n example indices with
    replacement (numpy Generator, seeded), the same indices for before and after, computes the
    confusion counts of each resample with one numpy bincount, and takes the 2.5/97.5 percentiles
    of F1_after - F1_before per class (percentile interval; Efron & Tibshirani 1993). Macro F1
    (unweighted mean over the classes) is reported the same way.

    Returns {"n", "n_boot", "classes": [{"label", "support", "f1_before", "f1_after", "change",
    "ci95": [lo, hi]}], "macro": {"f1_before", "f1_after", "change", "ci95"}}; with n == 0 the
    values are None.

    References: C. J. van Rijsbergen (1979), "Information Retrieval", ch. 7 (F-measure);
    B. Efron, R. Tibshirani (1993), "An Introduction to the Bootstrap"; scikit-learn f1_score.
    """
    check_paired(before_rows, after_rows)
    k, n = len(labels), len(before_rows)
    gold = label_codes(before_rows, "gold", labels)
    if n and not np.array_equal(gold, label_codes(after_rows, "gold", labels)):
        raise ValueError("before and after rows have different gold labels")
    if n == 0:
        empty = {"f1_before": None, "f1_after": None, "change": None, "ci95": [None, None]}
        return {
            "n": 0,
            "n_boot": n_boot,
            "macro": dict(empty),
            "classes": [{"label": l, "support": 0, **empty} for l in labels],
        }
    pb = label_codes(before_rows, "pred", labels)
    pa = label_codes(after_rows, "pred", labels)
    f1b = class_scores(confusion_matrix(before_rows, labels))["f1"]
    f1a = class_scores(confusion_matrix(after_rows, labels))["f1"]

    rng = np.random.default_rng(seed)
    chunk = max(1, 2_000_000 // n)  # bounds memory to ~2M indices at a time
    diffs = []
    for start in range(0, n_boot, chunk):
        idx = rng.integers(0, n, size=(min(chunk, n_boot - start), n))
        diffs.append(
            class_scores(_boot_confusions(gold, pa, idx, k))["f1"]
            - class_scores(_boot_confusions(gold, pb, idx, k))["f1"]
        )
    d = np.concatenate(diffs)  # (n_boot, k)
    lo, hi = np.percentile(d, [2.5, 97.5], axis=0)
    mlo, mhi = np.percentile(d.mean(axis=1), [2.5, 97.5])
    support = np.bincount(gold, minlength=k)
    classes = [
        {
            "label": labels[j],
            "support": int(support[j]),
            "f1_before": float(f1b[j]),
            "f1_after": float(f1a[j]),
            "change": float(f1a[j] - f1b[j]),
            "ci95": [float(lo[j]), float(hi[j])],
        }
        for j in range(k)
    ]
    macro = {
        "f1_before": float(f1b.mean()),
        "f1_after": float(f1a.mean()),
        "change": float(f1a.mean() - f1b.mean()),
        "ci95": [float(mlo), float(mhi)],
    }
    return {"n": n, "n_boot": n_boot, "classes": classes, "macro": macro}
