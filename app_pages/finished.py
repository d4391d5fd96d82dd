"""A run that is no longer training, on the Train page: the summary of a finished run (test accuracy
before and after, links to the report and the failure cases, its curves) and the Resume button of a
stopped or failed one.
"""

from pathlib import Path

import streamlit as st

from app_pages import ui
from app_pages.runcharts import draw_metrics_row, draw_resources
from core import jobs
from core.checkpoint import latest_state
from core.results.report import load_report
from core.runs import rundir, watch
from core.runs.state import read_status
from core.runs.watch import format_duration


def draw_done(run_dir: Path, snap: dict) -> None:
    report = load_report(run_dir)[0] or {}  # a damaged report.json: rebuilt (the damage note names it)
    b, a = report.get("test_before"), report.get("test_after")
    if b and a:
        c = st.columns(6)
        c[0].metric("Test accuracy before", f"{100 * b['accuracy']:.1f}%")
        c[1].metric(
            "Test accuracy after",
            f"{100 * a['accuracy']:.1f}%",
            delta=f"{100 * (a['accuracy'] - b['accuracy']):+.1f} points",
        )
        c[2].metric("Test examples", f"{a['n']}")
        c[3].metric("Best epoch", f"{report.get('best_epoch')}")
        c[4].metric("Total time", format_duration(report.get("total_s"), short=True))
    st.success("Done. Read the full report, or look at the examples fine-tuning fixed and broke.")
    l1, l2, _ = st.columns([1, 1, 3])
    l1.page_link("app_pages/report.py", label="Open the report", icon=":material/summarize:")
    l2.page_link("app_pages/failures.py", label="Open the failure cases", icon=":material/rule:")
    with st.expander("Training curves and resources", expanded=True):
        draw_metrics_row(snap)
        draw_resources(snap)


def resume_button(run_dir: Path) -> None:
    """Resume a stopped or failed run from its last full-state checkpoint (core.jobs.resume);
    nothing for a session that may not resume runs (public mode)."""
    if not ui.may("resume"):
        return
    state = latest_state(run_dir / rundir.CHECKPOINTS)
    where = (
        f"from step {int(state.name.split('-')[1])}"
        if state is not None
        else "from the start (no training checkpoint was saved yet)"
    )
    if st.button(
        "Resume",
        icon=":material/play_arrow:",
        key=f"resume:{run_dir.name}",
        help=f"Continue this run {where}, with the same settings and seed: the result equals an uninterrupted run.",
    ):
        try:
            jobs.resume(run_dir, password=ui.typed_password())
        except (ValueError, OSError) as e:
            st.error(f"Could not resume: {e}")
            return
        rundir.wait_for(lambda: read_status(run_dir).get("state") in watch.ACTIVE, timeout=15)
        st.rerun()
    st.caption(f"Resume continues {where}.")
