"""What a run is doing now, derived from its folder alone: progress, ETA and the series to plot.

    snap = snapshot(run_dir)     # status, setup, steps, evals, epochs, end, resources, progress
    snap["progress"]             # {"fraction", "eta_s", "elapsed_s", "step", "total_steps", "text", ...}

The app's Train page calls this every 1-2 seconds; nothing here keeps state between calls, so a
closed tab or a restarted server loses nothing (see core/rundir.py).
"""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path

from . import rundir
from ..report import throughput

ACTIVE = ("queued", "running")


def _seconds_since(iso: str | None, until: float) -> float | None:
    if not iso:
        return None
    try:
        return max(0.0, until - datetime.fromisoformat(iso).timestamp())
    except ValueError:
        return None


def estimate_remaining(setup: dict, steps: list[dict], evals: list[dict], epochs_done: int,
                       test_after_done: bool) -> float | None:
    """Seconds left, from measured step and evaluation times; None until a step has been timed.

    Remaining work = optimiser steps not yet taken (at the mean of the last 20 steps, not counting
    the first, which also pays for warm-up), one
    validation pass after each epoch not yet finished, and the final test pass (each as long as
    the same pass took before training)."""
    total_steps = setup.get("total_steps")
    if not total_steps or not steps:
        return None
    timed = steps[1:] or steps  # the first step also pays for warm-up (allocations, graph capture)
    recent = [s["step_s"] for s in timed[-20:]]
    remaining = max(0, total_steps - steps[-1]["step"]) * (sum(recent) / len(recent))
    val = [e["seconds"] for e in evals if e.get("split") == "validation"]
    test = [e["seconds"] for e in evals if e.get("split") == "test"]
    epochs_left = max(0, (setup.get("epochs") or 0) - epochs_done)
    if val:
        remaining += epochs_left * val[-1]
    if test and not test_after_done:
        remaining += test[0]
    return remaining


def snapshot(run_dir: Path, now: float | None = None) -> dict:
    """Everything the live view shows, read from the run folder."""
    run_dir = Path(run_dir)
    now = time.time() if now is None else now
    status = rundir.read_status(run_dir)
    metrics = rundir.read_metrics(run_dir)
    resources = rundir.read_jsonl(run_dir / rundir.RESOURCES)
    setup = metrics["setup"][0] if metrics["setup"] else {}
    steps, evals, epochs = metrics["step"], metrics["eval"], metrics["epoch"]
    end = metrics["end"][-1] if metrics["end"] else {}
    state = status.get("state", "unknown")

    total_steps = setup.get("total_steps") or status.get("total_steps")
    step = steps[-1]["step"] if steps else 0
    test_after_done = any(e.get("split") == "test" and e.get("stage") == "after" for e in evals)
    finished_iso = status.get("finished_at") if state not in ACTIVE else None
    until = datetime.fromisoformat(finished_iso).timestamp() if finished_iso else now
    elapsed = _seconds_since(status.get("started_at") or status.get("created_at"), until)
    eta = None
    if state in ACTIVE:
        eta = estimate_remaining(setup, steps, evals, len(epochs), test_after_done)
    if state == "done":
        fraction = 1.0
    elif eta is not None and elapsed:
        fraction = min(0.99, elapsed / (elapsed + eta))
    elif total_steps:
        fraction = min(0.99, step / total_steps)
    else:
        fraction = 0.0

    recent_throughput = throughput(steps[-10:])  # the last few steps: what the run does now
    t0 = resources[0]["t"] if resources else now
    for r in resources:
        r["elapsed_s"] = round(r["t"] - t0, 2)

    epoch = steps[-1]["epoch"] if steps else 0
    phase = status.get("phase") or state
    parts = [phase]
    if setup.get("epochs"):
        parts.append(f"epoch {epoch}/{setup['epochs']}")
    if total_steps:
        parts.append(f"step {step}/{total_steps}")
    if eta is not None:
        parts.append(f"about {format_duration(eta)} left")
    elif state in ACTIVE:
        parts.append("time left: measuring the first step")
    return {
        "run_id": run_dir.name, "state": state, "status": status, "setup": setup, "steps": steps,
        "evals": evals, "epochs": epochs, "end": end, "resources": resources,
        "progress": {"fraction": fraction, "eta_s": eta, "elapsed_s": elapsed, "step": step,
                     "total_steps": total_steps, "epoch": epoch, "epochs": setup.get("epochs"),
                     "phase": phase, "throughput": recent_throughput, "text": " · ".join(parts)},
    }


def validation_curve(evals: list[dict]) -> list[dict]:
    """Validation accuracy by epoch, with the model before training as epoch 0."""
    out = []
    for e in evals:
        if e.get("split") != "validation":
            continue
        stage = e.get("stage", "")
        epoch = 0 if stage == "before" else int(stage.split("-")[1]) if stage.startswith("epoch-") else None
        if epoch is not None:
            out.append({"epoch": epoch, "accuracy": e.get("accuracy"), "loss": e.get("loss"), "n": e.get("n")})
    return out


def log_tail(run_dir: Path, lines: int = 40) -> str:
    """The last lines of the trainer's train.log ('' if there is none)."""
    try:
        text = (Path(run_dir) / rundir.LOG).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def format_duration(seconds: float | None, short: bool = False) -> str:
    """42 s, 3 min 05 s, 1 h 02 min (short: 42 s, 3 min, 1 h 02 min)."""
    if seconds is None:
        return "n/a"
    s = int(round(seconds))
    if short and 60 <= s < 3600:
        return f"{round(s / 60)} min"
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {(s % 3600) // 60:02d} min"
