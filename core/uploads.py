"""Data files a user uploads in the app: safe names, parsing for the preview, saving into the run.

    rows = read_upload("my train.csv", data)             # parsed exactly as the trainer will
    cols = guess_columns(list(rows[0]))                  # {"premise": ..., "hypothesis": ..., "label": ...}
    saved = save_uploads(run_dir, {"train": ("my train.csv", data)})   # -> {"train": "/.../uploads/train-my_train.csv"}

Files are stored in <run>/uploads/ so a run folder holds everything it was trained on.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

from .data import HYPOTHESIS_ALIASES, LABEL_ALIASES, PREMISE_ALIASES, TEXT_ALIASES, read_table

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
        return read_table(path)


def guess_columns(columns: list[str]) -> dict[str, str | None]:
    """The columns the trainer would pick by name (premise/sentence1, hypothesis/sentence2, ...)."""
    pick = lambda aliases: next((c for c in aliases if c in columns), None)
    return {"premise": pick(PREMISE_ALIASES), "hypothesis": pick(HYPOTHESIS_ALIASES),
            "label": pick(LABEL_ALIASES), "text": pick(TEXT_ALIASES)}


def save_uploads(run_dir: Path, files: dict[str, tuple[str, bytes]]) -> dict[str, str]:
    """Write each split's uploaded file to <run_dir>/uploads/<split>-<safe name>; return the paths."""
    folder = Path(run_dir) / UPLOADS
    folder.mkdir(parents=True, exist_ok=True)
    saved = {}
    for split, (name, data) in files.items():
        if split not in ("train", "validation", "test"):
            raise ValueError(f"unknown split {split!r}")
        path = folder / f"{split}-{safe_filename(name)}"
        path.write_bytes(data)
        saved[split] = str(path)
    return saved
