"""Playground: type an input and see the label probabilities of a finished run's model before
training (checkpoints/epoch-0: the untrained adapter and random head) and after (the best epoch),
side by side. Models load through core.classifier.load_classifier, as the run loaded them, and are
kept for the whole server by core/model_pool.py (a few at a time, one loading at a time: a visitor
who would have to wait for another's load is told the Playground is busy)."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from app_pages import ui
from core.model_pool import POOL, Busy
from core.results import compare
from core.runs.state import list_runs

st.title("Playground")


runs = [r for r in list_runs() if r["state"] == "done" and not r.get("damaged")]
if not runs:
    st.info("No finished run yet. When a run on the **Train** page is done, try its model here.")
    st.stop()
by_id = {r["id"]: r for r in runs}
ids = list(by_id)
current = st.session_state.get(ui.RUN_KEY)
if st.session_state.get("playground_run") not in by_id:
    st.session_state["playground_run"] = current if current in by_id else ids[0]
run_id = st.selectbox("Finished run", ids, key="playground_run")
run_dir = by_id[run_id]["path"]

folders = compare.checkpoint_folders(run_dir)
if folders is None:
    st.info(f"Run `{run_id}` has no best epoch on record, so there is no fine-tuned model to try.")
    st.stop()
before_dir, after_dir = folders
kinds = [compare.classifier_input_kind(f) for f in folders]
if None in kinds:
    st.info(
        f"Run `{run_id}` was saved before checkpoints carried a classifier.json, so its models cannot be "
        "loaded here; train a new run to try one."
    )
    st.stop()
kind = kinds[1]

if kind == "text":
    text = st.text_area("Text", key="playground_text")
    row = {"text": text}
    ready = bool(text.strip())
else:
    premise = st.text_area("Premise", key="playground_premise")
    hypothesis = st.text_area("Hypothesis", key="playground_hypothesis")
    row = {"premise": premise, "hypothesis": hypothesis}
    ready = bool(premise.strip()) and bool(hypothesis.strip())
if not ready:
    st.caption(
        "Type "
        + ("a text" if kind == "text" else "a premise and a hypothesis")
        + " to see how the model scored it before and after fine-tuning."
    )
    st.stop()

try:
    with st.spinner("Loading the models (the base model in 4 bits, as the run loaded it)…"):
        before_model = POOL.get(before_dir)
        after_model = POOL.get(after_dir)
    before_p = before_model.predict([row])[0]
    after_p = after_model.predict([row])[0]
except Busy as e:  # other visitors' models are loading: say so now rather than time out
    st.info(str(e), icon=":material/hourglass_top:")
    st.button("Try again", key="playground_retry")
    st.stop()
except Exception as e:  # a damaged checkpoint, a base model no longer available, ...
    st.error(f"The models of run `{run_id}` could not be loaded or run ({type(e).__name__}: {ui.plain(e)}).")
    st.stop()

labels = list(after_model.labels)
shown = [ui.chart_text(label) for label in labels]  # labels from the run's classifier.json: no markup in the chart
best = after_dir.name.removeprefix("epoch-")
st.dataframe(
    pd.DataFrame(
        [
            {"model": "before (epoch 0)", **{lab: round(float(p), 4) for lab, p in zip(labels, before_p)}},
            {"model": f"after (epoch {best})", **{lab: round(float(p), 4) for lab, p in zip(labels, after_p)}},
        ]
    ),
    hide_index=True,
    key="playground_probs",
)
fig = go.Figure(
    [
        go.Bar(name="before (epoch 0)", x=shown, y=[float(p) for p in before_p], marker_color=ui.COLORS["before"]),
        go.Bar(name=f"after (epoch {best})", x=shown, y=[float(p) for p in after_p], marker_color=ui.COLORS["after"]),
    ]
)
fig.update_layout(
    barmode="group",
    yaxis=dict(title="probability", range=[0, 1]),
    height=340,
    margin=dict(l=10, r=10, t=30, b=10),
    legend=dict(orientation="h", y=-0.2),
)
st.plotly_chart(fig, config=ui.PLOTLY, key="playground_bars")
st.caption(f"Before: {ui.plain(labels[int(before_p.argmax())])} · after: {ui.plain(labels[int(after_p.argmax())])}.")
