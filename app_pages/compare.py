"""Compare: several runs side by side — their training-loss and validation-accuracy curves, a table
of headline numbers, and the config fields that differ. All the logic is in core.results.compare."""

from __future__ import annotations

import json

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from app_pages import ui
from core.results import compare
from core.runs import rundir
from core.runs.state import list_runs

st.title("Compare runs")

runs = [r for r in list_runs() if r["state"] != rundir.DAMAGED and not r.get("damaged")]
skipped = [r["id"] for r in list_runs() if r["state"] == rundir.DAMAGED or r.get("damaged")]
if skipped:
    st.caption(f"Left out (damaged): {', '.join(f'`{i}`' for i in skipped)}")
if not runs:
    st.info("No runs to compare yet. Start some on the **Train** page.")
    st.stop()

by_id = {r["id"]: r for r in runs}
ids = list(by_id)
if "compare_runs" not in st.session_state:
    current = st.session_state.get(ui.RUN_KEY)
    default = [current] if current in by_id else []
    default += [i for i in ids if i not in default][: max(0, 2 - len(default))]
    st.session_state["compare_runs"] = default
else:  # runs deleted since: drop them from the selection
    st.session_state["compare_runs"] = [i for i in st.session_state["compare_runs"] if i in by_id]
chosen = st.multiselect("Runs", ids, key="compare_runs", format_func=lambda i: f"{i} · {by_id[i]['state']}")
if not chosen:
    st.info("Pick one or more runs above.")
    st.stop()
dirs = [by_id[i]["path"] for i in chosen]
PALETTE = ["#4f46e5", "#f59e0b", "#10b981", "#ef4444", "#0ea5e9", "#a855f7", "#84cc16", "#f43f5e"]


def _figure(title: str, xaxis: str, yaxis: str) -> go.Figure:
    fig = go.Figure()
    fig.update_layout(
        title=title,
        xaxis_title=xaxis,
        yaxis_title=yaxis,
        height=340,
        margin=dict(l=10, r=10, t=40, b=10),
        legend=dict(orientation="h", y=-0.25),
    )
    return fig


loss_fig = _figure("Training loss", "step", "loss")
acc_fig = _figure("Validation accuracy", "epoch (0 = before training)", "accuracy")
empty = []
for n, (rid, d) in enumerate(zip(chosen, dirs)):
    c = compare.curves(d)
    color = PALETTE[n % len(PALETTE)]
    if c["loss"][0]:
        loss_fig.add_trace(go.Scatter(x=c["loss"][0], y=c["loss"][1], mode="lines", name=rid, line=dict(color=color)))
    if c["val_accuracy"][0]:
        acc_fig.add_trace(
            go.Scatter(
                x=c["val_accuracy"][0], y=c["val_accuracy"][1], mode="lines+markers", name=rid, line=dict(color=color)
            )
        )
    if not c["loss"][0] and not c["val_accuracy"][0]:
        empty.append(rid)
acc_fig.update_xaxes(dtick=1)
left, right = st.columns(2)
left.plotly_chart(loss_fig, config=ui.PLOTLY, key="compare_loss")
right.plotly_chart(acc_fig, config=ui.PLOTLY, key="compare_accuracy")
if empty:
    st.caption(f"No curves yet for {', '.join(f'`{i}`' for i in empty)}.")

st.subheader("Headline numbers")


def _pct(x):
    return None if x is None else f"{100 * x:.1f}%"


def _ci(ci):
    return None if not ci else f"{100 * ci[0]:.1f}–{100 * ci[1]:.1f}%"


def _num(x, digits=2):
    return None if x is None else round(x, digits)


rows = compare.headline_rows(dirs)
st.dataframe(
    pd.DataFrame(
        [
            {
                "run": r["run"],
                "state": r["state"],
                "test before": _pct(r["test_before"]),
                "before 95% CI": _ci(r["test_before_ci95"]),
                "test after": _pct(r["test_after"]),
                "after 95% CI": _ci(r["test_after_ci95"]),
                "best epoch": r["best_epoch"],
                "total time (s)": _num(r["total_s"], 1),
                "peak GPU memory (GB)": _num(r["peak_gpu_gb"], 3),
                "peak RSS (GB)": _num(r["peak_rss_gb"], 3),
            }
            for r in rows
        ]
    ),
    hide_index=True,
    key="compare_headline",
)
st.caption(
    "Test accuracy with its Wilson 95% interval; before = the untrained adapter and head (epoch 0), "
    "after = the best epoch on validation."
)

st.subheader("Config differences")
if len(chosen) < 2:
    st.caption("Pick at least two runs to see how their configs differ.")
else:
    diff = compare.config_diff(compare.read_configs(dirs))
    if not diff:
        st.caption("The selected runs have the same config.")
    else:

        def show(v):
            return v if isinstance(v, str) else json.dumps(v)

        st.dataframe(
            pd.DataFrame([{"field": k, **{rid: show(v[rid]) for rid in chosen}} for k, v in diff.items()]),
            hide_index=True,
            key="compare_config",
        )
        st.caption(
            f"{len(diff)} field{'s' if len(diff) != 1 else ''} differ; `{compare.MISSING}` = the run's "
            "config does not have the field."
        )
