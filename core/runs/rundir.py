"""The run directory: the only contract between the trainer process and the UI.

Everything a run produces lives in one folder, written so that a reader never sees half a file:
whole files are replaced atomically (temp file + rename), logs are append-only JSON lines that a
reader parses line by line, skipping a half-written last line.

    runs/<run_id>/
        config.json              the RunConfig this run was started with
        status.json              state (queued|running|done|stopped|failed), pid, timestamps, error
        metrics.jsonl            one JSON object per line: kind = setup | step | eval | epoch | end
        resources.jsonl          one sample per second: cpu %, RAM, GPU memory and utilisation
        predictions/<split>_<stage>.jsonl   per-example gold, predicted, probabilities
        checkpoints/epoch-<k>/   LoRA adapter + head (safetensors); epoch-0 is the "before" model
        report.json              everything the report shows, built at the end of the run
        train.log                stdout/stderr of the trainer process
        STOP                     present when someone asked the run to stop

The runs folder is `$QLORA_STUDIO_RUNS`, else `runs/` beside the project (ignored by git).
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

RUNS_ENV = "QLORA_STUDIO_RUNS"
PROJECT_ROOT = Path(__file__).resolve().parents[2]
RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,79}$")
STATES = ("queued", "running", "done", "stopped", "failed")

CONFIG = "config.json"
STATUS = "status.json"
METRICS = "metrics.jsonl"
RESOURCES = "resources.jsonl"
REPORT = "report.json"
LOG = "train.log"
STOP = "STOP"
PREDICTIONS = "predictions"
CHECKPOINTS = "checkpoints"


def runs_root() -> Path:
    """The folder that holds all runs: $QLORA_STUDIO_RUNS or <project>/runs."""
    return Path(os.environ.get(RUNS_ENV) or PROJECT_ROOT / "runs").resolve()


def validate_run_id(run_id: str) -> str:
    """A run id is one path component of letters, digits, '.', '_' and '-' (no '..', no '/')."""
    if not isinstance(run_id, str) or not RUN_ID_RE.match(run_id) or ".." in run_id:
        raise ValueError(
            f"invalid run id {run_id!r}: use 1-80 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return run_id


def run_path(run_id: str, root: Path | None = None) -> Path:
    """The folder of run `run_id` inside the runs folder; it can never escape that folder."""
    root = (root or runs_root()).resolve()
    path = (root / validate_run_id(run_id)).resolve()
    if path.parent != root:
        raise ValueError(f"run id {run_id!r} escapes the runs folder {root}")
    return path


def new_run_id(label: str = "run") -> str:
    """A fresh, sortable run id such as 20261129-071900-demo-3f2a."""
    label = re.sub(r"[^A-Za-z0-9_-]+", "-", label).strip("-")[:40] or "run"
    return f"{datetime.now().strftime('%Y%m%d-%H%M%S')}-{label}-{secrets.token_hex(2)}"


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# --- atomic files -------------------------------------------------------------------------------

def _clean(obj: Any) -> Any:
    """NaN and inf are not JSON: store them as null so every reader can parse the file."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never a mix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(_clean(obj), indent=2, ensure_ascii=False) + "\n")


def atomic_write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(_clean(r), ensure_ascii=False) + "\n" for r in rows))


def read_json(path: Path, default: Any = None) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return default


def append_jsonl(path: Path, record: dict) -> None:
    """Append one record as one line and flush it, so a live reader sees it at once."""
    line = json.dumps(_clean(record), ensure_ascii=False) + "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()


def read_jsonl(path: Path) -> list[dict]:
    """All complete records of a JSON-lines file; a half-written last line is skipped."""
    return list(iter_jsonl(path))


def iter_jsonl(path: Path) -> Iterator[dict]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            yield json.loads(line)
        except json.JSONDecodeError:
            continue  # a line still being written (only ever the last one)


METRIC_KINDS = ("setup", "step", "eval", "epoch", "end")


def read_metrics(run_dir: Path) -> dict[str, list[dict]]:
    """The records of a run's metrics.jsonl split by their "kind", each list in file order.

    Every kind in METRIC_KINDS is a key (an empty list when the run has not written one yet, or
    when there is no metrics file at all); a kind this list does not name gets its own key too.
    Records without a (string) "kind" are left out. Like read_jsonl, a half-written last line is skipped,
    so this is safe to call while the trainer is still appending. The first setup record is
    `by_kind["setup"][0]`, the last end record `by_kind["end"][-1]`."""
    by_kind: dict[str, list[dict]] = {k: [] for k in METRIC_KINDS}
    for rec in iter_jsonl(Path(run_dir) / METRICS):
        kind = rec.get("kind") if isinstance(rec, dict) else None
        if isinstance(kind, str):
            by_kind.setdefault(kind, []).append(rec)
    return by_kind


# --- status -------------------------------------------------------------------------------------

def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (finished child not yet reaped by its parent) is not alive for our purposes.
    try:
        with open(f"/proc/{int(pid)}/stat") as f:
            return f.read().split(") ", 1)[1][:1] != "Z"
    except (OSError, IndexError):
        return True


def write_status(run_dir: Path, **fields: Any) -> dict:
    """Merge `fields` into status.json (atomically) and return the new status."""
    path = Path(run_dir) / STATUS
    status = read_json(path, {}) or {}
    if "state" in fields and fields["state"] not in STATES:
        raise ValueError(f"unknown state {fields['state']!r}")
    status.update(fields)
    status["updated_at"] = now_iso()
    atomic_write_json(path, status)
    return status


def read_status(run_dir: Path) -> dict:
    """status.json, with a running/queued run whose process has died reported as failed."""
    status = read_json(Path(run_dir) / STATUS, {}) or {}
    if status.get("state") == "running" and not pid_alive(status.get("pid")):
        status = {**status, "state": "failed",
                  "error": status.get("error") or "the trainer process ended without finishing "
                  f"(see {LOG} in the run folder)"}
    return status


def request_stop(run_dir: Path) -> None:
    """Ask a running trainer to stop after its current step (it checks for this file)."""
    atomic_write_text(Path(run_dir) / STOP, now_iso() + "\n")


def stop_requested(run_dir: Path) -> bool:
    return (Path(run_dir) / STOP).exists()


def list_runs(root: Path | None = None) -> list[dict]:
    """All runs in the runs folder, newest first: {id, path, state, created_at, preset, model}."""
    root = root or runs_root()
    runs = []
    if not root.is_dir():
        return runs
    for path in root.iterdir():
        if not path.is_dir() or not RUN_ID_RE.match(path.name) or not (path / STATUS).exists():
            continue
        status = read_status(path)
        config = read_json(path / CONFIG, {}) or {}
        runs.append({
            "id": path.name,
            "path": path,
            "state": status.get("state", "unknown"),
            "created_at": status.get("created_at", ""),
            "preset": config.get("preset", ""),
            "model": (config.get("model") or {}).get("name", ""),
        })
    runs.sort(key=lambda r: (r["created_at"], r["id"]), reverse=True)
    return runs


def dir_size(path: Path) -> int:
    """Bytes used by all files under `path` (0 if it does not exist)."""
    path = Path(path)
    if not path.exists():
        return 0
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def wait_for(predicate, timeout: float, interval: float = 0.2) -> bool:
    """Poll `predicate` until it is true or `timeout` seconds pass (used by tests and the CLI)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())
