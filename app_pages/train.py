"""Train: choose settings, see what will happen, launch the trainer, and watch it live.

The trainer runs as its own process (core.jobs.launch); this page only reads the run folder, so
closing the tab or restarting the server loses nothing: the live view re-attaches from disk.
"""

import json
from pathlib import Path

import pandas as pd
import streamlit as st

from app_pages import svgchart, ui
from core import access, estimate, jobs, uploads
from core.config import BUILTIN_DATA, EMBEDDED_MODEL, NLI_LABELS, PRESETS, get_preset, override
from core.results.report import load_report
from core.runs import rundir, watch
from core.runs.state import read_config, read_status, stop_requested
from core.runs.watch import format_duration

DATA_CHOICES = {
    "builtin": "Built-in NLI sample",
    "hub": "Hugging Face Hub dataset",
    "upload": "Upload files (CSV / JSONL)",
}
PRESET_LABELS = {"demo": "Embedded demo (MiniLM, CPU, offline)", "phi2-snli": "Phi-2 on SNLI (GPU, Hub)"}


# --- the selected run ---------------------------------------------------------------------------

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
    import gc
    import time

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


def curve_figures(snap: dict) -> dict:
    """The loss and validation Plotly figures of a finished (or stopped, failed) run."""
    s = watch.chart_series(snap)
    return {"loss": ui.loss_figure(s["loss"], s["epochs"]), "val": ui.val_accuracy_figure(s["validation"])}


# The resource charts, Plotly (finished runs) or SVG (live): name -> (title, [(key, series name)], unit).
RESOURCE_CHARTS = {
    "cpu": ("CPU (100% = one core)", [("cpu_percent", "trainer CPU")], "%"),
    "ram": ("RAM", [("rss_gb", "trainer RSS"), ("ram_used_gb", "machine used")], "GiB"),
    "gpu": ("GPU", [("gpu_mem_gb", "memory (GiB)"), ("gpu_util", "utilisation (%)")], "GiB / %"),
}


def resource_charts(res: list[dict]) -> dict[str, tuple]:
    """RESOURCE_CHARTS without the GPU chart when no sample has GPU memory."""
    return {
        name: chart for name, chart in RESOURCE_CHARTS.items() if name != "gpu" or any("gpu_mem_gb" in r for r in res)
    }


def resource_figures(snap: dict) -> dict:
    """CPU, RAM (and GPU) Plotly figures of a finished (or stopped, failed) run."""
    res = watch.chart_series(snap)["resources"]
    return {
        name: ui.resources_figure(res, keys, title, unit) for name, (title, keys, unit) in resource_charts(res).items()
    }


def _live_charts(snap: dict) -> dict[str, str]:
    """The live view's charts as SVG (app_pages/svgchart.py: nothing for the browser to load or
    compute): the same curves as the Plotly figures of a finished run."""
    s = watch.chart_series(snap)
    line, second = ui.COLORS["line"], ui.COLORS["second"]
    spe = (s["loss"][0].get("steps_per_epoch") or 1) if s["loss"] else 1
    charts = {
        "loss": svgchart.line_chart(
            "Training loss",
            [
                svgchart.Series("step loss", [(r["step"], r["loss"]) for r in s["loss"]], line),
                svgchart.Series(
                    "epoch mean",
                    [(e["epoch"] * spe, e["train_loss"]) for e in s["epochs"]],
                    second,
                    lines=False,
                    markers=True,
                    marker_size=5,
                ),
            ],
            "optimiser step",
            "cross-entropy",
        )
    }
    curve = s["validation"]
    charts["val"] = svgchart.line_chart(
        "Validation accuracy by epoch (0 = before training)",
        [
            svgchart.Series(
                "validation",
                [(c["epoch"], 100 * c["accuracy"]) for c in curve],
                line,
                markers=True,
                marker_size=4,
                labels=[f"{100 * c['accuracy']:.1f}%" for c in curve],
            )
        ],
        "epoch",
        "accuracy (%)",
        y_range=(0, 105),
        integer_x=True,
    )
    res = s["resources"]
    for name, (title, keys, unit) in resource_charts(res).items():
        charts[name] = svgchart.line_chart(
            title,
            [
                svgchart.Series(label, [(r["elapsed_s"], r[k]) for r in res if k in r], color)
                for (k, label), color in zip(keys, (line, second))
            ],
            "seconds",
            unit,
            height=220,
        )
    return charts


# The live charts of a LiveRun snapshot are drawn once per (run, version) for every session that
# watches the run. Shared: read only.
@st.cache_resource(max_entries=32, show_spinner=False, ttl=900)
def _shared_live_charts(run_id: str, version: tuple, _snap: dict) -> dict[str, str]:
    return _live_charts(_snap)


def live_charts_of(snap: dict) -> dict[str, str]:
    """SVG charts of a LiveRun snapshot (it has a version): shared by every session."""
    return _shared_live_charts(snap["run_id"], snap["version"], snap)


def draw_metrics_row(snap: dict, charts: bool = True) -> None:
    p = snap["progress"]
    tp = p["throughput"]
    curve = watch.validation_curve(snap["evals"])
    c = st.columns(6)
    c[0].metric("Elapsed", format_duration(p["elapsed_s"], short=True))
    if snap["state"] in watch.ACTIVE:
        c[1].metric("Time left", format_duration(p["eta_s"], short=True) if p["eta_s"] is not None else "measuring…")
    else:
        c[1].metric("Steps", f"{p['step']}/{p['total_steps'] or '?'}")
    c[2].metric("Pairs / s", f"{tp['samples_per_s']:.1f}" if tp else "–")
    c[3].metric("Tokens / s", f"{tp['tokens_per_s']:.0f}" if tp else "–")
    c[4].metric(
        "MFU",
        f"{100 * tp['mfu']:.1f}%" if tp and tp.get("mfu") is not None else "–",
        help="Model FLOPs utilisation over the last steps: FLOPs per real token "
        "(4N + 6·ΣLoRA r(d_in+d_out) + 12·L·s·d) × real tokens/s ÷ the GPU's dense "
        "bf16/fp16 peak. Shown on GPUs with a known peak; – on CPU.",
    )
    c[5].metric(
        "Validation accuracy",
        f"{100 * curve[-1]['accuracy']:.1f}%" if curve else "–",
        help="Latest validation pass (epoch 0 = before training)",
    )
    if charts:
        draw_curves(snap)


def draw_curves(snap: dict, svg: bool = False) -> None:
    """The training loss by step and the validation accuracy by epoch (at most watch.MAX_POINTS
    points each): Plotly figures, or with `svg` the live view's light SVG charts."""
    if snap["steps"] or watch.validation_curve(snap["evals"]):
        left, right = st.columns(2)
        if svg:
            charts = live_charts_of(snap)
            left.image(charts["loss"], width="stretch")
            right.image(charts["val"], width="stretch")
            return
        figs = curve_figures(snap)
        left.plotly_chart(figs["loss"], config=ui.PLOTLY, key=f"loss:{snap['run_id']}")
        right.plotly_chart(figs["val"], config=ui.PLOTLY, key=f"val:{snap['run_id']}")


def draw_resources(snap: dict, svg: bool = False) -> None:
    if not snap["resources"]:
        return
    figs = live_charts_of(snap) if svg else resource_figures(snap)
    cols = st.columns(3 if "gpu" in figs else 2)
    for col, name in zip(cols, ("cpu", "ram", "gpu")):
        if name in figs:
            if svg:
                col.image(figs[name], width="stretch")
            else:
                col.plotly_chart(figs[name], config=ui.PLOTLY, key=f"{name}:{snap['run_id']}")
    if "gpu" not in figs:
        st.caption("No GPU in use: this run trains on the CPU.")


BASE_EVERY = {"progress": LIVE_EVERY, "charts": CHARTS_EVERY, "resources": RESOURCES_EVERY}
VIEWER_KEY = "viewer_id"  # session_state: this browser session's id among a run's viewers


def refresh_every(run_id: str, snap: dict, current: float | None = None) -> tuple[dict[str, float], int]:
    """This session's refresh intervals for the run, and how many sessions watch it (this one
    counted in, refreshing every `current` s so far): the base intervals when the run trains on a
    GPU; on the CPU, the base ones times the number of viewers (core.runs.watch.refresh_intervals),
    so that three tabs on the trainer's machine take from it what one does."""
    import uuid

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


def draw_selected(run_dir: Path) -> bool:
    """The selected run's panel; returns whether the run is still active."""
    snap = watch.snapshot(run_dir)
    state = snap["state"]
    st.markdown(f"#### {ui.run_title(run_dir, snap['status'])}")
    ui.damage_note(run_dir)
    if state in watch.ACTIVE:
        live_view(run_dir.name, snap)
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
        draw_done(run_dir, snap)
    elif state == "failed":
        st.error(f"The run failed: {ui.plain(snap['status'].get('error') or 'no error message recorded')}")
        resume_button(run_dir)
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
        resume_button(run_dir)
        draw_metrics_row(snap)
        draw_resources(snap)
    else:
        st.warning(f"This run folder has an unknown state {state!r}.")
    return False


def resume_button(run_dir: Path) -> None:
    """Resume a stopped or failed run from its last full-state checkpoint (core.jobs.resume);
    nothing for a session that may not resume runs (public mode)."""
    if not ui.may("resume"):
        return
    from core.checkpoint import latest_state

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


# --- the form -----------------------------------------------------------------------------------


@st.cache_data(show_spinner=False, max_entries=16)
def parse_upload(name: str, data: bytes) -> list[dict]:
    return uploads.read_upload(name, data)


@st.cache_data(show_spinner="Reading the model's configuration…", max_entries=32)
def model_facts(model_json: str, n_labels: int, lora_json: str) -> dict:
    """Parameter counts and shape without weights (cached: it builds the model on the meta device)."""
    from core.config import DataConfig, LoraSettings, ModelConfig, RunConfig

    cfg = RunConfig(
        model=ModelConfig(**json.loads(model_json)),
        data=DataConfig(labels=[f"class{i}" for i in range(n_labels)]),
        lora=LoraSettings(**json.loads(lora_json)),
    )
    return estimate.model_facts_or_error(cfg)


def upload_section(k) -> tuple[dict, dict, dict, list[str]]:
    """Uploaders, previews and column mapping; returns (config changes, files, row counts, errors)."""
    errors: list[str] = []
    files: dict[str, tuple[str, bytes]] = {}
    parsed: dict[str, list[dict]] = {}
    kinds = ["csv", "tsv", "jsonl", "json", "parquet"]
    cols = st.columns(3)
    for col, split, label in zip(
        cols, ("train", "validation", "test"), ("Train file", "Validation file (optional)", "Test file")
    ):
        f = col.file_uploader(label, type=kinds, key=f"upload:{split}")
        if f is None:
            continue
        try:
            rows = parse_upload(f.name, f.getvalue())
        except ValueError as e:
            col.error(str(e))
            errors.append(f"{split} file: {e}")
            continue
        if not rows:
            col.error("This file has no rows.")
            errors.append(f"{split} file is empty")
            continue
        files[split] = (f.name, f.getvalue())
        parsed[split] = rows
        col.caption(f"{len(rows):,} rows · saved as `uploads/{split}-{uploads.safe_filename(f.name)}`")
    if "train" not in parsed:
        st.info(
            "Upload a **train** and a **test** file (JSONL or CSV, one example per row). "
            "Without a validation file, 10% of the train rows are held out for validation."
        )
        errors.append("upload a train file")
        return {}, files, {}, errors
    if "test" not in parsed:
        errors.append("upload a test file: the before/after report is measured on it")
    rows = parsed["train"]
    columns = list(rows[0].keys())
    st.markdown("**Preview of the train file**")
    st.dataframe(pd.DataFrame(rows[:5]), hide_index=True)
    guess = uploads.guess_columns(columns)
    pair = st.radio(
        "Input",
        ["premise + hypothesis", "single text"],
        horizontal=True,
        key=k("input_kind"),
        index=0 if (guess["premise"] and guess["hypothesis"]) or not guess["text"] else 1,
    )
    idx = lambda c: columns.index(c) if c in columns else 0
    mcols = st.columns(3)
    changes: dict = {}
    if pair == "premise + hypothesis":
        changes["data.premise_column"] = mcols[0].selectbox(
            "Premise column", columns, index=idx(guess["premise"]), key=k("prem_col")
        )
        changes["data.hypothesis_column"] = mcols[1].selectbox(
            "Hypothesis column", columns, index=idx(guess["hypothesis"]), key=k("hyp_col")
        )
    else:
        changes["data.text_column"] = mcols[0].selectbox(
            "Text column", columns, index=idx(guess["text"]), key=k("text_col")
        )
    label_col = mcols[2].selectbox("Label column", columns, index=idx(guess["label"]), key=k("label_col"))
    changes["data.label_column"] = label_col
    values = sorted({str(r.get(label_col)) for r in rows[:5000]})
    names = st.text_input(
        "Class names, in id order",
        ", ".join(NLI_LABELS),
        key=k("labels"),
        help="A label may be a class name or an integer id into this list. "
        "Rows labelled -1, '-' or empty are dropped and counted.",
    )
    changes["data.labels"] = [x.strip() for x in names.split(",") if x.strip()]
    st.caption(
        f"Label values in the train file: {', '.join(map(ui.plain, values[:20]))}{' …' if len(values) > 20 else ''}"
    )
    known = {s: len(r) for s, r in parsed.items()}
    return changes, files, known, errors


def check_mapping(cfg, parsed_rows: list[dict], split: str = "train") -> tuple[str | None, list[str]]:
    """Map every row of one uploaded split exactly as the trainer will (columns, labels, empty
    texts): (the error that would stop the run, or None; notes on rows that would be dropped)."""
    return uploads.check_split(cfg.data, split, parsed_rows)


@st.cache_data(show_spinner=False, max_entries=32, ttl=60)
def model_problem(model_json: str, max_length: int) -> str | None:
    """What the trainer would refuse about the model before loading it (a folder that does not
    exist, code it would have to run, a max length above its positions); None if nothing."""
    from core.config import DataConfig, ModelConfig, RunConfig
    from core.model import check_model

    try:
        check_model(RunConfig(model=ModelConfig(**json.loads(model_json)), data=DataConfig(max_length=max_length)))
    except (ValueError, RuntimeError) as e:
        return str(e)
    return None


def settings_form() -> None:
    top = st.columns([2, 2, 1])
    preset = top[0].selectbox(
        "Preset",
        list(PRESETS),
        format_func=lambda p: PRESET_LABELS.get(p, p),
        key="preset",
        help="Starting settings; every field below can be changed. Embedded demo: all-MiniLM-L6-v2 in "
        "4-bit on the built-in NLI sample, runs on a CPU without network. Phi-2 on SNLI: "
        "the reference experiment, needs a GPU and the Hugging Face Hub.",
    )
    base = get_preset(preset)
    k = lambda name: f"{name}@{preset}"  # each preset keeps its own field values
    changes: dict = {}
    errors: list[str] = []
    files: dict = {}
    known_rows: dict = {}

    folders = "a local folder in HF format" if access.local_paths_allowed() else "(no local folders on this server)"
    changes["model.name"] = (
        top[1]
        .text_input(
            "Model",
            base.model.name,
            key=k("model"),
            help=f"A Hugging Face Hub id (e.g. microsoft/phi-2), {folders}, or {EMBEDDED_MODEL} "
            "(ships with the app, works offline).",
        )
        .strip()
    )
    top[2].markdown("&nbsp;")  # aligns the checkbox with the inputs
    quantize = top[2].checkbox(
        "4-bit NF4 (QLoRA)",
        base.model.quantize is not None,
        key=k("quantize"),
        help="Load the base model's linear layers in 4-bit NF4; off = unquantised",
    )
    changes["model.quantize"] = "bnb.nf4" if quantize else None

    left, right = st.columns(2, gap="large")
    with left:
        st.markdown("##### Data")
        default_data = "builtin" if base.data.source == BUILTIN_DATA else "hub"
        data_kind = st.radio(
            "Dataset",
            list(DATA_CHOICES),
            format_func=DATA_CHOICES.get,
            horizontal=True,
            index=list(DATA_CHOICES).index(default_data),
            key=k("data_kind"),
        )
        if data_kind == "builtin":
            from core.data import BUILTIN_DIR

            changes["data.source"] = BUILTIN_DATA
            if not (BUILTIN_DIR / "train.jsonl").exists():
                errors.append(f"the built-in sample is missing from {BUILTIN_DIR}")
            st.caption(
                "Premise/hypothesis pairs labelled entailment, neutral or contradiction, each tagged "
                "with the phenomenon it tests (negation, quantifiers, …); ships with the app."
            )
        r = st.columns(2)
        for i, split in enumerate(("train", "validation", "test")):
            v = r[i % 2].number_input(
                f"Max {split} rows",
                0,
                10_000_000,
                getattr(base.data, f"max_{split}_rows") or 0,
                step=16,
                key=k(f"max_{split}"),
                help="A stratified, seeded sample; 0 = all rows",
            )
            changes[f"data.max_{split}_rows"] = int(v) or None
        changes["data.max_length"] = int(
            r[1].number_input("Max length (tokens)", 8, 8192, base.data.max_length, step=16, key=k("max_length"))
        )
    with right:
        st.markdown("##### LoRA")
        lcols = st.columns(2)
        lora_r = int(lcols[0].number_input("Rank r", 1, 1024, base.lora.r, key=k("lora_r")))
        alpha = float(
            lcols[1].number_input("Alpha", 0.5, 4096.0, float(base.lora.alpha), step=1.0, key=k("lora_alpha"))
        )
        dropout = float(
            lcols[0].number_input("Dropout", 0.0, 0.95, float(base.lora.dropout), step=0.05, key=k("lora_dropout"))
        )
        tm_default = base.lora.target_modules
        tm_text = (
            lcols[1]
            .text_input(
                "Target modules",
                ", ".join(tm_default) if isinstance(tm_default, list) else (tm_default or ""),
                key=k("target_modules"),
                help="Comma-separated module names (e.g. q_proj, v_proj, fc1, fc2), all-linear, or empty for "
                "the usual ones of the architecture.",
            )
            .strip()
        )
        target = (
            None
            if not tm_text
            else "all-linear"
            if tm_text == "all-linear"
            else [t.strip() for t in tm_text.split(",") if t.strip()]
        )
        changes.update({"lora.r": lora_r, "lora.alpha": alpha, "lora.dropout": dropout, "lora.target_modules": target})

        st.markdown("##### Training")
        t = st.columns(2)
        changes["train.epochs"] = int(t[0].number_input("Epochs", 1, 1000, base.train.epochs, key=k("epochs")))
        changes["train.lr"] = float(
            t[1].number_input("Learning rate", 1e-6, 0.5, base.train.lr, step=1e-4, format="%.1e", key=k("lr"))
        )
        changes["train.batch_size"] = int(
            t[0].number_input("Batch size", 1, 4096, base.train.batch_size, key=k("batch"))
        )
        changes["train.seed"] = int(t[1].number_input("Seed", 0, 2**31 - 1, base.train.seed, key=k("seed")))
        seeds = int(
            t[0].number_input(
                "Seeds",
                1,
                20,
                1,
                key=k("seeds"),
                help="Train the same settings with this many seeds (seed, seed+1, ...), one after another, as one "
                "group: the report shows the mean and spread over seeds. One run is not a result.",
            )
        )
        gpus = len(ui.hardware().get("gpus") or [])
        if gpus > 1:  # data-parallel: the trainer starts torchrun itself (core/dist.py)
            changes["train.processes"] = int(
                t[1].number_input(
                    "GPUs",
                    1,
                    gpus,
                    min(base.train.processes, gpus),
                    key=k("gpus"),
                    help="Data-parallel training: one process per GPU, each taking an equal share of every batch "
                    "(the same batch size and learning rate as one GPU, so results compare).",
                )
            )
        with st.popover("More settings"):
            head_lr = st.number_input(
                "Head learning rate (0 = same as LoRA)",
                0.0,
                0.5,
                base.train.head_lr or 0.0,
                step=1e-4,
                format="%.1e",
                key=k("head_lr"),
            )
            changes["train.head_lr"] = float(head_lr) or None
            micro = st.number_input(
                "Micro-batch size (0 = batch size)", 0, 4096, base.train.micro_batch_size or 0, key=k("micro")
            )
            changes["train.micro_batch_size"] = int(micro) or None
            changes["model.compute_dtype"] = st.selectbox(
                "Compute dtype", ["auto", "float32", "bfloat16", "float16"], key=k("dtype")
            )
            changes["model.device"] = st.selectbox("Device", ["auto", "cpu", "cuda"], key=k("device"))

    if data_kind == "hub":
        h = st.columns([2, 1, 1, 1, 1])
        source = (
            h[0]
            .text_input(
                "Hub dataset id", base.data.source if default_data == "hub" else "stanfordnlp/snli", key=k("hub_id")
            )
            .strip()
        )
        changes["data.source"] = source
        changes["data.hub_config"] = (
            h[1].text_input("Configuration", base.data.hub_config or "", key=k("hub_config")).strip() or None
        )
        changes["data.train_split"] = h[2].text_input("Train split", base.data.train_split, key=k("hub_train")).strip()
        changes["data.validation_split"] = (
            h[3]
            .text_input(
                "Validation split",
                base.data.validation_split or "",
                key=k("hub_val"),
                help="Leave empty to hold out 10% of train",
            )
            .strip()
            or None
        )
        changes["data.test_split"] = h[4].text_input("Test split", base.data.test_split, key=k("hub_test")).strip()
        st.caption("Loaded with `datasets.load_dataset` when the run starts (needs the network or the HF cache).")
    elif data_kind == "upload":
        up_changes, files, known_rows, up_errors = upload_section(k)
        changes.update(up_changes)
        changes["data.source"] = "files"
        errors += up_errors

    # --- validate, then show what will happen ----------------------------------------------------
    try:
        cfg = override(base, changes)
        access.check_sources(cfg)  # before anything reads the model or the data a name points to
    except ValueError as e:
        st.error(f"Check the settings: {e}")
        st.button("Launch", type="primary", disabled=True, key="launch_disabled")
        return
    notes: list[str] = []
    if data_kind == "upload":  # every uploaded split, mapped as the trainer will map it
        for split, upload in files.items():
            err, split_notes = check_mapping(cfg, parse_upload(*upload), split)
            if err:
                errors.append(f"column/label mapping of the {split} file: {err}")
            notes += split_notes
    problem = model_problem(json.dumps(cfg.to_dict()["model"], sort_keys=True), cfg.data.max_length)
    if problem:
        errors.append(f"model: {problem}")

    st.markdown("##### What will happen")
    d = cfg.to_dict()
    facts = model_facts(
        json.dumps(d["model"], sort_keys=True), len(cfg.data.labels), json.dumps(d["lora"], sort_keys=True)
    )
    p = estimate.plan(cfg, rows=known_rows or None, facts=facts)
    draw_plan(cfg, p)
    for e in errors:
        st.warning(e)
    for n in notes:
        st.info(n)
    if st.button("Launch", type="primary", disabled=bool(errors) or bool(p.get("error")), key="launch"):
        try:
            password = ui.typed_password()
            run_dir = (
                jobs.launch_with_uploads(cfg, files, seeds=seeds, password=password)
                if files
                else jobs.launch(cfg, seeds=seeds, password=password)
            )
        except (ValueError, OSError) as e:
            st.error(f"Could not start the run: {e}")
            return
        ui.select_run(run_dir.name)
        st.rerun()


def draw_plan(cfg, p: dict) -> None:
    if p.get("error"):
        st.error(p["error"])
        return
    device = f"the GPU {p['gpu']} ({p['gpu_memory_gb']} GiB)" if p["device"] == "cuda" else "the CPU"
    weights = (
        "4-bit NF4" + (" with double quantisation" if cfg.model.double_quant else "")
        if cfg.model.quantize
        else "unquantised"
    )
    targets = cfg.lora.target_modules
    targets = (
        "the architecture's usual modules"
        if targets is None
        else ui.plain(targets if isinstance(targets, str) else ", ".join(targets))
    )
    rows = p["rows"]
    fmt = lambda n: "?" if n is None else f"{n:,}"
    steps = p.get("total_steps")
    st.markdown(
        f"Runs on **{device}** in **{p['dtype']}**; base weights **{weights}**, LoRA r={cfg.lora.r} "
        f"(alpha {cfg.lora.alpha:g}) on {targets}.  \n"
        f"Rows: **{fmt(rows['train'])}** train, **{fmt(rows['validation'])}** validation, **{fmt(rows['test'])}** test "
        f"→ **{fmt(steps)}** optimiser steps ({p.get('steps_per_epoch', '?')} per epoch × {cfg.train.epochs} epochs)."
    )
    c = st.columns(6)
    if p["params"]:
        pr = p["params"]
        c[0].metric(
            "Total parameters",
            f"{pr['total'] / 1e6:,.1f} M",
            help=f"{pr['total']:,} (4-bit weights counted at full size)",
        )
        c[1].metric(
            "Packed 4-bit count",
            f"{pr['packed'] / 1e6:,.1f} M",
            help=f"{pr['packed']:,}: the naive numel() sum of a 4-bit model (two weights per byte)",
        )
        c[2].metric(
            "Trainable (LoRA + head)",
            f"{pr['trainable'] / 1e6:,.2f} M",
            help=f"{pr['trainable']:,} = {100 * pr['trainable'] / pr['total']:.2f}% of the total",
        )
    else:
        c[0].caption(f"No parameter counts: they need the model's config ({p['params_error']})")
    t = p.get("time")
    c[3].metric(
        "Estimated time",
        f"~{format_duration(t['seconds'], short=True)}" if t else "unknown",
        help=(
            f"Scaled from the measured speed of run {t['from_run']} ({t['train_rows_per_s']} training "
            "rows/s), assuming similar text lengths."
            if t
            else "Estimates are scaled from an earlier finished run of this model on this device; there is none yet."
        ),
    )
    gm = p.get("gpu_memory")
    if gm:
        value = f"≤ {gm['estimate_gb']} GiB" if gm["estimate_gb"] else "unknown"
        helptext = (
            "Weights + LoRA optimiser state + activations of one micro-batch at max length "
            "(an upper bound: batches are padded only to their longest row)."
        )
        if gm.get("measured_gb"):
            helptext += f" Run {gm['measured_run']} peaked at {gm['measured_gb']} GiB."
        c[4].metric("Estimated GPU memory", value, help=helptext)
    else:
        c[4].metric("GPU memory", "none", help="This run uses the CPU.")
    if p["device"] == "cpu" and (p["params"] or {}).get("total", 0) > 500e6:
        st.warning(
            f"This model has {p['params']['total'] / 1e9:.1f} B parameters and the run would use the CPU: "
            "expect hours per epoch. Use a machine with a CUDA GPU, or the embedded demo model."
        )


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
            settings_form()
