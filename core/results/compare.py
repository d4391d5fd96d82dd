"""Side-by-side comparison of runs: the pure logic behind the Compare page.

Everything here reads run folders through core (rundir, report) and returns plain Python values
(lists and dicts of numbers and strings), so the page only draws them and the tests can check them
on run folders written by hand. Nothing here raises on a damaged run: a file that cannot be read
gives empty curves, None headline numbers, or an empty config.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from ..runs import rundir, watch
from ..runs.rundir import is_int, is_number
from ..runs.state import read_config
from .report import build_report, load_report
from .stats import wilson

_EPOCH_STAGE = re.compile(r"\Aepoch-(\d+)\Z")
MISSING = "—"  # a config key that a run does not have (shown in the diff table)


# --- config diff ------------------------------------------------------------------------------


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """A nested dict as {dotted.key: leaf value}. Lists and other non-dict values are leaves
    (kept as they are); an empty dict is a leaf too, so that its key is not lost.

    >>> flatten({"a": {"b": 1, "c": [1, 2]}, "d": {}})
    {'a.b': 1, 'a.c': [1, 2], 'd': {}}
    """
    if not isinstance(obj, dict) or (not obj and prefix):
        return {prefix: obj} if prefix else {}
    out: dict[str, Any] = {}
    for k, v in obj.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def config_diff(configs: dict[str, dict]) -> dict[str, dict[str, Any]]:
    """The flattened config keys whose values differ between the runs: {key: {run_id: value}},
    keys sorted. A key that some runs lack counts as differing (its value there is MISSING).
    With fewer than two runs nothing differs ({})."""
    if len(configs) < 2:
        return {}
    flat = {rid: flatten(cfg if isinstance(cfg, dict) else {}) for rid, cfg in configs.items()}
    keys = sorted(set().union(*(f.keys() for f in flat.values())))
    diff: dict[str, dict[str, Any]] = {}
    for key in keys:
        values = {rid: f.get(key, MISSING) for rid, f in flat.items()}
        if len({_canon(v) for v in values.values()}) > 1:
            diff[key] = values
    return diff


def _canon(value: Any) -> str:
    """A hashable form of a config value for comparing (lists and dicts included)."""
    try:
        return json.dumps(value, sort_keys=True, default=str)
    except (TypeError, ValueError):
        return repr(value)


def read_configs(run_dirs: list[Path]) -> dict[str, dict]:
    """{run id: config.json as a dict} ({} for a run whose config.json is missing or damaged)."""
    out = {}
    for d in run_dirs:
        try:
            cfg, _ = read_config(Path(d))
        except Exception:  # never raise on a damaged run
            cfg = {}
        out[Path(d).name] = cfg if isinstance(cfg, dict) else {}
    return out


# --- curves -----------------------------------------------------------------------------------


def _finite(x: Any) -> bool:
    return is_number(x) and math.isfinite(x)


def _metrics(run_dir: Path) -> dict[str, list[dict]]:
    try:
        return rundir.read_metrics(Path(run_dir))
    except Exception:
        return {k: [] for k in rundir.METRIC_KINDS}


def loss_curve(run_dir: Path, metrics: dict | None = None) -> tuple[list[int], list[float]]:
    """(steps, losses) of the run's training-loss curve: its metrics.jsonl step records with a
    whole step and a finite loss, in file order (empty lists when there are none)."""
    metrics = metrics if metrics is not None else _metrics(run_dir)
    xs, ys = [], []
    for rec in metrics.get("step", []):
        step, loss = rec.get("step"), rec.get("loss")
        if isinstance(step, int) and _finite(loss):
            xs.append(step)
            ys.append(float(loss))
    return xs, ys


def stage_epoch(stage: Any) -> int | None:
    """The epoch an eval record's stage stands for: "before" -> 0, "epoch-K" -> K, else None
    (e.g. "after", which is the best epoch evaluated again)."""
    if stage == "before":
        return 0
    m = _EPOCH_STAGE.match(stage) if isinstance(stage, str) else None
    return int(m.group(1)) if m else None


def val_accuracy_curve(run_dir: Path, metrics: dict | None = None) -> tuple[list[int], list[float]]:
    """(epochs, accuracies) from the run's eval records on the "validation" split: stage
    "before" is epoch 0, "epoch-K" epoch K; other stages are left out. Sorted by epoch; when an
    epoch was evaluated twice (a resumed run) the last record wins."""
    metrics = metrics if metrics is not None else _metrics(run_dir)
    by_epoch: dict[int, float] = {}
    for rec in metrics.get("eval", []):
        if rec.get("split") != "validation":
            continue
        epoch, acc = stage_epoch(rec.get("stage")), rec.get("accuracy")
        if epoch is not None and _finite(acc):
            by_epoch[epoch] = float(acc)
    epochs = sorted(by_epoch)
    return epochs, [by_epoch[e] for e in epochs]


def curves(run_dir: Path) -> dict:
    """{"loss": (steps, losses), "val_accuracy": (epochs, accuracies)} of one run, from its
    snapshot (core/runs/watch.py: a finished run's files are read once per version, its step
    records thinned to a few thousand for a chart of a few hundred points)."""
    try:
        snap = watch.snapshot(Path(run_dir))
        metrics = {"step": snap["steps"], "eval": snap["evals"]}
    except Exception:
        metrics = {k: [] for k in rundir.METRIC_KINDS}
    return {"loss": loss_curve(run_dir, metrics), "val_accuracy": val_accuracy_curve(run_dir, metrics)}


# --- headline metrics -------------------------------------------------------------------------


def _accuracy(summary: Any) -> tuple[float | None, list[float] | None]:
    """(accuracy, [lo, hi]) of a report's test summary ({n, correct, accuracy, ci95}); the
    interval is the summary's own ci95 when it has one, else core.results.stats.wilson(correct, n)."""
    if not isinstance(summary, dict):
        return None, None
    acc = summary.get("accuracy")
    acc = float(acc) if _finite(acc) else None
    ci = summary.get("ci95")
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(_finite(c) for c in ci):
        return acc, [float(ci[0]), float(ci[1])]
    n, k = summary.get("n"), summary.get("correct")
    if isinstance(n, int) and isinstance(k, int) and 0 <= k <= n and n > 0:
        return (acc if acc is not None else k / n), list(wilson(k, n))
    return acc, None


def _peak(resources: Any, *keys: str) -> float | None:
    if not isinstance(resources, dict):
        return None
    vals = [resources[k] for k in keys if _finite(resources.get(k))]
    return float(max(vals)) if vals else None


def load_run_report(run_dir: Path) -> tuple[dict | None, str | None]:
    """(report, problem) as core.results.report.load_report gives it; for a run without report.json yet
    (still running, or it stopped early) the report built from its other files; (None, why)
    when even that fails."""
    try:
        report, problem = load_report(Path(run_dir))
        if report is None:
            report = build_report(Path(run_dir))
        return (report if isinstance(report, dict) else None), problem
    except Exception as e:  # never raise on a damaged run
        return None, f"unreadable ({type(e).__name__}: {e})"


def headline_row(run_dir: Path, report: dict | None = None) -> dict:
    """One row of the headline table (keys run, state, test_before, test_before_ci95, test_after,
    test_after_ci95, best_epoch, total_s, peak_gpu_gb, peak_rss_gb): test accuracy before and after
    with their Wilson 95% intervals ([lo, hi]), the best epoch, the total time in seconds, the
    peak GPU memory (gpu_mem_gb, else the evaluations' peak_gb) and the peak RSS in GB. A number
    the run does not have is None."""
    run_dir = Path(run_dir)
    if report is None:
        report, _ = load_run_report(run_dir)
    report = report or {}
    before, before_ci = _accuracy(report.get("test_before"))
    after, after_ci = _accuracy(report.get("test_after"))
    resources = report.get("resources")
    gpu = _peak(resources, "gpu_mem_gb")
    if gpu is None:
        evals = report.get("evals") if isinstance(report.get("evals"), list) else []
        peaks = [e.get("peak_gb") for e in evals if isinstance(e, dict) and _finite(e.get("peak_gb"))]
        gpu = float(max(peaks)) if peaks else None
    best = report.get("best_epoch")
    total = report.get("total_s")
    return {
        "run": run_dir.name,
        "state": report.get("state"),
        "test_before": before,
        "test_before_ci95": before_ci,
        "test_after": after,
        "test_after_ci95": after_ci,
        "best_epoch": best if is_int(best) else None,
        "total_s": float(total) if _finite(total) else None,
        "peak_gpu_gb": gpu,
        "peak_rss_gb": _peak(resources, "rss_gb"),
    }


def headline_rows(run_dirs: list[Path]) -> list[dict]:
    """headline_row of each run, in the order given."""
    return [headline_row(d) for d in run_dirs]


# --- playground helpers -----------------------------------------------------------------------


def checkpoint_folders(run_dir: Path, report: dict | None = None) -> tuple[Path, Path] | None:
    """(before, after) checkpoint folders of a finished run: checkpoints/epoch-0 and
    checkpoints/epoch-<best_epoch>; None when the run has no best epoch (not done, or damaged)."""
    run_dir = Path(run_dir)
    if report is None:
        report, _ = load_run_report(run_dir)
    best = (report or {}).get("best_epoch")
    if not is_int(best):
        metrics = _metrics(run_dir)
        end = metrics.get("end", [])
        best = end[-1].get("best_epoch") if end and end[-1].get("state") == "done" else None
    if not is_int(best) or best < 0:
        return None
    ck = run_dir / rundir.CHECKPOINTS
    return ck / "epoch-0", ck / f"epoch-{best}"


def classifier_input_kind(folder: Path) -> str | None:
    """The input kind ("pair" or "text") in a checkpoint folder's classifier.json; None when the
    folder has no readable classifier.json (runs from before it existed)."""
    value, problem = rundir.load_json(Path(folder) / rundir.CLASSIFIER_FILE)
    if problem or not isinstance(value, dict):
        return None
    fmt = value.get("input")
    kind = fmt.get("kind") if isinstance(fmt, dict) else None
    if kind in ("pair", "text"):
        return kind
    return "pair" if isinstance(value.get("labels"), list) else None
