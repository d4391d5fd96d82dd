"""Rows from files and the Hub, streamed: JSONL (also .gz), JSON, CSV/TSV and Parquet.

    for row in iter_table("train.jsonl"): ...     # one dict per row; never the whole file in memory
    rows = read_table("train.csv")                # the same, as a list
    rows = read_table("up.csv", UPLOAD_LIMITS)    # an upload: tighter limits (it is held in memory)
    for row in iter_hub_split("stanfordnlp/snli", "train"): ...

JSONL and CSV are read line by line (each line decoded on its own, so an error names the file,
the line and the byte), Parquet row group by row group through pyarrow. core/data.py maps the rows.

What a file holds once decoded is bounded, not only its size on disk: a 1 KB Parquet file or a
small .jsonl.gz can decode to gigabytes. Every reader counts rows, columns, the bytes of each
cell and each line, and the decoded bytes of the whole file against a Limits (FILE_LIMITS for the
trainer and the CLI, UPLOAD_LIMITS for files uploaded in the app), and stops with one sentence at
the first limit passed, before it holds much more than the limit: a JSONL or CSV line is read
at most MAX_LINE_BYTES at a time (gzip streamed), a Parquet row group is measured in Arrow
(dictionary-encoded, nothing decoded into Python) before any of its rows is.
"""

from __future__ import annotations

import csv
import gzip
import json
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

# pyarrow and datasets are imported where they are used: the app's pages read uploads through this
# file, and most of them never touch a Parquet file or the Hub (datasets alone takes seconds to import).

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".ndjson")
PARQUET_BATCH_ROWS = 8192  # rows of a (measured) row group turned into Python dicts at a time
SCAN_CHUNK = 64 * 1024  # bytes read at a time by the first pass over a text file (see _scan)

MiB = 1 << 20
GiB = 1 << 30

MAX_ROWS = 5_000_000
"""Most rows one file (or Hub split) may have: ten times SNLI's training split."""

MAX_COLUMNS = 1_000
"""Most columns a table may have. A header of 100,000 names (0.8 MB of CSV) is refused at once."""

MAX_CELL_BYTES = 1 * MiB
"""Most bytes of one cell (a premise, a text, a label): far above any max_length the models take."""

MAX_LINE_BYTES = 8 * MiB
"""Most bytes of one JSONL line, one CSV record, or one Parquet row once decoded."""

MAX_DECODED_BYTES = 1 * GiB
"""Most bytes a file read for training may decode to (twice SNLI's training file with its parse
trees): a compressed file is measured by what it decodes to, not by its size."""

MAX_JSON_BYTES = 256 * MiB
"""Most bytes of a .json file, which is one JSON document parsed whole (larger data: use JSONL)."""

UPLOAD_MAX_ROWS = 1_000_000
"""Most rows of a file uploaded in the app (its rows are held in the server's memory)."""

UPLOAD_MAX_DECODED_BYTES = 256 * MiB
"""Most bytes an uploaded file may decode to (the server's upload limit is 200 MB on disk)."""


@dataclass(frozen=True)
class Limits:
    """What one table may hold once decoded; every reader in this file checks each of them."""

    rows: int = MAX_ROWS
    """Most rows."""
    columns: int = MAX_COLUMNS
    """Most columns (of a header, of one JSON object, of a Parquet schema)."""
    cell_bytes: int = MAX_CELL_BYTES
    """Most bytes of one cell's text."""
    line_bytes: int = MAX_LINE_BYTES
    """Most bytes of one line or record (Parquet: of one row once decoded)."""
    total_bytes: int = MAX_DECODED_BYTES
    """Most decoded bytes of the whole table."""


FILE_LIMITS = Limits()
UPLOAD_LIMITS = Limits(rows=UPLOAD_MAX_ROWS, total_bytes=UPLOAD_MAX_DECODED_BYTES)

# A cell larger than the limit is a csv.Error, turned into the limit's sentence (the csv module's
# limit is one per process, in characters: at most MAX_CELL_BYTES bytes never hold more).
csv.field_size_limit(MAX_CELL_BYTES)


def size_text(n: int) -> str:
    """8 MiB, 1 GiB, 300 KiB: a byte count for messages."""
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} bytes"


@dataclass
class Meter:
    """What a reader has read so far: rows and decoded bytes (core/uploads.py sizes its cache by it)."""

    rows: int = 0
    bytes: int = 0


class _Counted:
    """The limits of one reading, checked as rows and bytes come in; each breach one sentence."""

    def __init__(self, path: Path, limits: Limits, meter: Meter | None):
        self.path, self.limits = path, limits
        self.meter = meter if meter is not None else Meter()

    def add_bytes(self, n: int, where: str) -> None:
        """Count `n` decoded bytes read (at `where`), refused past the limit."""
        self.meter.bytes += n
        self.total(self.meter.bytes, where)

    def total(self, nbytes: int, where: str) -> None:
        """Refuse a table that decodes to `nbytes` (up to `where`), when that passes the limit."""
        if nbytes > self.limits.total_bytes:
            raise ValueError(
                f"{self.path}: more than {size_text(self.limits.total_bytes)} of data once decoded (at {where}): "
                f"a table may decode to at most {size_text(self.limits.total_bytes)}; use a smaller file or a sample"
            )

    def columns(self, n: int, where: str = "the header") -> None:
        if n > self.limits.columns:
            raise ValueError(
                f"{self.path}: {where} has {n:,} columns; a table may have at most {self.limits.columns:,}"
            )

    def cell(self, nbytes: int, where: str) -> None:
        if nbytes > self.limits.cell_bytes:
            raise ValueError(
                f"{self.path}: {where} holds a cell of {size_text(nbytes)}; a cell may hold at most "
                f"{size_text(self.limits.cell_bytes)}"
            )

    def line(self, nbytes: int, where: str) -> None:
        if nbytes > self.limits.line_bytes:
            raise ValueError(
                f"{self.path}: {where} is longer than {size_text(self.limits.line_bytes)}, the most one line "
                "or row may hold (is it one line at all? JSONL needs one object per line)"
            )

    def rows_ahead(self, n: int) -> None:
        """Refuse at once a table that says it has more rows than the limit (a Parquet file's metadata)."""
        if self.meter.rows + n > self.limits.rows:
            raise ValueError(
                f"{self.path}: more than {self.limits.rows:,} rows; a table may have at most "
                f"{self.limits.rows:,} (use a smaller file or a sample)"
            )

    def row(self, row: dict, where: str, cells: bool = True) -> dict:
        """Count one row: rows, columns, and (`cells`) each text cell's bytes."""
        self.rows_ahead(1)
        self.meter.rows += 1
        self.columns(len(row), where)
        if cells:
            for value in row.values():
                if isinstance(value, str) and len(value) * 4 > self.limits.cell_bytes:  # else it cannot be too long
                    self.cell(len(value.encode("utf-8", "surrogatepass")), where)
        return row


def _suffix(path: Path) -> str:
    return ("".join(path.suffixes[-2:]) if path.suffix == ".gz" else path.suffix).lower()


def read_table(path: str | Path, limits: Limits = FILE_LIMITS, meter: Meter | None = None) -> list[dict]:
    """Rows of a local .jsonl/.json/.csv/.tsv/.parquet file as a list of dicts (all in memory:
    for previews and uploads; the trainer streams them with iter_table)."""
    return list(iter_table(path, limits, meter))


def iter_table(path: str | Path, limits: Limits = FILE_LIMITS, meter: Meter | None = None) -> Iterator[dict]:
    """The rows of a local data file one at a time, never the whole file in one string: JSONL
    and CSV/TSV line by line, Parquet by row groups; only a .json file (one JSON document, at most
    MAX_JSON_BYTES) is read whole. A missing file or an unknown type raises here, at once; a row
    that cannot be read, or a limit passed (`limits`: rows, columns, bytes of a cell, of a line, of
    the decoded table), raises when it is reached, with the file and the line (and for bytes that
    are not UTF-8, their offset in the file). `meter`, when given, counts the rows and decoded
    bytes read. All values from CSV/TSV are strings, as typed."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"data file not found: {path}" if not path.exists() else f"{path} is not a file")
    suffix = _suffix(path)
    counted = _Counted(path, limits, meter)
    if suffix in JSONL_SUFFIXES:
        return _iter_jsonl(path, suffix.endswith(".gz"), counted)
    if suffix == ".json":
        return _iter_json(path, counted)
    if suffix in (".csv", ".tsv"):
        return _iter_csv(path, "\t" if suffix == ".tsv" else ",", counted)
    if suffix == ".parquet":
        return _iter_parquet(path, counted)
    raise ValueError(f"{path}: unsupported file type {suffix!r} (use .jsonl, .json, .csv, .tsv or .parquet)")


def _scan(open_binary, counted: _Counted) -> None:
    """The first pass over a JSONL or CSV file (decompressed as it is read): its decoded bytes and
    its lines, counted SCAN_CHUNK bytes at a time, so that a file past the limit of decoded bytes
    or of rows (a line per row at most) is refused before any of its rows is handed out, holding
    nothing (the rows a caller keeps would cost far more than the file)."""
    nbytes = lines = 0
    with open_binary() as f:
        while chunk := f.read(SCAN_CHUNK):
            nbytes += len(chunk)
            lines += chunk.count(b"\n")
            counted.total(nbytes, f"byte {nbytes:,}")
            if lines > counted.limits.rows:
                counted.rows_ahead(lines)


def _decoded_lines(f, path: Path, counted: _Counted, pending: list[int] | None = None) -> Iterator[tuple[int, str]]:
    """(line number, text) of a binary file object, line by line, decoded as UTF-8 (a BOM at the
    start is dropped); bytes that are not UTF-8 raise a ValueError naming the file, line and byte.
    A line is read at most the line limit (+1 byte) at a time, so one long line is refused before
    it is held whole; every byte counts against the decoded total. `pending` (CSV): bytes of the
    record being read, which the caller sets back to 0 when a record ends."""
    limit = counted.limits.line_bytes
    offset = 0
    n = 0
    while raw := f.readline(limit + 1):
        n += 1
        if len(raw) > limit and not raw.endswith(b"\n"):
            counted.line(len(raw), f"line {n}")
        counted.add_bytes(len(raw), f"line {n}")
        if pending is not None:
            pending[0] += len(raw)
            counted.line(pending[0], f"the record that ends on line {n}")
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


def _iter_jsonl(path: Path, gz: bool, counted: _Counted) -> Iterator[dict]:
    def open_binary():
        return gzip.open(path, "rb") if gz else open(path, "rb")  # gzip: decompressed as it is read

    try:
        if not gz:
            counted.total(path.stat().st_size, "the end of the file")
        _scan(open_binary, counted)
        with open_binary() as f:
            for n, line in _decoded_lines(f, path, counted):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
                except RecursionError:
                    raise ValueError(f"{path}:{n}: not valid JSON (nested too deeply)") from None
                if not isinstance(row, dict):
                    raise ValueError(f"{path}:{n}: each line must be a JSON object")
                yield counted.row(row, f"line {n}")
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:  # not gzip, or cut short
        raise ValueError(f"{path}: could not read as gzip ({e or type(e).__name__})") from None


def _iter_json(path: Path, counted: _Counted) -> Iterator[dict]:
    size = path.stat().st_size
    if size > MAX_JSON_BYTES:
        raise ValueError(
            f"{path}: a .json file is parsed whole, and this one is {size_text(size)} (at most "
            f"{size_text(MAX_JSON_BYTES)}): write it as JSONL, one object per line"
        )
    counted.add_bytes(size, "the end of the file")
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
    except RecursionError:
        raise ValueError(f"{path}: not valid JSON (nested too deeply)") from None
    del text
    if isinstance(data, dict) and "data" in data:
        data = data["data"]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise ValueError(f"{path}: a .json file must hold a list of objects")
    return (counted.row(r, f"row {i + 1}") for i, r in enumerate(data))


def _iter_csv(path: Path, delimiter: str, counted: _Counted) -> Iterator[dict]:
    kind = "TSV" if delimiter == "\t" else "CSV"
    pending = [0]  # bytes of the record being read: a quoted field may span lines
    counted.total(path.stat().st_size, "the end of the file")
    _scan(lambda: open(path, "rb"), counted)
    with open(path, "rb") as f:
        reader = csv.reader((text for _, text in _decoded_lines(f, path, counted, pending)), delimiter=delimiter)
        try:
            header = next(reader, None)
            if header is None:
                return
            counted.columns(len(header))
            pending[0] = 0
            header = [h if h else f"Unnamed: {i}" for i, h in enumerate(header)]
            twice = [h for h, k in Counter(header).items() if k > 1]  # one pass: a wide header is no longer quadratic
            if twice:
                raise ValueError(f"{path}: column {min(twice)!r} appears more than once in the header")
            width = len(header)
            for row in reader:
                pending[0] = 0
                if not row:
                    continue  # a blank line
                if len(row) > width:
                    raise ValueError(
                        f"{path}: line {reader.line_num} has {len(row)} fields, the header has {width} "
                        f"(a text holding {'a tab' if delimiter == chr(9) else 'a comma'} needs quotes)"
                    )
                if len(row) < width:
                    row += [""] * (width - len(row))
                yield counted.row(dict(zip(header, row)), f"line {reader.line_num}", cells=False)
        except csv.Error as e:
            if "field larger than field limit" in str(e):
                raise ValueError(
                    f"{path}: line {reader.line_num} holds a cell of more than {size_text(MAX_CELL_BYTES)}; a cell "
                    f"may hold at most {size_text(counted.limits.cell_bytes)}"
                ) from None
            raise ValueError(f"{path}: line {reader.line_num}: could not parse as {kind} ({e})") from None


def _cell_bytes(column):
    """Bytes of each cell of one Arrow column (a ChunkedArray), as an Arrow array of integers (null
    for a null cell), computed without decoding a dictionary-encoded column."""
    import pyarrow as pa  # see the imports
    import pyarrow.compute as pc

    lengths = []
    for chunk in column.chunks:
        if pa.types.is_dictionary(chunk.type):
            if _is_text(chunk.type.value_type):
                lengths.append(pc.take(pc.binary_length(chunk.dictionary), chunk.indices).cast(pa.int64()))
                continue
            chunk = chunk.dictionary_decode()
        if _is_text(chunk.type):
            lengths.append(pc.binary_length(chunk).cast(pa.int64()))
        else:  # numbers, booleans, dates: a few bytes each, counted as 8
            lengths.append(pa.repeat(pa.scalar(8, pa.int64()), len(chunk)))
    return pa.chunked_array(lengths, pa.int64())


def _is_text(t) -> bool:
    import pyarrow as pa  # see the imports

    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t) or pa.types.is_large_binary(t)


def _iter_parquet(path: Path, counted: _Counted) -> Iterator[dict]:
    import pyarrow as pa  # here, not at the top: see the imports
    import pyarrow.parquet as pq

    try:
        with pq.ParquetFile(path) as probe:
            meta, schema = probe.metadata, probe.schema_arrow
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{path}: could not read as Parquet ({e})") from None
    columns = [c for c in schema.names if not c.startswith("__index_level_")]  # pandas' saved index
    counted.columns(len(columns), "the schema")
    for name in columns:
        t = schema.field(name).type
        if pa.types.is_nested(t):
            raise ValueError(
                f"{path}: column {name!r} holds nested values ({t}), not text or numbers: flatten it, or drop it"
            )
    counted.rows_ahead(meta.num_rows)
    # What the pages would occupy even before decoding (plain or compressed data): refused at once.
    counted.total(sum(meta.row_group(g).total_byte_size for g in range(meta.num_row_groups)), "its metadata")
    # Text columns as dictionaries: a value repeated a million times is one value and a million
    # indices in Arrow. A first pass measures every row group that way (lengths taken through the
    # indices, nothing decoded into Python), so a file past a limit is refused before any row is
    # handed out; the second turns the rows into dicts, PARQUET_BATCH_ROWS at a time.
    file = pq.ParquetFile(path, read_dictionary=[n for n in columns if _is_text(schema.field(n).type)])
    with file:
        sizes = []
        for g in range(meta.num_row_groups):
            sizes.append(_measure(_row_group(file, g, columns, path), columns, counted, f"row group {g}"))
            counted.total(sum(sizes), f"row group {g}")
        for g, size in enumerate(sizes):
            table = _row_group(file, g, columns, path)
            counted.add_bytes(size, f"row group {g}")
            for start in range(0, table.num_rows, PARQUET_BATCH_ROWS):
                for row in table.slice(start, PARQUET_BATCH_ROWS).to_pylist():
                    yield counted.row(row, f"row group {g}", cells=False)
            del table


def _row_group(file, g: int, columns: list[str], path: Path):
    import pyarrow as pa  # see the imports

    try:
        return file.read_row_group(g, columns=columns)
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{path}: could not read row group {g} as Parquet ({e})") from None


def _measure(table, columns: list[str], counted: _Counted, where: str) -> int:
    """The decoded bytes of one row group (an Arrow table), its largest cell and row checked."""
    import pyarrow.compute as pc  # see the imports

    row_bytes = None
    for name in columns:
        cells = _cell_bytes(table.column(name)).fill_null(0)
        if len(cells):
            counted.cell(pc.max(cells).as_py() or 0, f"column {name!r} of {where}")
        row_bytes = cells if row_bytes is None else pc.add(row_bytes, cells)
    if row_bytes is None or not len(row_bytes):
        return 0
    counted.line(pc.max(row_bytes).as_py() or 0, f"a row of {where}")
    return pc.sum(row_bytes).as_py() or 0


def iter_hub_split(
    dataset_id: str, split: str, config_name: str | None = None, limits: Limits = FILE_LIMITS
) -> Iterator[dict]:
    """The rows of a Hub split one at a time (the dataset itself stays memory-mapped on disk), each
    counted against `limits` (rows, columns, bytes of a cell and in all)."""
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
    return _counted_rows(ds, _Counted(Path(f"Hub dataset {dataset_id} ({split})"), limits, None))


def _counted_rows(rows: Iterable[dict], counted: _Counted) -> Iterator[dict]:
    for i, row in enumerate(rows):
        counted.row(row, f"row {i + 1}")
        counted.add_bytes(sum(len(v) for v in row.values() if isinstance(v, (str, bytes))), f"row {i + 1}")
        yield row
