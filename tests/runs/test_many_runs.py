"""Fast with many runs and a large metrics.jsonl: list_runs keeps each run's line until its files
change (2,000 runs under a second), and a finished run's metrics are read once per version of the
file, thinned, by the snapshot and by the damage check (bench/many_runs.py times the pages)."""

import json
import os
import time

import pytest

from core.config import get_preset
from core.runs import rundir, watch
from core.runs.state import damaged_files, list_runs, write_status


def make_runs(root, n: int) -> None:
    config = get_preset("demo").to_dict()
    for i in range(n):
        run = root / f"20990101-{i:06d}-copy"
        run.mkdir(parents=True)
        rundir.atomic_write_json(run / "config.json", {**config, "group": "g" if i < 3 else None})
        write_status(run, state="done", pid=None, created_at=f"2099-01-01T00:00:{i % 60:02d}+00:00")


@pytest.mark.slow
def test_the_sidebar_lists_2000_runs_in_under_a_second(tmp_path, record_property):
    root = tmp_path / "runs"
    make_runs(root, 2000)
    t = time.perf_counter()
    cold = list_runs(root)
    cold_s = time.perf_counter() - t
    t = time.perf_counter()
    warm = list_runs(root)
    warm_s = time.perf_counter() - t
    record_property("list_runs_s", json.dumps({"cold": round(cold_s, 3), "warm": round(warm_s, 3)}))
    assert len(cold) == len(warm) == 2000 and warm_s < 1.0, (cold_s, warm_s)
    assert [r["id"] for r in cold] == [r["id"] for r in warm]
    assert sorted(r["seed"] for r in warm if r["group"] == "g") == [0, 0, 0]
    # a kept line follows its run: a changed status.json is read again, a running run every time
    run = root / "20990101-000005-copy"
    write_status(run, state="failed", error="boom")
    assert next(r for r in list_runs(root) if r["path"] == run)["state"] == "failed"
    write_status(run, state="running", pid=os.getpid())
    assert next(r for r in list_runs(root) if r["path"] == run)["state"] == "running"
    (run / rundir.HEARTBEAT).unlink(missing_ok=True)
    old = time.time() - 3600
    status = json.loads((run / rundir.STATUS).read_text())
    rundir.atomic_write_json(run / rundir.STATUS, {**status, "updated_at": "2000-01-01T00:00:00+00:00"})
    os.utime(run / rundir.STATUS, (old, old))
    assert next(r for r in list_runs(root) if r["path"] == run)["state"] == "failed"  # no heartbeat: read again
    (run / "config.json").write_text("{not json")
    assert next(r for r in list_runs(root) if r["path"] == run)["state"] == rundir.DAMAGED


@pytest.mark.slow
def test_a_large_metrics_file_is_read_once_per_version_and_thinned(tmp_path, record_property):
    run = tmp_path / "runs" / "20990101-000000-big"
    run.mkdir(parents=True)
    get_preset("demo").save(run / "config.json")
    write_status(run, state="done", pid=None, finished_at="2099-01-01T00:01:00+00:00")
    with open(run / rundir.METRICS, "w") as f:
        f.write(json.dumps({"t": 0.0, "kind": "setup", "epochs": 1, "total_steps": 200_000}) + "\n")
        for i in range(1, 200_001):
            loss = 9.0 if i == 123_457 else 1.0 / (1 + i * 1e-4)  # one spike the thinning must keep
            f.write(json.dumps({"t": float(i), "kind": "step", "step": i, "loss": loss, "step_s": 0.1}) + "\n")
        f.write(json.dumps({"t": 1e6, "kind": "end", "state": "done", "total_s": 1.0}) + "\n")
    size = (run / rundir.METRICS).stat().st_size
    t = time.perf_counter()
    snap = watch.snapshot(run)
    assert damaged_files(run) == []
    cold_s = time.perf_counter() - t
    t = time.perf_counter()
    again = watch.snapshot(run)
    assert damaged_files(run) == []
    warm_s = time.perf_counter() - t
    record_property("metrics", json.dumps({"bytes": size, "cold_s": round(cold_s, 2), "warm_s": round(warm_s, 4)}))
    assert again is snap and warm_s < 0.1, (cold_s, warm_s)
    steps = snap["steps"]
    assert len(steps) <= 2 * watch.STEPS_KEPT and steps[0]["step"] == 1 and steps[-1]["step"] == 200_000
    assert [s["step"] for s in steps[-watch.TAIL_KEPT :]] == list(range(200_001 - watch.TAIL_KEPT, 200_001))
    assert max(s["loss"] for s in steps) == 9.0  # min-max thinning keeps the spike
    assert snap["progress"]["step"] == 200_000 and snap["progress"]["fraction"] == 1.0
    # a new version of the file is read again
    with open(run / rundir.METRICS, "a") as f:
        f.write("garbage\n")
    assert watch.snapshot(run) is not snap
    assert damaged_files(run) == [f"{rundir.METRICS}: 1 unreadable line (garbled, not UTF-8, or the wrong type)"]
