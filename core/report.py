"""The report of a run, rebuilt from its folder alone: numbers, then Markdown or HTML.

    report = build_report(run_dir)        # a dict (also saved as report.json at the end of a run)
    print(render_markdown(report))        # python -m core report RUN_DIR
    html = render_html(report)            # self-contained, for download from the app
"""

from __future__ import annotations

import html as html_lib
import math
import re
from pathlib import Path

import numpy as np

from .runs import rundir

CATEGORIES = ("fixed", "still failing", "regressed", "still right")


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k/n (honest for small n, unlike +-1.96*se)."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def confusion(rows: list[dict], labels: list[str]) -> list[list[int]]:
    """Confusion matrix: rows = gold label, columns = predicted label."""
    m = [[0] * len(labels) for _ in labels]
    index = {l: i for i, l in enumerate(labels)}
    for r in rows:
        m[index[r["gold"]]][index[r["pred"]]] += 1
    return m


def per_class(matrix: list[list[int]], labels: list[str]) -> list[dict]:
    m = np.array(matrix)
    out = []
    for i, label in enumerate(labels):
        tp = int(m[i, i])
        pred, gold = int(m[:, i].sum()), int(m[i, :].sum())
        p = tp / pred if pred else 0.0
        r = tp / gold if gold else 0.0
        out.append({"label": label, "precision": p, "recall": r,
                    "f1": 2 * p * r / (p + r) if p + r else 0.0, "support": gold})
    return out


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
        category = ("fixed" if not b["correct"] and a["correct"] else
                    "still failing" if not b["correct"] else
                    "regressed" if not a["correct"] else "still right")
        row = {k: b[k] for k in ("id", "premise", "hypothesis", "text", "tag") if k in b}
        row.update(gold=b["gold"], pred_before=b["pred"], pred_after=a["pred"], probs_before=b["probs"],
                   probs_after=a["probs"], category=category,
                   gold_prob_before=b["probs"][gi], gold_prob_after=a["probs"][gi],
                   gold_prob_change=round(a["probs"][gi] - b["probs"][gi], 5))
        rows.append(row)
    return rows


def load_comparison(run_dir: Path, name: str = "test") -> tuple[list[dict], list[str]]:
    """compare_predictions for predictions/<name>_before/after.jsonl of a run (empty if missing)."""
    run_dir = Path(run_dir)
    config = rundir.read_json(run_dir / rundir.CONFIG, {}) or {}
    labels = (config.get("data") or {}).get("labels") or []
    before = rundir.read_jsonl(run_dir / rundir.PREDICTIONS / f"{name}_before.jsonl")
    after = rundir.read_jsonl(run_dir / rundir.PREDICTIONS / f"{name}_after.jsonl")
    if not before or not after:
        return [], labels
    return compare_predictions(before, after, labels), labels


def _summary(rows: list[dict], labels: list[str]) -> dict:
    k = sum(r["correct"] for r in rows)
    n = len(rows)
    lo, hi = wilson_interval(k, n)
    m = confusion(rows, labels)
    return {"n": n, "correct": k, "accuracy": k / n if n else None, "ci95": [lo, hi],
            "confusion": m, "per_class": per_class(m, labels)}


def build_report(run_dir: Path) -> dict:
    """Everything the report shows, from the files of `run_dir` (works on unfinished runs too)."""
    run_dir = Path(run_dir)
    config = rundir.read_json(run_dir / rundir.CONFIG, {}) or {}
    status = rundir.read_status(run_dir)
    metrics = rundir.read_metrics(run_dir)
    resources = rundir.read_jsonl(run_dir / rundir.RESOURCES)
    setup = metrics["setup"][0] if metrics["setup"] else {}
    labels = setup.get("labels") or (config.get("data") or {}).get("labels") or []
    steps, epochs, evals = metrics["step"], metrics["epoch"], metrics["eval"]
    end = metrics["end"][-1] if metrics["end"] else {}

    report: dict = {
        "run_id": run_dir.name,
        "state": status.get("state"),
        "error": status.get("error"),
        "preset": config.get("preset"),
        "model": (config.get("model") or {}).get("name"),
        "dataset": _dataset_name(config.get("data") or {}),
        "labels": labels,
        "config": config,
        "created_at": status.get("created_at"),
        "finished_at": status.get("finished_at"),
        "device": setup.get("device"),
        "compute_dtype": setup.get("compute_dtype"),
        "hardware": setup.get("hardware"),
        "params": setup.get("params"),
        "data": setup.get("data"),
        "target_modules": setup.get("target_modules"),
        "speed": setup.get("speed") or config.get("speed"),
        "speedups": setup.get("speedups"),
        "mean_tokens": setup.get("mean_tokens"),
        "load_s": setup.get("load_s"),
        "epochs": [{k: e.get(k) for k in ("epoch", "train_loss", "val_accuracy", "val_loss", "epoch_s")}
                   for e in epochs],
        "best_epoch": end.get("best_epoch") if end.get("state") == "done" else None,
        "total_s": end.get("total_s"),
        "train_s": round(sum(e["epoch_s"] for e in epochs), 3) if epochs else None,
        "eval_s": round(sum(e.get("seconds") or 0 for e in evals), 3) if evals else None,
        "throughput": throughput(steps),
        "evals": evals,
    }
    peaks: dict = {}
    for rec in resources:
        for k, v in rec.items():
            if k != "t" and isinstance(v, (int, float)):
                peaks[k] = max(peaks.get(k, 0), v)
    for k, v in (end.get("peaks") or {}).items():
        peaks[k] = max(peaks.get(k, 0), v)
    peaks["checkpoints_mb"] = round(rundir.dir_size(run_dir / rundir.CHECKPOINTS) / 2**20, 2)
    report["resources"] = peaks

    before = rundir.read_jsonl(run_dir / rundir.PREDICTIONS / "test_before.jsonl")
    after = rundir.read_jsonl(run_dir / rundir.PREDICTIONS / "test_after.jsonl")
    report["test_before"] = _summary(before, labels) if before else None
    report["test_after"] = _summary(after, labels) if after else None
    if before and after:
        rows = compare_predictions(before, after, labels)
        report["changes"] = {c: sum(r["category"] == c for r in rows) for c in CATEGORIES}
        examples = {}
        for c in ("fixed", "regressed", "still failing"):
            chosen = sorted((r for r in rows if r["category"] == c), key=lambda r: -abs(r["gold_prob_change"]))[:5]
            examples[c] = [{k: r.get(k) for k in ("id", "premise", "hypothesis", "text", "tag", "gold",
                                                   "pred_before", "pred_after", "gold_prob_change") if k in r}
                           for r in chosen]
        report["change_examples"] = examples
        report["by_tag"] = _by_tag(rows)
    return report


def _dataset_name(data: dict) -> str:
    files = [Path(data[s]).name for s in ("train", "validation", "test") if data.get(s)]
    if files:
        return "files: " + ", ".join(files)
    return data.get("source") or ""


def throughput(steps: list[dict]) -> dict | None:
    """Pairs/s, real tokens/s and MFU over `steps` (step records), each weighted by step time;
    the report takes every step, the live view the last few. MFU is None where it was not logged
    (CPU, unknown GPU); pad_fraction where the records carry it."""
    if not steps:
        return None
    secs = sum(s["step_s"] for s in steps)
    rows = sum(s["rows"] for s in steps)
    tokens = sum(s["tokens_per_s"] * s["step_s"] for s in steps)
    timed = [s for s in steps if s.get("mfu") is not None]
    out = {"samples_per_s": round(rows / secs, 2), "tokens_per_s": round(tokens / secs, 1),
           "mfu": round(sum(s["mfu"] * s["step_s"] for s in timed) / sum(s["step_s"] for s in timed), 4)
           if timed else None,
           "steps": len(steps), "mean_step_s": round(secs / len(steps), 4)}
    if all("pad_fraction" in s for s in steps):
        out["pad_fraction"] = round(float(np.mean([s["pad_fraction"] for s in steps])), 4)
    return out


def _by_tag(rows: list[dict]) -> list[dict]:
    tags = sorted({r.get("tag") for r in rows if r.get("tag")})
    out = []
    for t in tags:
        sub = [r for r in rows if r.get("tag") == t]
        out.append({"tag": t, "n": len(sub),
                    "accuracy_before": sum(r["pred_before"] == r["gold"] for r in sub) / len(sub),
                    "accuracy_after": sum(r["pred_after"] == r["gold"] for r in sub) / len(sub)})
    return out


# --- rendering ----------------------------------------------------------------------------------

def _pct(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def _num(x) -> str:
    return "n/a" if x is None else f"{x:,}"


def _secs(x) -> str:
    return "n/a" if x is None else f"{x:.1f} s"


def _gb(x) -> str:
    return "n/a" if x is None else f"{x:.2f} GiB"


def _fmt(x, fmt: str) -> str:
    return "n/a" if x is None else fmt.format(x)


def parameter_rows(report: dict) -> list[tuple[str, str]]:
    """The rows (count, value) of the report's Parameters table, formatted; [] when the run has
    no parameter counts yet. The Markdown/HTML report and the app's Report page both show these."""
    p = report.get("params")
    if not p:
        return []
    total, trainable = p.get("total"), p.get("trainable")
    share = f" ({100 * trainable / total:.2f}%)" if trainable is not None and total else ""
    return [("total (4-bit weights at full size)", _num(total)),
            ("packed 4-bit (naive numel sum)", _num(p.get("packed"))),
            ("trainable (LoRA + head)", _num(trainable) + share)]


def resource_rows(report: dict) -> list[tuple[str, str]]:
    """The rows (resource, peak) of the report's Resources (peaks) table, formatted; a peak that
    was never measured (no GPU, no sample yet) reads n/a. Shared by the Markdown/HTML report and
    the app's Report page."""
    res = report.get("resources") or {}
    return [("GPU memory (torch allocated)", _gb(res.get("torch_peak_gb"))),
            ("GPU memory (device, NVML)", _gb(res.get("gpu_mem_gb"))),
            ("GPU utilisation", _fmt(res.get("gpu_util"), "{:.0f}%")),
            ("process RAM (RSS)", _gb(res.get("rss_gb"))),
            ("CPU (100% = one core)", _fmt(res.get("cpu_percent"), "{:.0f}%")),
            ("disk used by checkpoints", _fmt(res.get("checkpoints_mb"), "{:.1f} MB"))]


def speed_rows(report: dict) -> list[tuple[str, str]]:
    """The run's speed settings (config.SpeedConfig as it ran; None reads "auto") and the
    model changes they made, for the report's settings section; [] for runs that predate them."""
    speed = report.get("speed") or {}
    rows = [(name, "auto" if value is None else str(value).lower() if isinstance(value, bool) else str(value))
            for name, value in speed.items()]
    if speed and report.get("speedups") is not None:
        rows.append(("applied", "; ".join(report["speedups"]) or "none"))
    return rows


def render_markdown(r: dict) -> str:
    """The report as Markdown: the sections of the reference report, generated."""
    from .runs.resources import describe_hardware
    L: list[str] = []
    L.append(f"# QLoRA fine-tuning report: {r.get('model')} on {r.get('dataset')}")
    L.append("")
    L.append(f"Run `{r['run_id']}` ({r.get('state')}), preset `{r.get('preset')}`; "
             f"device {r.get('device')}, compute dtype {r.get('compute_dtype')}; "
             f"hardware: {describe_hardware(r['hardware']) if r.get('hardware') else 'n/a'}.")
    if r.get("error"):
        L += ["", f"**Error:** {r['error']}"]
    b, a = r.get("test_before"), r.get("test_after")
    L += ["", "## Accuracy on the test split", "",
          "| model | accuracy | 95% interval (Wilson) | correct / n |", "|---|---|---|---|"]
    for name, s in (("before fine-tuning", b), (f"after (best epoch {r.get('best_epoch')})", a)):
        if s:
            L.append(f"| {name} | {_pct(s['accuracy'])} | {_pct(s['ci95'][0])} to {_pct(s['ci95'][1])} "
                     f"| {s['correct']} / {s['n']} |")
    if b and a:
        L += ["", f"Change: {100 * (a['accuracy'] - b['accuracy']):+.1f} points on n = {a['n']}."]
    if r.get("epochs"):
        L += ["", "## Training", "", "| epoch | train loss | validation accuracy | validation loss | time |",
              "|---|---|---|---|---|"]
        for e in r["epochs"]:
            L.append(f"| {e['epoch']} | {e['train_loss']:.4f} | {_pct(e['val_accuracy'])} | "
                     f"{e['val_loss']:.4f} | {_secs(e['epoch_s'])} |")
        t = r.get("throughput") or {}
        L += ["", f"Training time {_secs(r.get('train_s'))} ({_secs(r['train_s'] / len(r['epochs']))} per epoch), "
              f"evaluation {_secs(r.get('eval_s'))}, model load {_secs(r.get('load_s'))}, "
              f"total {_secs(r.get('total_s'))}. Throughput {t.get('samples_per_s', 'n/a')} pairs/s, "
              f"{t.get('tokens_per_s', 'n/a')} real tokens/s, padding {_pct(t.get('pad_fraction'))}."]
    params = parameter_rows(r)
    if params:
        L += ["", "## Parameters", "", "| count | value |", "|---|---|"]
        L += [f"| {name} | {value} |" for name, value in params]
    L += ["", "## Resources (peaks)", "", "| resource | peak |", "|---|---|"]
    L += [f"| {name} | {value} |" for name, value in resource_rows(r)]
    speed = speed_rows(r)
    if speed:
        L += ["", "## Speed settings", "", "| setting | value |", "|---|---|"]
        L += [f"| {name} | {value} |" for name, value in speed]
    if b and a:
        labels = r["labels"]
        L += ["", "## Per class (test)", "", "| class | precision before | recall before | F1 before | "
              "precision after | recall after | F1 after | n |", "|---|---|---|---|---|---|---|---|"]
        for pb, pa in zip(b["per_class"], a["per_class"]):
            L.append(f"| {pb['label']} | {_pct(pb['precision'])} | {_pct(pb['recall'])} | {_pct(pb['f1'])} | "
                     f"{_pct(pa['precision'])} | {_pct(pa['recall'])} | {_pct(pa['f1'])} | {pb['support']} |")
        for name, s in (("before", b), ("after", a)):
            L += ["", f"Confusion matrix {name} (rows gold, columns predicted):", "",
                  "| gold \\ predicted | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
            for lab, row in zip(labels, s["confusion"]):
                L.append(f"| {lab} | " + " | ".join(str(x) for x in row) + " |")
        c = r.get("changes") or {}
        L += ["", "## What fine-tuning changed", "",
              f"Fixed {c.get('fixed', 0)}, still failing {c.get('still failing', 0)}, "
              f"regressed {c.get('regressed', 0)}, still right {c.get('still right', 0)}."]
        for cat, rows in (r.get("change_examples") or {}).items():
            if not rows:
                continue
            L += ["", f"### {cat.capitalize()} (examples)", "", "| premise | hypothesis | gold | before | after |",
                  "|---|---|---|---|---|"]
            for e in rows:
                prem = e.get("premise") or e.get("text", "")
                L.append(f"| {_cell(prem)} | {_cell(e.get('hypothesis', ''))} | {e['gold']} | "
                         f"{e['pred_before']} | {e['pred_after']} |")
        if r.get("by_tag"):
            L += ["", "## By phenomenon tag", "", "| tag | n | before | after |", "|---|---|---|---|"]
            for t in r["by_tag"]:
                L.append(f"| {t['tag']} | {t['n']} | {_pct(t['accuracy_before'])} | {_pct(t['accuracy_after'])} |")
    return "\n".join(L) + "\n"


def _cell(s: str) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def render_html(r: dict) -> str:
    """A self-contained HTML page of the report (no scripts, no external files)."""
    md = render_markdown(r)
    body = []
    in_table = False
    for line in md.splitlines():
        if line.startswith("|"):
            cells = [html_lib.escape(c.strip().replace("\\|", "|")) for c in line.strip("|").split(" | ")]
            if set(line.replace("|", "").strip()) <= {"-"}:
                continue
            if not in_table:
                body.append("<table>")
                in_table = True
                body.append("<tr>" + "".join(f"<th>{c}</th>" for c in cells) + "</tr>")
            else:
                body.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
            continue
        if in_table:
            body.append("</table>")
            in_table = False
        text = html_lib.escape(line)
        text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)
        text = re.sub(r"`(.+?)`", r"<code>\1</code>", text)
        if line.startswith("### "):
            body.append(f"<h3>{text[4:]}</h3>")
        elif line.startswith("## "):
            body.append(f"<h2>{text[3:]}</h2>")
        elif line.startswith("# "):
            body.append(f"<h1>{text[2:]}</h1>")
        elif line.strip():
            body.append(f"<p>{text}</p>")
    if in_table:
        body.append("</table>")
    style = ("body{font-family:system-ui,sans-serif;max-width:960px;margin:2em auto;color:#222;line-height:1.45}"
             "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:4px 8px;"
             "text-align:left}th{background:#f3f4f6}code{background:#f3f4f6;padding:0 3px}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html_lib.escape(r['run_id'])}"
            f"</title><style>{style}</style></head><body>{''.join(body)}</body></html>\n")
