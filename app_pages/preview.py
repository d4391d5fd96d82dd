"""The Train page's look at the data, before Launch: per split the rows kept after dropping, the class
balance, the token lengths against max_length, duplicates between splits and a few example rows, as
core.preview computes them with the trainer's own mapping; and, when the training split is
imbalanced, the offer of balanced class weights.

    look = data_preview(cfg, uploads, data_kind, weights_key)   # draws it; returns core.preview's dict
"""

from __future__ import annotations

import json

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from app_pages import ui
from core import uploads as core_uploads
from core.config import ModelConfig, RunConfig
from core.model import load_tokenizer
from core.preview import IMBALANCE, SCAN, preview


@st.cache_resource(show_spinner="Loading the model's tokenizer…", max_entries=4)
def tokenizer_for(model_json: str):
    """(the model's tokenizer, None) or (None, why it could not be loaded)."""
    try:
        return load_tokenizer(ModelConfig(**json.loads(model_json))), None
    except Exception as e:  # noqa: BLE001 - a preview without token lengths, and the reason
        return None, f"{type(e).__name__}: {e}"


@st.cache_data(show_spinner="Looking at the data…", max_entries=8, ttl=600)
def compute(config_json: str, uploaded: tuple[tuple[str, str, bytes], ...]) -> tuple[dict | None, str | None]:
    """(core.preview of the config, None) or (None, why not); `uploaded`: (split, name, bytes) of
    the files the page holds, mapped as the trainer will map them."""
    cfg = RunConfig.from_dict(json.loads(config_json))
    tokenizer, why = tokenizer_for(json.dumps(cfg.to_dict()["model"], sort_keys=True))
    sources = {split: core_uploads.read_upload(name, data) for split, name, data in uploaded}
    try:
        look = preview(cfg, tokenizer, sources=sources or None)
    except (OSError, ValueError, RuntimeError) as e:
        return None, str(e)
    look["tokenizer_error"] = why
    return look, None


def balance_figure(look: dict, labels: list[str]) -> go.Figure:
    fig = go.Figure()
    for split, s in look["splits"].items():
        counts = s.get("label_counts")
        if not counts:
            continue
        total = sum(counts.values()) or 1
        fig.add_bar(
            name=split,
            x=[ui.chart_text(label) for label in labels],
            y=[counts[label] / total for label in labels],
            customdata=[counts[label] for label in labels],
            hovertemplate="%{x}: %{customdata} rows (%{y:.0%})<extra>" + split + "</extra>",
        )
    fig.update_layout(
        title=dict(text="Class balance (share of each split's rows)", font=dict(size=14)),
        height=280,
        margin=dict(l=10, r=10, t=40, b=10),
        template="plotly_white",
        barmode="group",
        yaxis=dict(tickformat=".0%"),
        legend=dict(orientation="h", yanchor="top", y=-0.12, xanchor="center", x=0.5),
    )
    return fig


def lengths_figure(lengths: dict, split: str) -> go.Figure:
    bars = lengths["histogram"]
    limit = lengths["max_length"]
    fig = go.Figure()
    fig.add_bar(
        x=[(b["lo"] + b["hi"]) / 2 for b in bars],
        y=[b["n"] for b in bars],
        width=[b["hi"] - b["lo"] for b in bars],
        marker_color=["#ef4444" if b["lo"] >= limit else "#6366f1" for b in bars],
        customdata=[[b["lo"], b["hi"]] for b in bars],
        hovertemplate="%{customdata[0]:.0f}-%{customdata[1]:.0f} tokens: %{y} rows<extra></extra>",
        showlegend=False,
    )
    fig.add_vline(x=limit, line_dash="dash", line_color="#ef4444", annotation_text=f"max length {limit}")
    fig.update_layout(
        title=dict(text=f"Token lengths of {split} ({lengths['sampled']:,} rows)", font=dict(size=14)),
        height=280,
        margin=dict(l=10, r=10, t=40, b=10),
        template="plotly_white",
        xaxis=dict(title="tokens, as the model reads the row"),
        yaxis=dict(title="rows"),
        bargap=0.05,
    )
    return fig


def total_text(s: dict) -> str:
    return f"{s['total_rows']:,}" if s.get("total_rows") else "more"


def split_rows(look: dict, labels: list[str]) -> list[dict]:
    rows = []
    for split, s in look["splits"].items():
        if "error" in s:
            rows.append({"split": split, "rows read": "", "kept": "", "the run uses": "", "error": s["error"]})
            continue
        counts = s.get("label_counts") or {}
        carved = s.get("carved_from_train")
        rows.append(
            {
                "split": split,
                "rows read": "carved from train"
                if carved
                else f"{s['rows_read']:,}" + ("" if s["complete"] else f" of {total_text(s)}"),
                "no gold label": "" if carved else f"{s['dropped_unlabelled']:,}",
                "empty text": "" if carved else f"{s['dropped_empty']:,}",
                "kept": s["kept"],
                "the run uses": s["used"],
                **{label: counts.get(label, 0) for label in labels},
                "> max length": (
                    f"{s['lengths']['over_max_length']} of {s['lengths']['sampled']}" if s.get("lengths") else "n/a"
                ),
            }
        )
    return rows


def data_preview(cfg: RunConfig, uploaded: dict[str, tuple[str, bytes]], data_kind: str, weights_key: str):
    """The look at the data, drawn; returns core.preview's dict (None when there is none to show).
    A Hub dataset is read only when asked (it needs the network); the rest at once (cached)."""
    st.markdown("##### A look at the data")
    if data_kind == "upload" and "train" not in uploaded:
        st.caption("Upload a train file to see its rows, class balance and lengths here.")
        return None
    if data_kind == "hub" and not st.session_state.get("preview:hub") == cfg.data.source:
        if st.button("Read a sample of the Hub dataset", key="preview_hub", icon=":material/visibility:"):
            st.session_state["preview:hub"] = cfg.data.source
            st.rerun()
        st.caption(f"The first {SCAN:,} rows of each split, downloaded from the Hub (or its cache).")
        return None
    files = tuple((split, name, data) for split, (name, data) in sorted(uploaded.items()))
    look, error = compute(json.dumps(cfg.to_dict(), sort_keys=True), files)
    if error:
        st.warning(f"The data could not be read for a preview: {ui.plain(error)}")
        return None
    labels = cfg.data.labels
    st.caption(
        "What the trainer will read, through its own column and label mapping: rows after dropping those "
        "without a gold label or with an empty text, the class balance, and token lengths against "
        f"max length {cfg.data.max_length} (rows longer are cut)."
        + (" " + " ".join(ui.plain(n) + "." for n in look["notes"]) if look["notes"] else "")
    )
    with st.container(key="data_preview"):
        st.dataframe(pd.DataFrame(split_rows(look, labels)), hide_index=True)
        left, right = st.columns(2)
        left.plotly_chart(balance_figure(look, labels), config=ui.PLOTLY, key="preview_balance")
        train = look["splits"].get("train") or {}
        lengths = train.get("lengths")
        if lengths:
            right.plotly_chart(lengths_figure(lengths, "train"), config=ui.PLOTLY, key="preview_lengths")
            right.caption(
                f"Mean {lengths['mean']:g} tokens, median {lengths['median']:g}, 95th percentile "
                f"{lengths['p95']:g}, longest {lengths['longest']}: **{lengths['over_max_length']}** of the "
                f"{lengths['sampled']:,} rows looked at ({100 * lengths['share_over']:.1f}%) are longer than "
                f"{lengths['max_length']} tokens and would be cut"
                + (f" (a seeded sample of {lengths['of']:,} rows)." if lengths["sampled"] < lengths["of"] else ".")
            )
        elif look.get("tokenizer_error"):
            right.caption(f"No token lengths: the tokenizer could not be loaded ({ui.plain(look['tokenizer_error'])}).")
    for d in look["duplicates"]:
        a, b = d["splits"]
        rows = f"**{d['n']:,} {b} row** has" if d["n"] == 1 else f"**{d['n']:,} {b} rows** have"
        st.warning(
            f"{rows} the same text as a {a} row (case and spaces ignored): a score on them measures memory. "
            "Examples: "
            + "; ".join(ui.plain(" / ".join(v for k, v in e.items() if k != "label")) for e in d["examples"]),
            icon=":material/content_copy:",
        )
    imbalanced = look["imbalanced"]
    if imbalanced:
        ratio = "∞" if imbalanced["ratio"] == float("inf") else f"{imbalanced['ratio']:.1f}"
        st.warning(
            f"The training split is imbalanced: **{ui.plain(imbalanced['largest'])}** has {ratio}x the rows of "
            f"**{ui.plain(imbalanced['smallest'])}** (more than {IMBALANCE:g}x). Unweighted, the model can score "
            "well by favouring the large class; balanced class weights make each class weigh the same in the "
            "loss (watch macro-F1 in the report).",
            icon=":material/balance:",
        )
        if cfg.train.class_weights != "balanced":
            st.button(
                "Use balanced class weights",
                key="use_balanced",
                on_click=lambda: st.session_state.update({weights_key: "balanced"}),
            )
    with st.expander("Example rows"):
        for split, s in look["splits"].items():
            if s.get("examples"):
                st.caption(split)
                st.dataframe(pd.DataFrame(s["examples"]), hide_index=True)
    return look
