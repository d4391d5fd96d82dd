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
from ..text import code_span, markdown_text
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


VARIANTS = {"lora": "LoRA", "rslora": "rsLoRA (scale alpha / sqrt(r))", "dora": "DoRA (weight-decomposed)"}


def controls_rows(r: dict) -> list[tuple[str, str]]:
    """The training controls of the run (report["controls"], "early_stop", "temperature_scaling")
    as (setting, value) rows; [] for reports from before them."""
    c = r.get("controls")
    if not isinstance(c, dict):
        return []
    variant = str(c.get("lora_variant") or "lora")
    weights, applied = c.get("class_weights"), c.get("class_weights_applied")
    if applied:
        setting = weights if isinstance(weights, str) else "given"
        weight_text = f"{setting}: " + ", ".join(f"{k} {v:.3f}" for k, v in applied.items())
    else:
        weight_text = "none"
    patience, stop = c.get("early_stopping_patience"), r.get("early_stop")
    if not patience:
        stopping = "off"
    elif stop:
        stopping = f"patience {patience}: stopped after epoch {stop['epoch']} of {stop['epochs']}, {stop['reason']}"
    else:
        stopping = f"patience {patience}: every epoch trained"
    rows = [
        ("LoRA variant", VARIANTS.get(variant, variant)),
        ("class weights in the loss", weight_text),
        ("early stopping", stopping),
        ("gradient checkpointing", "on" if c.get("gradient_checkpointing") else "off"),
    ]
    ts = r.get("temperature_scaling")
    if ts:
        rows.append(("temperature (fitted on validation, in classifier.json)", f"{ts['temperature']:.3f}"))
    return rows


def class_balance_rows(r: dict) -> list[dict]:
    """Rows of each class in each split (the setup record's label_counts, after dropping and
    sampling) with their share, and the class's weight in the training loss."""
    data, labels = r.get("data") or {}, r.get("labels") or []
    applied = (r.get("controls") or {}).get("class_weights_applied") or {}
    out = []
    for label in labels:
        row = {"class": label}
        for split in ("train", "validation", "test"):
            counts = (data.get(split) or {}).get("label_counts") or {}
            total = sum(counts.values())
            n = counts.get(label, 0)
            row[split] = f"{n} ({100 * n / total:.0f}%)" if total else "n/a"
        row["weight in the loss"] = f"{applied[label]:.3f}" if label in applied else "1"
        out.append(row)
    return out


def temperature_line(r: dict) -> str | None:
    """One sentence on temperature scaling: T, and test ECE and NLL before and after it."""
    ts = r.get("temperature_scaling")
    if not ts:
        return None
    t = ts["test"]
    return (
        f"Temperature scaling: T = {ts['temperature']:.3f}, fitted on the {ts['n_fit']} validation rows "
        f"({ts['method']}); on test (n = {t['n']}) ECE {_fmt(t['ece_before'], '{:.3f}')} -> "
        f"{_fmt(t['ece_after'], '{:.3f}')}, NLL {_fmt(t['nll_before'], '{:.3f}')} -> "
        f"{_fmt(t['nll_after'], '{:.3f}')}; accuracy unchanged (dividing the logits by T keeps the argmax)."
    )


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
    """Markdown table lines of dict rows (the keys are the header) or (name, value) pairs; every
    cell and header through markdown_text (labels, names and texts come from the data)."""
    if not rows:
        return []
    if isinstance(rows[0], tuple):
        rows = [{"item": a, "value": b} for a, b in rows]
    head = list(rows[0])
    return ["| " + " | ".join(map(_cell, head)) + " |", "|---" * len(head) + "|"] + [
        "| " + " | ".join(_cell("" if v is None else v) for v in row.values()) + " |" for row in rows
    ]


def statistics_markdown(r: dict) -> list[str]:
    """The statistics sections of the report as Markdown lines (empty without before/after)."""
    L: list[str] = []
    if r.get("baselines"):
        L += ["", "## Baselines on the same test rows", ""] + markdown_table(baseline_rows(r))
        z = r["baselines"].get("zero_shot") or {}
        if z.get("prompt"):
            prompt = code_span(str(z["prompt"]).replace("\n", "\\n"))
            L += [
                "",
                f"Zero-shot prompt: {prompt}; label words: " + ", ".join(map(code_span, z.get("words") or [])),
            ]
    if r.get("change"):
        L += ["", "## The change and its uncertainty", ""] + markdown_table(change_rows(r["change"]))
        L += ["", markdown_text(r["change"].get("note"), line_start=True)]
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
        if temperature_line(r):
            L += ["", temperature_line(r)]
    if r.get("slices"):
        L += ["", "## Slices (accuracy before and after, Wilson 95% intervals)", ""] + markdown_table(slice_rows(r))
        L += ["", "Many slices are tested at once: some will look different by chance."]
    d = r.get("dynamics")
    if d:
        L += [
            "",
            "## Learning dynamics (test, per epoch)",
            "",
            markdown_text(
                f"Over epochs {', '.join(map(str, d['epochs']))} (0 = before): {d['never_learned']} of {d['n']} "
                f"test examples were never right, {d['unforgettable']} were learned and never forgotten, "
                f"{d['forgotten']} were forgotten at least once (right, then wrong at a later epoch).",
                line_start=True,
            ),
        ]
    if r.get("noise_hints") is not None and r.get("change"):
        L += ["", "## Label-noise hints (hints, not facts)", "", NOISE_NOTE, ""]
        L += markdown_table(hint_rows(r)) or ["No still-failing example is contradicted that confidently."]
    g = r.get("group")
    if g:
        heading = markdown_text(f"group {g.get('group')}: {g.get('finished')} finished")
        L += ["", f"## Several seeds ({heading})", ""] + markdown_table(seed_rows(g))
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


def _t(x) -> str:
    """A value of the report (from the data, the config or the run folder) as inert Markdown."""
    return markdown_text("None" if x is None else x)


def render_markdown(r: dict) -> str:
    """The report as Markdown: the sections of the reference report, generated. Every text that
    comes from the data, the config or the run folder goes through core/text.py (markdown_text,
    code_span), so the file renders it as typed in any Markdown viewer (the Hub's included)."""
    L: list[str] = []
    L.append(f"# QLoRA fine-tuning report: {_t(r.get('model'))} on {_t(r.get('dataset'))}")
    L.append("")
    hardware = describe_hardware(r["hardware"]) if r.get("hardware") else "n/a"
    L.append(
        f"Run {code_span(r['run_id'])} ({_t(r.get('state'))}), preset {code_span(r.get('preset'))}; "
        f"device {_t(device_text(r))}, compute dtype {_t(r.get('compute_dtype'))}; hardware: {_t(hardware)}."
    )
    if r.get("base_model") and r["base_model"] != r.get("model"):
        note = f": {r['base_weights_note']}" if r.get("base_weights_note") else ""
        L += ["", f"Base model {code_span(r['base_model'])}{_t(note)}."]
    if r.get("error"):
        L += ["", f"**Error:** {_t(r['error'])}"]
    if r.get("headline"):
        L += ["", f"**{_t(r['headline'])}**"]
    b, a = r.get("test_before"), r.get("test_after")
    L += [
        "",
        "## Accuracy on the test split",
        "",
        "| model | accuracy | 95% interval (Wilson) | correct / n |",
        "|---|---|---|---|",
    ]
    for name, s in (("before fine-tuning", b), (f"after (best epoch {_t(r.get('best_epoch'))})", a)):
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
            f"total {_secs(r.get('total_s'))}. Throughput {_t(t.get('samples_per_s', 'n/a'))} pairs/s, "
            f"{_t(t.get('tokens_per_s', 'n/a'))} real tokens/s, padding {_pct(t.get('pad_fraction'))}.",
        ]
    controls = controls_rows(r)
    if controls:
        L += ["", "## Training controls", ""] + markdown_table(controls)
        L += ["", "Class balance of each split (rows after dropping and sampling):", ""]
        L += markdown_table(class_balance_rows(r))
    params = parameter_rows(r)
    if params:
        L += ["", "## Parameters", "", "| count | value |", "|---|---|"]
        L += [f"| {_cell(name)} | {_cell(value)} |" for name, value in params]
    L += ["", "## Resources (peaks)", "", "| resource | peak |", "|---|---|"]
    L += [f"| {_cell(name)} | {_cell(value)} |" for name, value in resource_rows(r)]
    speed = speed_rows(r)
    if speed:
        L += ["", "## Speed settings", "", "| setting | value |", "|---|---|"]
        L += [f"| {_cell(name)} | {_cell(value)} |" for name, value in speed]
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
                f"| {_cell(pb['label'])} | {_pct(pb['precision'])} | {_pct(pb['recall'])} | {_pct(pb['f1'])} | "
                f"{_pct(pa['precision'])} | {_pct(pa['recall'])} | {_pct(pa['f1'])} | {pb['support']} |"
            )
        for name, s in (("before", b), ("after", a)):
            L += [
                "",
                f"Confusion matrix {name} (rows gold, columns predicted):",
                "",
                "| gold \\ predicted | " + " | ".join(map(_cell, labels)) + " |",
                "|---" * (len(labels) + 1) + "|",
            ]
            for lab, row in zip(labels, s["confusion"]):
                L.append(f"| {_cell(lab)} | " + " | ".join(_cell(x) for x in row) + " |")
        c = r.get("changes") or {}
        L += [
            "",
            "## What fine-tuning changed",
            "",
            _t(
                f"Fixed {c.get('fixed', 0)}, still failing {c.get('still failing', 0)}, "
                f"regressed {c.get('regressed', 0)}, still right {c.get('still right', 0)}."
            ),
        ]
        for cat, rows in (r.get("change_examples") or {}).items():
            if not rows:
                continue
            L += [
                "",
                f"### {_t(str(cat).capitalize())} (examples)",
                "",
                "| premise | hypothesis | gold | before | after |",
                "|---|---|---|---|---|",
            ]
            for e in rows:
                prem = e.get("premise") or e.get("text", "")
                L.append(
                    f"| {_cell(prem)} | {_cell(e.get('hypothesis', ''))} | {_cell(e['gold'])} | "
                    f"{_cell(e['pred_before'])} | {_cell(e['pred_after'])} |"
                )
        if r.get("by_tag") and not r.get("slices"):
            L += ["", "## By phenomenon tag", "", "| tag | n | before | after |", "|---|---|---|---|"]
            for t in r["by_tag"]:
                before, after = _pct(t["accuracy_before"]), _pct(t["accuracy_after"])
                L.append(f"| {_cell(t['tag'])} | {_cell(t['n'])} | {before} | {after} |")
    return "\n".join(L) + "\n"


def _cell(s) -> str:
    """One table cell: inert Markdown on one line, its pipes escaped (markdown_text does both)."""
    return markdown_text(s)


# The Markdown render_markdown writes, inline: a backslash escape, a run of backticks (a code span
# when the same run closes it, CommonMark 6.1) or ** (bold).
_INLINE_TOKEN = re.compile(r"\\([!-/:-@\[-`{-~])|(`+)|\*\*")


def _inline_html(text: str) -> str:
    """One line of render_markdown's Markdown as HTML: escapes resolved, code spans and bold made
    elements, everything else escaped (nothing in the text can become markup)."""
    out, i, bold = [], 0, False
    while (m := _INLINE_TOKEN.search(text, i)) is not None:
        out.append(html_lib.escape(text[i : m.start()]))
        i = m.end()
        if m.group(1) is not None:
            out.append(html_lib.escape(m.group(1)))
        elif m.group(2):
            ticks = m.group(2)
            close = re.compile(rf"(?<!`){ticks}(?!`)").search(text, i)
            if close is None:
                out.append(ticks)
                continue
            code = text[i : close.start()]
            if len(code) > 2 and code.startswith(" ") and code.endswith(" ") and code.strip():
                code = code[1:-1]
            out.append(f"<code>{html_lib.escape(code)}</code>")
            i = close.end()
        else:
            out.append("</b>" if bold else "<b>")
            bold = not bold
    out.append(html_lib.escape(text[i:]))
    if bold:
        out.append("</b>")
    return "".join(out)


def _table_cells(line: str) -> list[str]:
    """The cells of one Markdown table row, split at the pipes that are not escaped."""
    cells, cell, i = [], [], 0
    inner = line.strip()[1:-1] if line.strip().endswith("|") else line.strip()[1:]
    while i < len(inner):
        if inner[i] == "\\" and i + 1 < len(inner):
            cell.append(inner[i : i + 2])
            i += 2
            continue
        if inner[i] == "|":
            cells.append("".join(cell).strip())
            cell = []
        else:
            cell.append(inner[i])
        i += 1
    cells.append("".join(cell).strip())
    return cells


def render_html(r: dict) -> str:
    """A self-contained HTML page of the report (no scripts, no external files), from
    render_markdown's Markdown: its own headings, tables, bold and code become elements; every text
    from the data is escaped."""
    md = render_markdown(r)
    body = []
    in_table = False
    for line in md.splitlines():
        if line.startswith("|"):
            if set(line.replace("|", "").strip()) <= {"-"}:
                continue
            cells = [_inline_html(c) for c in _table_cells(line)]
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
        mark, tag = next(
            (m, t) for m, t in (("### ", "h3"), ("## ", "h2"), ("# ", "h1"), ("", "p")) if line.startswith(m)
        )
        if line.strip():
            body.append(f"<{tag}>{_inline_html(line[len(mark) :])}</{tag}>")
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
