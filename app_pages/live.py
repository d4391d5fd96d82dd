"""The live view of a queued or running run: three fragments that refresh themselves (progress and
numbers, the loss and validation charts, the resource charts), at intervals stretched when several
browser sessions watch a run that trains on the CPU, and the Stop button.

Every session watching a run shares one reader of its run folder (watcher(): new lines only) and
the SVG charts drawn from it (app_pages/runcharts.py). Used by the Train page (app_pages/train.py).
"""

import gc
import time
import uuid
from pathlib import Path

import streamlit as st

from app_pages import ui
from app_pages.runcharts import draw_curves, draw_metrics_row, draw_resources
from core import jobs
from core.runs import rundir, watch
from core.runs.state import read_config, stop_requested

LIVE_EVERY = 3.0  # seconds between refreshes of the progress bar, the ETA and the numbers
CHARTS_EVERY = 12.0  # ... of the loss and validation charts (figures built once per this, for all viewers)
RESOURCES_EVERY = 30.0  # ... of the CPU / RAM / GPU charts


FREEZE_ABOVE = 50_000  # objects the cyclic garbage collector may walk after each script run
FREEZE_CHECK_EVERY = 30.0  # seconds


@st.cache_resource(show_spinner=False)
def _collector_state() -> dict:
    return {"checked": 0.0, "frozen": 0}


def spare_the_collector() -> None:
    """Keep Streamlit's garbage collection after every script run cheap while a run is watched.

    Streamlit runs a full gc.collect() after each script run, fragment reruns included (its hidden
    option runner.postScriptGC). This server has imported torch, transformers and peft (the plan,
    the hardware line): over half a million objects, which one collection walks in 0.3-0.8 s of
    CPU. A live view refreshing every 2 s then cost ~45% of a core per viewer (measured with
    bench/live_view.py), taken from the trainer. gc.freeze() moves every object alive now (right
    after the last collection: modules, caches) to a generation the collector skips; objects
    made later are collected as before. Checked at most every FREEZE_CHECK_EVERY s, done when
    more than FREEZE_ABOVE objects are in the oldest generation (once per server, in practice)."""
    state = _collector_state()
    now = time.monotonic()
    if now - state["checked"] < FREEZE_CHECK_EVERY:
        return
    state["checked"] = now
    if len(gc.get_objects(generation=2)) > FREEZE_ABOVE:
        gc.freeze()
        state["frozen"] = gc.get_freeze_count()


@st.cache_resource(max_entries=16, show_spinner=False)
def watcher(run_dir: str) -> watch.LiveRun:
    """One LiveRun per run folder for the whole server: every session watching a run shares its
    reading of the run folder (only new lines are read) and its snapshots."""
    return watch.LiveRun(Path(run_dir))


BASE_EVERY = {"progress": LIVE_EVERY, "charts": CHARTS_EVERY, "resources": RESOURCES_EVERY}
VIEWER_KEY = "viewer_id"  # session_state: this browser session's id among a run's viewers


def refresh_every(run_id: str, snap: dict, current: float | None = None) -> tuple[dict[str, float], int]:
    """This session's refresh intervals for the run, and how many sessions watch it (this one
    counted in, refreshing every `current` s so far): the base intervals when the run trains on a
    GPU; on the CPU, the base ones times the number of viewers (core.runs.watch.refresh_intervals),
    so that three tabs on the trainer's machine take from it what one does."""
    session = st.session_state.setdefault(VIEWER_KEY, uuid.uuid4().hex)
    run_dir = rundir.run_path(run_id)
    w = watcher(str(run_dir))
    viewers = w.watched_by(session, current or LIVE_EVERY)
    config = None if (snap.get("setup") or {}).get("device") else read_config(run_dir)[0]  # until setup
    cpu = watch.trains_on_cpu(snap, config, bool(ui.hardware().get("gpus")))
    every = watch.refresh_intervals(BASE_EVERY, viewers, cpu)
    w.watched_by(session, every["progress"])
    return every, (viewers if cpu else 1)


def live_view(run_id: str, snap: dict) -> None:
    """The live view of a queued or running run: three fragments that refresh themselves, the
    progress and numbers, the loss and validation charts less often, the resource charts least,
    each at refresh_every's interval. Each rerun costs a browser ~90 ms of JavaScript whatever it
    holds, and the charts are SVG images (no Plotly.js to load): taken from a CPU trainer on the
    same machine (bench/live_view.py, bench/RESULTS.md). All read the run through the shared
    watcher(): new lines only."""
    every, _ = refresh_every(run_id, snap)
    st.fragment(live_progress, run_every=every["progress"])(run_id, every, snap["state"])
    st.fragment(live_charts, run_every=every["charts"])(run_id, every)
    st.fragment(live_resources, run_every=every["resources"])(run_id, every)


def live_progress(run_id: str, every: dict[str, float], drawn_state: str) -> None:
    spare_the_collector()
    run_dir = rundir.run_path(run_id)
    snap = watcher(str(run_dir)).snapshot()
    if snap["state"] != drawn_state:
        st.rerun()  # queued -> running, or finished: the whole page (title, sidebar) shows the new state
    now_every, viewers = refresh_every(run_id, snap, every["progress"])
    if now_every != every:
        st.rerun()  # viewers came or went: the whole page gives the fragments their new intervals
    head, stop = st.columns([5, 1])
    head.progress(snap["progress"]["fraction"], text=snap["progress"]["text"])
    if stop_requested(run_dir):
        stop.caption("Stopping after the current step…")
    elif ui.may("stop") and stop.button(
        "Stop", icon=":material/stop:", key=f"stop:{run_id}", help="Ends the run cleanly after the current step"
    ):
        try:  # public mode (core/access.py): core checks the password this session typed
            jobs.stop(run_dir, password=ui.typed_password())
            st.toast("Asked the trainer to stop after its current step.")
        except ValueError as e:
            st.error(str(e))
    if not snap["setup"]:
        st.info(
            "Loading the data and the model… the first numbers appear after the model has "
            "been evaluated once before training."
        )
    draw_metrics_row(snap, charts=False)
    if viewers > 1:
        st.caption(
            f"{viewers} browser sessions are watching this run, which trains on the CPU: each refreshes "
            f"every {every['progress']:.0f} s (charts every {every['charts']:.0f} s), so that together they "
            "take from the trainer what one would."
        )


def live_charts(run_id: str, every: dict[str, float]) -> None:
    # max_age: every viewer whose timer fires within one interval gets the same snapshot (version),
    # so the figures are built once per interval for all of them, and re-sent unchanged.
    snap = watcher(str(rundir.run_path(run_id))).snapshot(max_age=every["charts"] - 0.5)
    draw_curves(snap, svg=True)


def live_resources(run_id: str, every: dict[str, float]) -> None:
    # the charts' shared snapshot: its SVG charts (resources included) are already drawn
    snap = watcher(str(rundir.run_path(run_id))).snapshot(max_age=every["charts"] - 0.5)
    draw_resources(snap, svg=True)
