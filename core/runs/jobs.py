"""Starting and stopping a trainer process for a run folder (what the app's Train page does).

    run_dir = launch(cfg)                 # writes config.json + status queued, starts the trainer
    stop(run_dir)                         # asks it to stop after the current step

The trainer is `python -m core train --config RUN/config.json --run-dir RUN`, started in its own
session so it outlives the Streamlit server, the browser tab and a page refresh.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from . import rundir
from ..config import RunConfig


def launch(cfg: RunConfig, run_dir: Path | None = None, env: dict | None = None) -> Path:
    """Create the run folder for `cfg` and start its trainer as a detached process."""
    run_dir = Path(run_dir) if run_dir else rundir.run_path(rundir.new_run_id(cfg.preset))
    if (run_dir / rundir.STATUS).exists():
        raise ValueError(f"{run_dir} already holds a run")
    run_dir.mkdir(parents=True, exist_ok=True)  # may already hold uploads (launch_with_uploads)
    cfg.save(run_dir / rundir.CONFIG)
    rundir.write_status(run_dir, state="queued", created_at=rundir.now_iso(), pid=None)
    log = open(run_dir / rundir.LOG, "ab")
    subprocess.Popen(
        [sys.executable, "-m", "core", "train", "--config", str(run_dir / rundir.CONFIG), "--run-dir", str(run_dir)],
        cwd=rundir.PROJECT_ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        start_new_session=True, env={**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"},
    )
    log.close()
    return run_dir


def launch_with_uploads(cfg: RunConfig, files: dict[str, tuple[str, bytes]], env: dict | None = None) -> Path:
    """launch(), with uploaded data files saved into <run>/uploads/ first and the config's
    data.train / data.validation / data.test pointing at them. files: split -> (name, bytes)."""
    from ..config import override
    from ..uploads import save_uploads
    run_dir = rundir.run_path(rundir.new_run_id(cfg.preset))
    run_dir.mkdir(parents=True, exist_ok=False)
    saved = save_uploads(run_dir, files)
    cfg = override(cfg, {"data.source": "files", **{f"data.{split}": path for split, path in saved.items()}})
    return launch(cfg, run_dir=run_dir, env=env)


def stop(run_dir: Path) -> None:
    """Ask the run to stop cleanly: a STOP file the loop checks each step, and SIGTERM."""
    rundir.request_stop(run_dir)
    pid = (rundir.read_json(Path(run_dir) / rundir.STATUS, {}) or {}).get("pid")
    if pid and rundir.pid_alive(pid):
        try:
            os.kill(int(pid), signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
