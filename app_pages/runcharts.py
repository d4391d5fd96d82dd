"""The numbers and charts of a run, as the Train page shows them: the metrics row, the training
loss and validation accuracy, and the CPU / RAM / GPU charts. A finished (or stopped, failed) run
gets Plotly figures; the live view (app_pages/live.py) gets light SVG images (app_pages/svgchart.py),
drawn once per snapshot for every session that watches the run.
"""

import streamlit as st

from app_pages import svgchart, ui
from core.runs import watch
from core.runs.watch import format_duration


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
