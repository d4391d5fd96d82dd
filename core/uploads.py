"""Data files a user uploads in the app: safe names, parsing for the preview, saving into the run.

    rows = read_upload("my train.csv", data)             # parsed exactly as the trainer will
    rows = parse_upload("my train.csv", data)            # the same, kept between reruns (PARSED_CACHE_BYTES)
    cols = guess_columns(list(rows[0]))                  # {"premise": ..., "hypothesis": ..., "label": ...}
    saved = save_uploads(run_dir, {"train": ("my train.csv", data)})   # -> {"train": "/.../uploads/train-my_train.csv"}
    problem, notes = check_split(cfg.data, "test", rows)  # the trainer's mapping, on every uploaded split

Files are stored in <run>/uploads/ so a run folder holds everything it was trained on.
"""

from __future__ import annotations

import errno
import hashlib
import re
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path

from .config import DataConfig
from .data import HYPOTHESIS_ALIASES, LABEL_ALIASES, PREMISE_ALIASES, TEXT_ALIASES, drop_notes, to_examples
from .tables import UPLOAD_LIMITS, Meter, read_table

SUFFIXES = (".csv", ".tsv", ".jsonl", ".json", ".parquet")
UPLOADS = "uploads"


def safe_filename(name: str) -> str:
    """A file name that cannot escape a folder or surprise a shell: the last path component,
    with anything but letters, digits, '.', '_' and '-' replaced, and a known data suffix."""
    base = re.split(r"[\\/]", str(name))[-1]
    stem, dot, suffix = base.rpartition(".")
    if not dot:
        stem, suffix = base, ""
    suffix = "." + suffix.lower()
    if suffix not in SUFFIXES:
        raise ValueError(f"unsupported file type {suffix!r} for {name!r}: use {', '.join(SUFFIXES)}")
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", stem).strip("_.")[:60] or "data"
    return stem + suffix


PARSED_CACHE_BYTES = 512 * 1024 * 1024
"""Most memory the parsed uploads kept between reruns may take, all sessions together (estimated as
the rows' decoded bytes plus ROW_COST_BYTES a row); the least recently used are dropped first."""

ROW_COST_BYTES = 400
"""What one parsed row costs in memory beyond its text (a dict and its values), for the estimate."""


def read_upload(name: str, data: bytes, meter: Meter | None = None) -> list[dict]:
    """The rows of an uploaded file, parsed by the same reader the trainer uses, within the
    upload limits (core/tables.py UPLOAD_LIMITS: rows, columns, bytes of a cell, a line and in all,
    decoded). `meter`, when given, counts the rows and decoded bytes."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / safe_filename(name)
        path.write_bytes(data)
        try:
            return read_table(path, UPLOAD_LIMITS, meter)
        except ValueError as e:  # name the file as the user knows it, not the temporary copy
            raise ValueError(str(e).replace(str(path), str(name))) from None


class _ParsedUploads:
    """Parsed uploads by (name, sha256 of the bytes), least recently used first, within a budget of
    estimated bytes; a file that cannot be parsed is kept as its error (one sentence, a few bytes)."""

    def __init__(self, budget: int):
        self.budget = budget
        self.used = 0
        self._entries: OrderedDict[tuple[str, str], tuple[list[dict] | str, int]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, name: str, data: bytes) -> list[dict]:
        key = (name, hashlib.sha256(data).hexdigest())
        with self._lock:
            hit = self._entries.get(key)
            if hit is not None:
                self._entries.move_to_end(key)
        if hit is None:
            meter = Meter()
            try:
                value: list[dict] | str = read_upload(name, data, meter)
            except ValueError as e:
                value = str(e)
            hit = (value, len(str(value)) if isinstance(value, str) else meter.bytes + ROW_COST_BYTES * meter.rows)
            self._put(key, hit)
        if isinstance(hit[0], str):
            raise ValueError(hit[0])
        return hit[0]

    def _put(self, key, entry) -> None:
        with self._lock:
            if key in self._entries or entry[1] > self.budget:  # a file larger than the budget is not kept
                return
            self._entries[key] = entry
            self.used += entry[1]
            while self.used > self.budget:
                _, (_, cost) = self._entries.popitem(last=False)
                self.used -= cost

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.used = 0


PARSED = _ParsedUploads(PARSED_CACHE_BYTES)


def parse_upload(name: str, data: bytes) -> list[dict]:
    """read_upload, kept for the next rerun and the other sessions in PARSED (at most
    PARSED_CACHE_BYTES in all). The same list is handed to every caller: do not modify it."""
    return PARSED.get(name, data)


def guess_columns(columns: list[str]) -> dict[str, str | None]:
    """The columns the trainer would pick by name (premise/sentence1, hypothesis/sentence2, ...)."""

    def pick(aliases: tuple[str, ...]) -> str | None:
        return next((c for c in aliases if c in columns), None)

    return {
        "premise": pick(PREMISE_ALIASES),
        "hypothesis": pick(HYPOTHESIS_ALIASES),
        "label": pick(LABEL_ALIASES),
        "text": pick(TEXT_ALIASES),
    }


def check_split(data_cfg: DataConfig, split: str, rows: list[dict]) -> tuple[str | None, list[str]]:
    """Map every row of an uploaded split exactly as the trainer will (columns, labels, empty
    texts): (the error that would stop the run, or None; notes on dropped rows)."""
    if not rows:
        return f"the {split} file has no rows", []
    try:
        examples, stats = to_examples(rows, data_cfg, split)
    except ValueError as e:
        return str(e), []
    if not examples:
        return (
            f"{split}: no usable rows: of {stats.rows_read} rows, {stats.dropped_unlabelled} have no gold label "
            f"and {stats.dropped_empty} an empty premise, hypothesis or text"
        ), []
    return None, drop_notes(split, stats)


def save_uploads(run_dir: Path, files: dict[str, tuple[str, bytes]]) -> dict[str, str]:
    """Write each split's uploaded file to <run_dir>/uploads/<split>-<safe name>; return the paths.
    A write that fails (a full disk) leaves no half file and raises a ValueError naming the folder."""
    folder = Path(run_dir) / UPLOADS
    saved = {}
    for split in files:
        if split not in ("train", "validation", "test"):
            raise ValueError(f"unknown split {split!r}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"could not create {folder} for the uploaded files: {e.strerror or e}") from e
    for split, (name, data) in files.items():
        path = folder / f"{split}-{safe_filename(name)}"
        try:
            with open(path, "wb") as f:
                f.write(data)
        except OSError as e:
            path.unlink(missing_ok=True)
            raise ValueError(
                f"could not save the uploaded {split} file into {folder}: {e.strerror or e}"
                + (" (the disk is full: free some space)" if e.errno == errno.ENOSPC else "")
            ) from e
        saved[split] = str(path)
    return saved
