"""What `python -m core train` shows while it trains, read from the run folder like the app does.

    with progress.Reporter(run_dir):        # a daemon thread that looks about once a second
        report = train(cfg, run_dir)
    print(progress.summary(report))         # test accuracy before -> after, best epoch, total time

The reporter reads what the trainer writes anyway: status.json (phase, epoch, step) and the lines
appended to metrics.jsonl since its last look (watch.JsonlTail, as the app's live view reads it:
it keeps the byte offset; a half-written last line waits for its newline). It shows the phase,
epoch, step/total, the loss and pairs/s of the last steps, and the time left
(watch.estimate_remaining, the app's ETA):

- on a terminal, one line redrawn in place with "\\r" and a text bar; when the phase or the
  epoch changes, the line is kept and a new one starts;
- elsewhere (train.log, CI logs), a plain line every EVERY_S seconds and whenever the phase or the
  epoch changes, so the log stays readable.

It never disturbs the training: a failed read is skipped, and it stops with a final line when the
`with` block ends (train() returned, raised, or Ctrl-C).
"""

from __future__ import annotations

import shutil
import sys
import threading
import time
from pathlib import Path
from typing import TextIO

from .runs import rundir
from .runs.rundir import is_number
from .runs.watch import JsonlTail, estimate_remaining, format_duration

POLL_S = 1.0  # how often the reporter looks at the run folder
EVERY_S = 10.0  # not a terminal: a plain line at least this often (and on each new phase or epoch)
BAR = 20  # characters of the text bar on a terminal
RECENT = 10  # the loss and pairs/s shown are over this many last steps
TIMED = 20  # steps kept for the ETA (estimate_remaining averages the last 20)


class RunProgress:
    """What the reporter knows of a run from its metrics records: the setup record, the first and
    the last steps, the evaluations, the epochs done."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.setup: dict = {}
        self.first_step: dict | None = None
        self.steps: list[dict] = []  # the last TIMED step records
        self.evals: list[dict] = []
        self.epochs = 0
        self.end: dict = {}

    def add(self, rec: dict) -> None:
        kind = rec.get("kind")
        if kind == "setup" and not self.setup:
            self.setup = rec
        elif kind == "step" and is_number(rec.get("step")) and is_number(rec.get("step_s")):
            if self.first_step is None:
                self.first_step = rec
            self.steps = (self.steps + [rec])[-TIMED:]
        elif kind == "eval" and is_number(rec.get("seconds")):
            self.evals.append(rec)
        elif kind == "epoch":
            self.epochs += 1
        elif kind == "end":
            self.end = rec

    def eta(self) -> float | None:
        if not self.steps:
            return None
        steps = self.steps if self.first_step is self.steps[0] else [self.first_step] + self.steps
        test_after = any(e.get("split") == "test" and e.get("stage") == "after" for e in self.evals)
        try:
            return estimate_remaining(self.setup, steps, self.evals, self.epochs, test_after)
        except (TypeError, ValueError, ZeroDivisionError):
            return None

    def line(self, status: dict, elapsed: float, bar: bool) -> tuple[str, tuple]:
        """(the progress line, its key: (phase, epoch), whose change starts a new line)."""
        state = status.get("state")
        phase = str(status.get("phase") or state or "starting")
        last = self.steps[-1] if self.steps else {}
        # status.json's epoch moves on when an epoch starts, the step records with its first step
        epoch = status.get("epoch") if is_number(status.get("epoch")) else last.get("epoch")
        epochs = self.setup.get("epochs")
        step = last.get("step") if last else status.get("step")
        total = self.setup.get("total_steps") or status.get("total_steps")
        parts = [phase]
        if is_number(epoch) and epoch and is_number(epochs):
            parts.append(f"epoch {epoch}/{epochs}")
        if is_number(step) and is_number(total) and total > 0:
            frac = min(1.0, step / total)
            if bar:
                filled = round(frac * BAR)
                parts.append(f"step {step}/{total} [{'#' * filled}{'-' * (BAR - filled)}] {frac:4.0%}")
            else:
                parts.append(f"step {step}/{total} ({frac:.0%})")
        recent = self.steps[-RECENT:]
        losses = [s["loss"] for s in recent if is_number(s.get("loss"))]
        if losses:
            parts.append(f"loss {sum(losses) / len(losses):.4f}")
        secs = sum(s["step_s"] for s in recent if is_number(s.get("rows")))
        rows = sum(s["rows"] for s in recent if is_number(s.get("rows")))
        if secs > 0 and rows:
            parts.append(f"{rows / secs:.1f} pairs/s")
        if state in (None, "queued", "running") and phase not in ("done", "stopped", "failed"):
            eta = self.eta()
            if eta is not None:
                parts.append(f"ETA {format_duration(eta)}")
            elif self.setup:  # before the setup record nothing is known of the work ahead
                parts.append("ETA after the first steps")
        parts.append(f"{format_duration(elapsed)} elapsed")
        return " | ".join(parts), (phase, epoch if is_number(epoch) else None)


class Reporter:
    """Shows a run's progress on `stream` (default sys.stdout) while the `with` block runs."""

    def __init__(
        self,
        run_dir: Path,
        stream: TextIO | None = None,
        tty: bool | None = None,
        poll: float = POLL_S,
        every: float = EVERY_S,
    ):
        self.run_dir = Path(run_dir)
        self.stream = stream if stream is not None else sys.stdout
        if tty is None:
            try:
                tty = self.stream.isatty()
            except (AttributeError, ValueError):
                tty = False
        self.tty, self.poll, self.every = tty, poll, every
        # head=0: what was read is never read again. The trainer only appends to metrics.jsonl, starts
        # it afresh (a new file) or cuts it back on a resume: JsonlTail notices those by the offset.
        self.tail = JsonlTail(self.run_dir / rundir.METRICS, head=0)
        self.progress = RunProgress()
        self.lines = 0  # lines written (plain) or lines kept (terminal)
        self._key: tuple | None = None  # (phase, epoch) of the last line
        self._status: dict = {}  # status.json as the last look found it
        self._drawn = 0  # width of the line drawn in place now (terminal), 0 when none
        self._last_text = ""
        self._last_print = 0.0
        self._t0 = time.monotonic()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Reporter:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> Reporter:
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="progress", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """The last look at the run folder, its line, and a final newline."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.tick(final=True)

    def _run(self) -> None:
        while not self._stop.wait(self.poll):
            self.tick()

    def tick(self, final: bool = False) -> None:
        """Read what is new in the run folder and show it (never raises)."""
        with self._lock:
            try:
                self._tick(final)
            except Exception:  # a progress line is never worth a failed run
                pass

    def _tick(self, final: bool) -> None:
        status = rundir.read_json(self.run_dir / rundir.STATUS, {})
        new, restarted = self.tail.read()
        if restarted:
            self.progress.reset()
        for rec in new:
            self.progress.add(rec)
        elapsed = time.monotonic() - self._t0
        text, key = self.progress.line(status, elapsed, bar=self.tty)
        if self.tty:
            # the line kept when a phase or epoch ends: that phase, with the records read just now
            kept = self.progress.line(self._status, elapsed, bar=True)[0] if self._drawn and key != self._key else None
            self._draw(text, kept, final)
        else:
            now = time.monotonic()
            if key != self._key or now - self._last_print >= self.every or (final and text != self._last_text):
                self._write(text + "\n")
                self.lines += 1
                self._last_print, self._last_text = now, text
        self._key, self._status = key, status

    def _draw(self, text: str, kept: str | None, final: bool) -> None:
        width = max(20, shutil.get_terminal_size((100, 24)).columns - 1)

        def fit(t: str) -> str:
            return t if len(t) <= width else t[: width - 1] + "~"

        text, out = fit(text), ""
        if kept is not None:  # a new phase or epoch: the last one's line stays on the screen
            kept = fit(kept)
            out = "\r" + kept + " " * max(0, self._drawn - len(kept)) + "\n"
            self._drawn = 0
            self.lines += 1
        out += "\r" + text + " " * max(0, self._drawn - len(text))
        self._drawn = len(text)
        if final:
            out += "\n"
            self._drawn = 0
            self.lines += 1
        self._write(out)

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()


def _pct(x) -> str:
    return f"{100 * x:.1f}%" if is_number(x) else "n/a"


def _accuracy(s: dict | None) -> str:
    if not isinstance(s, dict) or not is_number(s.get("accuracy")):
        return "n/a"
    ci = s.get("ci95")
    ci = f" [{_pct(ci[0])}, {_pct(ci[1])}]" if isinstance(ci, (list, tuple)) and len(ci) == 2 else ""
    return _pct(s["accuracy"]) + ci


def summary(report: dict) -> str:
    """Three lines before the Markdown report: test accuracy before -> after with the 95% Wilson
    intervals, the best epoch (by validation accuracy), the total time."""
    before, after = report.get("test_before"), report.get("test_after")
    n = next((s.get("n") for s in (after, before) if isinstance(s, dict)), None)
    change = ""
    if (
        isinstance(before, dict)
        and isinstance(after, dict)
        and is_number(before.get("accuracy"))
        and is_number(after.get("accuracy"))
    ):
        change = f" ({100 * (after['accuracy'] - before['accuracy']):+.1f} points)"
    first = f"test accuracy: {_accuracy(before)} -> {_accuracy(after)}{change}" + (
        f", n = {n}, 95% Wilson intervals" if is_number(n) else ""
    )
    best = report.get("best_epoch")
    epochs = report.get("epochs") if isinstance(report.get("epochs"), list) else []
    val = next((e.get("val_accuracy") for e in epochs if isinstance(e, dict) and e.get("epoch") == best), None)
    second = (
        f"best epoch: {best} of {len(epochs)}" + (f" (validation accuracy {_pct(val)})" if is_number(val) else "")
        if best is not None
        else "best epoch: n/a"
    )
    stop = report.get("early_stop")
    if isinstance(stop, dict) and is_number(stop.get("epoch")) and is_number(stop.get("epochs")):
        second += f"; stopped early after epoch {stop['epoch']} of {stop['epochs']}"
    total = report.get("total_s")
    detail = [
        f"{name} {format_duration(report[k])}"
        for name, k in (("training", "train_s"), ("evaluation", "eval_s"), ("model load", "load_s"))
        if is_number(report.get(k))
    ]
    third = f"total time: {format_duration(total) if is_number(total) else 'n/a'}" + (
        f" ({', '.join(detail)})" if detail else ""
    )
    return "\n".join((first, second, third))
