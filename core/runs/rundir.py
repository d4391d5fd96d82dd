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
        predictions/dynamics.jsonl          per split and epoch: the probabilities of every example
        checkpoints/epoch-<k>/   LoRA adapter + head (adapter_model.safetensors, adapter_config.json),
                                 classifier.json, tokenizer, model card; epoch-0 is the "before" model
        report.json              everything the report shows, built at the end of the run
        train.log                stdout/stderr of the trainer process
        STOP                     present when someone asked the run to stop
        heartbeat                {"t", "pid"}: rewritten every few seconds while the trainer lives
        .trainer.lock            flock held by the trainer for its life: Stop signals only its holder

    runs/.gpu.lock               flock held by the trainer that uses the GPU (one GPU run at a time)

Liveness: a queued or running run is alive only while its pid is alive, that process's start time
is the `pid_start` in status.json (within START_TOLERANCE_S, so a reused pid is not mistaken for
the trainer), and its last sign of life (heartbeat, or status.json's updated_at) is younger than
HEARTBEAT_STALE_S; otherwise read_status reports it failed with the reason (and, when the trainer
died, the last line of train.log). A file that cannot be read (empty, truncated, not UTF-8, the
wrong JSON type) never raises in a reader: read_json / iter_jsonl return their defaults, and
read_status / list_runs / damaged_files name it (state "damaged").

The runs folder is `$QLORA_STUDIO_RUNS`, else `runs/` beside the project (ignored by git).
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import secrets
import stat
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

RUNS_ENV = "QLORA_STUDIO_RUNS"
PROJECT_ROOT = Path(__file__).resolve().parents[2]
RUN_ID_RE = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,79}\Z")  # \Z: "$" would let a trailing newline in
STATES = ("queued", "running", "done", "stopped", "failed")

CONFIG = "config.json"
STATUS = "status.json"
METRICS = "metrics.jsonl"
RESOURCES = "resources.jsonl"
REPORT = "report.json"
LOG = "train.log"
STOP = "STOP"
PREDICTIONS = "predictions"
DYNAMICS = "dynamics.jsonl"  # in predictions/: one record per split and epoch (0 = before)
CHECKPOINTS = "checkpoints"
# in each checkpoints/epoch-<k>/ (core/checkpoint.py writes them; peft's names for the first two)
ADAPTER_FILE = "adapter_model.safetensors"  # the LoRA and head weights
ADAPTER_CONFIG = "adapter_config.json"
CLASSIFIER_FILE = "classifier.json"  # labels, input, pooling and base model (core/classifier.py)
HEARTBEAT = "heartbeat"
TENSORBOARD = "tensorboard"  # TensorBoard's event files, when train.report_to names it (core/trackers.py)
TRACKER_RUNS = "trackers.json"  # the MLflow and W&B run ids of the run, so that --resume continues them
GPU_LOCK = ".gpu.lock"  # in the runs folder
RUN_LOCK = ".trainer.lock"  # in a run folder: flock held by its trainer for its whole life (liveness.hold_run_lock)
CLAIM_ENV = "QLORA_STUDIO_CLAIM"  # jobs.launch -> its trainer: the token that lets it take the queued run
DAMAGED = "damaged"  # never written: what readers call a run whose status.json or config.json is unreadable
ACTIVE_STATES = ("queued", "running")

HEARTBEAT_EVERY_S = 2.0  # the trainer rewrites its heartbeat this often
HEARTBEAT_STALE_S = 60.0  # no sign of life for this long: the run reads failed (generous: GIL-heavy phases, slow disks)
QUEUED_GRACE_S = 60.0  # a queued run whose trainer has not started (claimed it) by then reads failed
START_TOLERANCE_S = 1.0  # a pid's process start time must match status.json's pid_start within this


def runs_root() -> Path:
    """The folder that holds all runs: $QLORA_STUDIO_RUNS or <project>/runs."""
    return Path(os.environ.get(RUNS_ENV) or PROJECT_ROOT / "runs").resolve()


def validate_run_id(run_id: str) -> str:
    """A run id is one path component of letters, digits, '.', '_' and '-' (no '..', no '/')."""
    if not isinstance(run_id, str) or not RUN_ID_RE.fullmatch(run_id) or ".." in run_id:
        raise ValueError(
            f"invalid run id {run_id!r}: use 1-80 letters, digits, '.', '_' or '-', starting with a letter or digit"
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
    return datetime.now(UTC).isoformat(timespec="seconds")


def predictions_file(run_dir: Path, split: str, stage: str) -> Path:
    """predictions/<split>_<stage>.jsonl of a run: the per-example rows of one evaluation
    (e.g. split "test" or the name of an evaluated file, stage "before", "after" or "zero_shot")."""
    return Path(run_dir) / PREDICTIONS / f"{split}_{stage}.jsonl"


# --- JSON types ---------------------------------------------------------------------------------


def is_int(x: Any) -> bool:
    """Whether `x` is a whole number as JSON has it: an int, and not a bool (True is an int in Python)."""
    return isinstance(x, int) and not isinstance(x, bool)


def is_number(x: Any) -> bool:
    """Whether `x` is a number as JSON has it: an int or a float, and not a bool (nan and inf count:
    add math.isfinite where they must not)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def json_type_name(value: Any) -> str:
    """'a list', 'a number' ...: the JSON type of `value`, for messages."""
    return (
        "null"
        if value is None
        else "a boolean"
        if isinstance(value, bool)
        else "a number"
        if isinstance(value, (int, float))
        else "a string"
        if isinstance(value, str)
        else "a list"
        if isinstance(value, list)
        else "an object"
    )


# --- atomic files -------------------------------------------------------------------------------


def json_safe(obj: Any) -> Any:
    """`obj` with every NaN and inf replaced by None (null): they are not JSON, and every reader
    must be able to parse what is written. Dicts, lists and tuples are copied, tuples as lists."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
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
    atomic_write_text(path, json.dumps(json_safe(obj), indent=2, ensure_ascii=False) + "\n")


def atomic_write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(json_safe(r), ensure_ascii=False) + "\n" for r in rows))


# --- reading a run folder: never through a symbolic link ------------------------------------------

# The folders inside a run folder: a link among them (in an imported or crafted run) is refused too.
_RUN_SUBFOLDER = re.compile(r"\A(?:predictions|checkpoints|uploads|(?:epoch|state)-\d+)\Z")
LINK_REFUSED = "a symbolic link, which is never followed in a run folder"


def open_run_file(path: Path) -> int:
    """A read-only file descriptor of a file of a run folder, opened without following a symbolic
    link: the file itself (O_NOFOLLOW) and the run's folders above it (predictions/, checkpoints/
    epoch-<k>/) must be real, and it must be a regular file (a FIFO would block its reader, a
    device never ends). A run folder imported from elsewhere can hold a link to /etc/passwd or to
    another run's uploads: such a file reads as unreadable (OSError ELOOP, LINK_REFUSED), never
    as the file it points to. The run folder itself is checked by run_path and list_runs."""
    path = Path(path)
    for parent in path.parents:
        if not _RUN_SUBFOLDER.match(parent.name):
            break
        if parent.is_symlink():
            raise OSError(errno.ELOOP, LINK_REFUSED, str(parent))
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        if e.errno == errno.ELOOP or (e.errno == errno.EMLINK and path.is_symlink()):
            raise OSError(errno.ELOOP, LINK_REFUSED, str(path)) from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file", str(path))
    return fd


def read_run_bytes(path: Path) -> bytes:
    """The bytes of a file of a run folder (open_run_file: never through a link)."""
    with os.fdopen(open_run_file(path), "rb") as f:
        return f.read()


def read_run_tail(path: Path, nbytes: int) -> bytes:
    """The last `nbytes` bytes of a file of a run folder (b"" when it is missing; never through a link)."""
    try:
        fd = open_run_file(path)
    except FileNotFoundError:
        return b""
    with os.fdopen(fd, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - nbytes))
        return f.read()


def load_json(path: Path) -> tuple[Any, str | None]:
    """(value, None), or (None, problem) where problem is "missing" or why the file cannot be
    read: "empty", "not UTF-8 text", "not valid JSON (truncated or garbled)", "unreadable (...)"
    (a symbolic link among them: open_run_file)."""
    try:
        data = read_run_bytes(path)
    except FileNotFoundError:
        return None, "missing"
    except OSError as e:
        return None, f"unreadable ({e.strerror or type(e).__name__})"
    if not data.strip():
        return None, "empty"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None, "not UTF-8 text"
    try:
        return json.loads(text), None
    except (ValueError, RecursionError):  # JSONDecodeError is a ValueError
        return None, "not valid JSON (truncated or garbled)"


def read_json(path: Path, default: Any = None) -> Any:
    """The JSON value in `path`, or `default` when the file is missing, empty, truncated, not
    UTF-8, or (when `default` is not None) holds another JSON type than `default` (a list where
    a {} default asks for an object). Never raises on a damaged file."""
    value, problem = load_json(path)
    if problem or (default is not None and not isinstance(value, type(default))):
        return default
    return value


def append_jsonl(path: Path, record: dict) -> None:
    """Append one record as one line and flush it, so a live reader sees it at once."""
    line = json.dumps(json_safe(record), ensure_ascii=False) + "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()


def read_jsonl(path: Path) -> list[dict]:
    """All complete records of a JSON-lines file; a half-written last line is skipped."""
    return list(iter_jsonl(path))


def iter_jsonl(path: Path) -> Iterator[dict]:
    """The JSON objects of a JSON-lines file, one per line; lines that are not UTF-8, not JSON or
    not an object are skipped (scan_jsonl counts them), and so is a half-written last line."""
    yield from scan_jsonl(path)[0]


def json_object(line: bytes) -> dict | None:
    """One JSON-lines line as a dict; None for a blank, non-UTF-8, non-JSON or non-object line."""
    try:
        value = json.loads(line.decode("utf-8"))
    except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return None
    return value if isinstance(value, dict) else None


def scan_jsonl(path: Path, complete: bool = False) -> tuple[list[dict], int]:
    """(records, bad): the JSON objects of a JSON-lines file in order, and how many lines were not
    one (garbage, not UTF-8, a list or a number). A missing file is ([], 0); a last line without
    its newline that does not parse is a line still being written, not a bad one, unless the
    file is `complete` (written whole, or by a trainer that has ended): then it is cut off. A
    symbolic link is not followed (open_run_file): it counts as one bad line."""
    try:
        data = read_run_bytes(path)
    except FileNotFoundError:
        return [], 0
    except OSError:
        return [], 1
    lines = data.split(b"\n")  # not str.splitlines: U+2028 inside a JSON string is not a line break
    last = lines.pop()  # b"" when the file ends with a newline
    records, bad = [], 0
    for line in lines:
        if not line.strip():
            continue
        rec = json_object(line)
        if rec is None:
            bad += 1
        else:
            records.append(rec)
    if last.strip():
        rec = json_object(last)
        if rec is not None:
            records.append(rec)
        elif complete:
            bad += 1
    return records, bad


METRIC_KINDS = ("setup", "step", "eval", "epoch", "end")
# Fields of metrics records that readers compute with: when present, they must have these types
# (None allowed for floats: NaN is stored as null). A record that breaks this is dropped as damaged.
_INT_FIELDS = ("step", "epoch", "epoch_step", "steps_per_epoch", "total_steps", "epochs", "best_epoch")
_FLOAT_FIELDS = (
    "t",
    "loss",
    "lr",
    "grad_norm",
    "step_s",
    "rows",
    "tokens_per_s",
    "samples_per_s",
    "pad_fraction",
    "mfu",
    "accuracy",
    "seconds",
    "n",
    "train_loss",
    "val_accuracy",
    "val_loss",
    "epoch_s",
    "total_s",
    "load_s",
    "test_accuracy",
)
_STR_FIELDS = ("split", "stage", "state", "device", "compute_dtype")
_DICT_FIELDS = ("hardware", "params", "data", "peaks", "speed", "mean_tokens")
_LIST_FIELDS = ("labels", "target_modules", "speedups")


def metric_fields_ok(rec: dict) -> bool:
    """Whether the fields of a metrics record that readers compute with have their types (those
    it has: _INT_FIELDS whole numbers, _FLOAT_FIELDS numbers or null, ...)."""
    return (
        all(is_int(rec[k]) for k in _INT_FIELDS if k in rec)
        and all(rec[k] is None or is_number(rec[k]) for k in _FLOAT_FIELDS if k in rec)
        and all(isinstance(rec[k], str) for k in _STR_FIELDS if k in rec)
        and all(rec[k] is None or isinstance(rec[k], dict) for k in _DICT_FIELDS if k in rec)
        and all(rec[k] is None or isinstance(rec[k], list) for k in _LIST_FIELDS if k in rec)
    )


def scan_metrics(run_dir: Path, complete: bool = False) -> tuple[dict[str, list[dict]], int]:
    """(by_kind, bad): read_metrics' records by kind, and how many lines were damaged (scan_jsonl's
    bad lines, and records whose fields have the wrong types); `complete` as for scan_jsonl."""
    by_kind: dict[str, list[dict]] = {k: [] for k in METRIC_KINDS}
    records, bad = scan_jsonl(Path(run_dir) / METRICS, complete)
    for rec in records:
        kind = rec.get("kind")
        if not isinstance(kind, str):
            continue
        if not metric_fields_ok(rec):
            bad += 1
            continue
        by_kind.setdefault(kind, []).append(rec)
    return by_kind, bad


def iter_lines(path: Path, chunk: int = 1 << 20) -> Iterator[tuple[bytes, bool]]:
    """(line, complete) for each line of a file of a run folder, read `chunk` bytes at a time (a
    200 MB log is never one string): complete is False only for a last line without its newline.
    A missing file yields nothing; a link is never followed (open_run_file)."""
    try:
        fd = open_run_file(path)
    except FileNotFoundError:
        return
    with os.fdopen(fd, "rb") as f:
        rest = b""
        while block := f.read(chunk):
            lines = (rest + block).split(b"\n")
            rest = lines.pop()
            for line in lines:
                yield line, True
        if rest:
            yield rest, False


def metrics_health(run_dir: Path, complete: bool = False) -> tuple[set[str], int]:
    """(kinds, bad): the kinds of the sound records of a run's metrics.jsonl and how many lines are
    damaged, as scan_metrics counts them, read line by line and keeping no record (what
    damaged_files asks of a file that may hold a million step records)."""
    kinds: set[str] = set()
    bad = 0
    for line, whole in iter_lines(Path(run_dir) / METRICS):
        if not line.strip():
            continue
        rec = json_object(line)
        if rec is None:
            bad += whole or complete  # a last line still being written is not damage until the run ended
            continue
        kind = rec.get("kind")
        if not isinstance(kind, str):
            continue
        if metric_fields_ok(rec):
            kinds.add(kind)
        else:
            bad += 1
    return kinds, bad


def read_metrics(run_dir: Path) -> dict[str, list[dict]]:
    """The records of a run's metrics.jsonl split by their "kind", each list in file order.

    Every kind in METRIC_KINDS is a key (an empty list when the run has not written one yet, or
    when there is no metrics file at all); a kind this list does not name gets its own key too.
    Records without a (string) "kind" are left out, and so are records whose numeric fields
    (step, loss, step_s, accuracy ...) hold another type (damaged_files counts them). Like
    read_jsonl, a half-written last line is skipped,
    so this is safe to call while the trainer is still appending. The first setup record is
    `by_kind["setup"][0]`, the last end record `by_kind["end"][-1]`."""
    return scan_metrics(run_dir)[0]


def throughput(steps: list[dict]) -> dict | None:
    """Pairs/s, real tokens/s and MFU over `steps` (step records), each weighted by step time;
    the report takes every step, the live view the last few. MFU is None where it was not logged
    (CPU, unknown GPU); pad_fraction where the records carry it."""
    steps = [s for s in steps if all(isinstance(s.get(k), (int, float)) for k in ("step_s", "rows", "tokens_per_s"))]
    if not steps or sum(s["step_s"] for s in steps) <= 0:
        return None
    secs = sum(s["step_s"] for s in steps)
    rows = sum(s["rows"] for s in steps)
    tokens = sum(s["tokens_per_s"] * s["step_s"] for s in steps)
    timed = [s for s in steps if isinstance(s.get("mfu"), (int, float))]
    timed_s = sum(s["step_s"] for s in timed)
    out = {
        "samples_per_s": round(rows / secs, 2),
        "tokens_per_s": round(tokens / secs, 1),
        "mfu": round(sum(s["mfu"] * s["step_s"] for s in timed) / timed_s, 4) if timed_s > 0 else None,
        "steps": len(steps),
        "mean_step_s": round(secs / len(steps), 4),
    }
    if all(isinstance(s.get("pad_fraction"), (int, float)) for s in steps):
        out["pad_fraction"] = round(sum(s["pad_fraction"] for s in steps) / len(steps), 4)
    return out


def valid_prediction(row: Any) -> bool:
    """A predictions/*.jsonl row readers can use: id, gold and pred labels (strings), probs (a
    list of numbers), correct (a boolean); premise/hypothesis/text/tag, when present, strings."""
    return (
        isinstance(row, dict)
        and (isinstance(row.get("id"), str) or is_int(row.get("id")))
        and isinstance(row.get("gold"), str)
        and isinstance(row.get("pred"), str)
        and isinstance(row.get("correct"), bool)
        and isinstance(row.get("probs"), list)
        and all(is_number(p) for p in row["probs"])
        and all(isinstance(row[k], str) for k in ("premise", "hypothesis", "text", "tag") if row.get(k) is not None)
    )


def read_predictions(path: Path) -> tuple[list[dict], int]:
    """(rows, bad): the usable rows of a predictions file (valid_prediction) and how many lines
    were not (garbage, wrong types)."""
    records, bad = scan_jsonl(path, complete=True)  # written whole (atomically): a cut line is damage
    rows = [r for r in records if valid_prediction(r)]
    return rows, bad + len(records) - len(rows)


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
