"""A run's state: status.json (written under a lock, claimed exclusively), what read_status
makes of it (alive, failed with a reason, damaged), the STOP request, and the list of runs with
the files that cannot be read. Part of the run folder contract.

    claim_run(run_dir, state="running", pid=os.getpid())   # exactly one claimer wins
    read_status(run_dir)                                   # state, with dead trainers reported failed
    list_runs()                                            # the runs folder, newest first, damaged named
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import threading
import time
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # not POSIX: no file locks
    fcntl = None

from .liveness import process_start, timestamp, trainer_problem, valid_pid
from .rundir import (
    ACTIVE_STATES,
    CONFIG,
    DAMAGED,
    LINK_REFUSED,
    METRICS,
    PREDICTIONS,
    REPORT,
    RESOURCES,
    RUN_ID_RE,
    STATES,
    STATUS,
    STOP,
    atomic_write_json,
    atomic_write_text,
    is_int,
    is_number,
    json_safe,
    json_type_name,
    load_json,
    metrics_health,
    now_iso,
    read_json,
    read_predictions,
    runs_root,
    scan_jsonl,
)

# --- status -------------------------------------------------------------------------------------


@contextlib.contextmanager
def _locked(run_dir: Path):
    """Serialise read-merge-write of status.json between threads and processes: an exclusive
    flock on the run folder itself. Best effort: skipped where the filesystem has no flock, and
    after 5 s of waiting (a holder frozen mid-write must not freeze the app)."""
    fd = None
    if fcntl is not None:
        try:
            fd = os.open(run_dir, os.O_RDONLY)
            deadline = time.monotonic() + 5.0
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        break
                    time.sleep(0.005)
        except OSError:
            pass
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)


def _with_pid_start(fields: dict) -> dict:
    """A pid written without its start time gets it: pid and pid_start always name one process."""
    if "pid" in fields and "pid_start" not in fields:
        return {**fields, "pid_start": process_start(fields["pid"])}
    return dict(fields)


def update_status(run_dir: Path, fields: dict, only_if=None) -> dict | None:
    """Merge `fields` into status.json (atomically, serialised with other writers) and return the
    new status; with `only_if` (status -> bool), only when it holds for the current status (None
    when it does not). A pid without pid_start gets its process's start time."""
    run_dir = Path(run_dir)
    if "state" in fields and fields["state"] not in STATES:
        raise ValueError(f"unknown state {fields['state']!r}")
    fields = _with_pid_start(fields)
    run_dir.mkdir(parents=True, exist_ok=True)
    with _locked(run_dir):
        status = read_json(run_dir / STATUS, {})
        if only_if is not None and not only_if(status):
            return None
        status.update(fields)
        status["updated_at"] = now_iso()
        atomic_write_json(run_dir / STATUS, status)
    return status


def write_status(run_dir: Path, **fields: Any) -> dict:
    """Merge `fields` into status.json (atomically) and return the new status."""
    return update_status(run_dir, fields)


def _is_claim_temp(name: str) -> bool:
    return name.startswith(f".{STATUS}.") and name.endswith(".claim")


def _create_exclusive(path: Path, data: bytes) -> None:
    """Create `path` holding `data`, or raise FileExistsError when it exists: exactly one of
    several processes creating it wins. A complete temp file is hard-linked into place (atomic and
    exclusive, and no reader sees an empty file); without hard links, O_CREAT | O_EXCL."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.claim")
    with open(tmp, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    try:
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise
        except OSError:  # a filesystem without hard links
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
    finally:
        tmp.unlink(missing_ok=True)


def claim_run(run_dir: Path, token: str | None = None, allow: tuple[str, ...] = (), **fields: Any) -> dict:
    """Take `run_dir` for one run and write its first status (`fields`); return that status.

    - No status.json yet: the folder must be missing or empty (names in `allow` aside, e.g.
      jobs.launch_with_uploads' uploads/); status.json is then created exclusively, so of several
      processes claiming one folder exactly one wins. A non-empty folder that is not a run folder
      is refused (ValueError) and nothing in it is touched.
    - A status.json: only the trainer jobs.launch started for this queued run takes it over (its
      `token`, passed in CLAIM_ENV, is the status's `claim`); anyone else gets
      ValueError("<run_dir> already holds a run ...").
    """
    run_dir = Path(run_dir)
    held = f"{run_dir} already holds a run; choose a new run folder"
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"{run_dir} is a file, not a folder")
    if os.path.lexists(run_dir / STATUS):
        if token:

            def mine(current: dict) -> bool:
                return current.get("state") == "queued" and current.get("claim") == token

            status = update_status(
                run_dir, {**{k: v for k, v in fields.items() if k != "created_at"}, "claim": None}, only_if=mine
            )
            if status is not None:
                return status
        raise ValueError(held)
    if run_dir.is_dir():
        names = sorted(p.name for p in run_dir.iterdir() if not _is_claim_temp(p.name))
        if STATUS in names:
            raise ValueError(held)
        other = [n for n in names if n not in allow]
        if other:
            shown = ", ".join(other[:3]) + (" …" if len(other) > 3 else "")
            raise ValueError(
                f"{run_dir} is not empty and is not a run folder (it holds {shown}); nothing in it "
                "was changed: choose a new or empty folder"
            )
    run_dir.mkdir(parents=True, exist_ok=True)
    status = {"created_at": now_iso(), **_with_pid_start(fields), "updated_at": now_iso()}
    if "state" in status and status["state"] not in STATES:
        raise ValueError(f"unknown state {status['state']!r}")
    try:
        data = json.dumps(json_safe(status), indent=2, ensure_ascii=False) + "\n"
        _create_exclusive(run_dir / STATUS, data.encode())
    except FileExistsError:
        raise ValueError(held) from None
    return status


def _is_iso(value: Any) -> bool:
    return value == "" or timestamp(value) is not None


def _status_problem(status: Any) -> str | None:
    """Why a parsed status.json cannot be used (None when it can)."""
    if not isinstance(status, dict):
        return f"holds {json_type_name(status)}, not a JSON object"
    state = status.get("state")
    if state not in STATES:
        return "has no state" if state is None else f"has an unknown state {str(state)[:40]!r}"
    if status.get("pid") is not None and not valid_pid(status["pid"]):
        return "pid is not a process id"
    if status.get("pid_start") is not None and not is_number(status["pid_start"]):
        return "pid_start is not a number"
    for k in ("created_at", "started_at", "finished_at", "updated_at"):
        if status.get(k) is not None and not _is_iso(status[k]):
            return f"{k} is not a timestamp"
    for k in ("error", "traceback", "phase"):
        if status.get(k) is not None and not isinstance(status[k], str):
            return f"{k} is not text"
    for k in ("step", "total_steps", "epoch"):
        if status.get(k) is not None and not is_int(status[k]):
            return f"{k} is not a whole number"
    return None


def read_status(run_dir: Path, now: float | None = None) -> dict:
    """status.json as readers should see it ({} when there is none):

    - a queued or running run whose trainer is not alive (trainer_problem: pid gone, pid reused,
      no heartbeat) reads failed, with the reason as its error;
    - an unreadable status.json (empty, truncated, not UTF-8, not an object, a bad state or pid)
      reads {"state": "damaged", "damaged": "status.json: <why>", "error": ...}."""
    run_dir = Path(run_dir)
    status, problem = load_json(run_dir / STATUS)
    return _status_as_read(run_dir, status, problem, now)


def _status_as_read(run_dir: Path, status: Any, problem: str | None, now: float | None = None) -> dict:
    """read_status's answer for a status.json already loaded (load_json's value and problem)."""
    if problem == "missing":
        return {}
    problem = problem or _status_problem(status)
    if problem:
        return {"state": DAMAGED, "damaged": f"{STATUS}: {problem}", "error": f"{STATUS} is damaged: {problem}"}
    if status["state"] in ACTIVE_STATES:
        reason = trainer_problem(run_dir, status, now)
        if reason:
            status = {**status, "state": "failed", "error": reason}
    return status


def request_stop(run_dir: Path) -> None:
    """Ask a running trainer to stop after its current step (it checks for this file)."""
    atomic_write_text(Path(run_dir) / STOP, now_iso() + "\n")


def stop_requested(run_dir: Path) -> bool:
    return (Path(run_dir) / STOP).exists()


# --- damaged files ------------------------------------------------------------------------------


def config_problem(config: Any) -> str | None:
    """Why a parsed config.json cannot be shown (None when it can): the fields the app reads
    must have their types (model.name text, data an object, data.labels a list of names ...)."""
    if not isinstance(config, dict):
        return f"holds {json_type_name(config)}, not a JSON object"
    model, data = config.get("model"), config.get("data")
    if not isinstance(model, dict) or not isinstance(model.get("name"), str):
        return '"model" is not an object with a "name"'
    if data is not None and not isinstance(data, dict):
        return '"data" is not an object'
    data = data or {}
    labels = data.get("labels")
    if labels is not None and not (isinstance(labels, list) and all(isinstance(l, str) for l in labels)):
        return '"data.labels" is not a list of names'
    for k in ("source", "train", "validation", "test"):
        if data.get(k) is not None and not isinstance(data[k], str):
            return f'"data.{k}" is not text'
    if config.get("preset") is not None and not isinstance(config["preset"], str):
        return '"preset" is not text'
    for k in ("lora", "train", "speed"):
        if config.get(k) is not None and not isinstance(config[k], dict):
            return f'"{k}" is not an object'
    return None


def read_config(run_dir: Path) -> tuple[dict, str | None]:
    """(config.json as a dict, None), or ({}, why it is damaged); ({}, None) when there is none."""
    value, problem = load_json(Path(run_dir) / CONFIG)
    if problem == "missing":
        return {}, None
    problem = problem or config_problem(value)
    return ({}, problem) if problem else (value, None)


# What damaged_files found in a file, kept by (path, whether the run had ended) until the file
# changes (inode, size, mtime): a finished run's 200 MB metrics.jsonl is read once per server.
_DAMAGE: dict[tuple[str, bool], tuple[tuple, Any]] = {}
_DAMAGE_LOCK = threading.Lock()
_DAMAGE_MAX = 4096


def _kept(path: Path, ended: bool, scan) -> Any:
    """scan(), or what it returned for this very version of the file."""
    try:
        st = os.lstat(path)
        signature = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_mode)
    except OSError:
        signature = None
    key = (str(path), ended)
    with _DAMAGE_LOCK:
        kept = _DAMAGE.get(key)
    if kept is not None and kept[0] == signature and signature is not None:
        return kept[1]
    value = scan()
    with _DAMAGE_LOCK:
        if len(_DAMAGE) >= _DAMAGE_MAX:
            _DAMAGE.clear()
        _DAMAGE[key] = (signature, value)
    return value


def _count(found: tuple[list, int]) -> tuple[int, int]:
    rows, bad = found
    return len(rows), bad


def _lines(n: int) -> str:
    return f"{n} unreadable line{'s' if n != 1 else ''} (garbled, not UTF-8, or the wrong type)"


def damaged_files(run_dir: Path) -> list[str]:
    """One line per file of the run folder that readers cannot use, naming it and why, e.g.
    "report.json: not valid JSON (truncated or garbled)" or "metrics.jsonl: 2 unreadable lines";
    [] for a sound folder. Missing files are not damage: a run writes them as it goes. A cut-off
    last line of a log is damage once the trainer has ended, and a done run's metrics.jsonl must
    hold its setup and end records."""
    run_dir = Path(run_dir)
    state = read_status(run_dir).get("state")
    ended = state not in ACTIVE_STATES
    out = []
    for name, check in (
        (STATUS, _status_problem),
        (CONFIG, config_problem),
        (REPORT, lambda v: None if isinstance(v, dict) else f"holds {json_type_name(v)}, not a JSON object"),
    ):
        value, problem = load_json(run_dir / name)
        if problem != "missing" and (problem or check(value)):
            out.append(f"{name}: {problem or check(value)}")
    kinds, bad = _kept(run_dir / METRICS, ended, lambda: metrics_health(run_dir, complete=ended))
    if bad:
        out.append(f"{METRICS}: {_lines(bad)}")
    elif state == "done" and not {"setup", "end"} <= kinds:
        out.append(f"{METRICS}: the setup or end record of this finished run is missing")

    def resources_bad() -> int:
        records, bad = scan_jsonl(run_dir / RESOURCES, complete=ended)
        return bad + sum(not is_number(r.get("t")) for r in records)

    bad = _kept(run_dir / RESOURCES, ended, resources_bad)
    if bad:
        out.append(f"{RESOURCES}: {_lines(bad)}")
    pred_dir = run_dir / PREDICTIONS
    if pred_dir.is_dir():
        for path in sorted(pred_dir.glob("*.jsonl")):
            if path.stem.endswith(("_before", "_after")):  # per-example predictions, written whole
                n, bad = _kept(path, ended, lambda p=path: _count(read_predictions(p)))
            else:  # other logs kept there (e.g. the trainer's dynamics.jsonl): JSON objects, one a line
                n, bad = _kept(path, ended, lambda p=path: _count(scan_jsonl(p, complete=ended)))
            if bad:
                out.append(f"{PREDICTIONS}/{path.name}: {_lines(bad)}")
            elif not n and path.stem.endswith(("_before", "_after")):
                out.append(f"{PREDICTIONS}/{path.name}: empty")
    return out


def _run_entry(path: Path) -> tuple[dict, bool]:
    """(the run's line in list_runs, whether its status.json says queued or running: then the
    line changes with time alone, as its trainer lives or dies, and is never kept)."""
    raw, problem = load_json(path / STATUS)
    status = _status_as_read(path, raw, problem)
    config, config_problem_ = read_config(path)
    damaged = status.get("damaged") or (f"{CONFIG}: {config_problem_}" if config_problem_ else None)
    created = status.get("created_at")
    train = config.get("train") if isinstance(config.get("train"), dict) else {}
    entry = {
        "id": path.name,
        "path": path,
        "state": DAMAGED if damaged else status.get("state", "unknown"),
        "created_at": created if isinstance(created, str) else "",
        "preset": config.get("preset") or "",
        "model": (config.get("model") or {}).get("name", ""),
        "group": config.get("group") if isinstance(config.get("group"), str) else None,
        "seed": train.get("seed") if is_int(train.get("seed")) else None,
        "damaged": damaged,
    }
    active = problem is None and isinstance(raw, dict) and raw.get("state") in ACTIVE_STATES
    return entry, active


def _damaged_entry(path: Path, why: str) -> dict:
    return {
        "id": path.name,
        "path": path,
        "state": DAMAGED,
        "created_at": "",
        "preset": "",
        "model": "",
        "group": None,
        "seed": None,
        "damaged": why,
    }


def _signature(folder: str) -> tuple:
    """(inode, size, mtime) of a run folder's status.json and config.json (None: missing), without
    following a link: what a kept list_runs line depends on."""
    out = []
    for name in (STATUS, CONFIG):
        try:
            st = os.lstat(os.path.join(folder, name))
        except OSError:
            out.append(None)
        else:
            out.append((st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(out)


# list_runs' lines, kept between calls by run folder: (signature, line, active). A line is read
# again only when status.json or config.json changed, or when the run is queued or running.
_LISTED: dict[str, tuple[tuple, dict, bool]] = {}
_LISTED_LOCK = threading.Lock()


def list_runs(root: Path | None = None) -> list[dict]:
    """All runs in the runs folder, newest first: {id, path, state, created_at, preset, model,
    group, seed, damaged}. A run whose status.json or config.json cannot be read is listed with
    state "damaged" and `damaged` naming the file and why ("config.json: not valid JSON ..."); it
    never hides the other runs. A run folder that is a symbolic link is listed as damaged and never
    read. Each line is kept until its status.json or config.json changes (queued and running runs
    are read on every call): 2,000 finished runs cost a stat() or two each, not two JSON files."""
    root = Path(root or runs_root())
    runs = []
    try:
        entries = list(os.scandir(root))
    except OSError:
        return runs
    seen = set()
    for e in entries:
        path = Path(e.path)
        try:
            if not RUN_ID_RE.fullmatch(e.name):
                continue
            if e.is_symlink():
                if e.is_dir():  # a run folder linked from elsewhere (an imported run): shown, never read
                    runs.append(_damaged_entry(path, f"the run folder is {LINK_REFUSED}"))
                continue
            if not e.is_dir(follow_symlinks=False):
                continue
            signature = _signature(e.path)
            if signature[0] is None:  # no status.json: not a run folder
                continue
            seen.add(e.path)
            with _LISTED_LOCK:
                kept = _LISTED.get(e.path)
            if kept is not None and kept[0] == signature and not kept[2]:
                runs.append(dict(kept[1]))
                continue
            entry, active = _run_entry(path)
            with _LISTED_LOCK:
                _LISTED[e.path] = (signature, entry, active)
            runs.append(dict(entry))
        except Exception as ex:  # one unreadable folder never hides the others
            runs.append(_damaged_entry(path, f"unreadable ({type(ex).__name__}: {ex})"))
    with _LISTED_LOCK:  # forget the folders of this runs folder that are gone
        for key in [k for k in _LISTED if os.path.dirname(k) == str(root) and k not in seen]:
            del _LISTED[key]
    runs.sort(key=lambda r: (r["created_at"], r["id"]), reverse=True)
    return runs
