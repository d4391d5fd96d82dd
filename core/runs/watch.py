"""What a run is doing now, derived from its folder alone: progress, ETA and the series to plot.

    snap = snapshot(run_dir)     # status, setup, steps, evals, epochs, end, resources, progress
    snap["progress"]             # {"fraction", "eta_s", "elapsed_s", "step", "total_steps", "text", ...}

    watcher = LiveRun(run_dir)   # the same snapshot, kept up to date by reading only new lines
    snap = watcher.snapshot()    # ... plus "version", which changes when new records arrive
    series = chart_series(snap)  # the curves to plot, each at most MAX_POINTS points

snapshot() reads the whole folder on each call; the Train page polls every few seconds, so it keeps
one LiveRun per run (shared by every browser session that watches it): a JsonlTail per JSON-lines
file reads only the lines appended since its last read. A LiveRun also counts its viewers, whose
refresh_intervals share one budget on a CPU run. Everything is rebuilt from the folder on demand,
so a closed tab or a restarted server loses nothing (see core/runs/rundir.py).
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from . import rundir
from .state import read_status

MAX_POINTS = 300  # per plotted series (chart_series)
VIEWER_GRACE_S = 5.0  # a viewer is counted until 2 of its refresh intervals plus this have passed unseen
MAX_SHARE = 10  # refresh_intervals: at most this many viewers' worth of slowing down
RESOURCE_KEYS = ("cpu_percent", "rss_gb", "ram_used_gb", "gpu_mem_gb", "gpu_util")

ACTIVE = ("queued", "running")


def _seconds_since(iso: str | None, until: float) -> float | None:
    if not iso:
        return None
    try:
        return max(0.0, until - datetime.fromisoformat(iso).timestamp())
    except ValueError:
        return None


def estimate_remaining(
    setup: dict, steps: list[dict], evals: list[dict], epochs_done: int, test_after_done: bool
) -> float | None:
    """Seconds left, from measured step and evaluation times; None until a step has been timed.

    Remaining work = optimiser steps not yet taken (at the mean of the last 20 steps, not counting
    the first, which also pays for warm-up), a validation pass after each epoch not yet finished,
    a test pass too when the run tracks test accuracy by epoch (train.track_test), and the final
    test pass (each as long as the latest pass of that split took)."""
    total_steps = setup.get("total_steps")
    if not total_steps or not steps:
        return None
    timed = steps[1:] or steps  # the first step also pays for warm-up (allocations, graph capture)
    recent = [s["step_s"] for s in timed[-20:] if rundir.is_number(s.get("step_s"))]
    if not recent:
        return None
    remaining = max(0, total_steps - (steps[-1].get("step") or 0)) * (sum(recent) / len(recent))
    val = [e["seconds"] for e in evals if e.get("split") == "validation" and rundir.is_number(e.get("seconds"))]
    test = [e["seconds"] for e in evals if e.get("split") == "test" and rundir.is_number(e.get("seconds"))]
    epochs_left = max(0, (setup.get("epochs") or 0) - epochs_done)
    tracked = setup.get(
        "track_test", any(str(e.get("stage")).startswith("epoch-") for e in evals if e.get("split") == "test")
    )  # runs from before the key
    return (
        remaining
        + (epochs_left * val[-1] if val else 0.0)
        + ((epochs_left if tracked else 0) + (not test_after_done)) * (test[-1] if test else 0.0)
    )


STEPS_KEPT = 4 * MAX_POINTS
"""Step records (and resource samples) a finished run's snapshot keeps at most: min-max thinned
(downsample), the last TAIL_KEPT exactly; its charts show MAX_POINTS of them."""
TAIL_KEPT = 20
FINISHED_KEPT = 16  # finished runs' snapshots kept (the server's memory: a few hundred KB each)

_FINISHED: OrderedDict[str, tuple[tuple, dict]] = OrderedDict()
_FINISHED_LOCK = threading.Lock()


def snapshot(run_dir: Path, now: float | None = None) -> dict:
    """Everything the live view shows, read from the run folder. A queued or running run is read
    whole on each call (the live view keeps a LiveRun instead); a run that has ended is read once
    per version of its files (status.json, metrics.jsonl, resources.jsonl: inode, size, mtime),
    line by line, its step records and resource samples thinned to STEPS_KEPT, and that snapshot
    is handed to every later call (shared: do not modify it). A 200 MB metrics.jsonl is then one
    read per server, not one per visit."""
    run_dir = Path(run_dir)
    status = read_status(run_dir)  # before the metrics: a final state means they are complete
    if status.get("state") in ACTIVE:
        metrics = rundir.read_metrics(run_dir)
        resources = [r for r in rundir.read_jsonl(run_dir / rundir.RESOURCES) if rundir.is_number(r.get("t"))]
        return derive(run_dir.name, status, metrics, _with_elapsed(resources), now)
    key, signature = str(run_dir), _files_signature(run_dir)
    with _FINISHED_LOCK:
        kept = _FINISHED.get(key)
        if kept is not None and kept[0] == signature:
            _FINISHED.move_to_end(key)
            return kept[1]
    snap = derive(run_dir.name, status, _thinned_metrics(run_dir), _with_elapsed(_thinned_resources(run_dir)), now)
    with _FINISHED_LOCK:
        _FINISHED[key] = (signature, snap)
        while len(_FINISHED) > FINISHED_KEPT:
            _FINISHED.popitem(last=False)
    return snap


def _with_elapsed(resources: list[dict]) -> list[dict]:
    t0 = resources[0]["t"] if resources else 0.0
    for r in resources:
        r["elapsed_s"] = round(r["t"] - t0, 2)
    return resources


def _files_signature(run_dir: Path) -> tuple:
    out = []
    for name in (rundir.STATUS, rundir.METRICS, rundir.RESOURCES):
        try:
            st = os.lstat(run_dir / name)
            out.append((st.st_ino, st.st_size, st.st_mtime_ns))
        except OSError:
            out.append(None)
    return tuple(out)


def _thin(rows: list[dict], y: str | Sequence[str]) -> list[dict]:
    """Rows kept so far, thinned to STEPS_KEPT when they pass twice that (the last TAIL_KEPT whole)."""
    if len(rows) <= 2 * STEPS_KEPT:
        return rows
    return downsample(rows[:-TAIL_KEPT], y, STEPS_KEPT) + rows[-TAIL_KEPT:]


def _thinned_metrics(run_dir: Path) -> dict[str, list[dict]]:
    """read_metrics, line by line, with the step records thinned (_thin): never all in memory."""
    by_kind: dict[str, list[dict]] = {k: [] for k in rundir.METRIC_KINDS}
    for line, _ in rundir.iter_lines(run_dir / rundir.METRICS):
        rec = rundir.json_object(line) if line.strip() else None
        if rec is None or not isinstance(rec.get("kind"), str) or not rundir.metric_fields_ok(rec):
            continue
        by_kind.setdefault(rec["kind"], []).append(rec)
        if rec["kind"] == "step":
            by_kind["step"] = _thin(by_kind["step"], "loss")
    return by_kind


def _thinned_resources(run_dir: Path) -> list[dict]:
    samples: list[dict] = []
    for line, _ in rundir.iter_lines(run_dir / rundir.RESOURCES):
        rec = rundir.json_object(line) if line.strip() else None
        if rec is not None and rundir.is_number(rec.get("t")):
            samples.append(rec)
            samples = _thin(samples, RESOURCE_KEYS)
    return samples


def derive(
    run_id: str, status: dict, metrics: dict[str, list[dict]], resources: list[dict], now: float | None = None
) -> dict:
    """The snapshot of a run from its status, its metrics records by kind (rundir.read_metrics)
    and its resource samples (each with elapsed_s); snapshot() and LiveRun.snapshot() share it."""
    now = time.time() if now is None else now
    setup = metrics["setup"][0] if metrics["setup"] else {}
    steps, evals, epochs = metrics["step"], metrics["eval"], metrics["epoch"]
    end = metrics["end"][-1] if metrics["end"] else {}
    state = status.get("state", "unknown")

    total_steps = setup.get("total_steps") or status.get("total_steps")
    step = (steps[-1].get("step") or 0) if steps else 0
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

    recent_throughput = rundir.throughput(steps[-10:])  # the last few steps: what the run does now

    epoch = (steps[-1].get("epoch") or 0) if steps else 0
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
        "run_id": run_id,
        "state": state,
        "status": status,
        "setup": setup,
        "steps": steps,
        "evals": evals,
        "epochs": epochs,
        "end": end,
        "resources": resources,
        "progress": {
            "fraction": fraction,
            "eta_s": eta,
            "elapsed_s": elapsed,
            "step": step,
            "total_steps": total_steps,
            "epoch": epoch,
            "epochs": setup.get("epochs"),
            "phase": phase,
            "throughput": recent_throughput,
            "text": " · ".join(parts),
        },
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


# --- reading only what is new --------------------------------------------------------------------


class JsonlTail:
    """The records of an append-only JSON-lines file, read a little at a time (by LiveRun here,
    and by core/progress.py for the lines `python -m core train` prints).

    Each read() returns the records of the lines completed since the last one: it seeks to the
    byte offset where the last read stopped and parses only what follows. A last line without its
    newline is being written; it stays in the file for the next read. When the file was truncated,
    replaced (a new inode, or other bytes before the offset) or removed, read() starts over from
    the first line and says so, and the caller drops what it had. Other bytes: the byte before
    the offset is no longer the newline that ended the last line read, or the first `head` bytes
    of the file changed. Lines that are not a JSON object are skipped and counted in `bad`. Not
    thread-safe: LiveRun holds its lock, the progress reporter its own."""

    HEAD = 256  # bytes from the start of the file compared on each read to notice a replacement

    def __init__(self, path: Path, head: int = HEAD):
        self.path = Path(path)
        self.head = head  # 0: the start of the file is not compared (a rewrite in place goes unnoticed)
        self.offset = 0  # bytes consumed: always just after a newline
        self.bad = 0
        self.bytes_read = 0  # bytes read from the offsets on, so far: what was read is not read again
        self._ident: tuple[int, int] | None = None  # (device, inode) of the file read so far
        self._head = b""
        self._seen: tuple | None = None  # (device, inode, size, mtime) at the last read

    def restart(self) -> None:
        self.offset, self.bad, self._ident, self._head, self._seen = 0, 0, None, b"", None

    def read(self) -> tuple[list[dict], bool]:
        """(the new records, whether reading started over: the records are then the whole file's)."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            if self._ident is None and not self.offset:
                return [], False
            self.restart()
            return [], True
        except OSError:
            return [], False
        seen = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        if seen == self._seen:
            return [], False  # not a byte changed: the common case, one stat() per poll
        restarted = False
        try:
            with os.fdopen(rundir.open_run_file(self.path), "rb") as f:  # never through a link
                if self._ident is not None and (
                    (st.st_dev, st.st_ino) != self._ident or st.st_size < self.offset or not self._same_start(f)
                ):
                    self.restart()
                    restarted = True
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:  # removed between stat() and open()
            self.restart()
            return [], True
        except OSError:
            return [], False
        self._ident, self._seen = (st.st_dev, st.st_ino), seen
        self.bytes_read += len(data)
        end = data.rfind(b"\n") + 1  # complete lines only; the rest waits for its newline
        if not end:
            return [], restarted
        if not self.offset:
            self._head = data[: min(self.head, end)]
        self.offset += end
        records = []
        for line in data[:end].split(b"\n"):
            if not line.strip():
                continue
            rec = rundir.json_object(line)  # None: not UTF-8, not JSON, or not an object
            if rec is not None:
                records.append(rec)
            else:
                self.bad += 1
        return records, restarted

    def _same_start(self, f) -> bool:
        """Whether the byte before the offset is still the newline that ended the last line read,
        and the file still begins with the bytes read before (its first `head` bytes)."""
        if self.offset:
            f.seek(self.offset - 1)
            if f.read(1) != b"\n":
                return False
        if not self._head:
            return True
        f.seek(0)
        return f.read(len(self._head)) == self._head


_uids = itertools.count(1)


class LiveRun:
    """One run's snapshot, kept up to date between calls by reading only the new lines of its
    metrics.jsonl and resources.jsonl (JsonlTail); status.json (small) is read on each call.

    Thread-safe: one instance serves every session that watches the run (the Train page keeps one
    per run folder in st.cache_resource). snapshot() has the format of snapshot() plus "version":
    a tuple that changes exactly when records were added or a file started over, so anything
    derived from the records (chart_series, figures) can be cached under (run, version). Callers
    must not modify the records in a snapshot: they are shared."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self._lock = threading.Lock()
        self._uid = next(_uids)
        self._metrics_tail = JsonlTail(self.run_dir / rundir.METRICS)
        self._resources_tail = JsonlTail(self.run_dir / rundir.RESOURCES)
        self._generation = 0
        self._by_kind: dict[str, list[dict]] = {k: [] for k in rundir.METRIC_KINDS}
        self._resources: list[dict] = []
        self._n_metrics = 0
        self._shared: dict | None = None  # the last snapshot asked for with max_age, and when (monotonic)
        self._shared_at = 0.0
        self._viewers: dict[str, tuple[float, float]] = {}  # session -> (last seen, its refresh interval)

    @property
    def version(self) -> tuple:
        return (self._uid, self._generation, self._n_metrics, len(self._resources))

    def _refresh(self) -> None:
        new, restarted = self._metrics_tail.read()
        if restarted:  # new lists, not cleared ones: snapshots already handed out stay whole
            self._by_kind = {k: [] for k in rundir.METRIC_KINDS}
            self._n_metrics = 0
            self._generation += 1
        for rec in new:
            if isinstance(rec.get("kind"), str) and rundir.metric_fields_ok(rec):  # what read_metrics keeps
                self._by_kind.setdefault(rec["kind"], []).append(rec)
                self._n_metrics += 1
        new, restarted = self._resources_tail.read()
        if restarted:
            self._resources = []
            self._generation += 1
        for r in new:
            if rundir.is_number(r.get("t")):
                r["elapsed_s"] = round(r["t"] - (self._resources[0]["t"] if self._resources else r["t"]), 2)
                self._resources.append(r)

    def snapshot(self, now: float | None = None, max_age: float = 0.0) -> dict:
        """The run now, as snapshot() gives it, plus "version". With max_age, the snapshot that
        an earlier call with max_age took at most that many seconds ago is returned as it is (the
        very same dict): viewers whose charts refresh every few seconds then share one version,
        so one set of figures, whatever their timers' phases."""
        with self._lock:
            if max_age > 0 and self._shared is not None and time.monotonic() - self._shared_at <= max_age:
                return self._shared
            status = read_status(self.run_dir)  # first: a final state means the files are complete
            self._refresh()
            metrics = {k: list(v) for k, v in self._by_kind.items()}  # copies: the lists keep growing
            snap = derive(self.run_dir.name, status, metrics, list(self._resources), now)
            snap["version"] = self.version
            if max_age > 0:
                self._shared, self._shared_at = snap, time.monotonic()
            return snap

    def watched_by(self, session: str, every: float, now: float | None = None) -> int:
        """Record that browser session `session` shows this run, refreshing every `every` s; returns
        how many do now. A session that stops asking (a closed tab) counts for 2 intervals + grace."""
        now = time.monotonic() if now is None else now
        with self._lock:
            self._viewers[session] = (now, every)
            self._viewers = {s: (t, e) for s, (t, e) in self._viewers.items() if now - t <= 2 * e + VIEWER_GRACE_S}
            return len(self._viewers)


def refresh_intervals(base: dict[str, float], viewers: int, shares_cpu: bool) -> dict[str, float]:
    """Seconds between one viewer's refreshes of each part: `base` on a GPU run; on a CPU run,
    `base` times the number of viewers (at most MAX_SHARE), so all of them cost the trainer what
    one does (three tabs at one tab's rate slowed the demo 1.4-1.7x on 2 cores: bench/RESULTS.md)."""
    k = min(max(1, viewers), MAX_SHARE) if shares_cpu else 1
    return {part: every * k for part, every in base.items()}


def trains_on_cpu(snap: dict, config: dict | None, gpu_present: bool) -> bool:
    """Whether the run's trainer computes on the CPU: its setup record's device once it has one,
    else its configured device ("auto" uses a GPU when this machine has one)."""
    device = (snap.get("setup") or {}).get("device") or ((config or {}).get("model") or {}).get("device") or "auto"
    return str(device).startswith("cpu") or (device == "auto" and not gpu_present)


# --- curves for charts ---------------------------------------------------------------------------


def downsample(rows: Sequence[dict], y: str | Sequence[str], max_points: int = MAX_POINTS) -> list[dict]:
    """At most `max_points` of `rows`, in their order: all of them when they fit, else the first,
    the last, and in each of equal buckets between them the rows with the lowest and the highest
    value of each key in `y` (min-max decimation: spikes and dips survive, a line keeps its shape).
    Rows whose values are all missing are left out of the buckets."""
    keys = (y,) if isinstance(y, str) else tuple(y)
    n = len(rows)
    if n <= max_points:
        return list(rows)
    if max_points < 2:
        return [rows[-1]] if max_points == 1 else []
    buckets = (max_points - 2) // (2 * max(1, len(keys)))
    keep = {0, n - 1}
    inner = n - 2
    for b in range(buckets):
        lo, hi = 1 + b * inner // buckets, 1 + (b + 1) * inner // buckets
        for k in keys:
            low = high = None
            for i in range(lo, hi):
                v = rows[i].get(k)
                if not rundir.is_number(v):
                    continue
                if low is None or v < rows[low][k]:
                    low = i
                if high is None or v > rows[high][k]:
                    high = i
            keep.update(i for i in (low, high) if i is not None)
    return [rows[i] for i in sorted(keep)]


def chart_series(snap: dict, max_points: int = MAX_POINTS) -> dict[str, list[dict]]:
    """The curves the Train page plots, each at most `max_points` points: "loss" (step records),
    "epochs" (epoch records, for the epoch means), "validation" (validation_curve) and
    "resources" (samples; the extremes of every resource key are kept)."""
    res = snap["resources"]
    keys = [k for k in RESOURCE_KEYS if any(k in r for r in res)] if len(res) > max_points else []
    return {
        "loss": downsample(snap["steps"], "loss", max_points),
        "epochs": downsample(snap["epochs"], "train_loss", max_points),
        "validation": downsample(validation_curve(snap["evals"]), "accuracy", max_points),
        "resources": downsample(res, keys, max_points),
    }


LOG_TAIL_BYTES = 64 * 1024  # log_tail reads at most this much of the end of train.log


def log_tail(run_dir: Path, lines: int = 40) -> str:
    """The last lines of the trainer's train.log ('' if there is none), from its last
    LOG_TAIL_BYTES; a train.log that is a symbolic link (an imported run folder) is never
    followed: it reads as such (rundir.open_run_file)."""
    try:
        data = rundir.read_run_tail(Path(run_dir) / rundir.LOG, LOG_TAIL_BYTES)
    except OSError as e:
        return f"({rundir.LOG} is unreadable: {e.strerror or type(e).__name__})"
    return "\n".join(data.decode("utf-8", errors="replace").splitlines()[-lines:])


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
