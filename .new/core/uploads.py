"""Data files a user uploads in the app: safe names, parsing for the preview, saving into the run.

    rows = read_upload("my train.csv", data)             # parsed exactly as the trainer will
    cols = guess_columns(list(rows[0]))                  # {"premise": ..., "hypothesis": ..., "label": ...}
    saved = save_uploads(run_dir, {"train": ("my train.csv", data)})   # -> {"train": "/.../uploads/train-my_train.csv"}
    problem, notes = check_split(cfg.data, "test", rows)  # the trainer's mapping, on every uploaded split

Files are stored in <run>/uploads/ so a run folder holds everything it was trained on.
"""

from __future__ import annotations

import errno
import re
import tempfile
from pathlib import Path

from .config import DataConfig
from .data import HYPOTHESIS_ALIASES, LABEL_ALIASES, PREMISE_ALIASES, TEXT_ALIASES, drop_notes, to_examples
from .tables import read_table

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


def read_upload(name: str, data: bytes) -> list[dict]:
    """The rows of an uploaded file, parsed by the same reader the trainer uses."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / safe_filename(name)
        path.write_bytes(data)
        try:
            return read_table(path)
        except ValueError as e:  # name the file as the user knows it, not the temporary copy
            raise ValueError(str(e).replace(str(path), str(name))) from None


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
