"""core.results.stats and core.results.slices against hand-computed cases and scipy / scikit-learn references."""

import json
import math
import statistics
import time
from fractions import Fraction

import numpy as np
import pytest
from scipy import stats as sps
from sklearn.calibration import calibration_curve
from sklearn.metrics import confusion_matrix, f1_score

from core.results import slices, stats
from tests.helpers import ROOT

LABELS = ["entailment", "neutral", "contradiction"]
E, N, C = LABELS


def row(i, gold, pred, probs=None, **kw):
    if probs is None:
        probs = [0.1, 0.1, 0.1]
        probs[LABELS.index(pred)] = 0.8
    return {"id": f"x{i}", "gold": gold, "pred": pred, "probs": probs, "correct": gold == pred, **kw}


def random_rows(n, seed, acc_before=0.6, acc_after=0.8):
    rng = np.random.default_rng(seed)
    gold = rng.integers(0, 3, n)
    before, after = [], []
    for i, g in enumerate(gold):
        for acc, out in ((acc_before, before), (acc_after, after)):
            p = g if rng.random() < acc else (g + rng.integers(1, 3)) % 3
            probs = rng.dirichlet([1, 1, 1])
            probs = np.sort(probs)[::-1][[0, 1, 2]]
            order = [p] + [j for j in range(3) if j != p]
            pr = [0.0] * 3
            for j, v in zip(order, probs):
                pr[j] = float(v)
            out.append(row(i, LABELS[g], LABELS[p], pr))
    return before, after


# --- Wilson ------------------------------------------------------------------------------------


def test_wilson_known_value_and_scipy():
    lo, hi = stats.wilson(75, 100)
    assert lo == pytest.approx(0.6569, abs=1e-4) and hi == pytest.approx(0.8245, abs=1e-4)
    # hand formula
    p, n, z = 0.75, 100, 1.96
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert (lo, hi) == pytest.approx((centre - half, centre + half), abs=1e-12)
    # scipy's Wilson interval (it uses the exact normal quantile)
    zq = sps.norm.ppf(0.975)
    for k, n in [(0, 10), (1, 10), (5, 10), (10, 10), (75, 100), (3, 204), (150, 204)]:
        ci = sps.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        assert stats.wilson(k, n, z=zq) == pytest.approx((ci.low, ci.high), abs=1e-9)


def test_wilson_edges():
    for n in range(0, 30):
        for k in range(n + 1):
            a = stats.wilson(k, n)
            if n == 0:
                assert all(math.isnan(x) for x in a)
            else:
                assert 0.0 <= a[0] <= k / n <= a[1] <= 1.0
    assert stats.wilson(0, 10)[0] == 0.0 and stats.wilson(10, 10)[1] == 1.0
    with pytest.raises(ValueError):
        stats.wilson(5, 3)


def test_accuracy_summary():
    s = stats.accuracy_summary([True] * 75 + [False] * 25)
    assert s["n"] == 100 and s["k"] == 75 and s["accuracy"] == 0.75
    assert s["ci95"] == pytest.approx(list(stats.wilson(75, 100)))
    assert stats.accuracy_summary([]) == {"n": 0, "k": 0, "accuracy": None, "ci95": [None, None]}
    json.dumps(s)


# --- paired bootstrap --------------------------------------------------------------------------


def _pairs(n_fixed, n_regressed, n_rr, n_ww):
    before = [False] * n_fixed + [True] * n_regressed + [True] * n_rr + [False] * n_ww
    after = [True] * n_fixed + [False] * n_regressed + [True] * n_rr + [False] * n_ww
    return before, after


def test_paired_bootstrap_basic_properties():
    b, a = _pairs(20, 8, 50, 22)
    r = stats.paired_bootstrap(b, a)
    assert r["delta"] == pytest.approx((20 - 8) / 100)
    lo, hi = r["ci95"]
    assert lo < r["delta"] < hi
    assert stats.paired_bootstrap(b, a) == r  # seeded: reproducible
    other = stats.paired_bootstrap(b, a, seed=1)["ci95"]  # another seed: about the same interval
    assert other == pytest.approx([lo, hi], abs=0.011)
    # identical before/after: no change in any resample
    assert stats.paired_bootstrap(a, a) == {"delta": 0.0, "ci95": [0.0, 0.0]}
    # more examples (same proportions) -> narrower, about 1/sqrt(4) = half
    b4, a4 = _pairs(80, 32, 200, 88)
    lo4, hi4 = stats.paired_bootstrap(b4, a4)["ci95"]
    assert 0.4 < (hi4 - lo4) / (hi - lo) < 0.6
    assert stats.paired_bootstrap([], []) == {"delta": None, "ci95": [None, None]}
    with pytest.raises(ValueError):
        stats.paired_bootstrap([True], [True, False])


def test_paired_bootstrap_matches_references():
    b, a = _pairs(20, 8, 50, 22)
    lo, hi = stats.paired_bootstrap(b, a, n_boot=20000)["ci95"]
    # scipy's paired percentile bootstrap
    res = sps.bootstrap(
        (np.array(b, float), np.array(a, float)),
        lambda x, y, axis=-1: y.mean(axis) - x.mean(axis),
        paired=True,
        vectorized=True,
        n_resamples=20000,
        method="percentile",
        random_state=np.random.default_rng(5),
    )
    assert lo == pytest.approx(res.confidence_interval.low, abs=0.012)
    assert hi == pytest.approx(res.confidence_interval.high, abs=0.012)
    # literal index resampling
    rng = np.random.default_rng(7)
    d = np.array(a, float) - np.array(b, float)
    idx = rng.integers(0, len(d), size=(20000, len(d)))
    ref = np.percentile(d[idx].mean(axis=1), [2.5, 97.5])
    assert [lo, hi] == pytest.approx(ref.tolist(), abs=0.012)
    # normal approximation of the paired difference: se = sqrt((b + c)/n - delta^2) / sqrt(n)
    se = math.sqrt(0.28 - 0.12**2) / 10
    assert hi - lo == pytest.approx(2 * 1.96 * se, rel=0.08)


# --- McNemar, verdict ----------------------------------------------------------------------------


def _mcnemar_formula(b, c):
    n, k = b + c, min(b, c)
    if n == 0:
        return Fraction(1)
    return min(Fraction(1), 2 * Fraction(sum(math.comb(n, i) for i in range(k + 1)), 2**n))


def test_mcnemar_known_value():
    exact = _mcnemar_formula(13, 105)
    assert float(exact) == pytest.approx(4.764406071312224e-19, rel=1e-12)
    assert 1e-19 < float(exact) < 1e-18  # "about 5e-19"
    assert sps.binomtest(13, 118, 0.5).pvalue == pytest.approx(float(exact), rel=1e-9)
    assert stats.mcnemar_exact(13, 105) == pytest.approx(float(exact), rel=1e-9)
    assert stats.mcnemar_exact(105, 13) == stats.mcnemar_exact(13, 105)


def test_mcnemar_equals_formula_on_grid():
    for b, c in [(b, c) for b in range(13) for c in range(13)] + [(40, 61), (100, 130), (3, 300)]:
        if True:
            assert stats.mcnemar_exact(b, c) == pytest.approx(float(_mcnemar_formula(b, c)), rel=1e-9, abs=1e-15)
    assert stats.mcnemar_exact(0, 0) == 1.0
    assert stats.mcnemar_exact(7, 7) == 1.0
    assert stats.mcnemar_exact(0, 5) == pytest.approx(2 / 32)  # 2 * (1/2)^5
    assert stats.mcnemar_exact(1, 9) == pytest.approx(2 * 11 / 1024)


def test_verdict():
    assert stats.verdict(0.01) == "significant at 5%"
    assert stats.verdict(0.05) == "not distinguishable from noise at this n"
    assert stats.verdict(0.2) == "not distinguishable from noise at this n"
    assert stats.verdict(None) == "not distinguishable from noise at this n"
    assert stats.verdict(0.005, alpha=0.01) == "significant at 1%"


def test_accuracy_change_puts_it_together():
    b, a = _pairs(20, 8, 50, 22)
    r = stats.accuracy_change(b, a)
    assert r["b"] == 8 and r["c"] == 20
    assert r["p"] == stats.mcnemar_exact(8, 20)
    assert r["verdict"] == stats.verdict(r["p"])
    assert r["before"]["accuracy"] == 0.58 and r["after"]["accuracy"] == 0.70
    assert r["delta"] == pytest.approx(0.12) and r["ci95"] == stats.paired_bootstrap(b, a)["ci95"]
    assert r["mdc"] == stats.minimum_detectable_change(100, 0.58)
    json.dumps(r)


# --- minimum detectable change -------------------------------------------------------------------


def test_mdc_two_proportions():
    zq, zb = sps.norm.ppf(0.975), sps.norm.ppf(0.8)
    d = stats.minimum_detectable_change(100, 0.5)
    # the textbook shortcut (both variances at p = 0.5): (z_a + z_b) sqrt(2 pq / n) = 0.198
    assert d == pytest.approx((zq + zb) * math.sqrt(2 * 0.25 / 100), abs=0.01)
    # d solves Fleiss' sample-size equation exactly: power 0.8 at n = 100
    for n, p1 in [(100, 0.5), (204, 0.6), (500, 0.85), (50, 0.3)]:
        d = stats.minimum_detectable_change(n, p1)
        p2, pbar = p1 + d, p1 + d / 2
        power = sps.norm.cdf(
            (d * math.sqrt(n) - zq * math.sqrt(2 * pbar * (1 - pbar))) / math.sqrt(p1 * (1 - p1) + p2 * (1 - p2))
        )
        assert power == pytest.approx(0.8, abs=1e-6)
    # about 1/sqrt(n)
    assert stats.minimum_detectable_change(400, 0.5) / stats.minimum_detectable_change(100, 0.5) == pytest.approx(
        0.5, abs=0.03
    )
    assert stats.minimum_detectable_change(100, 0.5, power=0.9) > stats.minimum_detectable_change(100, 0.5)
    assert stats.minimum_detectable_change(100, 1.0) == math.inf
    assert stats.minimum_detectable_change(10, 0.95) == math.inf
    assert stats.minimum_detectable_change(0, 0.5) == math.inf


def test_mdc_two_proportions_by_simulation():
    # two independent samples of n, pooled two-proportion z test: rejection rate ~ 0.8
    n, p1 = 200, 0.6
    d = stats.minimum_detectable_change(n, p1)
    rng = np.random.default_rng(0)
    x1, x2 = rng.binomial(n, p1, 40000) / n, rng.binomial(n, p1 + d, 40000) / n
    pool = (x1 + x2) / 2
    z = (x2 - x1) / np.sqrt(2 * pool * (1 - pool) / n)
    assert np.mean(np.abs(z) > 1.959964) == pytest.approx(0.8, abs=0.02)


def test_mdc_paired():
    zq, zb = sps.norm.ppf(0.975), sps.norm.ppf(0.8)
    n, psi = 200, 0.2
    d = stats.minimum_detectable_change(n, 0.6, discordance=psi)
    # Connor (1987): n = (z_a sqrt(psi) + z_b sqrt(psi - d^2))^2 / d^2
    assert (zq * math.sqrt(psi) + zb * math.sqrt(psi - d * d)) ** 2 / d**2 == pytest.approx(n, rel=1e-9)
    # the paired design detects smaller changes than the independent approximation
    assert d < stats.minimum_detectable_change(n, 0.6)
    # simulation: discordant pairs multinomial, McNemar z test (no continuity correction)
    rng = np.random.default_rng(1)
    cnt = rng.multinomial(n, [(psi - d) / 2, 1 - psi, (psi + d) / 2], size=40000)
    b, c = cnt[:, 0], cnt[:, 2]
    z = (c - b) / np.sqrt(np.maximum(b + c, 1))
    assert np.mean(np.abs(z) > 1.959964) == pytest.approx(0.8, abs=0.03)
    # impossible: needs more flips than the examples wrong before
    assert stats.minimum_detectable_change(20, 0.99, discordance=0.5) == math.inf


# --- transitions -------------------------------------------------------------------------------


def _crafted_pair():
    before = [row(0, E, E), row(1, N, E), row(2, C, C), row(3, N, C), row(4, E, N), row(5, C, N)]
    after = [row(0, E, E), row(1, N, N), row(2, C, E), row(3, N, E), row(4, E, E), row(5, C, N)]
    return before, after


def test_transitions_crafted():
    before, after = _crafted_pair()
    t = stats.transitions(before, after, LABELS)
    cells = t["correctness"]["cells"]
    assert cells["still right"] == {"count": 1, "indices": [0]}
    assert cells["fixed"] == {"count": 2, "indices": [1, 4]}
    assert cells["regressed"] == {"count": 1, "indices": [2]}
    assert cells["still failing"] == {"count": 2, "indices": [3, 5]}
    assert t["correctness"]["table"] == [[1, 1], [2, 2]]
    assert t["b"] == 1 and t["c"] == 2 and t["n"] == 6
    assert sum(map(sum, t["correctness"]["table"])) == 6
    lab = t["labels"]
    assert (
        lab["counts"]
        == confusion_matrix([r["pred"] for r in before], [r["pred"] for r in after], labels=LABELS).tolist()
    )
    assert lab["counts"] == [[1, 1, 0], [1, 1, 0], [2, 0, 0]]
    assert lab["indices"][2][0] == [2, 3]  # contradiction -> entailment
    assert lab["indices"][0][1] == [1]  # entailment -> neutral
    assert lab["indices"][1][1] == [5]
    assert sum(map(sum, lab["counts"])) == 6
    assert lab["moves"][0] == {"from": C, "to": E, "count": 2, "indices": [2, 3]}
    assert {(m["from"], m["to"]) for m in lab["moves"]} == {(C, E), (E, N), (N, E)}
    json.dumps(t)


def test_transitions_random_consistency():
    before, after = random_rows(300, 3)
    t = stats.transitions(before, after, LABELS)
    cells = t["correctness"]["cells"]
    assert sum(c["count"] for c in cells.values()) == 300
    assert sorted(i for c in cells.values() for i in c["indices"]) == list(range(300))
    for i in cells["fixed"]["indices"]:
        assert not before[i]["correct"] and after[i]["correct"]
    for x in range(3):
        for y in range(3):
            for i in t["labels"]["indices"][x][y]:
                assert before[i]["pred"] == LABELS[x] and after[i]["pred"] == LABELS[y]


def test_pairing_checks():
    before, after = _crafted_pair()
    with pytest.raises(ValueError):
        stats.transitions(before, after[::-1], LABELS)
    with pytest.raises(ValueError):
        stats.transitions(before, after[:-1], LABELS)
    b2, a2 = stats.pair_rows(before, after[::-1][:-1])  # drops x0, restores order
    assert [r["id"] for r in b2] == [r["id"] for r in a2] == ["x1", "x2", "x3", "x4", "x5"]


# --- per-class F1 ------------------------------------------------------------------------------


def test_per_class_f1_point_estimates():
    before, after = _crafted_pair()
    r = stats.per_class_f1_change(before, after, LABELS, n_boot=500)
    gold = [r_["gold"] for r_ in before]
    # hand: before preds E,E,C,C,N,N vs gold E,N,C,N,E,C: E and C TP=1 FP=1 FN=1 -> 0.5; N TP=0 -> 0
    assert [c["f1_before"] for c in r["classes"]] == pytest.approx([0.5, 0.0, 0.5])
    # after preds E,N,E,E,E,N: E TP=2 FP=2 FN=0 -> 2/3; N TP=1 FP=1 FN=1 -> 1/2; C TP=0 -> 0
    assert [c["f1_after"] for c in r["classes"]] == pytest.approx([2 / 3, 0.5, 0.0])
    ref = f1_score(gold, [r_["pred"] for r_ in after], labels=LABELS, average=None, zero_division=0)
    assert [c["f1_after"] for c in r["classes"]] == pytest.approx(ref.tolist())
    assert [c["change"] for c in r["classes"]] == pytest.approx([1 / 6, 0.5, -0.5])
    ref_b = f1_score(gold, [r_["pred"] for r_ in before], labels=LABELS, average=None, zero_division=0)
    assert [c["f1_before"] for c in r["classes"]] == pytest.approx(ref_b.tolist())
    assert [c["support"] for c in r["classes"]] == [2, 2, 2]
    assert r["macro"]["f1_after"] == pytest.approx(
        f1_score(gold, [r_["pred"] for r_ in after], labels=LABELS, average="macro", zero_division=0)
    )
    json.dumps(r)


def test_per_class_f1_bootstrap_matches_sklearn_loop():
    before, after = random_rows(60, 11)
    n, n_boot = 60, 40
    r = stats.per_class_f1_change(before, after, LABELS, n_boot=n_boot, seed=4)
    gold = np.array([LABELS.index(x["gold"]) for x in before])
    pb = np.array([LABELS.index(x["pred"]) for x in before])
    pa = np.array([LABELS.index(x["pred"]) for x in after])
    idx = np.random.default_rng(4).integers(0, n, size=(n_boot, n))  # the same draws (one chunk)
    diffs = np.array(
        [
            f1_score(gold[i], pa[i], labels=[0, 1, 2], average=None, zero_division=0)
            - f1_score(gold[i], pb[i], labels=[0, 1, 2], average=None, zero_division=0)
            for i in idx
        ]
    )
    lo, hi = np.percentile(diffs, [2.5, 97.5], axis=0)
    for j, c in enumerate(r["classes"]):
        assert c["ci95"] == pytest.approx([lo[j], hi[j]], abs=1e-12)
        assert c["ci95"][0] <= c["change"] <= c["ci95"][1]
    mlo, mhi = np.percentile(diffs.mean(axis=1), [2.5, 97.5])
    assert r["macro"]["ci95"] == pytest.approx([mlo, mhi], abs=1e-12)


def test_per_class_f1_identical_reproducible_and_fast():
    before, after = random_rows(500, 2)
    same = stats.per_class_f1_change(before, before, LABELS)
    assert all(c["change"] == 0 and c["ci95"] == [0.0, 0.0] for c in same["classes"])
    t0 = time.process_time()  # CPU time: robust to a busy machine
    r = stats.per_class_f1_change(before, after, LABELS, n_boot=2000)
    assert time.process_time() - t0 < 1.0
    assert r == stats.per_class_f1_change(before, after, LABELS, n_boot=2000)
    assert r["n"] == 500 and r["n_boot"] == 2000
    with pytest.raises(ValueError):
        stats.per_class_f1_change(before, [dict(x, gold=E) for x in after], LABELS)


# --- calibration -------------------------------------------------------------------------------

HAND = [
    row(0, E, E, [0.9, 0.05, 0.05]),  # conf 0.9, right
    row(1, N, E, [0.6, 0.3, 0.1]),  # conf 0.6, wrong
    row(2, N, N, [0.2, 0.7, 0.1]),  # conf 0.7, right
    row(3, E, E, [0.4, 0.35, 0.25]),
]  # conf 0.4, right


def test_ece_hand_cases():
    r = slices.calibration(HAND, LABELS, bins=10)
    # bins (0.3,0.4], (0.5,0.6], (0.6,0.7], (0.8,0.9]: (|1-.4| + |0-.6| + |1-.7| + |1-.9|) / 4 = 0.4
    assert r["ece"] == pytest.approx(0.4)
    assert r["n"] == 4 and len(r["bins"]) == 10
    assert [b["n"] for b in r["bins"]] == [0, 0, 0, 1, 0, 1, 1, 0, 1, 0]
    assert r["bins"][5] == {"lo": 0.5, "hi": 0.6, "n": 1, "confidence": pytest.approx(0.6), "accuracy": 0.0}
    assert r["bins"][0]["confidence"] is None and r["bins"][0]["accuracy"] is None
    # 2 bins: (0,.5]: conf .4 acc 1 -> .6 * 1/4; (.5,1]: conf mean .7333, acc 2/3 -> 1/15 * 3/4
    r2 = slices.calibration(HAND, LABELS, bins=2)
    assert r2["ece"] == pytest.approx(0.15 + 0.05)
    assert [b["n"] for b in r2["bins"]] == [1, 3]
    # a confidence exactly on an edge belongs to the bin it closes: 0.3 -> (0.2, 0.3]
    edge = slices.calibration([row(0, E, E, [0.3, 0.3, 0.4])], LABELS, bins=10)
    assert edge["bins"][3]["n"] == 1  # conf 0.4 -> (0.3, 0.4]
    assert slices.calibration([], LABELS)["ece"] is None


def test_ece_perfect_and_sklearn_reference():
    perfect = [row(i, E, E, [0.75, 0.2, 0.05]) for i in range(3)] + [row(3, N, E, [0.75, 0.2, 0.05])]
    assert slices.calibration(perfect, LABELS)["ece"] == pytest.approx(0.0, abs=1e-12)
    _, after = random_rows(400, 9)
    r = slices.calibration(after, LABELS, bins=10)
    conf = np.array([max(x["probs"]) for x in after])
    right = np.array([x["pred"] == x["gold"] for x in after])
    prob_true, prob_pred = calibration_curve(right, conf, n_bins=10, strategy="uniform")
    full = [b for b in r["bins"] if b["n"]]
    assert [b["accuracy"] for b in full] == pytest.approx(prob_true.tolist())
    assert [b["confidence"] for b in full] == pytest.approx(prob_pred.tolist())
    counts = [b["n"] for b in full]
    assert r["ece"] == pytest.approx(float(np.sum(np.array(counts) / 400 * np.abs(prob_true - prob_pred))))


# --- slices ------------------------------------------------------------------------------------

SLICE_ROWS = [
    {"premise": "A man is riding a bike.", "hypothesis": "The man isn't riding a bike.", "tag": "negation"},
    {"premise": "Two dogs run on the beach.", "hypothesis": "Nobody is outside.", "tag": "quantifier"},
    {
        "premise": "A woman is cooking dinner in a small kitchen.",
        "hypothesis": "A woman is cooking dinner.",
        "tag": "subset",
    },
    {
        "premise": "A child plays chess in the park with his grandfather.",
        "hypothesis": "The kid never learned any board games at all in school.",
        "tag": None,
    },
    {"premise": "A girl sings.", "hypothesis": "No one is singing.", "tag": "negation"},
    {"premise": "Kids swim.", "hypothesis": "They can’t swim.", "tag": "negation"},
]


def test_slice_helpers():
    assert slices.has_negation("The man isn't riding a bike.")
    assert slices.has_negation("They can’t swim.")  # typographic apostrophe
    assert slices.has_negation("No one is singing.")
    assert slices.has_negation("There is nothing there") and slices.has_negation("Neither of them")
    assert not slices.has_negation("A nobleman notes the snow.")  # no, not inside words do not count
    assert not slices.has_negation("A woman is cooking dinner.")
    assert slices.word_overlap("A man is riding a bike.", "The man isn't riding a bike.") == pytest.approx(4 / 6)
    assert slices.word_overlap("A woman is cooking dinner in a small kitchen.", "A woman is cooking dinner.") == 1.0
    assert slices.word_overlap("Two dogs run on the beach.", "Nobody is outside.") == 0.0
    assert slices.word_overlap("x", "") == 0.0


def test_nli_slices_crafted():
    s = slices.nli_slices(SLICE_ROWS)
    assert s["negation: yes"] == [0, 1, 3, 4, 5]
    assert s["negation: no"] == [2]
    # overlaps: 4/6, 0, 1, 2/11 ("the", "in"), 0/4, 1/3 ("swim")
    assert s["overlap: <0.34"] == [1, 3, 4, 5]
    assert s["overlap: 0.34-0.67"] == [0]  # 4/6 = 0.667 < 0.67
    assert s["overlap: >=0.67"] == [2]
    # lengths (whitespace words): 6, 3, 5, 11, 4, 3
    assert s["length: short (<=5 words)"] == [1, 2, 4, 5]
    assert s["length: medium (6-8 words)"] == [0]
    assert s["length: long (>=9 words)"] == [3]
    assert s["tag: negation"] == [0, 4, 5] and s["tag: quantifier"] == [1] and s["tag: subset"] == [2]
    assert [k for k in s if k.startswith("tag: ")] == ["tag: negation", "tag: quantifier", "tag: subset"]
    # each group partitions the rows that have a hypothesis
    for group in ("negation", "overlap", "length"):
        idx = sorted(i for k, v in s.items() if k.startswith(group + ":") for i in v)
        assert idx == list(range(6))


def test_nli_slices_text_rows_and_sample_data():
    s = slices.nli_slices([{"text": "great movie", "tag": "a"}, {"text": "bad", "tag": None}, {"text": "ok"}])
    assert s == {"tag: a": [0]}
    rows = [json.loads(l) for l in (ROOT / "assets/nli_sample/test.jsonl").read_text().splitlines()]
    s = slices.nli_slices(rows)
    assert len([k for k in s if k.startswith("tag: ")]) == 12
    assert sum(len(v) for k, v in s.items() if k.startswith("length:")) == len(rows)
    neg = s["negation: yes"]
    assert neg and all(slices.has_negation(rows[i]["hypothesis"]) for i in neg)


def test_slice_table():
    before = [row(i, E, p) for i, p in enumerate([E, N, E, N, E, E])]
    after = [row(i, E, p) for i, p in enumerate([E, E, N, E, E, E])]
    t = slices.slice_table(before, after, {"a": [0, 1, 2, 3], "b": [4, 5], "empty": []})
    a = t[0]
    assert a["slice"] == "a" and a["n"] == 4
    assert a["accuracy_before"] == 0.5 and a["accuracy_after"] == 0.75 and a["change"] == 0.25
    assert a["ci95_before"] == pytest.approx(list(stats.wilson(2, 4)))
    assert a["ci95_after"] == pytest.approx(list(stats.wilson(3, 4)))
    assert a["fixed"] == 2 and a["regressed"] == 1
    assert t[1]["accuracy_before"] == t[1]["accuracy_after"] == 1.0 and t[1]["change"] == 0.0
    assert t[2] == {
        "slice": "empty",
        "n": 0,
        "accuracy_before": None,
        "ci95_before": [None, None],
        "accuracy_after": None,
        "ci95_after": [None, None],
        "change": None,
        "fixed": 0,
        "regressed": 0,
    }
    json.dumps(t)


# --- label noise hints -------------------------------------------------------------------------


def _noise_rows():
    return [
        row(0, E, C, [0.02, 0.03, 0.95]),  # wrong, confident -> hint
        row(1, E, C, [0.3, 0.1, 0.6]),  # wrong, not confident
        row(2, N, N, [0.01, 0.98, 0.01]),  # right, confident
        row(3, C, N, [0.05, 0.92, 0.03]),  # wrong, confident -> hint
        row(4, N, E, [0.9, 0.05, 0.05]),
    ]  # wrong, exactly at the threshold -> hint


def test_label_noise_hints_after_only():
    h = slices.label_noise_hints(_noise_rows(), LABELS)
    assert [x["index"] for x in h] == [0, 3, 4]  # most confident first
    assert h[0] == {"index": 0, "id": "x0", "given": E, "model_label": C, "confidence": 0.95, "consistent_epochs": None}
    assert h[1]["given"] == C and h[1]["model_label"] == N
    assert [x["index"] for x in slices.label_noise_hints(_noise_rows(), LABELS, threshold=0.93)] == [0]
    # still failing only: example 3 was right before
    before = [row(0, E, N), row(1, E, N), row(2, N, N), row(3, C, C), row(4, N, C)]
    assert [x["index"] for x in slices.label_noise_hints(_noise_rows(), LABELS, before_rows=before)] == [0, 4]
    assert slices.label_noise_hints([], LABELS) == []


def test_label_noise_hints_per_epoch():
    rows = _noise_rows()
    conf_c = [0.1, 0.1, 0.8]

    def ep(r0, r3, r4):
        return [r0, [0.3, 0.1, 0.6], [0.01, 0.98, 0.01], r3, r4]

    per_epoch = [
        ep([0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.8, 0.1]),  # epoch 1: 0 and 4 not yet
        ep(conf_c, [0.8, 0.1, 0.1], [0.8, 0.1, 0.1]),  # epoch 2: 3 disagrees
        ep(conf_c, [0.1, 0.8, 0.1], [0.8, 0.1, 0.1]),
        ep(conf_c, [0.1, 0.8, 0.1], [0.8, 0.1, 0.1]),
    ]
    h = slices.label_noise_hints(rows, LABELS, per_epoch_probs=per_epoch, last_k=2)
    assert [x["index"] for x in h] == [0, 3, 4] and h[0]["consistent_epochs"] == 2
    h = slices.label_noise_hints(rows, LABELS, per_epoch_probs=per_epoch, last_k=3)
    assert [x["index"] for x in h] == [0, 4]
    h = slices.label_noise_hints(rows, LABELS, per_epoch_probs=per_epoch, last_k=10)  # all 4 epochs
    assert h == []
    assert (
        slices.label_noise_hints(rows, LABELS, per_epoch_probs=[np.array(p) for p in per_epoch[-1:]], last_k=3)[0][
            "consistent_epochs"
        ]
        == 1
    )
    with pytest.raises(ValueError):
        slices.label_noise_hints(rows, LABELS, per_epoch_probs=[[[0.5, 0.5, 0.0]]])


# --- forgetting --------------------------------------------------------------------------------


def test_forgetting_events_crafted():
    m = [
        [0, 1, 0, 0, 1],  # epoch 0 = before
        [1, 1, 0, 1, 0],
        [0, 1, 0, 1, 1],
        [1, 1, 0, 0, 1],
    ]
    f = slices.forgetting_events(m)
    assert f["n_epochs"] == 4
    assert f["first_learned"] == [1, 0, None, 1, 0]
    assert f["forgetting_events"] == [1, 0, 0, 1, 1]
    assert f["ended_right"] == [True, True, False, False, True]
    assert f["never_learned"] == [2]
    assert f["unforgettable"] == [1]
    assert f["forgotten"] == [0, 3, 4]
    one = slices.forgetting_events([[True, False]])
    assert one["first_learned"] == [0, None] and one["forgetting_events"] == [0, 0]
    with pytest.raises(ValueError):
        slices.forgetting_events([True, False])
    json.dumps(f)


# --- seeds -------------------------------------------------------------------------------------


def test_seed_summary_and_agreement():
    v = [0.81, 0.83, 0.80, 0.86]
    s = slices.seed_summary(v)
    assert s["mean"] == pytest.approx(statistics.mean(v)) and s["std"] == pytest.approx(statistics.stdev(v))
    assert s["std"] == pytest.approx(float(np.std(v, ddof=1)))
    assert (s["min"], s["max"], s["n"]) == (0.80, 0.86, 4)
    assert slices.seed_summary([0.7]) == {"mean": 0.7, "std": None, "min": 0.7, "max": 0.7, "n": 1}
    assert slices.seed_summary([])["mean"] is None
    preds = [[E, N, C, E], [E, N, E, E], [E, C, C, E]]
    assert slices.agreement(preds) == 0.5  # examples 0 and 3
    assert slices.agreement(preds[:1]) == 1.0
    assert slices.agreement([[], []]) is None and slices.agreement([]) is None
    with pytest.raises(ValueError):
        slices.agreement([[E], [E, N]])


def test_core_stats_does_not_import_streamlit():
    for name in ("stats", "slices"):
        src = (ROOT / f"core/results/{name}.py").read_text()
        assert "import streamlit" not in src and "from streamlit" not in src
