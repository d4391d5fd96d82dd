"""Rows from files and the Hub, streamed: JSONL (also .gz), JSON, CSV/TSV and Parquet.

    for row in iter_table("train.jsonl"): ...     # one dict per row; never the whole file in memory
    rows = read_table("train.csv")                # the same, as a list
    for row in iter_hub_split("stanfordnlp/snli", "train"): ...

JSONL and CSV are read line by line (each line decoded on its own, so an error names the file,
the line and the byte), Parquet by record batches through pyarrow. core/data.py maps the rows.
"""

from __future__ import annotations

import csv
import gzip
import json
from collections.abc import Iterator
from pathlib import Path

# pyarrow and datasets are imported where they are used: the app's pages read uploads through this
# file, and most of them never touch a Parquet file or the Hub (datasets alone takes seconds to import).

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".ndjson")
PARQUET_BATCH_ROWS = 8192
csv.field_size_limit(2**31 - 1)  # a long text in one field is data, not an error


def _suffix(path: Path) -> str:
    return ("".join(path.suffixes[-2:]) if path.suffix == ".gz" else path.suffix).lower()


def read_table(path: str | Path) -> list[dict]:
    """Rows of a local .jsonl/.json/.csv/.tsv/.parquet file as a list of dicts (all in memory:
    for previews of small files; the trainer streams them with iter_table)."""
    return list(iter_table(path))


def iter_table(path: str | Path) -> Iterator[dict]:
    """The rows of a local data file one at a time, never the whole file in one string: JSONL
    and CSV/TSV line by line, Parquet by record batches; only a .json file (one JSON document)
    is read whole. A missing file or an unknown type raises here, at once; a row that cannot be
    read raises when it is reached, with the file and the line (and for bytes that are not
    UTF-8, their offset in the file). All values from CSV/TSV are strings, as typed."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"data file not found: {path}" if not path.exists() else f"{path} is not a file")
    suffix = _suffix(path)
    if suffix in JSONL_SUFFIXES:
        return _iter_jsonl(path, gz=suffix.endswith(".gz"))
    if suffix == ".json":
        return iter(_read_json(path))
    if suffix in (".csv", ".tsv"):
        return _iter_csv(path, "\t" if suffix == ".tsv" else ",")
    if suffix == ".parquet":
        return _iter_parquet(path)
    raise ValueError(f"{path}: unsupported file type {suffix!r} (use .jsonl, .json, .csv, .tsv or .parquet)")


def _decoded_lines(f, path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of a binary file object, line by line, decoded as UTF-8 (a BOM at the
    start is dropped); bytes that are not UTF-8 raise a ValueError naming the file, line and byte."""
    offset = 0
    for n, raw in enumerate(f, 1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(
                f"{path}: line {n} is not UTF-8 text (byte 0x{raw[e.start]:02x} at byte offset {offset + e.start} "
                "of the file): save the file as UTF-8"
            ) from None
        if n == 1 and text.startswith("\ufeff"):
            text = text[1:]
        offset += len(raw)
        yield n, text


def _iter_jsonl(path: Path, gz: bool) -> Iterator[dict]:
    with gzip.open(path, "rb") if gz else open(path, "rb") as f:
        for n, line in _decoded_lines(f, path):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{n}: each line must be a JSON object")
            yield row


def _read_json(path: Path) -> list[dict]:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ValueError(
            f"{path}: line {line} is not UTF-8 text (byte 0x{raw[e.start]:02x} at byte offset "
            f"{e.start} of the file): save the file as UTF-8"
        ) from None
    del raw
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg}, column {e.colno})") from None
    if isinstance(data, dict) and "data" in data:
        data = data["data"]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise ValueError(f"{path}: a .json file must hold a list of objects")
    return data


def _iter_csv(path: Path, delimiter: str) -> Iterator[dict]:
    kind = "TSV" if delimiter == "\t" else "CSV"
    with open(path, "rb") as f:
        reader = csv.reader((text for _, text in _decoded_lines(f, path)), delimiter=delimiter)
        try:
            header = next(reader, None)
            if header is None:
                return
            header = [h if h else f"Unnamed: {i}" for i, h in enumerate(header)]
            twice = sorted({h for h in header if header.count(h) > 1})
            if twice:
                raise ValueError(f"{path}: column {twice[0]!r} appears more than once in the header")
            width = len(header)
            for row in reader:
                if not row:
                    continue  # a blank line
                if len(row) > width:
                    raise ValueError(
                        f"{path}: line {reader.line_num} has {len(row)} fields, the header has {width} "
                        f"(a text holding {'a tab' if delimiter == chr(9) else 'a comma'} needs quotes)"
                    )
                if len(row) < width:
                    row += [""] * (width - len(row))
                yield dict(zip(header, row))
        except csv.Error as e:
            raise ValueError(f"{path}: line {reader.line_num}: could not parse as {kind} ({e})") from None


def _iter_parquet(path: Path) -> Iterator[dict]:
    import pyarrow as pa  # here, not at the top: see the imports
    import pyarrow.parquet as pq

    try:
        file = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{path}: could not read as Parquet ({e})") from None
    columns = [c for c in file.schema_arrow.names if not c.startswith("__index_level_")]  # pandas' saved index
    with file:
        for batch in file.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=columns):
            yield from batch.to_pylist()


def iter_hub_split(dataset_id: str, split: str, config_name: str | None = None) -> Iterator[dict]:
    """The rows of a Hub split one at a time (the dataset itself stays memory-mapped on disk)."""
    try:
        import datasets  # here, not at the top: see the imports
    except ImportError as e:  # pragma: no cover - datasets is in requirements.txt
        raise RuntimeError("loading a Hub dataset needs the `datasets` package") from e
    try:
        ds = datasets.load_dataset(dataset_id, config_name, split=split)
    except Exception as e:
        raise RuntimeError(
            f"could not load split {split!r} of Hub dataset {dataset_id!r}: {type(e).__name__}: {e}. "
            "Without network access, download the files and pass --train/--validation/--test."
        ) from e
    return iter(ds)
