"""The run folder's files (core/runs/rundir.py, core/runs/state.py): run ids, the runs root, atomic
writes, JSONL reading of half-written lines, metrics by kind, the status of a dead process."""

import json
import os

import pytest

from core.runs import rundir
from core.runs.state import read_status, write_status


def test_run_ids_cannot_escape_the_runs_folder(tmp_path):
    for bad in ("..", "../x", "a/b", "", ".hidden", "x" * 81, "a b", "/etc", "a\\b", "..."):
        with pytest.raises(ValueError):
            rundir.run_path(bad, root=tmp_path)
    assert rundir.run_path("20261129-demo_1.a", root=tmp_path) == (tmp_path / "20261129-demo_1.a").resolve()
    assert rundir.RUN_ID_RE.match(rundir.new_run_id("demo"))


def test_runs_root_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(rundir.RUNS_ENV, str(tmp_path / "elsewhere"))
    assert rundir.runs_root() == (tmp_path / "elsewhere").resolve()


def test_atomic_write_replaces_whole_files_and_leaves_no_temp(tmp_path):
    path = tmp_path / "s.json"
    rundir.atomic_write_json(path, {"a": 1, "nan": float("nan")})
    assert json.loads(path.read_text()) == {"a": 1, "nan": None}

    class Boom:
        def __str__(self):
            raise RuntimeError("boom")

    with pytest.raises(TypeError):  # not bytes: the write itself fails
        rundir.atomic_write_bytes(path, Boom())  # fails mid-write
    assert json.loads(path.read_text()) == {"a": 1, "nan": None}
    assert [p.name for p in tmp_path.iterdir()] == ["s.json"]


def test_jsonl_reader_skips_a_half_written_last_line(tmp_path):
    path = tmp_path / "m.jsonl"
    rundir.append_jsonl(path, {"step": 1})
    rundir.append_jsonl(path, {"step": 2})
    with open(path, "a") as f:
        f.write('{"step": 3, "lo')
    assert rundir.read_jsonl(path) == [{"step": 1}, {"step": 2}]
    assert rundir.read_jsonl(tmp_path / "missing.jsonl") == []


def test_read_metrics_splits_records_by_kind_in_file_order(tmp_path):
    path = tmp_path / rundir.METRICS
    for rec in (
        {"kind": "setup", "n": 0},
        {"kind": "step", "step": 1},
        {"kind": "eval", "stage": "before"},
        {"kind": "step", "step": 2},
        {"kind": "epoch", "epoch": 1},
        {"kind": "custom", "x": 1},
        {"no_kind": True},
        {"kind": "end", "state": "stopped"},
        {"kind": "end", "state": "done"},
    ):
        rundir.append_jsonl(path, rec)
    with open(path, "a") as f:
        f.write('{"kind": "step", "st')  # the trainer is mid-way through this line
    by_kind = rundir.read_metrics(tmp_path)
    assert by_kind == {
        "setup": [{"kind": "setup", "n": 0}],
        "step": [{"kind": "step", "step": 1}, {"kind": "step", "step": 2}],
        "eval": [{"kind": "eval", "stage": "before"}],
        "epoch": [{"kind": "epoch", "epoch": 1}],
        "end": [{"kind": "end", "state": "stopped"}, {"kind": "end", "state": "done"}],
        "custom": [{"kind": "custom", "x": 1}],
    }
    assert rundir.read_metrics(tmp_path / "no-such-run") == {k: [] for k in rundir.METRIC_KINDS}


def test_status_of_a_dead_running_process_reads_failed(tmp_path):
    write_status(tmp_path, state="running", pid=2**22 + 12345)
    assert read_status(tmp_path)["state"] == "failed"
    write_status(tmp_path, state="running", pid=os.getpid())
    assert read_status(tmp_path)["state"] == "running"
    with pytest.raises(ValueError):
        write_status(tmp_path, state="bogus")
