"""Is the trainer of a run alive? Process identity (pid + start time), the heartbeat, and the
GPU lock (one GPU run at a time). Part of the run folder contract.

    pid_alive(pid, start)          # the process lives and is the one that started at `start`
    Heartbeat(run_dir).start()     # the trainer's sign of life, and its lock on the run folder
    holds_run_lock(pid, run_dir)   # whether `pid` is the process that holds that lock (what Stop signals)
    fd = gpu_lock(run_dir, "cuda") # held until the process ends (kill -9 included)
"""

from __future__ import annotations

import json
import os
import re
import stat
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil

try:
    import fcntl
except ImportError:  # not POSIX: no file locks
    fcntl = None

from .rundir import (
    GPU_LOCK,
    HEARTBEAT,
    HEARTBEAT_EVERY_S,
    HEARTBEAT_STALE_S,
    LOG,
    QUEUED_GRACE_S,
    RUN_LOCK,
    START_TOLERANCE_S,
    STATUS,
    is_int,
    is_number,
    read_json,
    read_run_tail,
    runs_root,
)

# --- processes and the heartbeat ----------------------------------------------------------------


def valid_pid(pid: Any) -> bool:
    return is_int(pid) and pid > 0


def process_start(pid: Any) -> float | None:
    """When process `pid` started (seconds since the epoch, psutil's create_time), None if there
    is no such process. With the pid, this names one process: a later one that reuses the pid
    started later."""
    if not valid_pid(pid):
        return None
    try:
        return psutil.Process(pid).create_time()
    except (psutil.Error, ValueError, OverflowError):
        return None


def pid_alive(pid: int | None, start: float | None = None) -> bool:
    """Whether process `pid` exists (a zombie does not count). With `start` (its pid_start, as
    process_start gave it), also whether it is still that process, not a later one given the same
    pid: their start times must agree within START_TOLERANCE_S."""
    if not valid_pid(pid):
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        pass  # alive, owned by someone else
    # A zombie (finished child not yet reaped by its parent) is not alive for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(") ", 1)[1][:1] == "Z":
                return False
    except (OSError, IndexError):
        pass
    if start is None:
        return True
    now_start = process_start(pid)
    return is_number(start) and now_start is not None and abs(now_start - start) <= START_TOLERANCE_S


def beat(run_dir: Path) -> None:
    """Write the run's heartbeat file {"t": now, "pid": this process} (replaced atomically; no
    fsync, it is only news; a run folder that was deleted is not recreated)."""
    run_dir = Path(run_dir)
    tmp = run_dir / f".{HEARTBEAT}.{os.getpid()}.{threading.get_ident()}.tmp"
    tmp.write_text(json.dumps({"t": round(time.time(), 3), "pid": os.getpid()}))
    os.replace(tmp, run_dir / HEARTBEAT)


def last_beat(run_dir: Path) -> float | None:
    """Unix time of the run's last heartbeat (None: none yet, or an unreadable file)."""
    t = read_json(Path(run_dir) / HEARTBEAT, {}).get("t")
    return float(t) if is_number(t) else None


# --- the trainer's lock on its run folder ------------------------------------------------------


def hold_run_lock(run_dir: Path) -> int | None:
    """Take the run folder for this process: an exclusive, non-blocking flock on <run>/.trainer.lock,
    held while the returned file descriptor is open (the OS lets it go when the process ends, kill
    -9 included; children never inherit it). None where it cannot be had (no flock, another
    holder, a link in its place): the run trains all the same, only Stop then sends no signal."""
    if fcntl is None:
        return None
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(Path(run_dir) / RUN_LOCK, flags, 0o644)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def holds_run_lock(pid: Any, run_dir: Path) -> bool:
    """Whether process `pid` holds the run's trainer lock: <run>/.trainer.lock is a regular file
    (not a link, one name), it is locked (a shared probe fails), and `pid` has that very file open.
    Forged status fields (a pid with its real start time, a fresh heartbeat) cannot make another
    process pass this: it would have to hold the lock on this run's file."""
    if fcntl is None or not valid_pid(pid):
        return False
    path = Path(run_dir) / RUN_LOCK
    try:
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            return False
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            pass  # held: by whom is the question below
        else:
            fcntl.flock(fd, fcntl.LOCK_UN)
            return False  # nobody holds it
        if (os.fstat(fd).st_dev, os.fstat(fd).st_ino) != (st.st_dev, st.st_ino):
            return False
    finally:
        os.close(fd)
    try:
        files = psutil.Process(pid).open_files()
    except (psutil.Error, OSError, ValueError):
        return False
    for f in files:
        try:
            other = os.stat(f.path)
        except OSError:
            continue
        if (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino):
            return True
    return False


class Heartbeat:
    """Beats for `run_dir` now and then every `every` seconds on a daemon thread, until stop(),
    the run's status is final (done, stopped, failed), or the process ends; and holds the run's
    trainer lock (hold_run_lock) as long. The trainer runs one from its claim of the run folder on
    (and ResourceSampler beats too, for train() called in-process)."""

    def __init__(self, run_dir: Path, every: float = HEARTBEAT_EVERY_S):
        self.run_dir, self.every = Path(run_dir), every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)
        self._lock_fd: int | None = None

    def start(self) -> Heartbeat:
        self._lock_fd = hold_run_lock(self.run_dir)
        self._beat()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self._release()

    def _release(self) -> None:
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)

    def _beat(self) -> None:
        try:
            beat(self.run_dir)
        except OSError:
            pass  # a heartbeat must never break training

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            if read_json(self.run_dir / STATUS, {}).get("state") in ("done", "stopped", "failed"):
                self._release()  # the run is over: nothing left for Stop to signal
                return
            self._beat()


_ERROR_LINE = re.compile(r"^([\w.]*(Error|Exception|Interrupt|Exit)\b|error:|Killed\b)")


def log_reason(run_dir: Path, limit: int = 300) -> str:
    """The line of train.log that best says why a trainer ended: its last exception or
    "error: ..." line, else its last line ("" without a log)."""
    try:
        tail = read_run_tail(Path(run_dir) / LOG, 32768)  # never through a link (rundir.open_run_file)
    except OSError:
        return ""
    lines = [line.strip() for line in tail.decode("utf-8", errors="replace").splitlines() if line.strip()]
    if not lines:
        return ""
    line = next((l for l in reversed(lines) if _ERROR_LINE.match(l)), lines[-1])
    return line if len(line) <= limit else line[:limit] + "…"


def _because(run_dir: Path) -> str:
    line = log_reason(run_dir)
    return f"; last error in {LOG}: {line}" if line else f" ({LOG} is empty)"


def timestamp(iso: Any) -> float | None:
    try:
        return datetime.fromisoformat(iso).timestamp()
    except (TypeError, ValueError):
        return None


def trainer_problem(run_dir: Path, status: dict, now: float | None = None) -> str | None:
    """Why the trainer of a queued or running run is not alive, None while it is. Alive means:
    its pid (when recorded) is alive AND is the process that started at pid_start (when recorded),
    AND its last sign of life (the heartbeat file, or status.json's updated_at: every write is one)
    is at most HEARTBEAT_STALE_S old (QUEUED_GRACE_S for a queued run, whose trainer has not
    claimed the folder yet)."""
    now = time.time() if now is None else now
    pid, start, queued = status.get("pid"), status.get("pid_start"), status.get("state") == "queued"
    if pid is not None:
        if not pid_alive(pid):
            return (
                f"the trainer process (pid {pid}) ended "
                f"{'before it started the run' if queued else 'without finishing'}{_because(run_dir)}"
            )
        if start is not None and not pid_alive(pid, start):
            return (
                f"the trainer process (pid {pid}) is gone: that pid now belongs to another process{_because(run_dir)}"
            )
    signs = [t for t in (last_beat(run_dir), timestamp(status.get("updated_at"))) if t is not None]
    quiet = now - max(signs) if signs else None
    limit = QUEUED_GRACE_S if queued else HEARTBEAT_STALE_S
    if quiet is None or quiet > limit:
        ago = f"in {quiet:.0f} s" if quiet is not None else "at all"
        if queued:
            return f"the trainer never started: no sign of it {ago} (limit {limit:.0f} s){_because(run_dir)}"
        return (
            f"the trainer stopped sending its heartbeat: none {ago} (limit {limit:.0f} s), so it hung "
            f"or ended{_because(run_dir)}"
        )
    return None


# --- the GPU lock -------------------------------------------------------------------------------


def gpu_busy_message(holder: str | None) -> str:
    return f"another run ({holder or 'unknown'}) is using the GPU; wait for it or stop it"


def _lock_holder(fd: int) -> str | None:
    try:
        value = json.loads(os.pread(fd, 4096, 0).decode("utf-8"))
    except (OSError, ValueError):
        return None
    run = value.get("run") if isinstance(value, dict) else None
    return run if isinstance(run, str) else None


def gpu_lock(run_dir: Path, device_type: str, root: Path | None = None, tries: int = 10) -> int | None:
    """Hold the GPU for this process: an exclusive, non-blocking flock on <runs folder>/.gpu.lock,
    with this run's id written into the file. Returns the lock's file descriptor (keep it open for
    the life of the process; the OS releases the lock when the process ends, kill -9 included;
    os.close releases it earlier), or None for a device other than "cuda" (CPU runs take no lock).
    Raises ValueError(gpu_busy_message(holder)) while another process holds it (a few retries
    over half a second ride out gpu_holder's brief probes)."""
    if device_type != "cuda" or fcntl is None:
        return None
    path = Path(root or runs_root()) / GPU_LOCK
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    for attempt in range(tries):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if attempt == tries - 1:
                holder = _lock_holder(fd)
                os.close(fd)
                raise ValueError(gpu_busy_message(holder)) from None
            time.sleep(0.05)
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"run": Path(run_dir).name, "path": str(run_dir), "pid": os.getpid()}).encode(), 0)
    return fd


def gpu_holder(root: Path | None = None) -> str | None:
    """The id of the run whose trainer holds the GPU lock ("unknown" if it did not say), None
    while the GPU is free. Probes with a shared, non-blocking flock and lets it go at once."""
    if fcntl is None:
        return None
    try:
        fd = os.open(Path(root or runs_root()) / GPU_LOCK, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _lock_holder(fd) or "unknown"
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
