"""Decoded size is bounded, not file size (core/tables.py): rows, columns, bytes of a cell, of a
line and of the whole decoded table, for every format and for uploads, each refused in one
sentence; the CSV checks are linear; compression bombs are refused before their rows are read,
with the peak memory of the refusing process measured (under 1.5 GB)."""

import gzip
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core import uploads
from core.config import DataConfig
from core.data import to_examples
from core.tables import (
    FILE_LIMITS,
    MAX_CELL_BYTES,
    MAX_COLUMNS,
    UPLOAD_LIMITS,
    Limits,
    Meter,
    _Counted,
    _counted_rows,
    iter_table,
    read_table,
)
from tests.helpers import ROOT

ROW = {"premise": "A man plays.", "hypothesis": "A person plays.", "label": 1}
PEAK_LIMIT_MB = 1536  # 1.5 GB


def jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_every_limit_is_one_sentence_naming_the_file(tmp_path):
    small = Limits(rows=5, columns=4, cell_bytes=100, line_bytes=300, total_bytes=2000)
    cases = {
        "rows": (jsonl(tmp_path / "rows.jsonl", [ROW] * 6), "more than 5 rows; a table may have at most 5"),
        "columns": (jsonl(tmp_path / "cols.jsonl", [{f"c{i}": i for i in range(5)}]), "has 5 columns; a table"),
        "cell": (jsonl(tmp_path / "cell.jsonl", [{**ROW, "premise": "x" * 150}]), "line 1 holds a cell of 150 bytes"),
        "line": (
            jsonl(tmp_path / "line.jsonl", [{"a": "x" * 100, "b": "y" * 100, "c": "z" * 100}]),
            "line 1 is longer",
        ),
        "total": (jsonl(tmp_path / "total.jsonl", [ROW] * 40), "more than 1.95 KiB of data once decoded"),
    }
    for what, (path, message) in cases.items():
        with pytest.raises(ValueError) as e:
            read_table(path, small)
        text = str(e.value)
        assert text.startswith(f"{path}: ") and message in text and "\n" not in text, (what, text)
    # the same limits hold for CSV, JSON, Parquet and a Hub split
    (tmp_path / "rows.csv").write_text("premise,hypothesis,label\n" + "a,b,1\n" * 6)
    (tmp_path / "rows.json").write_text(json.dumps([ROW] * 6))
    pq.write_table(pa.Table.from_pylist([ROW] * 6), tmp_path / "rows.parquet")
    for name in ("rows.csv", "rows.json", "rows.parquet"):
        with pytest.raises(ValueError, match="more than 5 rows"):
            read_table(tmp_path / name, small)
    with pytest.raises(ValueError, match="more than 5 rows"):
        list(_counted_rows([ROW] * 6, _Counted(Path("Hub dataset x/y (train)"), small, None)))
    (tmp_path / "cell.csv").write_text("premise,hypothesis,label\n" + "x" * (MAX_CELL_BYTES + 10) + ",b,1\n")
    with pytest.raises(ValueError, match=r"cell\.csv: line 2 holds a cell of more than 1 MiB"):
        read_table(tmp_path / "cell.csv")
    # a file within the limits reads as before, and the meter counts it
    meter = Meter()
    assert read_table(tmp_path / "rows.jsonl", FILE_LIMITS, meter) == [ROW] * 6
    assert meter.rows == 6 and meter.bytes == (tmp_path / "rows.jsonl").stat().st_size


def test_a_wide_csv_header_is_refused_at_once_and_the_duplicate_check_is_linear(tmp_path):
    wide = tmp_path / "wide.csv"
    wide.write_text(",".join(f"c{i}" for i in range(100_000)) + "\n")  # 0.7 MB: 3 minutes of CPU before
    t = time.perf_counter()
    with pytest.raises(ValueError, match=r"the header has 100,000 columns; a table may have at most 1,000"):
        read_table(wide)
    assert time.perf_counter() - t < 2
    # within the column limit, a duplicate is still found, in one pass
    names = [f"c{i}" for i in range(MAX_COLUMNS - 1)] + ["c5"]
    (tmp_path / "twice.csv").write_text(",".join(names) + "\n")
    t = time.perf_counter()
    with pytest.raises(ValueError, match="column 'c5' appears more than once"):
        read_table(tmp_path / "twice.csv")
    assert time.perf_counter() - t < 1
    allowed = Limits(columns=200_000)
    t = time.perf_counter()
    assert read_table(wide, allowed) == []  # a header only: no rows, and linear (was quadratic)
    assert time.perf_counter() - t < 5


def test_json_nesting_and_size_and_nested_parquet_columns_are_refused(tmp_path, monkeypatch):
    (tmp_path / "deep.jsonl").write_text('{"premise": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    with pytest.raises(ValueError, match=r"deep\.jsonl:1: not valid JSON \(nested too deeply\)"):
        read_table(tmp_path / "deep.jsonl")
    monkeypatch.setattr("core.tables.MAX_JSON_BYTES", 100)
    (tmp_path / "big.json").write_text(json.dumps([ROW] * 10))
    with pytest.raises(ValueError, match="a .json file is parsed whole, and this one is .* write it as JSONL"):
        read_table(tmp_path / "big.json")
    table = pa.table({"premise": ["p"], "hypothesis": ["h"], "label": [1], "annotators": [["a", "b"]]})
    pq.write_table(table, tmp_path / "nested.parquet")
    with pytest.raises(ValueError, match=r"column 'annotators' holds nested values \(list<"):
        read_table(tmp_path / "nested.parquet")
    # a nested value in a JSONL text column is refused by the mapping, naming the row (never str()-ed)
    rows = read_table(jsonl(tmp_path / "n.jsonl", [ROW, {**ROW, "premise": {"a": 1}}]))
    with pytest.raises(ValueError, match=r"train row 2: a text column holds an object where a text is expected"):
        to_examples(rows, DataConfig(), "train")


def test_uploads_have_tighter_limits_and_the_parse_cache_is_bounded_in_bytes(tmp_path):
    assert UPLOAD_LIMITS.total_bytes < FILE_LIMITS.total_bytes and UPLOAD_LIMITS.rows < FILE_LIMITS.rows
    n = 300_000  # 300 MB of premises once decoded, in a file of a few hundred KB
    premise = pa.array(["x" * 1000]).dictionary_encode().take(pa.array([0] * n))
    pq.write_table(pa.table({"premise": premise, "hypothesis": ["h"] * n, "label": [1] * n}), tmp_path / "b.parquet")
    with pytest.raises(ValueError, match=r"^my file\.parquet: more than 256 MiB of data once decoded"):
        uploads.read_upload("my file.parquet", (tmp_path / "b.parquet").read_bytes())  # named as the user knows it
    assert len(read_table(tmp_path / "b.parquet")) == n  # the trainer's limits take it
    cache = uploads._ParsedUploads(budget=5_000)
    one = json.dumps(ROW).encode() + b"\n"
    files = [(f"f{i}.jsonl", one * (i + 1)) for i in range(10)]
    for name, data in files:
        assert cache.get(name, data) == [ROW] * (int(name[1:-6]) + 1)
        assert cache.used <= cache.budget
    assert cache.get(*files[-1]) is cache.get(*files[-1])  # kept: the same list
    assert len(cache._entries) < len(files)  # the least recently used were dropped
    with pytest.raises(ValueError, match="not valid JSON"):
        cache.get("bad.jsonl", b"{not json\n")
    assert any(isinstance(v, str) for v, _ in cache._entries.values())  # the error is kept, not re-parsed
    assert len(cache.get("huge.jsonl", one * 1000)) == 1000  # larger than the whole budget: returned ...
    assert "huge.jsonl" not in [name for name, _ in cache._entries]  # ... and never kept


BOMB_READER = """
import sys
from core.tables import iter_table, FILE_LIMITS, UPLOAD_LIMITS
limits = UPLOAD_LIMITS if sys.argv[2] == "upload" else FILE_LIMITS
try:
    n = sum(1 for _ in iter_table(sys.argv[1], limits))
    print("read", n)
except ValueError as e:
    print("refused:", e)
# VmHWM: this process's peak resident memory (ru_maxrss would count the parent's too, kept across exec)
hwm = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print("peak_mb", int(hwm.split()[1]) // 1024)
"""


def make_bombs(folder: Path) -> dict[str, Path]:
    """Small files that decode to gigabytes, as the issue found them."""
    n = 2_500_000
    premise = pa.array(["x" * 1000]).dictionary_encode().take(pa.array([0] * n))
    pq.write_table(
        pa.table({"premise": premise, "hypothesis": pa.array(["h"] * n).dictionary_encode(), "label": [1] * n}),
        folder / "bomb.parquet",
        compression="zstd",
        row_group_size=n,
    )  # about 0.3 MB, 2.5 GB of premises once decoded
    with gzip.open(folder / "line.jsonl.gz", "wb", compresslevel=9) as f:  # about 1 MB: one 1 GiB line
        f.write(b'{"premise": "')
        chunk = b"a" * (1 << 20)
        for _ in range(1024):
            f.write(chunk)
        f.write(b'", "hypothesis": "h", "label": 1}\n')
    with open(folder / "long.jsonl", "wb") as f:  # one 50 MB line
        f.write(b'{"premise": "' + b"a" * (50 << 20) + b'", "hypothesis": "h", "label": 1}\n')
    (folder / "wide.csv").write_text(",".join(f"c{i}" for i in range(100_000)) + "\n")
    return {p.stem: p for p in folder.iterdir()}


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the peak memory from /proc")
def test_refused_bombs_stay_under_1_5_gb_of_memory(tmp_path, record_property):
    bombs = make_bombs(tmp_path)
    expected = {
        "bomb.parquet": "more than 1 GiB of data once decoded",
        "line.jsonl.gz": "more than 1 GiB of data once decoded",
        "long.jsonl": "line 1 is longer than 8 MiB",
        "wide.csv": "the header has 100,000 columns",
    }
    peaks = {}
    for path in bombs.values():
        for mode in ("file", "upload"):
            proc = subprocess.run(
                [sys.executable, "-c", BOMB_READER, str(path), mode],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=600,
            )
            out = proc.stdout
            assert "refused:" in out, (path.name, mode, out, proc.stderr[-2000:])
            if mode == "file":
                assert expected[path.name] in out, out
            peak = int(out.rsplit("peak_mb", 1)[1])
            peaks[f"{path.name} ({mode})"] = peak
            assert peak < PEAK_LIMIT_MB, (path.name, mode, peak)
    record_property("bomb_peaks_mb", json.dumps(peaks))
    print("peak RSS of the refusing process, MB:", json.dumps(peaks))


def test_a_refused_file_hands_out_no_row(tmp_path):
    """Past the limit of rows or of decoded bytes, nothing is read: the first pass refuses it
    before the first row (a caller that keeps rows would hold them otherwise)."""
    path = jsonl(tmp_path / "many.jsonl", [ROW] * 50)
    got = []
    with pytest.raises(ValueError, match="more than 10 rows"):
        for row in iter_table(path, Limits(rows=10)):
            got.append(row)
    assert got == []
    gz = tmp_path / "many.jsonl.gz"
    gz.write_bytes(gzip.compress(path.read_bytes()))
    with pytest.raises(ValueError, match="of data once decoded"):
        for row in iter_table(gz, Limits(total_bytes=1000)):
            got.append(row)
    assert got == []
    pq.write_table(pa.Table.from_pylist([ROW] * 50), tmp_path / "many.parquet", row_group_size=10)
    with pytest.raises(ValueError, match="of data once decoded"):
        for row in iter_table(tmp_path / "many.parquet", Limits(total_bytes=500)):
            got.append(row)
    assert got == []
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss > 0
