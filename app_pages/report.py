"""Report: every section of the reference report, generated from the selected run's folder,
with the statistics of the change (baselines, intervals, McNemar, transitions, calibration,
slices, label-noise hints, seeds), downloads as Markdown, HTML and a reproducibility bundle."""

import pandas as pd
import streamlit as st

from app_pages import ui
from core import access, share
from core.results import compare
from core.results.bundle import build_bundle
from core.results.render import (
    baseline_rows,
    change_rows,
    class_balance_rows,
    controls_rows,
    device_text,
    hint_rows,
    parameter_rows,
    per_class_change_rows,
    render_html,
    render_markdown,
    resource_rows,
    seed_rows,
    seed_run_rows,
    slice_rows,
    speed_rows,
)
from core.results.report import CATEGORIES, build_report, load_report
from core.results.sections import NOISE_NOTE
from core.results.seeds import group_summary
from core.runs import watch
from core.runs.resources import describe_hardware
from core.runs.rundir import ADAPTER_CONFIG
from core.runs.state import read_status
from core.text import code_span


def pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def rnd(x: float | None, n: int) -> float | None:
    return None if x is None else round(x, n)


def adapter_section(run_dir, folder, params: int | None) -> None:
    """The best epoch's checkpoint folder: a zip to download (browsing: also on a read-only
    deployment) and a push to the Hub (not on a read-only deployment; behind the password); for a
    run of at most share.MERGED_MAX_PARAMS parameters (`params`), the merged model too, built on
    click (core/export.py: seconds of loading and dequantising; not on a read-only deployment)."""
    run_id = run_dir.name
    name = f"{run_id}-{folder.name}"
    mergeable = bool(params) and params <= share.MERGED_MAX_PARAMS and not access.read_only()
    st.subheader("The fine-tuned adapter")
    left, right = st.columns([1, 2], gap="large")
    left.caption(
        f"`checkpoints/{folder.name}`, the best epoch on validation, as a portable classifier: the LoRA "
        "adapter and head, the tokenizer, classifier.json and a model card (README.md)."
    )
    left.download_button(
        "Download adapter",
        lambda: share.zip_folder(folder, name),
        file_name=f"{name}.zip",
        mime="application/zip",
        icon=":material/folder_zip:",
        key="adapter_zip",
        help="Unzipped, the folder loads with core.classifier.load_classifier(folder) (and, for a "
        "standard head, with peft's AutoPeftModelForSequenceClassification); see its README.md.",
    )
    if mergeable:
        left.download_button(
            "Download merged model",
            lambda: share.merged_zip(run_dir, f"{name}-merged"),  # exported on click
            file_name=f"{name}-merged.zip",
            mime="application/zip",
            icon=":material/merge:",
            key="merged_zip",
            help="One model folder, the 4-bit base dequantised with the LoRA update merged in and the head "
            "included: plain transformers loads it (AutoModelForSequenceClassification.from_pretrained), "
            "without peft or bitsandbytes; see its README.md.",
        )
    elif not access.read_only():
        left.caption(f"The merged model (no peft, no bitsandbytes): `python -m core export {run_id} --out DIR`.")
    if access.read_only():
        return
    with right.expander("Push to the Hugging Face Hub", icon=":material/cloud_upload:"):
        if not ui.may("push"):
            st.caption("Pushing needs this deployment's password: enter it on the Train page.")
            return
        if not share.hub_token():
            st.info(share.NO_TOKEN, icon=":material/key:")
            return
        repo = st.text_input(
            "Repository id",
            key="push_repo",
            placeholder=f"you/{name}",
            help="OWNER/NAME, or NAME for your own namespace; made if it does not exist.",
        ).strip()
        private = st.checkbox("Private repository", True, key="push_private")
        what = "adapter"
        if mergeable:
            what = st.radio(
                "What to push", ["adapter", "merged model"], horizontal=True, key="push_what"
            )  # the merged model: exported into a temporary folder first
        if st.button("Push to Hub", icon=":material/cloud_upload:", key="push", disabled=not repo):
            try:
                with st.spinner(f"Uploading the {what} of {folder.name} to {ui.plain(repo)}…"):
                    if what == "merged model":
                        url = share.push_merged(run_dir, repo, private=private, password=ui.typed_password())
                    else:
                        url = share.push_to_hub(folder, repo, private=private, password=ui.typed_password())
            except ValueError as e:
                st.error(ui.plain(e))
            else:
                st.success(f"Pushed to {url}")


st.title("Report")
run_dir = ui.selected_run()
if run_dir is None:
    ui.no_run_message("The report compares the model before and after fine-tuning.")
    st.stop()

status = read_status(run_dir)
state = status.get("state")
report, problem = load_report(run_dir)  # a damaged report.json is rebuilt from the other files
ui.damage_note(run_dir, [problem])
if report is not None:
    report["state"] = state  # status.json is the authority on the state
elif state in watch.ACTIVE:
    st.info(
        f"Run `{run_dir.name}` is still {state}: its report is written when training ends. "
        "Watch its progress on the Train page; this page fills in by itself when it is done."
    )
    ui.rerun_when_finished(run_dir.name)
    st.page_link("app_pages/train.py", label="Watch it on the Train page", icon=":material/model_training:")
    st.stop()
else:
    report = build_report(run_dir)
    st.warning(
        f"Run `{run_dir.name}` is **{state}**: this report shows only what it produced before it "
        f"ended.{' Error: ' + ui.plain(status['error']) if status.get('error') else ''}"
    )

report["group"] = group_summary(run_dir)  # fresh: a later seed of the group may have ended since

# --- header and downloads -----------------------------------------------------------------------
head, dl = st.columns([2, 1])
head.markdown(f"#### {ui.plain(report.get('model'))} on {ui.plain(report.get('dataset'))}")
if report.get("base_model") and report["base_model"] != report.get("model"):  # an embedded model's Hub id
    note = f": {report['base_weights_note']}" if report.get("base_weights_note") else ""
    head.caption(ui.plain(f"Base model {report['base_model']}{note}."))
hw = report.get("hardware")
head.caption(
    f"Run `{run_dir.name}` · {ui.plain(report.get('state'))} · preset {ui.plain(report.get('preset'))} · "
    f"device {ui.plain(device_text(report))}, compute dtype {ui.plain(report.get('compute_dtype') or 'n/a')} · "
    f"{ui.plain(describe_hardware(hw)) if hw else 'hardware n/a'}"
)
dl.download_button(
    "Download Markdown",
    render_markdown(report),
    file_name=f"{run_dir.name}-report.md",
    mime="text/markdown",
    icon=":material/download:",
    use_container_width=True,
)
dl.download_button(
    "Download HTML",
    render_html(report),
    file_name=f"{run_dir.name}-report.html",
    mime="text/html",
    icon=":material/download:",
    use_container_width=True,
)
dl.download_button(
    "Download reproducibility bundle",
    lambda: build_bundle(run_dir),  # built on click
    file_name=f"{run_dir.name}-bundle.zip",
    mime="application/zip",
    icon=":material/folder_zip:",
    use_container_width=True,
    key="bundle",
    help="One zip: config.json, seeds, package versions, hardware, sha256 of the data files, both "
    "models' per-example predictions (CSV), a methods paragraph and a results table to paste.",
)
if report.get("headline"):
    with st.container(border=True, key="headline"):
        st.markdown(f"**{ui.sentence(report['headline'])}**")
        st.caption(ui.sentence((report.get("change") or {}).get("note") or ""))

# --- accuracy -----------------------------------------------------------------------------------
st.subheader("Accuracy on the test split, before vs after")
b, a = report.get("test_before"), report.get("test_after")
if b and a:
    left, right = st.columns([2, 3])
    with left:
        c = st.columns(2)
        c[0].metric("Before fine-tuning", pct(b["accuracy"]), help=f"{b['correct']} of {b['n']} test examples")
        c[1].metric(
            f"After (epoch {report.get('best_epoch')})",
            pct(a["accuracy"]),
            delta=f"{100 * (a['accuracy'] - b['accuracy']):+.1f} points",
            help=f"{a['correct']} of {a['n']} test examples",
        )
        st.dataframe(
            pd.DataFrame(
                [
                    {
                        "model": name,
                        "accuracy": pct(s["accuracy"]),
                        "95% interval": f"{pct(s['ci95'][0])} – {pct(s['ci95'][1])}",
                        "correct": s["correct"],
                        "n": s["n"],
                    }
                    for name, s in (("before", b), ("after", a))
                ]
            ),
            hide_index=True,
        )
        st.caption(
            f"n = {a['n']} test examples. The after model is the epoch with the best validation "
            "accuracy; the test split was never used to choose anything. Intervals are Wilson 95%."
        )
    right.plotly_chart(ui.accuracy_figure(b, a, report.get("best_epoch")), config=ui.PLOTLY, key="accuracy")
else:
    st.info("The run ended before the test split was scored before and after training.")
folders = compare.checkpoint_folders(run_dir, report)
if folders and (folders[1] / ADAPTER_CONFIG).is_file():
    adapter_section(run_dir, folders[1], (report.get("params") or {}).get("total"))

# --- baselines and the change -------------------------------------------------------------------
if report.get("baselines"):
    st.subheader("Baselines on the same test rows")
    st.dataframe(
        pd.DataFrame(baseline_rows(report)),
        hide_index=True,
        column_config={"what": st.column_config.TextColumn(width="large")},
    )
    z = report["baselines"].get("zero_shot") or {}
    if z.get("prompt"):
        st.caption(
            "Zero-shot prompt (the label is the next word: "
            + ", ".join(f"**{ui.plain(w.strip())}**" for w in z.get("words") or [])
            + "):"
        )
        st.code(z["prompt"], language=None)
    st.caption(
        'The random-head baseline is what the reference script measured as "before"; the zero-shot baseline '
        "asks the pretrained language model itself, without any training."
    )
change = change_rows(report.get("change"))  # [] without a change to show
if change:
    st.subheader("The change and its uncertainty")
    ch, values = report["change"], [value for _, value in change]
    c = st.columns(4)
    c[0].metric("Change", values[0], help="accuracy after − before, same test rows")
    c[1].metric(
        "95% interval", values[1].removesuffix(" points"), help="paired bootstrap, 10,000 resamples of the test rows"
    )
    c[2].metric("McNemar p", values[3], help=f"exact, two-sided, on the {ch['b'] + ch['c']} discordant pairs")
    c[3].metric(
        "Smallest detectable change",
        values[5],
        help="80% power, two-sided 5% level, at this n (two-sample approximation)",
    )
    st.markdown(f"**Verdict:** {ui.sentence(ch['verdict'])}.")
    st.dataframe(pd.DataFrame(change, columns=["item", "value"]), hide_index=True)
    z = (report.get("baselines") or {}).get("zero_shot") or {}
    if z.get("change"):
        with st.expander("Zero-shot baseline → fine-tuned"):
            st.dataframe(pd.DataFrame(change_rows(z["change"]), columns=["item", "value"]), hide_index=True)

# --- several seeds ------------------------------------------------------------------------------
group = report.get("group")
if group:
    st.subheader(f"Several seeds: group {code_span(group.get('group'))}")  # the name is from config.json
    st.caption(
        f"{group.get('finished')} of {len(group.get('runs') or [])} runs finished. One run is not a result: "
        "mean ± standard deviation (and range) over the seeds, in percent."
    )
    st.dataframe(pd.DataFrame(seed_rows(group)), hide_index=True)
    if group.get("agreement") is not None:
        st.markdown(
            f"Per-example agreement: every seed's fine-tuned model predicts the same label on "
            f"**{pct(group['agreement'])}** of {group['agreement_n']} test examples."
        )
    st.dataframe(pd.DataFrame(seed_run_rows(group)), hide_index=True)

# --- transitions --------------------------------------------------------------------------------
t = report.get("transitions")
if t:
    st.subheader("Transitions: where the test examples went")

    def link(col, label: str, params: dict) -> None:
        col.page_link(
            "app_pages/failures.py",
            label=label,
            icon=":material/list:",
            query_params={"run": run_dir.name, **params},
        )

    left, right = st.columns([1, 1], gap="large")
    with left:
        st.caption("Right/wrong before (rows) × after (columns): click a cell to list its examples.")
        head = st.columns([1, 2, 2])
        head[1].markdown("**right after**")
        head[2].markdown("**wrong after**")
        for before_name, cells in (
            ("right before", ("still right", "regressed")),
            ("wrong before", ("fixed", "still failing")),
        ):
            row = st.columns([1, 2, 2], vertical_alignment="center")
            row[0].markdown(f"**{before_name}**")
            for col, cell in zip(row[1:], cells):
                link(col, f"{t['cells'].get(cell, 0)} {cell}", {"cell": cell.replace(" ", "-")})
        st.caption("Label moves (predicted before → after), most frequent first:")
        for m in t["moves"]:
            link(st, f"{ui.plain(m['from'])} → {ui.plain(m['to'])}: {m['count']}", {"move": f"{m['from']}->{m['to']}"})
    right.plotly_chart(ui.moves_figure(t["counts"], t["labels"]), config=ui.PLOTLY, key="moves")

# --- calibration --------------------------------------------------------------------------------
cal = report.get("calibration")
if cal:
    st.subheader("Calibration")
    left, right = st.columns([1, 2])
    with left:
        for name, cb in cal.items():
            st.metric(
                f"ECE {ui.plain(name.replace('_', '-'))}",
                "n/a" if cb.get("ece") is None else f"{cb['ece']:.3f}",
                help=f"expected calibration error over 10 equal-width confidence bins, n = {cb['n']}",
            )
        st.caption(
            "ECE: the mean gap between confidence and accuracy, weighted by the examples per bin (lower is "
            "better; noisy with few examples per bin)."
        )
    ts = report.get("temperature_scaling")  # core/results/calibration.py
    if ts:
        scaled = ts["test"]
        with left:
            st.metric(
                "Temperature T",
                f"{ts['temperature']:.2f}",
                help=f"fitted on the {ts['n_fit']} validation rows ({ts['method']}); the selected checkpoint's "
                "classifier.json carries it, and load_classifier and predict divide the logits by it",
            )
            st.metric(
                "Test ECE after scaling",
                "n/a" if scaled["ece_after"] is None else f"{scaled['ece_after']:.3f}",
                delta=None
                if None in (scaled["ece_after"], scaled["ece_before"])
                else f"{scaled['ece_after'] - scaled['ece_before']:+.3f}",
                delta_color="inverse",
                help=f"n = {scaled['n']}; test NLL {scaled['nll_before']:.3f} -> {scaled['nll_after']:.3f}. "
                "Dividing the logits by T changes no prediction: accuracy stays.",
            )
        cal = {**cal, "after_T_scaled": ts["calibration_after"]}
    right.plotly_chart(ui.reliability_figure(cal), config=ui.PLOTLY, key="reliability")

# --- slices -------------------------------------------------------------------------------------
if report.get("slices"):
    st.subheader("Slices: accuracy by phenomenon and by automatic NLI slice")
    st.dataframe(pd.DataFrame(slice_rows(report)), hide_index=True)
    st.caption(
        "Negation cue in the hypothesis, word overlap with the premise, hypothesis length, and the data's "
        "own tags; each with n and Wilson 95% intervals. Many slices at once: some differ by chance."
    )

# --- learning dynamics and label-noise hints ----------------------------------------------------
d = report.get("dynamics")
if d or report.get("noise_hints"):
    st.subheader("Learning dynamics and label-noise hints")
if d:
    c = st.columns(3)
    c[0].metric("Never right", d["never_learned"], help=f"of {d['n']} test examples, at every epoch {d['epochs']}")
    c[1].metric("Learned, never forgotten", d["unforgettable"])
    c[2].metric("Forgotten at least once", d["forgotten"], help="right at one epoch, wrong at a later one")
    st.caption("Per example, on the Failures page: p(gold) at each epoch, when it was learned or forgotten.")
if report.get("noise_hints"):
    st.warning(NOISE_NOTE, icon=":material/help:")
    st.dataframe(
        pd.DataFrame(hint_rows(report)),
        hide_index=True,
        column_config={
            "premise": st.column_config.TextColumn(width="large"),
            "hypothesis": st.column_config.TextColumn(width="large"),
        },
    )
    st.page_link(
        "app_pages/failures.py",
        label="See them on the Failures page",
        icon=":material/help:",
        query_params={"run": run_dir.name, "hints": "1"},
    )

# --- training time ------------------------------------------------------------------------------
st.subheader("Training time")
epochs = report.get("epochs") or []
if epochs:
    n_ep = len(epochs)
    c = st.columns(5)

    def exact(x: float | None) -> str | None:
        return None if x is None else f"{x:.1f} s"

    c[0].metric(
        "Total",
        watch.format_duration(report.get("total_s"), short=True),
        help=f"{exact(report.get('total_s'))}: model load + evaluations + training",
    )
    c[1].metric(
        "Per epoch (mean)",
        watch.format_duration(report["train_s"] / n_ep, short=True),
        help=exact(report["train_s"] / n_ep),
    )
    c[2].metric("Training", watch.format_duration(report.get("train_s"), short=True), help=exact(report.get("train_s")))
    c[3].metric("Evaluation", watch.format_duration(report.get("eval_s"), short=True), help=exact(report.get("eval_s")))
    c[4].metric("Model load", watch.format_duration(report.get("load_s")))
    st.dataframe(
        pd.DataFrame(
            [
                {
                    "epoch": e["epoch"],
                    "train loss": rnd(e.get("train_loss"), 4),
                    "validation accuracy": pct(e.get("val_accuracy")),
                    "validation loss": rnd(e.get("val_loss"), 4),
                    "time (s)": rnd(e.get("epoch_s"), 1),
                }
                for e in epochs
            ]
        ),
        hide_index=True,
    )
    t = report.get("throughput") or {}
    if t:
        st.caption(
            f"Throughput {ui.plain(t.get('samples_per_s'))} pairs/s, {ui.plain(t.get('tokens_per_s'))} real "
            f"tokens/s over {ui.plain(t.get('steps'))} optimiser steps; {pct(t.get('pad_fraction'))} of each "
            "batch was padding."
        )
else:
    st.caption("No epoch finished.")
if report.get("early_stop"):
    stop = report["early_stop"]
    st.info(
        f"Early stopping: stopped after epoch {stop['epoch']} of {stop['epochs']}: {stop['reason']}.",
        icon=":material/front_hand:",
    )
controls = controls_rows(report)
if controls:
    with st.expander("Training controls and the class balance of each split"):
        st.dataframe(pd.DataFrame(controls, columns=["control", "value"]), hide_index=True)
        st.dataframe(pd.DataFrame(class_balance_rows(report)), hide_index=True)

# --- parameters, resources, hardware ------------------------------------------------------------
p_col, r_col, h_col = st.columns(3)
with p_col:
    st.subheader("Parameters")
    params = parameter_rows(report)
    if params:
        st.dataframe(pd.DataFrame(params, columns=["count", "value"]), hide_index=True)
        if report.get("target_modules"):
            st.caption("LoRA on: " + ui.plain(", ".join(report["target_modules"])))
    else:
        st.caption("n/a")
with r_col:
    st.subheader("Resources (peaks)")
    st.dataframe(pd.DataFrame(resource_rows(report), columns=["resource", "peak"]), hide_index=True)
with h_col:
    st.subheader("Hardware")
    if hw:
        gpus = hw.get("gpus") or []
        rows = [
            {"item": "summary", "value": describe_hardware(hw)},
            {"item": "CPU", "value": f"{hw.get('cpu')} · {hw.get('cpu_cores')} logical cores"},
            {"item": "RAM", "value": f"{hw.get('ram_gb')} GiB"},
        ]
        rows += [
            {"item": f"GPU {i}", "value": f"{g['name']}, {g['memory_gb']} GiB, compute {g.get('capability')}"}
            for i, g in enumerate(gpus)
        ]
        rows.append({"item": "torch", "value": str(hw.get("torch", "n/a"))})
        st.dataframe(pd.DataFrame(rows), hide_index=True)
    else:
        st.caption("n/a")
    speed = speed_rows(report)
    if speed:
        with st.expander("Speed settings (config.json `speed`)"):
            st.dataframe(pd.DataFrame(speed, columns=["setting", "value"]), hide_index=True)

# --- per class ----------------------------------------------------------------------------------
if b and a:
    labels = report["labels"]
    st.subheader("Per class: precision, recall, F1 and confusion matrices")
    st.dataframe(
        pd.DataFrame(
            [
                {
                    "class": pb["label"],
                    "precision before": pct(pb["precision"]),
                    "recall before": pct(pb["recall"]),
                    "F1 before": pct(pb["f1"]),
                    "precision after": pct(pa["precision"]),
                    "recall after": pct(pa["recall"]),
                    "F1 after": pct(pa["f1"]),
                    "n": pb["support"],
                }
                for pb, pa in zip(b["per_class"], a["per_class"])
            ]
        ),
        hide_index=True,
    )
    if report.get("per_class_change"):
        st.dataframe(pd.DataFrame(per_class_change_rows(report)), hide_index=True)
        st.caption(
            "Per-class F1 before and after, and its change with a paired bootstrap 95% interval (2,000 "
            "resamples of the test rows)."
        )
    c1, c2 = st.columns(2)
    c1.plotly_chart(
        ui.confusion_figure(b["confusion"], labels, "Confusion before (rows gold, columns predicted)"),
        config=ui.PLOTLY,
        key="confusion_before",
    )
    c2.plotly_chart(
        ui.confusion_figure(a["confusion"], labels, "Confusion after (rows gold, columns predicted)"),
        config=ui.PLOTLY,
        key="confusion_after",
    )

# --- by tag (reports from before the slices) ----------------------------------------------------
if report.get("by_tag") and not report.get("slices"):
    st.subheader("By phenomenon tag")
    st.dataframe(
        pd.DataFrame(
            [
                {
                    "tag": t["tag"],
                    "n": t["n"],
                    "before": pct(t["accuracy_before"]),
                    "after": pct(t["accuracy_after"]),
                    "change (points)": round(100 * (t["accuracy_after"] - t["accuracy_before"]), 1),
                }
                for t in report["by_tag"]
            ]
        ),
        hide_index=True,
    )

# --- failure cases ------------------------------------------------------------------------------
if report.get("changes"):
    st.subheader("Failure-case analysis: what fine-tuning changed")
    ch = report["changes"]
    c = st.columns(4)
    for col, cat in zip(c, CATEGORIES):
        col.metric(cat.capitalize(), ch.get(cat, 0))
    st.caption(
        "Fixed = wrong before, right after; regressed = right before, wrong after. Examples are the "
        "largest moves of the gold label's probability."
    )
    for cat, rows in (report.get("change_examples") or {}).items():
        if not rows:
            continue
        st.markdown(f"**{ui.plain(str(cat).capitalize())}** (examples)")
        st.dataframe(
            pd.DataFrame(
                [
                    {
                        "premise": e.get("premise") or e.get("text", ""),
                        "hypothesis": e.get("hypothesis", ""),
                        "gold": e["gold"],
                        "before": e["pred_before"],
                        "after": e["pred_after"],
                        "Δ p(gold)": e["gold_prob_change"],
                    }
                    for e in rows
                ]
            ),
            hide_index=True,
            column_config={
                "premise": st.column_config.TextColumn(width="large"),
                "hypothesis": st.column_config.TextColumn(width="large"),
            },
        )
    st.page_link(
        "app_pages/failures.py", label="Browse every test example on the Failures page", icon=":material/rule:"
    )
