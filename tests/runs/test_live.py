"""The Train page's incremental reading of a run folder (core.runs.watch): JsonlTail reads only the
lines appended since its last read, LiveRun keeps a snapshot up to date with it, downsample and
chart_series bound what is plotted. No Streamlit, no training."""

import json
import os
import threading
import time

import pytest

from core.runs import rundir, watch
from core.runs.state import write_status


def write(path, *records, raw: str = ""):
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records) + raw)


# --- JsonlTail ----------------------------------------------------------------------------------


def test_tail_returns_only_the_new_lines(tmp_path):
    path = tmp_path / "m.jsonl"
    tail = watch.JsonlTail(path)
    assert tail.read() == ([], False)  # no file yet
    write(path, {"i": 1}, {"i": 2})
    assert tail.read() == ([{"i": 1}, {"i": 2}], False)
    assert tail.read() == ([], False)  # nothing new: nothing parsed
    write(path, {"i": 3})
    assert tail.read() == ([{"i": 3}], False)
    assert tail.offset == path.stat().st_size


def test_tail_keeps_a_half_written_line_for_the_next_read(tmp_path):
    path = tmp_path / "m.jsonl"
    tail = watch.JsonlTail(path)
    write(path, {"i": 1}, raw='{"i": 2, "note": "half')
    assert tail.read() == ([{"i": 1}], False)
    write(path, raw=' written"}\n{"i": 3')
    assert tail.read() == ([{"i": 2, "note": "half written"}], False)
    write(path, raw="}\n")
    assert tail.read() == ([{"i": 3}], False)
    assert tail.bad == 0


def test_tail_skips_and_counts_lines_that_are_not_objects(tmp_path):
    path = tmp_path / "m.jsonl"
    write(path, {"i": 1}, raw="garbage\n[1, 2]\n\n\xff\n")
    with open(path, "ab") as f:
        f.write(b'\xff\xfe\n{"i": 2}\n')
    tail = watch.JsonlTail(path)
    assert tail.read() == ([{"i": 1}, {"i": 2}], False)
    assert tail.bad == 4


def test_tail_starts_over_when_the_file_is_truncated(tmp_path):
    path = tmp_path / "m.jsonl"
    tail = watch.JsonlTail(path)
    write(path, {"i": 1}, {"i": 2}, {"i": 3})
    assert len(tail.read()[0]) == 3
    with open(path, "w") as f:  # same inode, shorter
        f.write(json.dumps({"j": 1}) + "\n")
    assert tail.read() == ([{"j": 1}], True)
    write(path, {"j": 2})
    assert tail.read() == ([{"j": 2}], False)


def test_tail_starts_over_when_the_file_is_replaced(tmp_path):
    path = tmp_path / "m.jsonl"
    tail = watch.JsonlTail(path)
    write(path, {"i": 1})
    tail.read()
    rundir.atomic_write_jsonl(path, [{"k": 1}, {"k": 2}, {"k": 3}])  # a new inode, longer
    assert tail.read() == ([{"k": 1}, {"k": 2}, {"k": 3}], True)


def test_tail_starts_over_when_the_bytes_it_read_changed_in_place(tmp_path):
    path = tmp_path / "m.jsonl"
    tail = watch.JsonlTail(path)
    write(path, {"i": 1}, {"i": 2})
    tail.read()
    with open(path, "r+b") as f:  # same inode, same size, other content, then more lines
        f.write(b'{"x": 7}')
    write(path, {"i": 3})
    records, restarted = tail.read()
    assert restarted and records == [{"x": 7}, {"i": 2}, {"i": 3}]


def test_tail_starts_over_when_the_file_is_removed(tmp_path):
    path = tmp_path / "m.jsonl"
    tail = watch.JsonlTail(path)
    write(path, {"i": 1})
    tail.read()
    path.unlink()
    assert tail.read() == ([], True)
    assert tail.read() == ([], False)
    write(path, {"i": 9})
    assert tail.read() == ([{"i": 9}], False)


# --- LiveRun ------------------------------------------------------------------------------------


def running_run(tmp_path):
    run = tmp_path / "20990101-000000-demo-live"
    run.mkdir()
    write_status(
        run,
        state="running",
        phase="training",
        pid=os.getpid(),
        created_at=rundir.now_iso(),
        started_at=rundir.now_iso(),
    )
    t = time.time()
    write(
        run / "metrics.jsonl",
        {"t": t, "kind": "setup", "total_steps": 8, "epochs": 2, "steps_per_epoch": 4},
        {
            "t": t,
            "kind": "eval",
            "split": "validation",
            "stage": "before",
            "accuracy": 0.4,
            "loss": 1.1,
            "n": 20,
            "seconds": 2.0,
        },
    )
    return run


def step(i, **kw):
    return {
        "t": time.time(),
        "kind": "step",
        "step": i,
        "epoch": 1 + (i - 1) // 4,
        "steps_per_epoch": 4,
        "loss": 1.0 / i,
        "rows": 32,
        "tokens_per_s": 300.0,
        "step_s": 3.0,
        **kw,
    }


def same(a: dict, b: dict) -> bool:
    return {k: v for k, v in a.items() if k != "version"} == b


def test_live_run_matches_snapshot_and_reads_only_new_lines(tmp_path):
    run = running_run(tmp_path)
    watcher = watch.LiveRun(run)
    now = time.time()
    first = watcher.snapshot(now=now)
    assert same(first, watch.snapshot(run, now=now))
    for i in (1, 2, 3):
        write(run / "metrics.jsonl", step(i))
    write(run / "resources.jsonl", {"t": 100.0, "cpu_percent": 90.0}, {"t": 101.5, "cpu_percent": 95.0})
    write(run / "metrics.jsonl", raw='{"t": 1, "kind": "step", "ste')  # being written
    snap = watcher.snapshot(now=now)
    assert same(snap, watch.snapshot(run, now=now))
    assert snap["progress"]["step"] == 3 and "step 3/8" in snap["progress"]["text"]
    assert [r["elapsed_s"] for r in snap["resources"]] == [0.0, 1.5]
    assert snap["version"] != first["version"]
    assert watcher.snapshot(now=now)["version"] == snap["version"]  # nothing new, same version
    offset = watcher._metrics_tail.offset
    assert offset == (run / "metrics.jsonl").read_bytes().rindex(b"\n") + 1  # up to the half line
    # the run ends: the status says so, and the end record arrives
    write(run / "metrics.jsonl", raw='p": 4}\n')
    write(run / "metrics.jsonl", {"t": time.time(), "kind": "end", "state": "done", "total_s": 30.0})
    write_status(run, state="done", finished_at=rundir.now_iso())
    done = watcher.snapshot(now=now)
    assert done["state"] == "done" and done["end"]["total_s"] == 30.0 and done["progress"]["fraction"] == 1.0
    assert same(done, watch.snapshot(run, now=now))


def test_live_run_starts_over_when_metrics_are_rewritten(tmp_path):
    run = running_run(tmp_path)
    watcher = watch.LiveRun(run)
    for i in range(1, 6):
        write(run / "metrics.jsonl", step(i))
    before = watcher.snapshot()
    assert before["progress"]["step"] == 5
    rundir.atomic_write_jsonl(run / "metrics.jsonl", [{"kind": "setup", "total_steps": 8, "epochs": 2}, step(1)])
    after = watcher.snapshot()
    assert after["progress"]["step"] == 1 and len(after["steps"]) == 1 and after["version"] != before["version"]
    assert len(before["steps"]) == 5  # a snapshot already handed out is not changed


def test_live_run_with_max_age_shares_one_snapshot(tmp_path):
    run = running_run(tmp_path)
    watcher = watch.LiveRun(run)
    shared = watcher.snapshot(max_age=60)
    write(run / "metrics.jsonl", step(1))
    assert watcher.snapshot(max_age=60) is shared  # young enough: the same dict, the same version
    fresh = watcher.snapshot()  # without max_age: always read
    assert fresh["progress"]["step"] == 1
    assert watcher.snapshot(max_age=60) is shared  # ... and that does not replace the shared one
    assert watcher.snapshot(max_age=1e-9)["progress"]["step"] == 1


def test_live_run_serves_threads_at_once(tmp_path):
    run = running_run(tmp_path)
    watcher = watch.LiveRun(run)
    errors, stop = [], threading.Event()

    def viewer():
        try:
            while not stop.is_set():
                s = watcher.snapshot()
                assert [x["step"] for x in s["steps"]] == list(range(1, len(s["steps"]) + 1))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=viewer) for _ in range(4)]
    for t in threads:
        t.start()
    for i in range(1, 201):
        write(run / "metrics.jsonl", step(i))
    stop.set()
    for t in threads:
        t.join()
    assert not errors and len(watcher.snapshot()["steps"]) == 200


# --- downsampling -------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 2, 299, 300, 301, 1000, 12345])
@pytest.mark.parametrize("keys", [("y",), ("y", "z")])
def test_downsample_is_bounded_ordered_and_keeps_ends_and_extremes(n, keys):
    import math

    rows = [
        {"i": i, "y": math.sin(i / 7) + (5 if i == n // 3 else 0), "z": -i if i != n // 2 else 10**6} for i in range(n)
    ]
    out = watch.downsample(rows, keys if len(keys) > 1 else keys[0], max_points=300)
    assert len(out) <= 300
    if n <= 300:
        assert out == rows
        return
    idx = [r["i"] for r in out]
    assert idx == sorted(set(idx)) and idx[0] == 0 and idx[-1] == n - 1
    assert max(r["y"] for r in out) == max(r["y"] for r in rows)  # the spike survives
    assert min(r["y"] for r in out) == min(r["y"] for r in rows)
    if "z" in keys:
        assert max(r["z"] for r in out) == 10**6
    assert len(out) > 100  # still a curve, not a handful of points


def test_downsample_small_bounds_and_missing_values():
    rows = [{"y": None if i % 2 else i} for i in range(1000)]
    out = watch.downsample(rows, "y", max_points=50)
    assert len(out) <= 50 and out[0] is rows[0] and out[-1] is rows[-1]
    assert all(r["y"] is not None for r in out[1:-1])
    assert watch.downsample(rows, "y", max_points=2) == [rows[0], rows[-1]]
    assert watch.downsample(rows, "y", max_points=1) == [rows[-1]]


def test_chart_series_bounds_every_curve(tmp_path):
    run = running_run(tmp_path)
    write(run / "metrics.jsonl", *(step(i) for i in range(1, 2001)))
    write(
        run / "resources.jsonl",
        *(
            {"t": 1000.0 + i, "cpu_percent": float(i % 97), "rss_gb": 0.5, "ram_used_gb": 2.0 + (i == 777)}
            for i in range(5000)
        ),
    )
    snap = watch.LiveRun(run).snapshot()
    series = watch.chart_series(snap, max_points=300)
    assert all(len(v) <= 300 for v in series.values())
    assert series["loss"][0]["step"] == 1 and series["loss"][-1]["step"] == 2000
    assert series["resources"][-1]["elapsed_s"] == 4999.0
    assert max(r["ram_used_gb"] for r in series["resources"]) == 3.0  # a one-sample peak is kept
    assert series["validation"] == [{"epoch": 0, "accuracy": 0.4, "loss": 1.1, "n": 20}]


# --- several viewers of one run -----------------------------------------------------------------


def test_watched_by_counts_sessions_until_they_stop_asking(tmp_path):
    watcher = watch.LiveRun(running_run(tmp_path))
    assert watcher.watched_by("a", 3.0, now=100.0) == 1
    assert watcher.watched_by("b", 3.0, now=101.0) == 2
    assert watcher.watched_by("a", 6.0, now=102.0) == 2  # the same session again: still two
    # "b" refreshes every 3 s: counted until 2 * 3 + VIEWER_GRACE_S = 11 s after it was last seen
    assert watcher.watched_by("a", 6.0, now=101.0 + 11.0) == 2
    assert watcher.watched_by("a", 6.0, now=101.0 + 11.1) == 1  # a closed tab stops counting


def test_refresh_intervals_are_shared_by_viewers_of_a_cpu_run_only():
    base = {"progress": 3.0, "charts": 12.0}
    assert watch.refresh_intervals(base, 1, shares_cpu=True) == base
    assert watch.refresh_intervals(base, 3, shares_cpu=True) == {"progress": 9.0, "charts": 36.0}
    assert watch.refresh_intervals(base, 3, shares_cpu=False) == base  # a GPU run: every viewer at full rate
    assert watch.refresh_intervals(base, 0, shares_cpu=True) == base
    many = watch.refresh_intervals(base, 500, shares_cpu=True)
    assert many["progress"] == 3.0 * watch.MAX_SHARE


@pytest.mark.parametrize(
    "setup, config, gpu, expected",
    [
        ({"device": "cpu"}, {"model": {"device": "auto"}}, True, True),  # the trainer said where it runs
        ({"device": "cuda:0"}, {"model": {"device": "auto"}}, False, False),
        ({}, {"model": {"device": "cpu"}}, True, True),  # before setup: the configured device
        ({}, {"model": {"device": "cuda"}}, False, False),
        ({}, {"model": {"device": "auto"}}, True, False),  # auto: a GPU when the machine has one
        ({}, {"model": {"device": "auto"}}, False, True),
        ({}, None, False, True),  # an unreadable config: auto
    ],
)
def test_trains_on_cpu(setup, config, gpu, expected):
    assert watch.trains_on_cpu({"setup": setup}, config, gpu) is expected
