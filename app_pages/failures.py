"""Failures: every test example, split by what fine-tuning did to it, with filters, search,
sorting, and a detail view of both models' probabilities."""

import zlib

import pandas as pd
import streamlit as st

from app_pages import ui
from core.runs import live, rundir
from core.report import CATEGORIES, load_comparison

ICONS = {"fixed": ":green[:material/check_circle:]", "still failing": ":red[:material/cancel:]",
         "regressed": ":orange[:material/trending_down:]", "still right": ":gray[:material/check:]"}
HELP = {"fixed": "wrong before, right after", "still failing": "wrong before and after",
        "regressed": "right before, wrong after", "still right": "right before and after"}
SORTS = {"largest gain in p(gold) first": ("gold_prob_change", True),
         "largest loss in p(gold) first": ("gold_prob_change", False),
         "id": ("id", False)}

st.title("Failures")
run_dir = ui.selected_run()
if run_dir is None:
    ui.no_run_message("This page lists the test examples fine-tuning fixed, broke, or left failing.")
    st.stop()

rows, labels = load_comparison(run_dir)
if not rows:
    state = rundir.read_status(run_dir).get("state")
    if state in live.ACTIVE:
        st.info(f"Run `{run_dir.name}` is still {state}. The test examples are scored before training and "
                "again after the last epoch; this page fills in when the run is done.")
        ui.rerun_when_finished(run_dir.name)
        st.page_link("app_pages/train.py", label="Watch it on the Train page", icon=":material/model_training:")
    else:
        st.warning(f"Run `{run_dir.name}` ({state}) has no before/after test predictions to compare.")
    st.stop()

st.caption(f"Run `{run_dir.name}` · {len(rows)} test examples · before = the model before fine-tuning, "
           "after = the best epoch by validation accuracy")
counts = {c: sum(r["category"] == c for r in rows) for c in CATEGORIES}
cols = st.columns(4)
for col, cat in zip(cols, CATEGORIES):
    col.metric(f"{ICONS[cat]} {cat.capitalize()}", counts[cat], help=HELP[cat])

# --- filters ------------------------------------------------------------------------------------
category = st.radio("Show", ["all", *CATEGORIES], horizontal=True, key="fail_category",
                    format_func=lambda c: f"all ({len(rows)})" if c == "all" else f"{c} ({counts[c]})")
tags = sorted({r.get("tag") for r in rows if r.get("tag")})
f = st.columns(4 if tags else 3)
gold = f[0].multiselect("Gold label", labels, key="fail_gold")
pred_before = f[1].multiselect("Predicted before", labels, key="fail_pred_before")
pred_after = f[2].multiselect("Predicted after", labels, key="fail_pred_after")
tag = f[3].multiselect("Phenomenon tag", tags, key="fail_tag") if tags else []
s1, s2 = st.columns([3, 2])
search = s1.text_input("Search premise, hypothesis or id", key="fail_search").strip().lower()
sort = s2.selectbox("Sort by change in gold-label probability", list(SORTS), key="fail_sort")

shown = [r for r in rows
         if (category == "all" or r["category"] == category)
         and (not gold or r["gold"] in gold)
         and (not pred_before or r["pred_before"] in pred_before)
         and (not pred_after or r["pred_after"] in pred_after)
         and (not tag or r.get("tag") in tag)
         and (not search or search in " ".join(str(r.get(k, "")) for k in ("premise", "hypothesis", "text", "id")).lower())]
key, descending = SORTS[sort]
shown.sort(key=lambda r: r[key], reverse=descending)

if not shown:
    st.info("No example matches these filters. Clear the search or pick fewer filters.")
    st.stop()

# --- table and detail ---------------------------------------------------------------------------
st.caption(f"{len(shown)} of {len(rows)} examples · click a row to see it in detail below")
df = pd.DataFrame([{"category": r["category"], "gold": r["gold"], "before": r["pred_before"],
                    "after": r["pred_after"], "Δ p(gold)": r["gold_prob_change"],
                    "premise": r.get("premise") or r.get("text", ""), "hypothesis": r.get("hypothesis", ""),
                    "tag": r.get("tag", ""), "id": r["id"]}
                   for r in shown])
if not tags:
    df = df.drop(columns="tag")
signature = f"{category}|{gold}|{pred_before}|{pred_after}|{tag}|{search}|{sort}"
event = st.dataframe(df, on_select="rerun", selection_mode="single-row", hide_index=True,
                     height=min(318, 35 * (len(df) + 1) + 3),
                     key=f"fail_table:{zlib.crc32(signature.encode())}",
                     column_config={"Δ p(gold)": st.column_config.NumberColumn(format="%+.3f", width="small"),
                                    "premise": st.column_config.TextColumn(width="large"),
                                    "hypothesis": st.column_config.TextColumn(width="large")})
picked = event.selection.rows if event and event.selection else []
r = shown[picked[0]] if picked and picked[0] < len(shown) else shown[0]

with st.container(border=True, key="detail"):
    text, chart = st.columns([1, 1], gap="large")
    with text:
        st.subheader(f"{ICONS[r['category']]} {r['category'].capitalize()} · `{r['id']}`", anchor=False)
        if r.get("premise") or r.get("hypothesis"):
            st.markdown(f"**Premise:** {r.get('premise', '')}")
            st.markdown(f"**Hypothesis:** {r.get('hypothesis', '')}")
        else:
            st.markdown(f"**Text:** {r.get('text', '')}")
        st.markdown(f"**Gold:** {r['gold']}" + (f" · **tag:** {r['tag']}" if r.get("tag") else ""))
        st.markdown(f"**Before:** {r['pred_before']} (p(gold) = {r['gold_prob_before']:.3f}) → "
                    f"**after:** {r['pred_after']} (p(gold) = {r['gold_prob_after']:.3f}, {r['gold_prob_change']:+.3f})")
        if not picked:
            st.caption("Showing the first example of the table; click a row to see another.")
    chart.plotly_chart(ui.probs_figure(labels, r["probs_before"], r["probs_after"], r["gold"]), config=ui.PLOTLY, key="detail_probs")
