"""Report: every section of the reference report, generated from the selected run's folder,
with downloads as Markdown and as a self-contained HTML file."""

import pandas as pd
import streamlit as st

from app_pages import ui
from core.runs import live, rundir
from core.report import (CATEGORIES, build_report, parameter_rows, render_html, render_markdown, resource_rows,
                         speed_rows)
from core.runs.resources import describe_hardware

pct = lambda x: "n/a" if x is None else f"{100 * x:.1f}%"

st.title("Report")
run_dir = ui.selected_run()
if run_dir is None:
    ui.no_run_message("The report compares the model before and after fine-tuning.")
    st.stop()

status = rundir.read_status(run_dir)
state = status.get("state")
report = rundir.read_json(run_dir / rundir.REPORT)
if report is not None:
    report["state"] = state  # status.json is the authority on the state
elif state in live.ACTIVE:
    st.info(f"Run `{run_dir.name}` is still {state}: its report is written when training ends. "
            "Watch its progress on the Train page; this page fills in by itself when it is done.")
    ui.rerun_when_finished(run_dir.name)
    st.page_link("app_pages/train.py", label="Watch it on the Train page", icon=":material/model_training:")
    st.stop()
else:
    report = build_report(run_dir)
    st.warning(f"Run `{run_dir.name}` is **{state}**: this report shows only what it produced before it "
               f"ended.{' Error: ' + status['error'] if status.get('error') else ''}")

# --- header and downloads -----------------------------------------------------------------------
head, dl = st.columns([3, 1])
head.markdown(f"#### {report.get('model')} on {report.get('dataset')}")
hw = report.get("hardware")
head.caption(f"Run `{report['run_id']}` · {report.get('state')} · preset {report.get('preset')} · "
             f"device {report.get('device') or 'n/a'}, compute dtype {report.get('compute_dtype') or 'n/a'} · "
             f"{describe_hardware(hw) if hw else 'hardware n/a'}")
dl.download_button("Download Markdown", render_markdown(report), file_name=f"{report['run_id']}-report.md",
                   mime="text/markdown", icon=":material/download:", use_container_width=True)
dl.download_button("Download HTML", render_html(report), file_name=f"{report['run_id']}-report.html",
                   mime="text/html", icon=":material/download:", use_container_width=True)

# --- accuracy -----------------------------------------------------------------------------------
st.subheader("Accuracy on the test split, before vs after")
b, a = report.get("test_before"), report.get("test_after")
if b and a:
    left, right = st.columns([2, 3])
    with left:
        c = st.columns(2)
        c[0].metric("Before fine-tuning", pct(b["accuracy"]), help=f"{b['correct']} of {b['n']} test examples")
        c[1].metric(f"After (epoch {report.get('best_epoch')})", pct(a["accuracy"]),
                    delta=f"{100 * (a['accuracy'] - b['accuracy']):+.1f} points",
                    help=f"{a['correct']} of {a['n']} test examples")
        st.dataframe(pd.DataFrame([
            {"model": name, "accuracy": pct(s["accuracy"]), "95% interval": f"{pct(s['ci95'][0])} – {pct(s['ci95'][1])}",
             "correct": s["correct"], "n": s["n"]}
            for name, s in (("before", b), ("after", a))]), hide_index=True)
        st.caption(f"n = {a['n']} test examples. The after model is the epoch with the best validation "
                   "accuracy; the test split was never used to choose anything. Intervals are Wilson 95%.")
    right.plotly_chart(ui.accuracy_figure(b, a, report.get("best_epoch")), config=ui.PLOTLY, key="accuracy")
else:
    st.info("The run ended before the test split was scored before and after training.")

# --- training time ------------------------------------------------------------------------------
st.subheader("Training time")
epochs = report.get("epochs") or []
if epochs:
    n_ep = len(epochs)
    c = st.columns(5)
    exact = lambda x: None if x is None else f"{x:.1f} s"
    c[0].metric("Total", live.format_duration(report.get("total_s"), short=True),
                help=f"{exact(report.get('total_s'))}: model load + evaluations + training")
    c[1].metric("Per epoch (mean)", live.format_duration(report["train_s"] / n_ep, short=True),
                help=exact(report["train_s"] / n_ep))
    c[2].metric("Training", live.format_duration(report.get("train_s"), short=True), help=exact(report.get("train_s")))
    c[3].metric("Evaluation", live.format_duration(report.get("eval_s"), short=True), help=exact(report.get("eval_s")))
    c[4].metric("Model load", live.format_duration(report.get("load_s")))
    st.dataframe(pd.DataFrame([{"epoch": e["epoch"], "train loss": round(e["train_loss"], 4),
                                "validation accuracy": pct(e["val_accuracy"]),
                                "validation loss": round(e["val_loss"], 4), "time (s)": round(e["epoch_s"], 1)}
                               for e in epochs]), hide_index=True)
    t = report.get("throughput") or {}
    if t:
        st.caption(f"Throughput {t.get('samples_per_s')} pairs/s, {t.get('tokens_per_s')} real tokens/s over "
                   f"{t.get('steps')} optimiser steps; {pct(t.get('pad_fraction'))} of each batch was padding.")
else:
    st.caption("No epoch finished.")

# --- parameters, resources, hardware ------------------------------------------------------------
p_col, r_col, h_col = st.columns(3)
with p_col:
    st.subheader("Parameters")
    params = parameter_rows(report)
    if params:
        st.dataframe(pd.DataFrame(params, columns=["count", "value"]), hide_index=True)
        if report.get("target_modules"):
            st.caption("LoRA on: " + ", ".join(report["target_modules"]))
    else:
        st.caption("n/a")
with r_col:
    st.subheader("Resources (peaks)")
    st.dataframe(pd.DataFrame(resource_rows(report), columns=["resource", "peak"]), hide_index=True)
with h_col:
    st.subheader("Hardware")
    if hw:
        gpus = hw.get("gpus") or []
        rows = [{"item": "summary", "value": describe_hardware(hw)},
                {"item": "CPU", "value": f"{hw.get('cpu')} · {hw.get('cpu_cores')} logical cores"},
                {"item": "RAM", "value": f"{hw.get('ram_gb')} GiB"}]
        rows += [{"item": f"GPU {i}", "value": f"{g['name']}, {g['memory_gb']} GiB, compute {g.get('capability')}"}
                 for i, g in enumerate(gpus)]
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
    st.dataframe(pd.DataFrame([
        {"class": pb["label"], "precision before": pct(pb["precision"]), "recall before": pct(pb["recall"]),
         "F1 before": pct(pb["f1"]), "precision after": pct(pa["precision"]), "recall after": pct(pa["recall"]),
         "F1 after": pct(pa["f1"]), "n": pb["support"]}
        for pb, pa in zip(b["per_class"], a["per_class"])]), hide_index=True)
    c1, c2 = st.columns(2)
    c1.plotly_chart(ui.confusion_figure(b["confusion"], labels, "Confusion before (rows gold, columns predicted)"),
                    config=ui.PLOTLY, key="confusion_before")
    c2.plotly_chart(ui.confusion_figure(a["confusion"], labels, "Confusion after (rows gold, columns predicted)"),
                    config=ui.PLOTLY, key="confusion_after")

# --- by tag -------------------------------------------------------------------------------------
if report.get("by_tag"):
    st.subheader("By phenomenon tag")
    st.dataframe(pd.DataFrame([{"tag": t["tag"], "n": t["n"], "before": pct(t["accuracy_before"]),
                                "after": pct(t["accuracy_after"]),
                                "change (points)": round(100 * (t["accuracy_after"] - t["accuracy_before"]), 1)}
                               for t in report["by_tag"]]), hide_index=True)

# --- failure cases ------------------------------------------------------------------------------
if report.get("changes"):
    st.subheader("Failure-case analysis: what fine-tuning changed")
    ch = report["changes"]
    c = st.columns(4)
    for col, cat in zip(c, CATEGORIES):
        col.metric(cat.capitalize(), ch.get(cat, 0))
    st.caption("Fixed = wrong before, right after; regressed = right before, wrong after. Examples are the "
               "largest moves of the gold label's probability.")
    for cat, rows in (report.get("change_examples") or {}).items():
        if not rows:
            continue
        st.markdown(f"**{cat.capitalize()}** (examples)")
        st.dataframe(pd.DataFrame([{"premise": e.get("premise") or e.get("text", ""), "hypothesis": e.get("hypothesis", ""),
                                    "gold": e["gold"], "before": e["pred_before"], "after": e["pred_after"],
                                    "Δ p(gold)": e["gold_prob_change"]} for e in rows]), hide_index=True,
                     column_config={"premise": st.column_config.TextColumn(width="large"),
                                    "hypothesis": st.column_config.TextColumn(width="large")})
    st.page_link("app_pages/failures.py", label="Browse every test example on the Failures page", icon=":material/rule:")
