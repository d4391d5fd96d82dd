"""Views of a run's examples beyond the overall accuracy: pure functions, no I/O, no streamlit.

Accuracy by confidence bin (calibration, the reliability diagram), by automatic NLI slice and
phenomenon tag, per example across epochs (forgetting, label-noise hints) and across seeds.
Inputs are paired prediction rows as in core/results/stats.py (align them with stats.pair_rows first).

    from core.results import slices
    slices.calibration(after, labels)                    # {"ece", "n", "bins": [...]}  (equal-width bins)
    s = slices.nli_slices(after)                         # {"negation: yes": [i, ...], "tag: time": [...], ...}
    slices.slice_table(before, after, s)                 # per slice: n, accuracy before/after with Wilson CIs
    slices.label_noise_hints(after, labels)              # confidently contradicted gold labels (hints, not facts)
    slices.forgetting_events(per_epoch_correct)          # epochs x examples booleans -> learned/forgotten
    slices.seed_summary([0.81, 0.83, 0.80]); slices.agreement([preds_seed0, preds_seed1])
"""

from __future__ import annotations

import re

import numpy as np

from .stats import accuracy_summary, check_paired, label_codes, row_correct

__all__ = [
    "calibration",
    "nli_slices",
    "slice_table",
    "label_noise_hints",
    "forgetting_events",
    "seed_summary",
    "agreement",
    "has_negation",
    "word_overlap",
    "NEGATION_WORDS",
    "OVERLAP_EDGES",
    "LENGTH_EDGES",
]


# --- calibration -------------------------------------------------------------------------------


def calibration(rows: list[dict], labels: list[str], bins: int = 10) -> dict:
    """Expected calibration error with equal-width confidence bins.

    Per example: confidence = max(probs), prediction = argmax(probs), right = (prediction == gold).
    Bin m covers ((m-1)/M, m/M] (the first bin also takes 0). With n_b examples in bin b, mean
    confidence conf_b and accuracy acc_b:
        ECE = sum_b (n_b / N) * |acc_b - conf_b|.
    Returns {"ece", "n", "bins": [{"lo", "hi", "n", "confidence", "accuracy"}]} with all M bins
    (confidence and accuracy None for an empty bin); ece None when there are no rows.
    ECE with few examples per bin is noisy and biased upwards; read it with n in mind.

    References: M. P. Naeini, G. F. Cooper, M. Hauskrecht (2015), "Obtaining well calibrated
    probabilities using Bayesian binning", AAAI; C. Guo, G. Pleiss, Y. Sun, K. Q. Weinberger
    (2017), "On calibration of modern neural networks", ICML (eq. 3).
    """
    if bins < 1:
        raise ValueError("bins must be >= 1")
    edges = [m / bins for m in range(bins + 1)]
    n = len(rows)
    if n == 0:
        return {
            "ece": None,
            "n": 0,
            "bins": [
                {"lo": edges[m], "hi": edges[m + 1], "n": 0, "confidence": None, "accuracy": None} for m in range(bins)
            ],
        }
    probs = np.array([r["probs"] for r in rows], dtype=float)
    if probs.ndim != 2 or probs.shape[1] != len(labels):
        raise ValueError(f"each row needs one probability per label ({len(labels)})")
    gold = label_codes(rows, "gold", labels)
    conf = probs.max(axis=1)
    right = probs.argmax(axis=1) == gold
    which = np.clip(np.searchsorted(np.array(edges[1:-1]), conf, side="left"), 0, bins - 1)
    out, ece = [], 0.0
    for m in range(bins):
        mask = which == m
        nb = int(mask.sum())
        c = float(conf[mask].mean()) if nb else None
        a = float(right[mask].mean()) if nb else None
        if nb:
            ece += nb / n * abs(a - c)
        out.append({"lo": edges[m], "hi": edges[m + 1], "n": nb, "confidence": c, "accuracy": a})
    return {"ece": ece, "n": n, "bins": out}


# --- slices ------------------------------------------------------------------------------------

NEGATION_WORDS = frozenset({"no", "not", "never", "nobody", "nothing", "none", "nowhere", "neither", "nor", "cannot"})
"""Negation cue words (plus every token ending in n't: isn't, don't, can't, ...). After the
negation cues found in SNLI hypotheses by Gururangan et al. (2018), "Annotation artifacts in
natural language inference data", NAACL."""

OVERLAP_EDGES = (0.34, 0.67)
"""Word-overlap bins: share of hypothesis tokens that also occur in the premise:
low < 0.34 <= medium < 0.67 <= high."""

LENGTH_EDGES = (5, 8)
"""Hypothesis length bins by whitespace-separated word count: short <= 5 < medium <= 8 < long.
Fixed (not quantiles) so that slices mean the same thing across runs; on the built-in NLI sample
(hypotheses of 4-14 words) about 26% / 66% / 8% of hypotheses are short / medium / long."""

_TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z]+)*")


def _tokens(text: str) -> list[str]:
    return _TOKEN.findall(text.lower().replace("\u2019", "'"))


def has_negation(text: str) -> bool:
    """Whether `text` contains a negation cue: a whole word of NEGATION_WORDS (so "no one" counts
    through "no") or a word ending in n't (typographic apostrophes included)."""
    return any(t in NEGATION_WORDS or t.endswith("n't") for t in _tokens(text))


def word_overlap(premise: str, hypothesis: str) -> float:
    """Share of the hypothesis's tokens (lower-cased words, repeats counted) that occur anywhere
    in the premise; 0.0 for an empty hypothesis. High overlap is the "lexical overlap" heuristic
    of McCoy, Pavlick & Linzen (2019), "Right for the wrong reasons", ACL."""
    h = _tokens(hypothesis)
    if not h:
        return 0.0
    p = set(_tokens(premise))
    return sum(t in p for t in h) / len(h)


def nli_slices(rows: list[dict]) -> dict[str, list[int]]:
    """Automatic slices of the test set: {slice name: [example indices]}, in a fixed order.
    The group is the part of the name before ": ".

    - "negation: yes" / "negation: no": the hypothesis has a negation cue (has_negation).
    - "overlap: <0.34" / "overlap: 0.34-0.67" / "overlap: >=0.67": word_overlap(premise,
      hypothesis) (only for rows with both a premise and a hypothesis).
    - "length: short (<=5 words)" / "length: medium (6-8 words)" / "length: long (>=9 words)":
      whitespace word count of the hypothesis (LENGTH_EDGES).
    - "tag: <tag>" for each of the dataset's own tag values (rows with no tag are in none), sorted.
    Rows without a hypothesis (single-text data) fall only into tag slices. The negation, overlap
    and length slices are listed even when empty, as long as some row has a hypothesis/premise.
    """
    out: dict[str, list[int]] = {}
    hyp = [(i, r["hypothesis"]) for i, r in enumerate(rows) if isinstance(r.get("hypothesis"), str)]
    if hyp:
        neg = {i for i, h in hyp if has_negation(h)}
        out["negation: yes"] = [i for i, _ in hyp if i in neg]
        out["negation: no"] = [i for i, _ in hyp if i not in neg]
    pairs = [(i, word_overlap(rows[i]["premise"], h)) for i, h in hyp if isinstance(rows[i].get("premise"), str)]
    if pairs:
        lo, hi = OVERLAP_EDGES
        out[f"overlap: <{lo}"] = [i for i, o in pairs if o < lo]
        out[f"overlap: {lo}-{hi}"] = [i for i, o in pairs if lo <= o < hi]
        out[f"overlap: >={hi}"] = [i for i, o in pairs if o >= hi]
    if hyp:
        s, m = LENGTH_EDGES
        words = [(i, len(h.split())) for i, h in hyp]
        out[f"length: short (<={s} words)"] = [i for i, w in words if w <= s]
        out[f"length: medium ({s + 1}-{m} words)"] = [i for i, w in words if s < w <= m]
        out[f"length: long (>={m + 1} words)"] = [i for i, w in words if w > m]
    tags = sorted({r["tag"] for r in rows if isinstance(r.get("tag"), str) and r["tag"]})
    for t in tags:
        out[f"tag: {t}"] = [i for i, r in enumerate(rows) if r.get("tag") == t]
    return out


def slice_table(before_rows: list[dict], after_rows: list[dict], slices: dict[str, list[int]]) -> list[dict]:
    """Per slice, in the order of `slices`: {"slice", "n", "accuracy_before", "ci95_before",
    "accuracy_after", "ci95_after", "change", "fixed", "regressed"}; accuracies with Wilson 95%
    intervals (None for an empty slice). "fixed"/"regressed" are the slice's discordant counts:
    mcnemar_exact(regressed, fixed) tests a slice, but with many slices some will look
    "significant" by chance (no multiple-comparison correction is applied here)."""
    check_paired(before_rows, after_rows)
    b_ok = [row_correct(r) for r in before_rows]
    a_ok = [row_correct(r) for r in after_rows]
    out = []
    for name, idx in slices.items():
        sb = accuracy_summary([b_ok[i] for i in idx])
        sa = accuracy_summary([a_ok[i] for i in idx])
        out.append(
            {
                "slice": name,
                "n": len(idx),
                "accuracy_before": sb["accuracy"],
                "ci95_before": sb["ci95"],
                "accuracy_after": sa["accuracy"],
                "ci95_after": sa["ci95"],
                "change": None if not idx else sa["accuracy"] - sb["accuracy"],
                "fixed": sum(a_ok[i] and not b_ok[i] for i in idx),
                "regressed": sum(b_ok[i] and not a_ok[i] for i in idx),
            }
        )
    return out


# --- label noise, forgetting, seeds ------------------------------------------------------------


def label_noise_hints(
    after_rows: list[dict],
    labels: list[str],
    per_epoch_probs: list | None = None,
    threshold: float = 0.9,
    last_k: int = 3,
    before_rows: list[dict] | None = None,
) -> list[dict]:
    """Examples whose given (gold) label the fine-tuned model confidently contradicts: HINTS for a
    human to re-read, never facts. A flagged example may be mislabelled, ambiguous, or simply one
    the model gets confidently wrong (e.g. through a shortcut such as a hypothesis-only cue).

    Candidates: the examples the fine-tuned model gets wrong (after), whether or not they were
    wrong before; pass before_rows to keep only the "still failing" ones (wrong before and after).
    A candidate is flagged when the after probability of its predicted class (argmax of probs,
    != gold) is >= threshold. When per_epoch_probs is given (a list over epochs of (n, K) arrays
    of probabilities, in row order), it must also be consistent: the same other class is the
    argmax in each of the last `last_k` epochs (all epochs if fewer).

    Returns [{"index", "id", "given", "model_label", "confidence", "consistent_epochs"}], most
    confident first; consistent_epochs is the number of epochs checked (None without
    per_epoch_probs).

    References: C. G. Northcutt, L. Jiang, I. L. Chuang (2021), "Confident learning: estimating
    uncertainty in dataset labels", JAIR 70:1373-1411; S. Swayamdipta et al. (2020), "Dataset
    cartography", EMNLP (training dynamics across epochs).
    """
    if before_rows is not None:
        check_paired(before_rows, after_rows)
    n, k = len(after_rows), len(labels)
    if n == 0:
        return []
    probs = np.array([r["probs"] for r in after_rows], dtype=float)
    if probs.shape != (n, k):
        raise ValueError(f"each row needs one probability per label ({k})")
    gold = label_codes(after_rows, "gold", labels)
    top = probs.argmax(axis=1)
    conf = probs.max(axis=1)
    flag = (top != gold) & (conf >= threshold)
    if before_rows is not None:
        flag &= ~np.array([row_correct(r) for r in before_rows], dtype=bool)
    checked = None
    if per_epoch_probs is not None and len(per_epoch_probs):
        last = [np.asarray(p, dtype=float) for p in list(per_epoch_probs)[-max(1, last_k) :]]
        for p in last:
            if p.shape != (n, k):
                raise ValueError(f"per-epoch probabilities must have shape ({n}, {k}), got {p.shape}")
            flag &= p.argmax(axis=1) == top
        checked = len(last)
    out = [
        {
            "index": int(i),
            "id": after_rows[i].get("id"),
            "given": labels[gold[i]],
            "model_label": labels[top[i]],
            "confidence": float(conf[i]),
            "consistent_epochs": checked,
        }
        for i in np.flatnonzero(flag)
    ]
    out.sort(key=lambda h: -h["confidence"])
    return out


def forgetting_events(per_epoch_correct) -> dict:
    """Learning and forgetting per example from a matrix epochs x examples of booleans (row 0 =
    before fine-tuning, row e = after epoch e).

    Per example (lists in example order): "first_learned" = the first epoch at which it is right
    (0 = already right before training; None = never right), "forgetting_events" = the number
    of right -> wrong transitions between consecutive epochs, "ended_right" = right at the last
    epoch. Also the index lists "never_learned", "unforgettable" (learned at some point and never
    forgotten) and "forgotten" (at least one forgetting event), and "n_epochs" (rows).

    Toneva et al. count events at every mini-batch presentation during training; here they are
    counted on evaluations once per epoch, which sees fewer events (a coarser view).

    Reference: M. Toneva, A. Sordoni, R. Tachet des Combes, A. Trischler, Y. Bengio, G. J. Gordon
    (2019), "An empirical study of example forgetting during deep neural network learning", ICLR.
    """
    m = np.asarray(per_epoch_correct, dtype=bool)
    if m.ndim != 2:
        raise ValueError("per_epoch_correct must be a matrix epochs x examples")
    e, n = m.shape
    if e == 0:
        return {
            "n_epochs": 0,
            "first_learned": [None] * n,
            "forgetting_events": [0] * n,
            "ended_right": [False] * n,
            "never_learned": list(range(n)),
            "unforgettable": [],
            "forgotten": [],
        }
    ever = m.any(axis=0)
    first = np.where(ever, m.argmax(axis=0), -1)
    events = (m[:-1] & ~m[1:]).sum(axis=0) if e > 1 else np.zeros(n, dtype=int)
    return {
        "n_epochs": int(e),
        "first_learned": [int(f) if f >= 0 else None for f in first],
        "forgetting_events": [int(x) for x in events],
        "ended_right": [bool(x) for x in m[-1]],
        "never_learned": np.flatnonzero(~ever).tolist(),
        "unforgettable": np.flatnonzero(ever & (events == 0)).tolist(),
        "forgotten": np.flatnonzero(events > 0).tolist(),
    }


def seed_summary(values: list[float]) -> dict:
    """{"mean", "std", "min", "max", "n"} of a metric over seeds; std is the sample standard
    deviation (ddof=1: sqrt(sum (x - mean)^2 / (n - 1))), None for fewer than 2 values; all None
    but n for no values. With few seeds the std is itself very uncertain."""
    x = np.asarray(values, dtype=float)
    n = int(x.size)
    if n == 0:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    return {
        "mean": float(x.mean()),
        "std": float(x.std(ddof=1)) if n > 1 else None,
        "min": float(x.min()),
        "max": float(x.max()),
        "n": n,
    }


def agreement(pred_lists: list[list]) -> float | None:
    """Share of examples on which all seeds predict the same label: pred_lists is a list over
    seeds of the predictions (labels) in example order, all of the same length. 1.0 for a single
    seed; None when there are no examples (or no seeds)."""
    if not pred_lists:
        return None
    n = len(pred_lists[0])
    if any(len(p) != n for p in pred_lists):
        raise ValueError("every seed needs one prediction per example")
    if n == 0:
        return None
    same = sum(all(p[i] == pred_lists[0][i] for p in pred_lists[1:]) for i in range(n))
    return same / n
