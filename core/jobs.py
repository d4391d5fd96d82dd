"""Starting and stopping a trainer process for a run folder (what the app's Train page does).

    run_dir = launch(cfg)                 # writes config.json + status queued, starts the trainer
    stop(run_dir)                         # asks it to stop after the current step

The trainer is `python -m core train --config RUN/config.json --run-dir RUN`, started in its own
session so it outlives the Streamlit server, the browser tab and a page refresh. launch creates
status.json exclusively (state queued, with a one-off `claim` token the trainer gets in
$QLORA_STUDIO_CLAIM to take the run over), refuses while another run holds the GPU lock
(liveness.gpu_holder), and records the trainer's pid and start time; stop signals only that process,
and only while it holds the run's trainer lock (liveness.holds_run_lock).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import psutil

from . import access
from .config import RunConfig
from .runs import liveness, rundir
from .runs.state import claim_run, read_status, request_stop, update_status, write_status


def check_gpu_free(cfg: RunConfig) -> None:
    """ValueError("another run (<id>) is using the GPU; ...") when `cfg` may use the GPU (device
    auto or cuda: a held lock means this machine has one) and another run's trainer holds it."""
    if cfg.model.device != "cpu":
        holder = liveness.gpu_holder()
        if holder is not None:
            raise ValueError(liveness.gpu_busy_message(holder))


def launch(
    cfg: RunConfig,
    run_dir: Path | None = None,
    env: dict | None = None,
    allow: tuple[str, ...] = (),
    seeds: int = 1,
    password: str | None = None,
) -> Path:
    """Create the run folder for `cfg` and start its trainer as a detached process.

    Raises ValueError when another run holds the GPU and this one may use it (model.device auto or
    cuda), when `run_dir` already holds a run, or when it is a non-empty folder that is not a run
    folder (names in `allow` aside); nothing is started then. `seeds` > 1 runs the config with
    that many seeds one after another as one group (the first in run_dir, core/results/seeds.py).
    Public mode (core/access.py): access.Refused when launching is not allowed or `cfg` names a
    local path where none is allowed."""
    from .uploads import UPLOADS

    access.check("launch", password)
    access.check_sources(cfg, uploads=Path(run_dir) / UPLOADS if run_dir else None)
    run_dir = Path(run_dir) if run_dir else rundir.run_path(rundir.new_run_id(cfg.preset))
    check_gpu_free(cfg)
    token = secrets.token_hex(16)
    claim_run(run_dir, token=None, allow=allow, state="queued", pid=None, claim=token)
    cfg.save(run_dir / rundir.CONFIG)
    try:
        with open(run_dir / rundir.LOG, "ab") as log:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "core",
                    "train",
                    "--config",
                    str(run_dir / rundir.CONFIG),
                    "--run-dir",
                    str(run_dir),
                    *(["--seeds", str(seeds)] if seeds > 1 else []),
                ],
                cwd=rundir.PROJECT_ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env={**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1", rundir.CLAIM_ENV: token},
            )
    except OSError as e:
        write_status(
            run_dir,
            state="failed",
            phase="failed",
            finished_at=rundir.now_iso(),
            error=f"could not start the trainer: {e}",
        )
        raise
    pid = getattr(proc, "pid", None)
    if isinstance(pid, int):  # unless the trainer has already taken the run (it writes the same pid)
        update_status(run_dir, {"pid": pid}, only_if=lambda s: s.get("state") == "queued")
    return run_dir


def launch_with_uploads(
    cfg: RunConfig,
    files: dict[str, tuple[str, bytes]],
    env: dict | None = None,
    seeds: int = 1,
    password: str | None = None,
) -> Path:
    """launch(), with uploaded data files saved into <run>/uploads/ first and the config's
    data.train / data.validation / data.test pointing at them. files: split -> (name, bytes)."""
    from .config import override
    from .uploads import UPLOADS, save_uploads

    access.check("upload", password)
    access.check_sources(cfg)
    check_gpu_free(cfg)
    run_dir = rundir.run_path(rundir.new_run_id(cfg.preset))
    run_dir.mkdir(parents=True, exist_ok=False)
    try:
        saved = save_uploads(run_dir, files)
        cfg = override(cfg, {"data.source": "files", **{f"data.{split}": path for split, path in saved.items()}})
        return launch(cfg, run_dir=run_dir, env=env, allow=(UPLOADS,), seeds=seeds, password=password)
    except ValueError:
        if not (run_dir / rundir.STATUS).exists():  # nothing was started: leave no orphan folder
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def stop(run_dir: Path, password: str | None = None) -> bool:
    """Ask the run to stop cleanly: a STOP file the loop checks each step, and SIGTERM to its
    trainer, only if the process with the run's pid is the one that started at its pid_start (a
    pid reused by another process is never signalled) and holds the run's trainer lock (a forged
    status.json, pid, start time and heartbeat included, cannot point Stop at another process).
    Returns whether a signal was sent.
    access.Refused (nothing written) when stopping is not allowed here (core/access.py)."""
    access.check("stop", password)
    request_stop(run_dir)
    status = rundir.read_json(Path(run_dir) / rundir.STATUS, {})
    pid, start = status.get("pid"), status.get("pid_start")
    if status.get("state") not in rundir.ACTIVE_STATES or start is None or not liveness.pid_alive(pid, start):
        return False
    if not liveness.holds_run_lock(pid, run_dir):
        return False
    try:
        proc = psutil.Process(pid)
        if abs(proc.create_time() - start) > rundir.START_TOLERANCE_S:
            return False
        proc.send_signal(signal.SIGTERM)  # psutil checks again that the pid was not reused meanwhile
    except (psutil.Error, OSError):
        return False
    return True


def resume(run_dir: Path, env: dict | None = None, password: str | None = None) -> None:
    """Start `python -m core train --resume RUN` for a stopped or failed run (the Train page's
    Resume button): it continues from the run's last full-state checkpoint. Raises ValueError when
    the run is active or done, or when another run holds the GPU; access.Refused in public mode
    without the right (or any) permission (core/access.py)."""
    access.check("resume", password)
    run_dir = Path(run_dir)
    state = read_status(run_dir).get("state")
    if state not in ("stopped", "failed"):
        raise ValueError(f"run {run_dir.name} is {state}: only a stopped or failed run can be resumed")
    cfg = RunConfig.load(run_dir / rundir.CONFIG)
    check_gpu_free(cfg)
    with open(run_dir / rundir.LOG, "ab") as log:
        subprocess.Popen(
            [sys.executable, "-m", "core", "train", "--resume", str(run_dir)],
            cwd=rundir.PROJECT_ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env={**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"},
        )
    # the trainer writes state "running" with its pid within a second; until then the page polls
