"""Train: choose settings, see what will happen, launch the trainer, and watch it live.

The trainer runs as its own process (core.jobs.launch); this page only reads the run folder, so
closing the tab or restarting the server loses nothing: the live view re-attaches from disk.
The live view is app_pages/live.py, a finished run's summary and Resume app_pages/finished.py, the
"Start a new run" form and its plan app_pages/launch.py.
"""

from pathlib import Path

import streamlit as st

from app_pages import finished, launch, live, ui
from app_pages.runcharts import draw_metrics_row, draw_resources
from core.runs import rundir, watch
from core.runs.state import read_status


def draw_selected(run_dir: Path) -> bool:
    """The selected run's panel; returns whether the run is still active."""
    # A live run: the reader its live view shares (new lines only); an ended one: read once per
    # version of its files (core.runs.watch.snapshot keeps it), not on every visit.
    active = read_status(run_dir).get("state") in watch.ACTIVE
    snap = live.watcher(str(run_dir)).snapshot() if active else watch.snapshot(run_dir)
    state = snap["state"]
    st.markdown(f"#### {ui.run_title(run_dir, snap['status'])}")
    ui.damage_note(run_dir)
    if state in watch.ACTIVE:
        live.live_view(run_dir.name, snap)
        return True
    if state == rundir.DAMAGED:
        st.error(
            "This run's state is unknown because its status.json cannot be read. Its log and whatever "
            "its other files hold are below; start a new run to train again."
        )
        with st.expander("Last lines of train.log"):
            st.code(watch.log_tail(run_dir) or "(train.log is empty)", language="text")
        draw_metrics_row(snap)
    elif state == "done":
        finished.draw_done(run_dir, snap)
    elif state == "failed":
        st.error(f"The run failed: {ui.plain(snap['status'].get('error') or 'no error message recorded')}")
        finished.resume_button(run_dir)
        if snap["status"].get("traceback"):
            with st.expander("Traceback"):
                st.code(snap["status"]["traceback"], language="text")
        with st.expander("Last lines of train.log"):
            st.code(watch.log_tail(run_dir) or "(train.log is empty)", language="text")
        draw_metrics_row(snap)
    elif state == "stopped":
        p = snap["progress"]
        st.warning(
            f"Stopped at step {p['step']} of {p['total_steps'] or '?'}."
            + (
                f" Resume continues from the last checkpoint in `{run_dir / rundir.CHECKPOINTS}`."
                if ui.may("resume")
                else ""
            )
        )
        finished.resume_button(run_dir)
        draw_metrics_row(snap)
        draw_resources(snap)
    else:
        st.warning(f"This run folder has an unknown state {state!r}.")
    return False


# --- the page -----------------------------------------------------------------------------------

st.title("Train")
may_launch = ui.access_gate()  # public mode: a read-only line, or the password field until it is right
run_dir = ui.selected_run()
active = False
if run_dir:
    active = draw_selected(run_dir)
elif may_launch:
    st.info(
        "**No runs yet.** Pick a preset below and press **Launch**. The embedded demo fine-tunes a small "
        "sentence model in 4-bit on the built-in NLI sample, offline, on the CPU, in about a minute or two on "
        "2 cores (for a quicker look, set *Epochs* to 1). You watch it live here, then open "
        "**Report** and **Failures**."
    )
else:
    st.info("**No runs yet** in this deployment's runs folder.")
if may_launch:
    # Built only when open (on_change="rerun" gives the expander a state): while a run is watched,
    # the collapsed form costs neither the server nor the browser anything on each refresh.
    new_run = st.expander(
        "Start a new run",
        expanded=not active,
        icon=":material/rocket_launch:",
        key=f"new_run:{'watching' if active else 'idle'}",
        on_change="rerun",
    )
    if new_run.open:
        with new_run:
            launch.settings_form()
