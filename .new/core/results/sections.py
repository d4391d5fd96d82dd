"""The statistics sections of a run's report: what fine-tuning changed, and how sure we can be.

    sections = build_sections(before, after, labels, zero_shot=..., metrics=..., dynamics=..., best_epoch=...)
    report.update(sections)            # headline, baselines, change, transitions, calibration, slices,
                                       # per_class_change, noise_hints, dynamics (core/results/report.py does this)
    dyn = read_dynamics(run_dir)       # predictions/dynamics.jsonl: {split: {epoch: {"ids", "probs"}}}
    example_trajectory(dyn, "nli-0001-e", "entailment", labels)   # p(gold) per epoch, learned / forgotten

`before` and `after` are the usable rows of predictions/test_before.jsonl and test_after.jsonl
(report.read_predictions). Everything returned is JSON-ready (math.inf reads None). Readers are
tolerant: a missing or damaged dynamics file, or a record of the wrong shape, is left out.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..runs import rundir
from ..runs.rundir import is_int, is_number
from . import slices, stats

SECTION_KEYS = (
    "headline",
    "baselines",
    "change",
    "transitions",
    "calibration",
    "slices",
    "per_class_change",
    "noise_hints",
    "dynamics",
)
RANDOM_HEAD = (
    "the LoRA adapter at its initialisation and a freshly initialised classification head, scored on "
    'the test rows before any training: what the reference script measured as "before"'
)
ZERO_SHOT = (
    "the pretrained language model's own next word after a prompt, with no training at all (the LoRA "
    "adapters off, the label words' next-token probabilities)"
)
LABEL_WORD_HEAD = (
    "the LoRA adapter at its initialisation and a head started from the language model's rows for the label "
    "words, on the zero-shot prompt: the zero-shot baseline computed through the classifier"
)
NOISE_NOTE = (
    "A hint, not a fact: among the examples still failing after fine-tuning, these are the ones the "
    "fine-tuned model contradicts confidently (p >= 0.9 for another label) and consistently (the same "
    "other label at each checked epoch). Re-read them: the label may be wrong or ambiguous, or the "
    "model may be confidently wrong."
)
MAX_HINTS = 50


def _finite(x):
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else x


def _id(x) -> bool:
    """An example id: text or a whole number."""
    return isinstance(x, str) or is_int(x)


# --- dynamics.jsonl -----------------------------------------------------------------------------


def read_dynamics(run_dir: Path) -> dict[str, dict[int, dict]]:
    """predictions/dynamics.jsonl as {split: {epoch: {"ids": [...], "probs": [[...], ...]}}}: the
    last record of each (split, epoch) wins (a resumed run repeats some). Records of the wrong
    shape (ids and probs of different lengths, rows of different widths, non-numbers) and
    unreadable lines are left out; a missing file is {}."""
    out: dict[str, dict[int, dict]] = {}
    for rec in rundir.iter_jsonl(Path(run_dir) / rundir.PREDICTIONS / rundir.DYNAMICS):
        split, epoch, ids, probs = rec.get("split"), rec.get("epoch"), rec.get("ids"), rec.get("probs")
        if not (
            isinstance(split, str)
            and is_int(epoch)
            and epoch >= 0
            and isinstance(ids, list)
            and isinstance(probs, list)
            and ids
            and len(ids) == len(probs)
        ):
            continue
        if not all(_id(i) for i in ids):
            continue
        k = len(probs[0]) if isinstance(probs[0], list) else 0
        if not k or not all(isinstance(p, list) and len(p) == k and all(is_number(x) for x in p) for p in probs):
            continue
        out.setdefault(split, {})[epoch] = {"ids": ids, "probs": probs}
    return out


def aligned(records: dict[int, dict], ids: list, k: int) -> tuple[list[int], np.ndarray | None]:
    """(epochs, probs[epoch, example, label]) of the epochs whose record holds every one of `ids`
    with k probabilities each, rows in the order of `ids`; ([], None) when none does."""
    epochs, mats = [], []
    for e in sorted(records):
        rec = records[e]
        if len(rec["probs"][0]) != k:
            continue
        pos = {i: j for j, i in enumerate(rec["ids"])}
        if any(i not in pos for i in ids):
            continue
        mats.append(np.array([rec["probs"][pos[i]] for i in ids], dtype=float).reshape(len(ids), k))
        epochs.append(e)
    return epochs, (np.stack(mats) if mats else None)


def example_trajectory(dynamics: dict, example_id, gold: str, labels: list[str], split: str = "test") -> dict | None:
    """One example across the recorded epochs of `split` (0 = before training): {"split",
    "epochs", "p_gold", "pred", "correct", "first_learned" (the first epoch at which it is right,
    None if never), "forgetting_events" (right -> wrong between consecutive recorded epochs),
    "forgotten_at" (the epochs at which it went wrong again)}; None when no epoch holds it."""
    if gold not in labels:
        return None
    g, k = labels.index(gold), len(labels)
    epochs, p_gold, preds = [], [], []
    for e, rec in sorted((dynamics.get(split) or {}).items()):
        try:
            p = rec["probs"][rec["ids"].index(example_id)]
        except ValueError:
            continue
        if len(p) == k:
            epochs.append(e)
            p_gold.append(float(p[g]))
            preds.append(labels[int(np.argmax(p))])
    if not epochs:
        return None
    correct = [p == gold for p in preds]
    f = slices.forgetting_events([[c] for c in correct])
    first = f["first_learned"][0]
    return {
        "split": split,
        "epochs": epochs,
        "p_gold": p_gold,
        "pred": preds,
        "correct": correct,
        "first_learned": None if first is None else epochs[first],
        "forgetting_events": f["forgetting_events"][0],
        "forgotten_at": [epochs[i + 1] for i in range(len(correct) - 1) if correct[i] and not correct[i + 1]],
    }


# --- the sections -------------------------------------------------------------------------------


def _pct_ci(s: dict) -> str:
    lo, hi = s["ci95"]
    return f"{100 * s['accuracy']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]"


def format_p(p: float | None) -> str:
    """A p-value in few characters: 5e-19, 0.0032, 0.41, 1."""
    if p is None:
        return "n/a"
    if p == 0:
        return "< 1e-300"
    if p < 0.001:
        mantissa, exponent = f"{p:.0e}".split("e")
        return f"{mantissa}e{int(exponent)}"
    return f"{p:.2g}"


def headline(change: dict | None) -> str | None:
    """The sentence a reader sees first, e.g. "Fine-tuning raised test accuracy from 33.8% [27.6,
    40.5] to 78.9% [72.8, 83.9] (n = 204): +45.1 points, 95% CI [+37.3, +52.9]; McNemar p = 5e-19:
    significant at 5%." (accuracies with Wilson 95% intervals; the change's interval is the paired
    bootstrap's)."""
    if not change or change.get("delta") is None:
        return None
    b, a, d, (lo, hi) = change["before"], change["after"], change["delta"], change["ci95"]
    tail = (
        f"{100 * d:+.1f} points, 95% CI [{100 * lo:+.1f}, {100 * hi:+.1f}]; McNemar p = {format_p(change['p'])}: "
        f"{change['verdict']}."
    )
    if d == 0:
        return f"Fine-tuning left test accuracy unchanged at {_pct_ci(a)} (n = {change['n']}): {tail}"
    verb = "raised" if d > 0 else "lowered"
    return f"Fine-tuning {verb} test accuracy from {_pct_ci(b)} to {_pct_ci(a)} (n = {change['n']}): {tail}"


def change_section(before_ok: list[bool], after_ok: list[bool]) -> dict:
    """stats.accuracy_change with n, mdc None where nothing is detectable, and a note in words."""
    ch = stats.accuracy_change(before_ok, after_ok)
    n, mdc = len(after_ok), _finite(ch["mdc"])
    if mdc is None:
        note = f"At n = {n} and this starting accuracy, no gain is reliably detectable."
    else:
        note = (
            f"At n = {n}, the smallest gain this test set detects with 80% power at the 5% level is about "
            f"{100 * mdc:+.1f} points (two-sample approximation; conservative for paired data)."
        )
    if ch["p"] >= 0.05:
        note += " Not significant is not the same as no effect: this n cannot tell a smaller change from chance."
    return {**ch, "n": n, "mdc": mdc, "note": note}


def _zero_shot(zero_shot: list[dict], after: list[dict], metrics: dict) -> dict:
    records = [r for r in metrics.get("eval", []) if r.get("split") == "test" and r.get("stage") == "zero-shot"]
    why = [r.get("why_not") for r in metrics.get("baseline", []) if r.get("name") == "zero-shot"]
    base = {"name": "zero-shot baseline", "what": ZERO_SHOT}
    if not zero_shot:
        reason = (
            why[-1]
            if why and isinstance(why[-1], str)
            else (
                "this run recorded no zero-shot predictions (a run from before the zero-shot baseline, or one that "
                "ended before it)"
            )
        )
        return {**base, "why_not": reason}
    z, a = stats.pair_rows(zero_shot, after)
    rec = records[-1] if records else {}
    words = rec.get("words")
    return {
        **base,
        **stats.accuracy_summary([r["correct"] for r in z]),
        "prompt": rec.get("prompt") if isinstance(rec.get("prompt"), str) else None,
        "words": words if isinstance(words, list) and all(isinstance(w, str) for w in words) else None,
        "change": change_section([r["correct"] for r in z], [r["correct"] for r in a]) if z else None,
    }


def _dynamics_summary(records: dict, after: list[dict], labels: list[str]) -> dict | None:
    ids = [r["id"] for r in after]
    epochs, probs = aligned(records, ids, len(labels))
    if probs is None or len(epochs) < 2:
        return None
    gold = np.array([labels.index(r["gold"]) for r in after])
    f = slices.forgetting_events(probs.argmax(axis=2) == gold[None, :])
    learned = {str(e): sum(first == j for first in f["first_learned"]) for j, e in enumerate(epochs)}
    learned["never"] = len(f["never_learned"])
    return {
        "split": "test",
        "epochs": epochs,
        "n": len(ids),
        "never_learned": len(f["never_learned"]),
        "unforgettable": len(f["unforgettable"]),
        "forgotten": len(f["forgotten"]),
        "learned_at": learned,
        "forgotten_ids": [ids[i] for i in f["forgotten"]][:MAX_HINTS],
    }


def _noise_hints(
    before: list[dict], after: list[dict], labels: list[str], records: dict, best_epoch: int | None
) -> list[dict]:
    epochs, probs = aligned(records, [r["id"] for r in after], len(labels))
    per_epoch = [probs[j] for j, e in enumerate(epochs) if e >= 1 and (best_epoch is None or e <= best_epoch)]
    hints = slices.label_noise_hints(after, labels, per_epoch_probs=per_epoch or None, before_rows=before)
    for h in hints[:MAX_HINTS]:
        row = after[h["index"]]
        h.update({k: row[k] for k in ("premise", "hypothesis", "text", "tag") if row.get(k) is not None})
    return hints[:MAX_HINTS]


def build_sections(
    before: list[dict],
    after: list[dict],
    labels: list[str],
    zero_shot: list[dict] | None = None,
    metrics: dict | None = None,
    dynamics: dict | None = None,
    best_epoch: int | None = None,
) -> dict:
    """The report's statistics sections (SECTION_KEYS; each None without before and after rows):

    headline (str), change (stats.accuracy_change + n, note), baselines {random_head, zero_shot,
    fine_tuned} (n, k, accuracy, Wilson ci95; zero-shot with prompt and words, its change to the
    fine-tuned model, or why_not), transitions (2x2 right/wrong table and KxK label moves, counts
    only), calibration {before, after[, zero_shot]} (ECE and bins), slices (slice_table over
    nli_slices, each with its group), per_class_change (per_class_f1_change), noise_hints
    (label_noise_hints among still-failing examples, per-epoch test probabilities where recorded),
    dynamics (learned / forgotten counts over the recorded test epochs, or None)."""
    out: dict = dict.fromkeys(SECTION_KEYS)
    pairs = [(b, a) for b, a in zip(*stats.pair_rows(before or [], after or [])) if b["gold"] == a["gold"]]
    before, after = [b for b, _ in pairs], [a for _, a in pairs]
    if not before:
        return out
    metrics, dynamics = metrics or {}, dynamics or {}
    b_ok, a_ok = [r["correct"] for r in before], [r["correct"] for r in after]
    out["change"] = change_section(b_ok, a_ok)
    out["headline"] = headline(out["change"])
    best = f" (best epoch {best_epoch})" if best_epoch is not None else ""
    before_row = {"name": "random-head baseline", "what": RANDOM_HEAD}
    zero = _zero_shot(zero_shot or [], after, metrics)
    setup = (metrics.get("setup") or [{}])[-1]
    if (setup.get("head_init") or {}).get("head_init") == "label-words":  # core/model.py, init_head
        acc, z_acc = out["change"]["before"]["accuracy"], zero.get("accuracy")
        same = (
            f" (zero-shot {100 * z_acc:.1f}%, this {100 * acc:.1f}%)" if z_acc is not None and acc is not None else ""
        )
        before_row = {"name": "label-word head, untrained", "what": LABEL_WORD_HEAD + same}
        if z_acc is not None:
            zero["what"] = ZERO_SHOT + "; the same model as the untrained classifier above, computed apart"
    out["baselines"] = {
        "random_head": {**before_row, **out["change"]["before"]},
        "zero_shot": zero,
        "fine_tuned": {
            "name": f"fine-tuned{best}",
            "what": "the best epoch by validation accuracy",
            **out["change"]["after"],
        },
    }
    t = stats.transitions(before, after, labels)
    out["transitions"] = {
        "n": t["n"],
        "table": t["correctness"]["table"],
        "cells": {name: c["count"] for name, c in t["correctness"]["cells"].items()},
        "labels": list(labels),
        "counts": t["labels"]["counts"],
        "moves": [{k: m[k] for k in ("from", "to", "count")} for m in t["labels"]["moves"]],
    }
    out["calibration"] = {"before": slices.calibration(before, labels), "after": slices.calibration(after, labels)}
    if zero_shot:
        out["calibration"]["zero_shot"] = slices.calibration(zero_shot, labels)
    out["slices"] = [
        {"group": s["slice"].split(": ", 1)[0], **s}
        for s in slices.slice_table(before, after, slices.nli_slices(before))
    ]
    out["per_class_change"] = stats.per_class_f1_change(before, after, labels)
    records = dynamics.get("test") or {}
    out["noise_hints"] = _noise_hints(before, after, labels, records, best_epoch)
    out["dynamics"] = _dynamics_summary(records, after, labels)
    return out


# --- checks of a parsed report.json -------------------------------------------------------------


def _str(x) -> bool:
    return isinstance(x, str)


def _opt(f):
    return lambda x: x is None or f(x)


def _list(f, n: int | None = None):
    return lambda x: isinstance(x, list) and (n is None or len(x) == n) and all(f(v) for v in x)


def _obj(**fields):
    return lambda x: isinstance(x, dict) and all(f(x.get(k)) for k, f in fields.items())


def _dict_of(f):
    return lambda x: isinstance(x, dict) and all(isinstance(k, str) and f(v) for k, v in x.items())


_CI = _list(_opt(is_number), 2)
_ACC = _obj(n=is_int, k=is_int, accuracy=_opt(is_number), ci95=_CI)
_CHANGE = _obj(
    n=is_int,
    before=_ACC,
    after=_ACC,
    delta=_opt(is_number),
    ci95=_CI,
    b=is_int,
    c=is_int,
    p=is_number,
    verdict=_str,
    mdc=_opt(is_number),
    note=_opt(_str),
)
_BASELINE_MISSING = _obj(name=_str, why_not=_str)
_BASELINE_SCORED = _obj(
    name=_str,
    n=is_int,
    k=is_int,
    accuracy=_opt(is_number),
    ci95=_CI,
    prompt=_opt(_str),
    words=_opt(_list(_str)),
    change=_opt(_CHANGE),
)


def _baseline(x) -> bool:
    """A baseline section: one that could not be scored (why_not), or its scores."""
    return _BASELINE_MISSING(x) or _BASELINE_SCORED(x)


_F1 = _obj(f1_before=_opt(is_number), f1_after=_opt(is_number), change=_opt(is_number), ci95=_CI)
_CALIBRATION = _obj(
    ece=_opt(is_number),
    n=is_int,
    bins=_list(_obj(lo=is_number, hi=is_number, n=is_int, confidence=_opt(is_number), accuracy=_opt(is_number))),
)
_SUMMARY = _opt(_obj(mean=_opt(is_number), std=_opt(is_number), min=_opt(is_number), max=_opt(is_number), n=is_int))
CHECKS = {
    "headline": _str,
    "change": _CHANGE,
    "baselines": _obj(random_head=_opt(_baseline), zero_shot=_opt(_baseline), fine_tuned=_opt(_baseline)),
    "transitions": lambda x: (
        _obj(
            n=is_int,
            table=_list(_list(is_int, 2), 2),
            cells=_dict_of(is_int),
            labels=_list(_str),
            moves=_list(_obj(**{"from": _str, "to": _str, "count": is_int})),
        )(x)
        and _list(_list(is_int, len(x["labels"])), len(x["labels"]))(x.get("counts"))
    ),
    "calibration": _dict_of(_CALIBRATION),
    "slices": _list(
        _obj(
            slice=_str,
            group=_str,
            n=is_int,
            accuracy_before=_opt(is_number),
            accuracy_after=_opt(is_number),
            ci95_before=_CI,
            ci95_after=_CI,
            change=_opt(is_number),
        )
    ),
    "per_class_change": _obj(
        n=is_int, macro=_F1, classes=_list(lambda c: _obj(label=_str, support=is_int)(c) and _F1(c))
    ),
    "noise_hints": _list(
        _obj(id=_id, given=_str, model_label=_str, confidence=is_number, consistent_epochs=_opt(is_int))
    ),
    "dynamics": _obj(
        split=_str,
        epochs=_list(is_int),
        n=is_int,
        never_learned=is_int,
        unforgettable=is_int,
        forgotten=is_int,
        learned_at=_dict_of(is_int),
    ),
    "group": _obj(
        group=_opt(_str),
        finished=is_int,
        agreement=_opt(is_number),
        agreement_n=is_int,
        accuracy_before=_SUMMARY,
        accuracy_after=_SUMMARY,
        change=_SUMMARY,
        val_accuracy=_SUMMARY,
        runs=_list(
            _obj(
                run_id=_str,
                seed=_opt(is_int),
                state=_opt(_str),
                best_epoch=_opt(is_int),
                checkpoint=_opt(_str),
                accuracy_before=_opt(is_number),
                accuracy_after=_opt(is_number),
            )
        ),
    ),
}


def sections_problem(report: dict) -> str | None:
    """Why the statistics sections of a parsed report.json cannot be shown (None when they can):
    each present section must have the types the Report page and render_markdown read."""
    for key, check in CHECKS.items():
        if report.get(key) is not None and not check(report[key]):
            return f'"{key}" is malformed'
    return None
