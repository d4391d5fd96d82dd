"""A run's reproducibility bundle: one zip with what it takes to rerun the run and to cite it.

    data = build_bundle(run_dir)                   # the zip's bytes
    python -m core report RUN --bundle out.zip     # the same, from the command line

Members, in a folder named after the run:
    README.md          what each file is
    config.json        the run's RunConfig (enough to rerun it: python -m core train --config config.json)
    environment.json   seeds, package versions, Python, platform, hardware (the run's setup record)
    data.json          sha256 of the data files the run read (its own files or the built-in sample),
                       and of the test ids it was scored on
    predictions.csv    per test example: id, texts, gold, both models' predictions and probabilities
                       (and the zero-shot baseline's, where the run has one)
    methods.md         a methods paragraph and a results table, ready to paste
    report.md, report.json   the full report (core/results/render.py, core/results/report.py)
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import platform
import sys
import zipfile
from importlib import metadata
from pathlib import Path

from ..config import BUILTIN_DATA, BUILTIN_DIR
from ..runs import rundir
from ..runs.state import read_config
from ..text import csv_cell, markdown_text
from .render import baseline_rows, change_rows, markdown_table, render_markdown
from .report import build_report, read_predictions
from .seeds import group_summary

PACKAGES = (
    "torch",
    "transformers",
    "peft",
    "bitsandbytes",
    "accelerate",
    "datasets",
    "numpy",
    "streamlit",
    "scipy",
    "scikit-learn",
)
MEMBERS = (
    "README.md",
    "config.json",
    "environment.json",
    "data.json",
    "predictions.csv",
    "methods.md",
    "report.md",
    "report.json",
)


def package_versions() -> dict[str, str | None]:
    """The installed version of each of PACKAGES (None when it is not installed)."""
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _resolve(path: str) -> Path | None:
    """A data path as the trainer saw it: absolute, else relative to this process's folder or to
    the project (the app starts trainers there); None when it is not found."""
    p = Path(path)
    for candidate in [p] if p.is_absolute() else [Path.cwd() / p, rundir.PROJECT_ROOT / p]:
        if candidate.is_file():
            return candidate
    return None


def data_hashes(config: dict, test_ids: list) -> dict:
    """Per split: the file it came from and its sha256 (the run's own file, or the built-in
    sample's), or the Hub dataset and split it names (not hashed: pin its revision); and the
    sha256 of the test ids the run was scored on, one per line in the order scored."""
    data = config.get("data") if isinstance(config.get("data"), dict) else {}
    source = data.get("source")
    out: dict = {"source": source, "splits": {}}
    for split in ("train", "validation", "test"):
        given = data.get(split)
        if isinstance(given, str) and given:
            path = _resolve(given)
            out["splits"][split] = {
                "file": given,
                "sha256": sha256_file(path) if path else None,
                "bytes": path.stat().st_size if path else None,
                **({} if path else {"note": "file not found where this bundle was made"}),
            }
        elif source == BUILTIN_DATA:
            path = BUILTIN_DIR / f"{split}.jsonl"
            out["splits"][split] = {
                "file": path.relative_to(rundir.PROJECT_ROOT).as_posix(),
                "sha256": sha256_file(path) if path.is_file() else None,
                "bytes": path.stat().st_size if path.is_file() else None,
            }
        elif isinstance(source, str) and source not in ("", "files"):
            name = data.get(f"{split}_split")
            if name:
                out["splits"][split] = {
                    "hub_dataset": source,
                    "config": data.get("hub_config"),
                    "split": name,
                    "sha256": None,
                    "note": "a Hub dataset: the rows scored are in predictions.csv",
                }
    out["test_ids_sha256"] = hashlib.sha256("".join(f"{i}\n" for i in test_ids).encode()).hexdigest()
    out["test_rows"] = len(test_ids)
    return out


def predictions_csv(run_dir: Path, labels: list[str]) -> tuple[str, list]:
    """(CSV text, test ids): one row per test example scored before and after: id, premise,
    hypothesis (or text), tag, gold, pred_before, pred_after, correct_before, correct_after,
    p_before_<label>..., p_after_<label>..., and pred_zero_shot, p_zero_shot_<label>... when
    the run has a zero-shot baseline. Every cell and header passes through csv_cell: a text or a
    label that starts with = + - @ is written with a leading quote, never as a formula."""
    before = read_predictions(rundir.predictions_file(run_dir, "test", "before"), labels)
    after = {r["id"]: r for r in read_predictions(rundir.predictions_file(run_dir, "test", "after"), labels)}
    zero = {r["id"]: r for r in read_predictions(rundir.predictions_file(run_dir, "test", "zero_shot"), labels)}
    rows = [(b, after[b["id"]]) for b in before if b["id"] in after]
    texts = ["premise", "hypothesis"] if any("premise" in b for b, _ in rows) or not rows else ["text"]
    head = (
        ["id", *texts, "tag", "gold", "pred_before", "pred_after", "correct_before", "correct_after"]
        + [f"p_before_{l}" for l in labels]
        + [f"p_after_{l}" for l in labels]
    )
    if zero:
        head += ["pred_zero_shot"] + [f"p_zero_shot_{l}" for l in labels]
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow([csv_cell(h) for h in head])
    for b, a in rows:
        line = [
            b["id"],
            *(b.get(t, "") for t in texts),
            b.get("tag") or "",
            b["gold"],
            b["pred"],
            a["pred"],
            b["correct"],
            a["correct"],
            *b["probs"],
            *a["probs"],
        ]
        if zero:
            z = zero.get(b["id"])
            line += [z["pred"], *z["probs"]] if z else [""] * (1 + len(labels))
        w.writerow([csv_cell(v) for v in line])
    return out.getvalue(), [b["id"] for b, _ in rows]


def _seeds(config: dict, report: dict) -> dict:
    train = config.get("train") if isinstance(config.get("train"), dict) else {}
    data = config.get("data") if isinstance(config.get("data"), dict) else {}
    out = {
        "train.seed": train.get("seed"),
        "data.sample_seed": data.get("sample_seed"),
        "note": "train.seed seeds the head and LoRA initialisation, dropout and the data order; "
        "data.sample_seed (None: train.seed) the row subsampling",
    }
    if report.get("group"):
        out["group"] = report["group"].get("group")
        out["group_runs"] = [{"run": r.get("run_id"), "seed": r.get("seed")} for r in report["group"].get("runs", [])]
    return out


def _count(x) -> str:
    return f"{x:,}" if isinstance(x, int) else "n/a"


def methods_markdown(report: dict) -> str:
    """A methods paragraph and a results table, in Markdown, ready to paste. The values from the
    config and the run folder (the model, labels, settings) go through markdown_text."""
    c = report.get("config") or {}
    m, d, lo, t = (c.get(k) if isinstance(c.get(k), dict) else {} for k in ("model", "data", "lora", "train"))
    p = report.get("params") or {}
    data = report.get("data") or {}
    counts = {
        s: (data.get(s) or {}).get("used") if isinstance(data.get(s), dict) else None
        for s in ("train", "validation", "test")
    }
    targets = report.get("target_modules") or lo.get("target_modules")
    targets = ", ".join(targets) if isinstance(targets, list) else str(targets or "peft's default modules")
    share = f", {100 * p['trainable'] / p['total']:.2f}%" if p.get("trainable") and p.get("total") else ""
    labels = report.get("labels") or []
    quant = (
        "4-bit NF4 with double quantisation (bitsandbytes)"
        if m.get("quantize") == "bnb.nf4" and m.get("double_quant")
        else f"{m.get('quantize') or 'no'} quantisation"
    )
    text = (
        f"We fine-tuned {report.get('model')} as a {len(labels)}-way classifier ({', '.join(labels)}) with QLoRA: "
        f"the base weights were quantised to {quant}, with computation in {report.get('compute_dtype')} on "
        f"{report.get('device')}. LoRA adapters (r = {lo.get('r')}, alpha = {lo.get('alpha')}, dropout = "
        f"{lo.get('dropout')}) on {targets} and a full-precision classification head were trained "
        f"({_count(p.get('trainable'))} of {_count(p.get('total'))} parameters{share}) for {t.get('epochs')} epochs "
        f"with AdamW (learning rate {t.get('lr')}, head learning rate {t.get('head_lr') or t.get('lr')}, batch size "
        f"{t.get('batch_size')}, {t.get('schedule')} schedule with {t.get('warmup_ratio')} warm-up, seed "
        f"{t.get('seed')}). Data: {report.get('dataset')}, {counts['train']} training, {counts['validation']} "
        f"validation and {counts['test']} test examples. The epoch with the best validation accuracy (epoch "
        f"{report.get('best_epoch')}) was kept; the test split was used for nothing else. The baseline is the "
        "same model before training (the LoRA adapter at initialisation and a freshly initialised head) on the "
        "same test examples. Accuracies are given with Wilson 95% intervals; the change with a paired bootstrap "
        "95% interval (10,000 resamples) and an exact McNemar test on the discordant pairs; per-class F1 changes "
        "with paired bootstrap intervals (2,000 resamples); calibration as the expected calibration error over 10 "
        "equal-width confidence bins."
    )
    lines = ["# Methods", "", markdown_text(text, line_start=True), "", "# Results", ""]
    if report.get("headline"):
        lines += [markdown_text(report["headline"], line_start=True), ""]
    rows = baseline_rows(report)
    lines += markdown_table([{k: v for k, v in r.items() if k != "what"} for r in rows])
    z = (report.get("baselines") or {}).get("zero_shot") or {}
    if z.get("why_not"):
        lines += ["", f"No zero-shot baseline: {markdown_text(z['why_not'])}"]
    if report.get("change"):
        lines += [""] + markdown_table(change_rows(report["change"]))
    cal = report.get("calibration") or {}
    if cal:
        lines += [
            "",
            "ECE: "
            + ", ".join(
                f"{markdown_text(name.replace('_', '-'))} {c['ece']:.3f}"
                for name, c in cal.items()
                if c.get("ece") is not None
            )
            + ".",
        ]
    return "\n".join(lines) + "\n"


README = """# Reproducibility bundle of run {run_id}

- config.json: the run's settings; rerun with `python -m core train --config config.json`
- environment.json: seeds, package versions, Python, platform and the hardware it ran on
- data.json: sha256 of the data files it read and of the test ids it was scored on
- predictions.csv: per test example, the gold label and both models' predictions and probabilities
- methods.md: a methods paragraph and a results table, ready to paste
- report.md, report.json: the full report
"""


def build_bundle(run_dir: Path) -> bytes:
    """The reproducibility bundle of `run_dir` as the bytes of a zip (see the module doc).
    Works on any run folder: what the run has not written is left empty or None."""
    run_dir = Path(run_dir)
    report = build_report(run_dir, group=group_summary(run_dir))
    config, _ = read_config(run_dir)
    csv_text, ids = predictions_csv(run_dir, report.get("labels") or [])
    environment = {
        "seeds": _seeds(config, report),
        "packages": package_versions(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "hardware": report.get("hardware"),
        "device": report.get("device"),
        "compute_dtype": report.get("compute_dtype"),
    }
    members = {
        "README.md": README.format(run_id=run_dir.name),
        "config.json": json.dumps(config, indent=2, ensure_ascii=False) + "\n",
        "environment.json": json.dumps(environment, indent=2, ensure_ascii=False) + "\n",
        "data.json": json.dumps(data_hashes(config, ids), indent=2, ensure_ascii=False) + "\n",
        "predictions.csv": csv_text,
        "methods.md": methods_markdown(report),
        "report.md": render_markdown(report),
        "report.json": json.dumps(rundir.json_safe(report), indent=2, ensure_ascii=False, default=str) + "\n",
    }
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        for name in MEMBERS:
            z.writestr(f"{run_dir.name}/{name}", members[name])
    return out.getvalue()
