"""Failures: every test example, split by what fine-tuning did to it, with filters, search,
sorting, and a detail view of both models' probabilities, the example's learning dynamics (p(gold)
per epoch) and its label-noise hint, if any. The Report page links here with ?cell=fixed,
?move=neutral->entailment or ?hints=1, which set the filters."""

import zlib
from pathlib import Path

import pandas as pd
import streamlit as st

from app_pages import ui
from core.results.report import CATEGORIES, build_report, load_comparison, load_report
from core.results.sections import example_trajectory, read_dynamics
from core.runs import rundir, watch
from core.runs.state import read_status

ICONS = {
    "fixed": ":green[:material/check_circle:]",
    "still failing": ":red[:material/cancel:]",
    "regressed": ":orange[:material/trending_down:]",
    "still right": ":gray[:material/check:]",
}
HELP = {
    "fixed": "wrong before, right after",
    "still failing": "wrong before and after",
    "regressed": "right before, wrong after",
    "still right": "right before and after",
}
SORTS = {
    "largest gain in p(gold) first": ("gold_prob_change", True),
    "largest loss in p(gold) first": ("gold_prob_change", False),
    "id": ("id", False),
}
CELLS = {**{c.replace(" ", "-"): c for c in CATEGORIES}, **{c: c for c in CATEGORIES}}  # ?cell= values
FILTERS = {
    "fail_category": "all",
    "fail_gold": [],
    "fail_pred_before": [],
    "fail_pred_after": [],
    "fail_tag": [],
    "fail_search": "",
    "fail_hints": False,
}


def follow_link(labels: list[str]) -> None:
    """The Report page's links as filters: ?cell=fixed (a cell of the right/wrong table),
    ?move=neutral->entailment (predicted label before -> after), ?hints=1 (label-noise hints).
    Applied once, then dropped from the URL, so the filters are the user's to change again."""
    link = {k: st.query_params.get(k) for k in ("cell", "move", "hints")}
    if not any(link.values()):
        return
    st.session_state.update(FILTERS)
    if link["cell"] in CELLS:
        st.session_state["fail_category"] = CELLS[link["cell"]]
    before, _, after = (link["move"] or "").partition("->")
    if before in labels and after in labels:
        st.session_state["fail_pred_before"], st.session_state["fail_pred_after"] = [before], [after]
    st.session_state["fail_hints"] = link["hints"] == "1"
    for k in link:
        if k in st.query_params:
            del st.query_params[k]


@st.cache_resource(max_entries=4, show_spinner=False)
def dynamics(run: str, mtime: float) -> dict:
    """predictions/dynamics.jsonl of run folder `run`, read once per version of the file (read-only)."""
    return read_dynamics(Path(run))


st.title("Failures")
run_dir = ui.selected_run()
if run_dir is None:
    ui.no_run_message("This page lists the test examples fine-tuning fixed, broke, or left failing.")
    st.stop()

ui.damage_note(run_dir)
rows, labels = load_comparison(run_dir)  # damaged rows are left out
if not rows:
    state = read_status(run_dir).get("state")
    if state in watch.ACTIVE:
        st.info(
            f"Run `{run_dir.name}` is still {state}. The test examples are scored before training and "
            "again after the last epoch; this page fills in when the run is done."
        )
        ui.rerun_when_finished(run_dir.name)
        st.page_link("app_pages/train.py", label="Watch it on the Train page", icon=":material/model_training:")
    else:
        st.warning(f"Run `{run_dir.name}` ({state}) has no before/after test predictions to compare.")
    st.stop()

st.caption(
    f"Run `{run_dir.name}` · {len(rows)} test examples · before = the model before fine-tuning, "
    "after = the best epoch by validation accuracy"
)
report = load_report(run_dir)[0] or build_report(run_dir)  # no report.json: from the other files
hints = {h["id"]: h for h in report.get("noise_hints") or []}
follow_link(labels)
counts = {c: sum(r["category"] == c for r in rows) for c in CATEGORIES}
cols = st.columns(4)
for col, cat in zip(cols, CATEGORIES):
    col.metric(f"{ICONS[cat]} {cat.capitalize()}", counts[cat], help=HELP[cat])

# --- filters ------------------------------------------------------------------------------------
category = st.radio(
    "Show",
    ["all", *CATEGORIES],
    horizontal=True,
    key="fail_category",
    format_func=lambda c: f"all ({len(rows)})" if c == "all" else f"{c} ({counts[c]})",
)
tags = sorted({r.get("tag") for r in rows if r.get("tag")})
f = st.columns(4 if tags else 3)
gold = f[0].multiselect("Gold label", labels, key="fail_gold")
pred_before = f[1].multiselect("Predicted before", labels, key="fail_pred_before")
pred_after = f[2].multiselect("Predicted after", labels, key="fail_pred_after")
tag = f[3].multiselect("Phenomenon tag", tags, key="fail_tag") if tags else []
s1, s2, s3 = st.columns([5, 3, 2], vertical_alignment="bottom") if hints else (*st.columns([3, 2]), None)
search = s1.text_input("Search premise, hypothesis or id", key="fail_search").strip().lower()
sort = s2.selectbox("Sort by change in gold-label probability", list(SORTS), key="fail_sort")
only_hints = (
    s3.checkbox(
        f"Noise hints only ({len(hints)})",
        key="fail_hints",
        help="Still failing, and contradicted confidently and consistently by the fine-tuned "
        "model: a hint to re-read, not a fact",
    )
    if s3
    else False
)

shown = [
    r
    for r in rows
    if (category == "all" or r["category"] == category)
    and (not gold or r["gold"] in gold)
    and (not pred_before or r["pred_before"] in pred_before)
    and (not pred_after or r["pred_after"] in pred_after)
    and (not tag or r.get("tag") in tag)
    and (not only_hints or r["id"] in hints)
    and (not search or search in " ".join(str(r.get(k, "")) for k in ("premise", "hypothesis", "text", "id")).lower())
]
key, descending = SORTS[sort]
shown.sort(key=lambda r: r[key], reverse=descending)

if not shown:
    st.info("No example matches these filters. Clear the search or pick fewer filters.")
    st.stop()

# --- table and detail ---------------------------------------------------------------------------
st.caption(f"{len(shown)} of {len(rows)} examples · click a row to see it in detail below")
df = pd.DataFrame(
    [
        {
            "category": r["category"],
            "gold": r["gold"],
            "before": r["pred_before"],
            "after": r["pred_after"],
            "Δ p(gold)": r["gold_prob_change"],
            "premise": r.get("premise") or r.get("text", ""),
            "hypothesis": r.get("hypothesis", ""),
            "tag": r.get("tag", ""),
            "id": r["id"],
        }
        for r in shown
    ]
)
if not tags:
    df = df.drop(columns="tag")
signature = f"{category}|{gold}|{pred_before}|{pred_after}|{tag}|{search}|{sort}|{only_hints}"
event = st.dataframe(
    df,
    on_select="rerun",
    selection_mode="single-row",
    hide_index=True,
    height=min(318, 35 * (len(df) + 1) + 3),
    key=f"fail_table:{zlib.crc32(signature.encode())}",
    column_config={
        "Δ p(gold)": st.column_config.NumberColumn(format="%+.3f", width="small"),
        "premise": st.column_config.TextColumn(width="large"),
        "hypothesis": st.column_config.TextColumn(width="large"),
    },
)
picked = event.selection.rows if event and event.selection else []
r = shown[picked[0]] if picked and picked[0] < len(shown) else shown[0]

with st.container(border=True, key="detail"):
    text, chart = st.columns([1, 1], gap="large")
    with text:
        # every text from the data through ui.plain: a link, image or HTML in it shows as typed
        st.subheader(f"{ICONS[r['category']]} {r['category'].capitalize()} · {ui.plain(r['id'])}", anchor=False)
        if r.get("premise") or r.get("hypothesis"):
            st.markdown(f"**Premise:** {ui.plain(r.get('premise', ''))}")
            st.markdown(f"**Hypothesis:** {ui.plain(r.get('hypothesis', ''))}")
        else:
            st.markdown(f"**Text:** {ui.plain(r.get('text', ''))}")
        st.markdown(f"**Gold:** {ui.plain(r['gold'])}" + (f" · **tag:** {ui.plain(r['tag'])}" if r.get("tag") else ""))
        st.markdown(
            f"**Before:** {ui.plain(r['pred_before'])} (p(gold) = {r['gold_prob_before']:.3f}) → "
            f"**after:** {ui.plain(r['pred_after'])} (p(gold) = {r['gold_prob_after']:.3f}, "
            f"{r['gold_prob_change']:+.3f})"
        )
        if not picked:
            st.caption("Showing the first example of the table; click a row to see another.")
        hint = hints.get(r["id"])
        if hint:
            checked = (
                f" at each of the last {hint['consistent_epochs']} epochs" if hint.get("consistent_epochs") else ""
            )
            st.warning(
                f"**Label-noise hint, not a fact:** the fine-tuned model says **{ui.plain(hint['model_label'])}** "
                f"(p = {hint['confidence']:.2f}){checked}, where the given label is **{ui.plain(hint['given'])}**. "
                "Re-read it: the label may be wrong or ambiguous, or the model confidently wrong.",
                icon=":material/help:",
            )
    chart.plotly_chart(
        ui.probs_figure(labels, r["probs_before"], r["probs_after"], r["gold"]), config=ui.PLOTLY, key="detail_probs"
    )

    # --- learning dynamics: p(gold) per epoch ----------------------------------------------------
    dyn_file = run_dir / rundir.PREDICTIONS / rundir.DYNAMICS
    try:
        dyn = dynamics(str(run_dir), dyn_file.stat().st_mtime)
    except OSError:  # no dynamics file (yet)
        dyn = {}
    best = report.get("best_epoch")
    traj = example_trajectory(dyn, r["id"], r["gold"], labels)
    if traj is None or len(traj["epochs"]) < 2:  # no per-epoch test scores: before and after only
        traj = {
            "split": "test, before and after only",
            "epochs": [0, best if best is not None else 1],
            "p_gold": [r["gold_prob_before"], r["gold_prob_after"]],
            "pred": [r["pred_before"], r["pred_after"]],
            "correct": [r["pred_before"] == r["gold"], r["pred_after"] == r["gold"]],
        }
        traj["first_learned"] = next((e for e, c in zip(traj["epochs"], traj["correct"]) if c), None)
        traj["forgotten_at"] = [traj["epochs"][1]] if traj["correct"] == [True, False] else []
    words, plot = st.columns([1, 1], gap="large")
    with words:
        st.markdown("**Learning dynamics**")
        first = traj["first_learned"]
        st.markdown(
            "Never right at any recorded epoch."
            if first is None
            else "Already right before training."
            if first == 0
            else f"Learned at epoch {first}."
        )
        if traj["forgotten_at"]:
            st.markdown(f"Forgotten at epoch {', '.join(map(str, traj['forgotten_at']))} (right before, wrong then).")
        else:
            st.markdown("Never forgotten." if first is not None else "")
        st.caption(
            f"Recorded epochs: {', '.join(map(str, traj['epochs']))} (0 = before training"
            + (f"; the fine-tuned model is epoch {best})" if best is not None else ")")
        )
    plot.plotly_chart(ui.trajectory_figure(traj, best), config=ui.PLOTLY, key="detail_trajectory")
