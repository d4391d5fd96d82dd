"""The report of a run, rebuilt from its folder alone: the numbers (report.json).

    report = build_report(run_dir)        # a dict (also saved as report.json at the end of a run)
    report, problem = load_report(run_dir)   # report.json, or rebuilt when it is damaged

The statistics sections (headline, baselines, change, transitions, calibration, slices, ...) are
built by core/results/sections.py; Markdown and HTML by core/results/render.py.
"""

from __future__ import annotations

from pathlib import Path

from ..embedded import hub_id, weights_note
from ..runs import rundir, state
from ..runs.rundir import is_int, is_number
from ..runs.state import read_config, read_status
from . import sections
from .calibration import temperature_section
from .stats import class_scores, confusion_matrix, wilson

CATEGORIES = ("fixed", "still failing", "regressed", "still right")


def compare_predictions(before: list[dict], after: list[dict], labels: list[str]) -> list[dict]:
    """Join before/after predictions by id: each row gets its category (fixed, still failing,
    regressed, still right) and the change in the probability of the gold label."""
    after_by_id = {r["id"]: r for r in after}
    rows = []
    for b in before:
        a = after_by_id.get(b["id"])
        if a is None:
            continue
        gi = labels.index(b["gold"])
        category = (
            "fixed"
            if not b["correct"] and a["correct"]
            else "still failing"
            if not b["correct"]
            else "regressed"
            if not a["correct"]
            else "still right"
        )
        row = {k: b[k] for k in ("id", "premise", "hypothesis", "text", "tag") if k in b}
        row.update(
            gold=b["gold"],
            pred_before=b["pred"],
            pred_after=a["pred"],
            probs_before=b["probs"],
            probs_after=a["probs"],
            category=category,
            gold_prob_before=b["probs"][gi],
            gold_prob_after=a["probs"][gi],
            gold_prob_change=round(a["probs"][gi] - b["probs"][gi], 5),
        )
        rows.append(row)
    return rows


def _dict(x) -> dict:
    return x if isinstance(x, dict) else {}


def run_labels(run_dir: Path, setup: dict | None = None) -> list[str]:
    """The run's class names: its setup record's (what the trainer used), else config.json's;
    [] when neither can be read."""
    if setup is None:
        setups = rundir.read_metrics(run_dir)["setup"]
        setup = setups[0] if setups else {}
    config, _ = read_config(run_dir)
    for labels in (setup.get("labels"), _dict(config.get("data")).get("labels")):
        if isinstance(labels, list) and labels and all(isinstance(l, str) for l in labels):
            return labels
    return []


def read_predictions(path: Path, labels: list[str]) -> list[dict]:
    """The usable rows of a predictions file: rundir.valid_prediction, with gold and pred among
    `labels` and one probability per label (damaged rows are left out; state.damaged_files
    names the file)."""
    rows, _ = rundir.read_predictions(path)
    return [r for r in rows if r["gold"] in labels and r["pred"] in labels and len(r["probs"]) == len(labels)]


def load_comparison(run_dir: Path, name: str = "test") -> tuple[list[dict], list[str]]:
    """compare_predictions for predictions/<name>_before/after.jsonl of a run (empty if missing
    or unreadable)."""
    run_dir = Path(run_dir)
    labels = run_labels(run_dir)
    before = read_predictions(rundir.predictions_file(run_dir, name, "before"), labels)
    after = read_predictions(rundir.predictions_file(run_dir, name, "after"), labels)
    if not before or not after:
        return [], labels
    return compare_predictions(before, after, labels), labels


def _summary(rows: list[dict], labels: list[str]) -> dict:
    k = sum(r["correct"] for r in rows)
    n = len(rows)
    lo, hi = wilson(k, n)
    m = confusion_matrix(rows, labels)  # rows = gold label, columns = predicted label
    scores = class_scores(m)
    per_class = [
        {
            "label": label,
            "precision": float(scores["precision"][j]),
            "recall": float(scores["recall"][j]),
            "f1": float(scores["f1"][j]),
            "support": int(scores["support"][j]),
        }
        for j, label in enumerate(labels)
    ]
    return {
        "n": n,
        "correct": k,
        "accuracy": k / n if n else None,
        "ci95": [lo, hi],
        "confusion": m.tolist(),
        "per_class": per_class,
    }


def read_sections(run_dir: Path, labels: list[str], metrics: dict | None = None, best_epoch: int | None = None) -> dict:
    """sections.build_sections from the run's files: test predictions before, after and
    zero-shot, metrics.jsonl, predictions/dynamics.jsonl (each left out where missing or damaged)."""
    run_dir = Path(run_dir)

    def read(stage: str) -> list[dict]:
        return read_predictions(rundir.predictions_file(run_dir, "test", stage), labels)

    return sections.build_sections(
        read("before"),
        read("after"),
        labels,
        zero_shot=read("zero_shot"),
        metrics=metrics if metrics is not None else rundir.read_metrics(run_dir),
        dynamics=sections.read_dynamics(run_dir),
        best_epoch=best_epoch,
    )


def _base_model(config: dict) -> str | None:
    """The Hub id of the run's model (an embedded model's, core/embedded.py), as model cards name it."""
    name = (config.get("model") or {}).get("name")
    return hub_id(name) if isinstance(name, str) else None


def _base_weights_note(config: dict) -> str | None:
    """How the run's base weights differ from the Hub's (a dequantised GGUF), None when they do not."""
    name = (config.get("model") or {}).get("name")
    return weights_note(name) if isinstance(name, str) else None


def build_report(run_dir: Path, group: dict | None = None) -> dict:
    """Everything the report shows, from the files of `run_dir` (works on unfinished runs too).
    "group" is `group`: the caller passes seeds.group_summary(run_dir) where the report should
    show the run's seeds (None outside a group); it is computed when the report is built, so a
    page refreshes it (a later seed may have ended)."""
    run_dir = Path(run_dir)
    config, _ = read_config(run_dir)  # {} when damaged: the pages say so (damaged_files)
    status = read_status(run_dir)
    metrics = rundir.read_metrics(run_dir)
    resources = rundir.read_jsonl(run_dir / rundir.RESOURCES)
    setup = metrics["setup"][0] if metrics["setup"] else {}
    labels = run_labels(run_dir, setup)
    steps, epochs, evals = metrics["step"], metrics["epoch"], metrics["eval"]
    end = metrics["end"][-1] if metrics["end"] else {}

    report: dict = {
        "run_id": run_dir.name,
        "state": status.get("state"),
        "error": status.get("error"),
        "preset": config.get("preset"),
        "model": (config.get("model") or {}).get("name"),
        "base_model": _base_model(config),
        "base_weights_note": _base_weights_note(config),
        "dataset": _dataset_name(config.get("data") or {}),
        "labels": labels,
        "config": config,
        "created_at": status.get("created_at"),
        "finished_at": status.get("finished_at"),
        "device": setup.get("device"),
        "world_size": setup.get("world_size") or 1,  # data-parallel processes (core/dist.py)
        "compute_dtype": setup.get("compute_dtype"),
        "hardware": setup.get("hardware"),
        "params": setup.get("params"),
        "data": setup.get("data"),
        "target_modules": setup.get("target_modules"),
        "speed": setup.get("speed") or config.get("speed"),
        "speedups": setup.get("speedups"),
        "mean_tokens": setup.get("mean_tokens"),
        "load_s": setup.get("load_s"),
        "epochs": [
            {k: e.get(k) for k in ("epoch", "train_loss", "val_accuracy", "val_loss", "epoch_s")} for e in epochs
        ],
        "best_epoch": end.get("best_epoch") if end.get("state") == "done" else None,
        "total_s": end.get("total_s"),
        "train_s": round(sum(e.get("epoch_s") or 0 for e in epochs), 3) if epochs else None,
        "eval_s": round(sum(e.get("seconds") or 0 for e in evals), 3) if evals else None,
        "throughput": rundir.throughput(steps),
        "evals": evals,
    }
    peaks: dict = {}
    for rec in resources:
        for k, v in rec.items():
            if k != "t" and isinstance(v, (int, float)):
                peaks[k] = max(peaks.get(k, 0), v)
    for k, v in _dict(end.get("peaks")).items():
        if is_number(v):
            peaks[k] = max(peaks.get(k, 0), v)
    peaks["checkpoints_mb"] = round(rundir.dir_size(run_dir / rundir.CHECKPOINTS) / 2**20, 2)
    report["resources"] = peaks

    before = read_predictions(rundir.predictions_file(run_dir, "test", "before"), labels)
    after = read_predictions(rundir.predictions_file(run_dir, "test", "after"), labels)
    report["test_before"] = _summary(before, labels) if before else None
    report["test_after"] = _summary(after, labels) if after else None
    if before and after:
        rows = compare_predictions(before, after, labels)
        report["changes"] = {c: sum(r["category"] == c for r in rows) for c in CATEGORIES}
        examples = {}
        for c in ("fixed", "regressed", "still failing"):
            chosen = sorted((r for r in rows if r["category"] == c), key=lambda r: -abs(r["gold_prob_change"]))[:5]
            examples[c] = [
                {
                    k: r.get(k)
                    for k in (
                        "id",
                        "premise",
                        "hypothesis",
                        "text",
                        "tag",
                        "gold",
                        "pred_before",
                        "pred_after",
                        "gold_prob_change",
                    )
                    if k in r
                }
                for r in chosen
            ]
        report["change_examples"] = examples
        report["by_tag"] = _by_tag(rows)
    report.update(read_sections(run_dir, labels, metrics, report["best_epoch"]))
    validation = read_predictions(rundir.predictions_file(run_dir, "validation", "after"), labels)
    report["temperature_scaling"] = temperature_section(validation, after, labels)  # fitted on validation
    report["controls"] = _controls(config, setup)
    report["early_stop"] = end.get("early_stop") if end.get("state") == "done" else None
    report["group"] = group
    return report


def _controls(config: dict, setup: dict) -> dict:
    """The training controls a run used (config.json, and the weights the trainer applied): LoRA
    variant, class weights as set and as applied (rescaled, per class), early-stopping patience,
    gradient checkpointing. Runs from before a control read its default."""
    train = _dict(config.get("train"))
    applied = setup.get("class_weights")
    return {
        "lora_variant": setup.get("lora_variant") or _dict(config.get("lora")).get("variant") or "lora",
        "class_weights": train.get("class_weights", "none"),
        "class_weights_applied": applied if isinstance(applied, dict) else None,
        "early_stopping_patience": train.get("early_stopping_patience"),
        "gradient_checkpointing": bool(train.get("gradient_checkpointing")),
    }


def _number_or_none(x) -> bool:
    return x is None or is_number(x)


def _names(x) -> bool:
    return isinstance(x, list) and all(isinstance(v, str) for v in x)


def _summary_ok(s, labels: list[str]) -> bool:
    k = len(labels)
    return (
        isinstance(s, dict)
        and is_number(s.get("accuracy"))
        and is_int(s.get("correct"))
        and is_int(s.get("n"))
        and isinstance(s.get("ci95"), list)
        and len(s["ci95"]) == 2
        and all(_number_or_none(x) for x in s["ci95"])
        and isinstance(s.get("confusion"), list)
        and len(s["confusion"]) == k
        and all(isinstance(row, list) and len(row) == k and all(is_int(v) for v in row) for row in s["confusion"])
        and isinstance(s.get("per_class"), list)
        and all(
            isinstance(c, dict)
            and isinstance(c.get("label"), str)
            and all(is_number(c.get(f)) for f in ("precision", "recall", "f1", "support"))
            for c in s["per_class"]
        )
    )


def report_problem(r) -> str | None:
    """Why a report (a parsed report.json) cannot be shown as it is, None when it can: the
    fields the Report page and render_markdown compute with must have their types."""
    if not isinstance(r, dict):
        return "not a JSON object"
    if not isinstance(r.get("run_id"), str):
        return "has no run_id"
    labels = r.get("labels")
    if not _names(labels):
        return '"labels" is not a list of names'
    for k in (
        "model",
        "base_model",
        "base_weights_note",
        "dataset",
        "preset",
        "device",
        "compute_dtype",
        "state",
        "error",
    ):
        if r.get(k) is not None and not isinstance(r[k], str):
            return f'"{k}" is not text'
    for k in ("test_before", "test_after"):
        if r.get(k) is not None and not _summary_ok(r[k], labels):
            return f'"{k}" is malformed'
    epochs = r.get("epochs")
    if epochs is not None and not (
        isinstance(epochs, list)
        and all(
            isinstance(e, dict)
            and is_int(e.get("epoch"))
            and all(_number_or_none(e.get(f)) for f in ("train_loss", "val_accuracy", "val_loss", "epoch_s"))
            for e in epochs
        )
    ):
        return '"epochs" is malformed'
    for k in ("total_s", "train_s", "eval_s", "load_s"):
        if not _number_or_none(r.get(k)):
            return f'"{k}" is not a number'
    if epochs and not is_number(r.get("train_s")):
        return '"train_s" is missing'
    if r.get("best_epoch") is not None and not is_int(r["best_epoch"]):
        return '"best_epoch" is not a whole number'
    for k in (
        "hardware",
        "params",
        "resources",
        "throughput",
        "speed",
        "changes",
        "change_examples",
        "config",
        "data",
        "mean_tokens",
        "controls",
        "early_stop",
    ):
        if r.get(k) is not None and not isinstance(r[k], dict):
            return f'"{k}" is not an object'
    for k in ("params", "resources", "throughput", "changes"):
        if not all(_number_or_none(v) for v in (r.get(k) or {}).values()):
            return f'"{k}" holds something other than numbers'
    ts = r.get("temperature_scaling")
    if ts is not None and not (
        isinstance(ts, dict)
        and is_number(ts.get("temperature"))
        and isinstance(ts.get("test"), dict)
        and all(_number_or_none(v) for v in ts["test"].values())
        and sections.CHECKS["calibration"]({"after": ts.get("calibration_after")})
    ):
        return '"temperature_scaling" is malformed'
    gpus = (r.get("hardware") or {}).get("gpus")
    if gpus is not None and not (
        isinstance(gpus, list)
        and all(isinstance(g, dict) and isinstance(g.get("name"), str) and is_number(g.get("memory_gb")) for g in gpus)
    ):
        return '"hardware.gpus" is malformed'
    for k in ("target_modules", "speedups"):
        if r.get(k) is not None and not _names(r[k]):
            return f'"{k}" is not a list of names'
    for rows in (r.get("change_examples") or {}).values():
        if not (
            isinstance(rows, list)
            and all(
                isinstance(e, dict)
                and all(isinstance(e.get(f), str) for f in ("gold", "pred_before", "pred_after"))
                and is_number(e.get("gold_prob_change"))
                for e in rows
            )
        ):
            return '"change_examples" is malformed'
    by_tag = r.get("by_tag")
    if by_tag is not None and not (
        isinstance(by_tag, list)
        and all(
            isinstance(t, dict)
            and isinstance(t.get("tag"), str)
            and is_int(t.get("n"))
            and is_number(t.get("accuracy_before"))
            and is_number(t.get("accuracy_after"))
            for t in by_tag
        )
    ):
        return '"by_tag" is malformed'
    return sections.sections_problem(r)


def damaged_files(run_dir: Path) -> list[str]:
    """state.damaged_files, with report.json's content checked too (report_problem): one line
    per damaged file, naming it and why."""
    out = state.damaged_files(run_dir)
    value, problem = rundir.load_json(Path(run_dir) / rundir.REPORT)
    if problem is None and isinstance(value, dict) and report_problem(value):
        out.append(f"{rundir.REPORT}: {report_problem(value)}")
    return out


def load_report(run_dir: Path) -> tuple[dict | None, str | None]:
    """(report, problem): report.json when it can be shown (problem None); when it cannot, the
    report rebuilt from the run's other files (build_report) and one line naming report.json and
    why; (None, None) when the run has no report.json yet."""
    run_dir = Path(run_dir)
    value, problem = rundir.load_json(run_dir / rundir.REPORT)
    if problem == "missing":
        return None, None
    problem = problem or report_problem(value)
    if problem is None:
        value["run_id"] = run_dir.name  # the folder's name: a copied or renamed run links to itself
        if any(k not in value for k in sections.SECTION_KEYS):  # written before these sections existed
            value.update(read_sections(run_dir, value["labels"], best_epoch=value.get("best_epoch")))
        return value, None
    return build_report(run_dir), f"{rundir.REPORT}: {problem} (rebuilt from the run's other files)"


def _dataset_name(data: dict) -> str:
    data = _dict(data)
    files = [Path(data[s]).name for s in ("train", "validation", "test") if isinstance(data.get(s), str) and data[s]]
    if files:
        return "files: " + ", ".join(files)
    return data.get("source") if isinstance(data.get("source"), str) else ""


def _by_tag(rows: list[dict]) -> list[dict]:
    tags = sorted({r.get("tag") for r in rows if r.get("tag")})
    out = []
    for t in tags:
        sub = [r for r in rows if r.get("tag") == t]
        out.append(
            {
                "tag": t,
                "n": len(sub),
                "accuracy_before": sum(r["pred_before"] == r["gold"] for r in sub) / len(sub),
                "accuracy_after": sum(r["pred_after"] == r["gold"] for r in sub) / len(sub),
            }
        )
    return out
