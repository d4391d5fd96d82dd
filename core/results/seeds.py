"""Several seeds of one configuration as one result: `python -m core train --seeds K`.

    run_dirs = group_runs(run_dir)          # the finished and unfinished runs of run_dir's group
    summary = group_summary(run_dir)        # mean +- std of the headline numbers, agreement, seeds

One run is not a result: the same recipe gives a spread of accuracies over seeds. A group is K
runs of one config that differ only in train.seed (which seeds subsampling, the head and LoRA
initialisation, dropout and the data order); each is an ordinary run folder named <id>-seed<S>,
with `group` set in its config.json. The report of any of them shows the group's mean, standard
deviation and range of every headline number, the per-example agreement of the fine-tuned
models across seeds, and which seed each run (and so each checkpoint) came from.
"""

from __future__ import annotations

from pathlib import Path

from ..runs import rundir
from ..runs.state import list_runs, read_status
from .report import load_report
from .slices import agreement, seed_summary


def group_runs(run_dir: Path) -> list[Path]:
    """The run folders beside `run_dir` whose config.json names the same group (sorted by seed);
    [] when the run belongs to no group. From list_runs, whose lines are kept between calls: a
    runs folder of 2,000 runs is not 2,000 config.json files read on every report."""
    run_dir = Path(run_dir)
    group = (rundir.read_json(run_dir / rundir.CONFIG, {}) or {}).get("group")
    if not group or not run_dir.parent.is_dir():
        return []
    found = [(r["seed"], r["path"]) for r in list_runs(run_dir.parent) if r.get("group") == group]
    return [p for _, p in sorted(found, key=lambda t: (t[0] is None, t[0] or 0, t[1].name))]


def group_summary(run_dir: Path) -> dict | None:
    """The group of `run_dir` summed up over its finished runs: per run (id, seed, state, best
    epoch, accuracies); for each headline number its seed_summary (mean, std, min, max, n); the
    share of test examples on which every seed's fine-tuned model predicts the same label.
    None when the run belongs to no group."""
    runs = group_runs(run_dir)
    if not runs:
        return None
    rows, after_preds = [], []
    for path in runs:
        cfg = rundir.read_json(path / rundir.CONFIG, {}) or {}
        status = read_status(path)
        report, _ = load_report(path) if status.get("state") == "done" else (None, None)
        row = {"run_id": path.name, "seed": (cfg.get("train") or {}).get("seed"), "state": status.get("state")}
        if report and report.get("test_after") and report.get("test_before"):
            best = report.get("best_epoch")
            row.update(
                best_epoch=best,
                checkpoint=f"{path.name}/{rundir.CHECKPOINTS}/epoch-{best}",
                accuracy_before=report["test_before"]["accuracy"],
                accuracy_after=report["test_after"]["accuracy"],
                change=report["test_after"]["accuracy"] - report["test_before"]["accuracy"],
                val_accuracy=max((e.get("val_accuracy") or 0 for e in report.get("epochs") or []), default=None),
            )
            preds = rundir.read_jsonl(rundir.predictions_file(path, "test", "after"))
            after_preds.append({r.get("id"): r.get("pred") for r in preds})
        rows.append(row)
    done = [r for r in rows if "accuracy_after" in r]
    summary = {
        "group": (rundir.read_json(Path(run_dir) / rundir.CONFIG, {}) or {}).get("group"),
        "runs": rows,
        "finished": len(done),
    }
    for key in ("accuracy_before", "accuracy_after", "change", "val_accuracy"):
        values = [r[key] for r in done if r.get(key) is not None]
        summary[key] = seed_summary(values) if values else None
    if len(after_preds) >= 2:
        ids = sorted(set.intersection(*(set(p) for p in after_preds)), key=str)
        summary["agreement"] = agreement([[p[i] for i in ids] for p in after_preds])
        summary["agreement_n"] = len(ids)
    else:
        summary["agreement"], summary["agreement_n"] = None, 0
    return summary
