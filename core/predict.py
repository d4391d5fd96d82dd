"""Predictions for new rows: `python -m core predict RUN --data FILE [--out OUT.jsonl|OUT.csv]`.

    result = predict_file(Path("runs/<id>"), Path("new.csv"), out=Path("new-predicted.csv"))
    result["n"], result["out"], result["accuracy"]   # accuracy only where the rows had labels

The rows go through the run's own column mapping and input (core/data.py: iter_examples and
encode, as in training), with labels optional: a row with a gold label also gets `gold` and
`correct`, a row without one is scored all the same. The file is streamed: rows are read, scored
and written CHUNK_ROWS at a time, so a file of millions of rows never sits in memory, and a line
on stderr says how far it is. Each output row holds the id, the inputs (premise and hypothesis,
or text), the predicted label and every class's probability: in JSONL as `probs` {label: p}, in
CSV as one column `prob_<label>` per class. CSV text cells pass through core/text.py's csv_cell,
so a spreadsheet never runs a text from the data as a formula. The output is written to a
temporary file beside it and renamed into place at the end: a failed run leaves no half file.
"""

from __future__ import annotations

import csv
import itertools
import json
import os
import secrets
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .checkpoint import load_adapter_weights, run_checkpoint
from .classifier import CLASSIFIER_FILE
from .config import RunConfig
from .data import LABEL_ALIASES, NO_LABEL, Example, SplitStats, drop_notes, encode, iter_examples, warn
from .evaluate import evaluation_name, load_run_model, predict
from .results.calibration import apply_temperature
from .runs import rundir
from .tables import iter_table
from .text import csv_cell

CHUNK_ROWS = 2048  # rows read, scored and written at a time
OUTPUT_SUFFIXES = (".jsonl", ".csv")


def output_path(run_dir: Path, data_file: Path, out: Path | None) -> Path:
    """Where predict_file writes: `out` (a .jsonl or .csv file), else the run's
    predictions/<name>_predicted.jsonl, <name> being the data file's stem made safe."""
    if out is None:
        return rundir.predictions_file(run_dir, evaluation_name(data_file), "predicted")
    out = Path(out)
    if out.suffix.lower() not in OUTPUT_SUFFIXES:
        raise ValueError(
            f"--out {out}: the predictions are written as .jsonl or .csv, not {out.suffix or 'no suffix'!r}"
        )
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder: give a file name ending in .jsonl or .csv")
    return out


def chunks(examples: Iterator[Example], size: int) -> Iterator[list[Example]]:
    while chunk := list(itertools.islice(examples, size)):
        yield chunk


def output_rows(examples: list[Example], probs: np.ndarray, labels: list[str]) -> Iterator[dict]:
    """One output row per example: id, inputs, tag, gold and correct (labelled rows only), pred, probs."""
    for ex, p in zip(examples, probs):
        row = ex.as_dict()
        row.pop("label")
        pred = int(p.argmax())
        if ex.label != NO_LABEL:
            row["gold"] = labels[ex.label]
            row["correct"] = pred == ex.label
        row["pred"] = labels[pred]
        row["probs"] = {label: round(float(x), 5) for label, x in zip(labels, p)}
        yield row


class PredictionWriter:
    """Rows to a .jsonl or .csv file through a temporary file renamed into place by close()."""

    def __init__(self, path: Path, labels: list[str], columns: list[str]):
        self.path = path
        self.labels = labels
        self.tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.tmp, "w", encoding="utf-8", newline="")
        self.csv = None
        if path.suffix.lower() == ".csv":
            self.header = columns + ["pred"] + [f"prob_{label}" for label in labels]
            self.csv = csv.writer(self.file, lineterminator="\n")
            self.csv.writerow([csv_cell(h) for h in self.header])

    def write(self, rows: Iterator[dict]) -> None:
        for row in rows:
            if self.csv is None:
                self.file.write(json.dumps(row, ensure_ascii=False) + "\n")
                continue
            flat = {**row, **{f"prob_{k}": v for k, v in row["probs"].items()}}
            self.csv.writerow([csv_cell(flat.get(h, "")) for h in self.header])

    def close(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.path)

    def discard(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)


def predict_file(
    run_dir: Path,
    data_file: Path,
    out: Path | None = None,
    epoch: int | None = None,
    batch_size: int | None = None,
    progress=None,
    temperature: bool = True,
) -> dict:
    """Score every row of `data_file` with the run's checkpoint of `epoch` (default: the epoch the
    run selected) and write the predictions to `out` (see output_path). `progress(done, rows_per_s)`
    is called after every chunk (default: a line on stderr). With `temperature` the probabilities
    are those of the logits divided by the checkpoint's temperature (classifier.json, fitted on
    validation: calibrated; the predicted labels are the same). Returns {"n", "out", "epoch",
    "labelled", "accuracy" (None without labelled rows), "dropped_empty", "seconds", "temperature"}."""
    run_dir = Path(run_dir)
    folder, epoch = run_checkpoint(run_dir, epoch)  # not a run, no finished epoch: before any model loads
    path = output_path(run_dir, data_file, out)
    rows = iter_table(data_file)  # a missing file or an unknown type fails here
    cfg = RunConfig.load(run_dir / rundir.CONFIG)
    first = next(rows, None)
    if first is None:
        raise ValueError(f"{data_file}: no rows to predict")
    label_column = cfg.data.label_column or next((a for a in LABEL_ALIASES if a in first), None)
    has_labels = label_column in first  # as iter_examples decides: gold and correct columns in a CSV
    stats = SplitStats()
    examples = iter_examples(
        itertools.chain([first], rows), cfg.data, "predict", source=str(data_file), stats=stats, need_labels=False
    )
    batches = chunks(examples, CHUNK_ROWS)
    first_chunk = next(batches, None)  # the column mapping is checked here, still before the model loads
    if first_chunk is None:
        raise ValueError(
            f"{data_file}: no usable rows to predict: of {stats.rows_read} rows, {stats.dropped_empty} have an "
            "empty premise, hypothesis or text"
        )
    progress = progress or _progress_line
    model, tokenizer, device, dtype, speed = load_run_model(cfg)
    load_adapter_weights(model, folder)
    info = rundir.read_json(folder / CLASSIFIER_FILE) or {}
    t = info.get("temperature") if temperature else None
    bs = batch_size or cfg.train.eval_batch_size
    labels = list(cfg.data.labels)
    inputs = ["text"] if first_chunk[0].text else ["premise", "hypothesis"]
    columns = ["id", *inputs] + (["tag"] if first_chunk[0].tag else []) + (["gold", "correct"] if has_labels else [])
    writer = PredictionWriter(path, labels, columns)
    t0 = time.perf_counter()
    n = right = labelled = 0
    try:
        for chunk in itertools.chain([first_chunk], batches):
            encoded = encode(chunk, tokenizer, cfg.data, split="predict")
            for e in encoded:
                e["label"] = max(e["label"], 0)  # predict() also computes a loss: any valid class will do
            probs, _ = predict(model, encoded, bs, tokenizer.pad_token_id, device, dtype, speed=speed)
            if t:
                probs = apply_temperature(probs, t, eps=1e-30)
            writer.write(output_rows(chunk, probs, labels))
            gold = np.array([e.label for e in chunk])
            mask = gold != NO_LABEL
            labelled += int(mask.sum())
            right += int((probs.argmax(-1)[mask] == gold[mask]).sum())
            n += len(chunk)
            progress(n, n / max(time.perf_counter() - t0, 1e-9))
    except BaseException:
        writer.discard()
        raise
    writer.close()
    for note in drop_notes("predict", stats):
        warn(note)
    return {
        "n": n,
        "out": str(path),
        "epoch": epoch,
        "labelled": labelled,
        "accuracy": right / labelled if labelled else None,
        "dropped_empty": stats.dropped_empty,
        "seconds": round(time.perf_counter() - t0, 3),
        "temperature": t,
    }


def _progress_line(done: int, rows_per_s: float) -> None:
    print(f"predict: {done:,} rows scored ({rows_per_s:,.0f} rows/s)", file=sys.stderr, flush=True)
