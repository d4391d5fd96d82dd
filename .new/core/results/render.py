"""A report (build_report's dict, or a parsed report.json) as Markdown or as self-contained HTML,
and the formatted rows of its tables that the app's Report page shows too.

    print(render_markdown(report))        # python -m core report RUN_DIR
    html = render_html(report)            # for download from the app
"""

from __future__ import annotations

import html as html_lib
import math
import re

from ..runs.resources import describe_hardware
from .sections import NOISE_NOTE, format_p


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
    return [
        ("total (4-bit weights at full size)", _num(total)),
        ("packed 4-bit (naive numel sum)", _num(p.get("packed"))),
        ("trainable (LoRA + head)", _num(trainable) + share),
    ]


def resource_rows(report: dict) -> list[tuple[str, str]]:
    """The rows (resource, peak) of the report's Resources (peaks) table, formatted; a peak that
    was never measured (no GPU, no sample yet) reads n/a. Shared by the Markdown/HTML report and
    the app's Report page."""
    res = report.get("resources") or {}
    return [
        ("GPU memory (torch allocated)", _gb(res.get("torch_peak_gb"))),
        ("GPU memory (device, NVML)", _gb(res.get("gpu_mem_gb"))),
        ("GPU utilisation", _fmt(res.get("gpu_util"), "{:.0f}%")),
        ("process RAM (RSS)", _gb(res.get("rss_gb"))),
        ("CPU (100% = one core)", _fmt(res.get("cpu_percent"), "{:.0f}%")),
        ("disk used by checkpoints", _fmt(res.get("checkpoints_mb"), "{:.1f} MB")),
    ]


def speed_rows(report: dict) -> list[tuple[str, str]]:
    """The run's speed settings (config.SpeedConfig as it ran; None reads "auto") and the
    model changes they made, for the report's settings section; [] for runs that predate them."""
    speed = report.get("speed") or {}
    rows = [
        (name, "auto" if value is None else str(value).lower() if isinstance(value, bool) else str(value))
        for name, value in speed.items()
    ]
    if speed and report.get("speedups") is not None:
        rows.append(("applied", "; ".join(report["speedups"]) or "none"))
    return rows


def _ci(ci, signed: bool = False) -> str:
    """A 95% interval of fractions as "[27.6, 40.5]" (percent or points; "[+37.3, +52.9]" signed)."""
    if not ci or ci[0] is None or ci[1] is None:
        return "n/a"
    f = "{:+.1f}" if signed else "{:.1f}"
    return f"[{f.format(100 * ci[0])}, {f.format(100 * ci[1])}]"


def _points(x) -> str:
    return "n/a" if x is None else f"{100 * x:+.1f} points"


def baseline_rows(r: dict) -> list[dict]:
    """The baselines and the fine-tuned model on the same test rows (report["baselines"]):
    model, accuracy, Wilson 95% interval, correct / n, what it is; a baseline that does not exist
    reads "none" with the reason in "what"."""
    rows = []
    for key in ("random_head", "zero_shot", "fine_tuned"):
        s = (r.get("baselines") or {}).get(key)
        if not s:
            continue
        if s.get("why_not"):
            rows.append(
                {
                    "model": s["name"],
                    "accuracy": "none",
                    "95% interval (Wilson)": "",
                    "correct / n": "",
                    "what": f"no such baseline: {s['why_not']}",
                }
            )
        else:
            rows.append(
                {
                    "model": s["name"],
                    "accuracy": _pct(s["accuracy"]),
                    "95% interval (Wilson)": _ci(s["ci95"]),
                    "correct / n": f"{s['k']} / {s['n']}",
                    "what": s.get("what") or "",
                }
            )
    return rows


def change_rows(ch: dict | None) -> list[tuple[str, str]]:
    """The accuracy change (report["change"], or a baseline's "change") as (item, value) rows."""
    if not ch or ch.get("delta") is None:
        return []
    return [
        ("change in accuracy", _points(ch["delta"])),
        ("95% interval (paired bootstrap)", _ci(ch["ci95"], signed=True) + " points"),
        ("discordant pairs", f"{ch['c']} fixed (wrong -> right), {ch['b']} regressed (right -> wrong)"),
        ("McNemar exact p (two-sided)", format_p(ch["p"])),
        ("verdict", ch["verdict"]),
        (
            f"smallest change this n = {ch['n']} could detect (80% power)",
            "none detectable" if ch.get("mdc") is None else _points(ch["mdc"]),
        ),
    ]


def per_class_change_rows(r: dict) -> list[dict]:
    """Per-class F1 before/after and its change with the paired bootstrap 95% interval, macro last."""
    pc = r.get("per_class_change")
    if not pc:
        return []

    def row(c: dict, name: str, n: int) -> dict:
        return {
            "class": name,
            "n": n,
            "F1 before": _pct(c["f1_before"]),
            "F1 after": _pct(c["f1_after"]),
            "change": _points(c["change"]),
            "95% interval (bootstrap)": _ci(c["ci95"], signed=True),
        }

    return [row(c, c["label"], c["support"]) for c in pc["classes"]] + [row(pc["macro"], "macro average", pc["n"])]


def slice_rows(r: dict) -> list[dict]:
    """Accuracy before/after per slice (report["slices"]) with n and Wilson 95% intervals."""
    return [
        {
            "group": s["group"],
            "slice": s["slice"].split(": ", 1)[-1],
            "n": s["n"],
            "before": _pct(s["accuracy_before"]),
            "before 95%": _ci(s["ci95_before"]),
            "after": _pct(s["accuracy_after"]),
            "after 95%": _ci(s["ci95_after"]),
            "change": _points(s["change"]),
        }
        for s in r.get("slices") or []
    ]


def hint_rows(r: dict) -> list[dict]:
    """The label-noise hints (report["noise_hints"]): hints for a human to re-read, not facts."""
    return [
        {
            "id": h["id"],
            "premise": h.get("premise") or h.get("text", ""),
            "hypothesis": h.get("hypothesis", ""),
            "given label": h["given"],
            "model says": h["model_label"],
            "confidence": f"{h['confidence']:.2f}",
            "epochs checked": "after only" if h.get("consistent_epochs") is None else str(h["consistent_epochs"]),
        }
        for h in r.get("noise_hints") or []
    ]


def seed_rows(g: dict | None) -> list[dict]:
    """mean +- std (min-max, n seeds) of each headline number of a group of seeds."""
    names = (
        ("accuracy_before", "test accuracy before"),
        ("accuracy_after", "test accuracy after"),
        ("change", "change (points)"),
        ("val_accuracy", "best validation accuracy"),
    )
    rows = []
    for key, name in names:
        s = (g or {}).get(key)
        if s and s.get("mean") is not None:
            std = "n/a" if s.get("std") is None else f"{100 * s['std']:.1f}"
            rows.append(
                {
                    "number": name,
                    "mean": f"{100 * s['mean']:.1f}",
                    "std": std,
                    "min-max": f"{100 * s['min']:.1f} - {100 * s['max']:.1f}",
                    "seeds": s["n"],
                }
            )
    return rows


def seed_run_rows(g: dict | None) -> list[dict]:
    """Which seed each run of a group (and its selected checkpoint) came from."""
    return [
        {
            "run": x["run_id"],
            "seed": x.get("seed"),
            "state": x.get("state"),
            "best epoch": x.get("best_epoch"),
            "checkpoint": x.get("checkpoint") or "",
            "before": _pct(x.get("accuracy_before")),
            "after": _pct(x.get("accuracy_after")),
        }
        for x in (g or {}).get("runs") or []
    ]


def markdown_table(rows: list) -> list[str]:
    """Markdown table lines of dict rows (the keys are the header) or (name, value) pairs."""
    if not rows:
        return []
    if isinstance(rows[0], tuple):
        rows = [{"item": a, "value": b} for a, b in rows]
    head = list(rows[0])
    return ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"] + [
        "| " + " | ".join(_cell("" if v is None else v) for v in row.values()) + " |" for row in rows
    ]


def statistics_markdown(r: dict) -> list[str]:
    """The statistics sections of the report as Markdown lines (empty without before/after)."""
    L: list[str] = []
    if r.get("baselines"):
        L += ["", "## Baselines on the same test rows", ""] + markdown_table(baseline_rows(r))
        z = r["baselines"].get("zero_shot") or {}
        if z.get("prompt"):
            prompt = _cell(z["prompt"].replace("\n", "\\n")).replace("`", "'")
            L += [
                "",
                f"Zero-shot prompt: `{prompt}`; label words: " + ", ".join(f"`{w}`" for w in z.get("words") or []),
            ]
    if r.get("change"):
        L += ["", "## The change and its uncertainty", ""] + markdown_table(change_rows(r["change"]))
        L += ["", r["change"].get("note") or ""]
        z = (r.get("baselines") or {}).get("zero_shot") or {}
        if z.get("change"):
            L += ["", "Zero-shot baseline -> fine-tuned:", ""] + markdown_table(change_rows(z["change"]))
    if r.get("per_class_change"):
        L += ["", "## Per-class F1 change", ""] + markdown_table(per_class_change_rows(r))
    t = r.get("transitions")
    if t:
        cells = t["cells"]
        L += ["", "## Transitions", "", "Right/wrong before (rows) and after (columns):", ""]
        L += markdown_table(
            [
                {"before \\ after": "right", "right": cells.get("still right", 0), "wrong": cells.get("regressed", 0)},
                {"before \\ after": "wrong", "right": cells.get("fixed", 0), "wrong": cells.get("still failing", 0)},
            ]
        )
        L += ["", "Predicted label before (rows) -> after (columns):", ""]
        L += markdown_table(
            [{"before \\ after": lab, **dict(zip(t["labels"], row))} for lab, row in zip(t["labels"], t["counts"])]
        )
    cal = r.get("calibration")
    if cal:
        L += [
            "",
            "## Calibration",
            "",
            "Expected calibration error (10 equal-width confidence bins; lower is better):",
            "",
        ]
        L += markdown_table(
            [
                {"model": name.replace("_", "-"), "ECE": _fmt(c.get("ece"), "{:.3f}"), "n": c["n"]}
                for name, c in cal.items()
            ]
        )
    if r.get("slices"):
        L += ["", "## Slices (accuracy before and after, Wilson 95% intervals)", ""] + markdown_table(slice_rows(r))
        L += ["", "Many slices are tested at once: some will look different by chance."]
    d = r.get("dynamics")
    if d:
        L += [
            "",
            "## Learning dynamics (test, per epoch)",
            "",
            f"Over epochs {', '.join(map(str, d['epochs']))} (0 = before): {d['never_learned']} of {d['n']} test "
            f"examples were never right, {d['unforgettable']} were learned and never forgotten, {d['forgotten']} "
            "were forgotten at least once (right, then wrong at a later epoch).",
        ]
    if r.get("noise_hints") is not None and r.get("change"):
        L += ["", "## Label-noise hints (hints, not facts)", "", NOISE_NOTE, ""]
        L += markdown_table(hint_rows(r)) or ["No still-failing example is contradicted that confidently."]
    g = r.get("group")
    if g:
        L += ["", f"## Several seeds (group {g.get('group')}: {g.get('finished')} finished)", ""] + markdown_table(
            seed_rows(g)
        )
        if g.get("agreement") is not None:
            L += [
                "",
                f"Per-example agreement: every seed's fine-tuned model predicts the same label on "
                f"{_pct(g['agreement'])} of {g['agreement_n']} test examples.",
            ]
        L += ["", ""] + markdown_table(seed_run_rows(g))
    return L


def device_text(r: dict) -> str:
    """The report's device, with the number of processes of a data-parallel run."""
    n = r.get("world_size")
    many = f" x {n} processes (data-parallel)" if isinstance(n, int) and n > 1 else ""
    return f"{r.get('device') or 'n/a'}{many}"


def render_markdown(r: dict) -> str:
    """The report as Markdown: the sections of the reference report, generated."""
    L: list[str] = []
    L.append(f"# QLoRA fine-tuning report: {r.get('model')} on {r.get('dataset')}")
    L.append("")
    L.append(
        f"Run `{r['run_id']}` ({r.get('state')}), preset `{r.get('preset')}`; "
        f"device {device_text(r)}, compute dtype {r.get('compute_dtype')}; "
        f"hardware: {describe_hardware(r['hardware']) if r.get('hardware') else 'n/a'}."
    )
    if r.get("error"):
        L += ["", f"**Error:** {r['error']}"]
    if r.get("headline"):
        L += ["", f"**{r['headline']}**"]
    b, a = r.get("test_before"), r.get("test_after")
    L += [
        "",
        "## Accuracy on the test split",
        "",
        "| model | accuracy | 95% interval (Wilson) | correct / n |",
        "|---|---|---|---|",
    ]
    for name, s in (("before fine-tuning", b), (f"after (best epoch {r.get('best_epoch')})", a)):
        if s:
            L.append(
                f"| {name} | {_pct(s['accuracy'])} | {_pct(s['ci95'][0])} to {_pct(s['ci95'][1])} "
                f"| {s['correct']} / {s['n']} |"
            )
    if b and a and not r.get("change"):  # a report.json from before the statistics sections
        L += ["", f"Change: {100 * (a['accuracy'] - b['accuracy']):+.1f} points on n = {a['n']}."]
    L += statistics_markdown(r)
    if r.get("epochs"):
        L += [
            "",
            "## Training",
            "",
            "| epoch | train loss | validation accuracy | validation loss | time |",
            "|---|---|---|---|---|",
        ]
        for e in r["epochs"]:
            L.append(
                f"| {e['epoch']} | {_fmt(e.get('train_loss'), '{:.4f}')} | {_pct(e.get('val_accuracy'))} | "
                f"{_fmt(e.get('val_loss'), '{:.4f}')} | {_secs(e.get('epoch_s'))} |"
            )
        t = r.get("throughput") or {}
        L += [
            "",
            f"Training time {_secs(r.get('train_s'))} ({_secs(r['train_s'] / len(r['epochs']))} per epoch), "
            f"evaluation {_secs(r.get('eval_s'))}, model load {_secs(r.get('load_s'))}, "
            f"total {_secs(r.get('total_s'))}. Throughput {t.get('samples_per_s', 'n/a')} pairs/s, "
            f"{t.get('tokens_per_s', 'n/a')} real tokens/s, padding {_pct(t.get('pad_fraction'))}.",
        ]
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
        L += [
            "",
            "## Per class (test)",
            "",
            "| class | precision before | recall before | F1 before | precision after | recall after | F1 after | n |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for pb, pa in zip(b["per_class"], a["per_class"]):
            L.append(
                f"| {pb['label']} | {_pct(pb['precision'])} | {_pct(pb['recall'])} | {_pct(pb['f1'])} | "
                f"{_pct(pa['precision'])} | {_pct(pa['recall'])} | {_pct(pa['f1'])} | {pb['support']} |"
            )
        for name, s in (("before", b), ("after", a)):
            L += [
                "",
                f"Confusion matrix {name} (rows gold, columns predicted):",
                "",
                "| gold \\ predicted | " + " | ".join(labels) + " |",
                "|---" * (len(labels) + 1) + "|",
            ]
            for lab, row in zip(labels, s["confusion"]):
                L.append(f"| {lab} | " + " | ".join(str(x) for x in row) + " |")
        c = r.get("changes") or {}
        L += [
            "",
            "## What fine-tuning changed",
            "",
            f"Fixed {c.get('fixed', 0)}, still failing {c.get('still failing', 0)}, "
            f"regressed {c.get('regressed', 0)}, still right {c.get('still right', 0)}.",
        ]
        for cat, rows in (r.get("change_examples") or {}).items():
            if not rows:
                continue
            L += [
                "",
                f"### {cat.capitalize()} (examples)",
                "",
                "| premise | hypothesis | gold | before | after |",
                "|---|---|---|---|---|",
            ]
            for e in rows:
                prem = e.get("premise") or e.get("text", "")
                L.append(
                    f"| {_cell(prem)} | {_cell(e.get('hypothesis', ''))} | {e['gold']} | "
                    f"{e['pred_before']} | {e['pred_after']} |"
                )
        if r.get("by_tag") and not r.get("slices"):
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
    style = (
        "body{font-family:system-ui,sans-serif;max-width:960px;margin:2em auto;color:#222;line-height:1.45}"
        "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:4px 8px;"
        "text-align:left}th{background:#f3f4f6}code{background:#f3f4f6;padding:0 3px}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html_lib.escape(r['run_id'])}"
        f"</title><style>{style}</style></head><body>{''.join(body)}</body></html>\n"
    )
