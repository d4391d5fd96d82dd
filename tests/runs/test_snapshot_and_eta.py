"""Live progress and ETA of a run folder (core.runs.watch): the remaining time, the snapshot of a running
and a finished folder, durations, the log tail. No Streamlit, no training."""

import time

import pytest

from core.runs import rundir, watch
from core.runs.state import write_status

# --- live ---------------------------------------------------------------------------------------


def test_remaining_time_counts_steps_validation_passes_and_the_final_test():
    setup = {"total_steps": 10, "epochs": 2}
    steps = [{"step": i, "step_s": 2.0} for i in range(1, 5)]
    evals = [
        {"split": "validation", "stage": "before", "seconds": 3.0},
        {"split": "test", "stage": "before", "seconds": 5.0},
    ]
    # 6 steps x 2 s + 2 validation passes x 3 s + the test pass 5 s
    assert watch.estimate_remaining(setup, steps, evals, epochs_done=0, test_after_done=False) == 23.0
    assert watch.estimate_remaining(setup, steps, evals, epochs_done=1, test_after_done=False) == 20.0
    assert watch.estimate_remaining(setup, [], evals, 0, False) is None
    slow_first = [{"step": 1, "step_s": 30.0}] + steps[1:]
    assert watch.estimate_remaining(setup, slow_first, evals, 0, False) == 23.0  # warm-up is not the pace


def test_remaining_time_counts_a_test_pass_per_epoch_when_the_run_tracks_test():
    steps = [{"step": i, "step_s": 2.0} for i in range(1, 5)]
    evals = [
        {"split": "validation", "stage": "before", "seconds": 3.0},
        {"split": "test", "stage": "before", "seconds": 5.0},
    ]
    tracked = {"total_steps": 10, "epochs": 2, "track_test": True}
    # 6 steps x 2 s + 2 x (validation 3 s + test 5 s) + the final test pass 5 s
    assert watch.estimate_remaining(tracked, steps, evals, epochs_done=0, test_after_done=False) == 33.0
    assert watch.estimate_remaining(tracked, steps, evals, epochs_done=2, test_after_done=True) == 12.0
    # a run from before setup recorded track_test: an epoch's test pass in the metrics says so
    old = {"total_steps": 10, "epochs": 2}
    epoch_1 = evals + [{"split": "test", "stage": "epoch-1", "seconds": 4.0}]
    assert watch.estimate_remaining(old, steps, epoch_1, epochs_done=1, test_after_done=False) == 12 + 3 + 4 + 4
    assert watch.estimate_remaining(old, steps, evals, epochs_done=0, test_after_done=False) == 23.0


def test_snapshot_of_a_running_and_a_finished_folder(tmp_path):
    run = tmp_path / "r1"
    run.mkdir()
    write_status(
        run, state="done", pid=None, started_at="2026-01-01T00:00:00+00:00", finished_at="2026-01-01T00:01:05+00:00"
    )
    rundir.append_jsonl(run / "metrics.jsonl", {"kind": "setup", "total_steps": 4, "epochs": 2})
    rundir.append_jsonl(
        run / "metrics.jsonl",
        {"kind": "eval", "split": "validation", "stage": "before", "accuracy": 0.3, "seconds": 1.0, "n": 10},
    )
    for i, mfu in ((1, 0.10), (2, 0.20)):
        rundir.append_jsonl(
            run / "metrics.jsonl",
            {
                "kind": "step",
                "step": i,
                "epoch": 1,
                "step_s": 1.0,
                "rows": 8,
                "tokens_per_s": 100.0,
                "loss": 1.0,
                "mfu": mfu,
            },
        )
    rundir.append_jsonl(
        run / "metrics.jsonl",
        {"kind": "eval", "split": "validation", "stage": "epoch-1", "accuracy": 0.5, "seconds": 1.0, "n": 10},
    )
    rundir.append_jsonl(
        run / "metrics.jsonl",
        {"kind": "epoch", "epoch": 1, "train_loss": 1.0, "val_accuracy": 0.5, "val_loss": 1.0, "epoch_s": 2.0},
    )
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"kind": "step", "ste')  # a line still being written
    snap = watch.snapshot(run)
    p = snap["progress"]
    assert p["fraction"] == 1.0 and p["elapsed_s"] == 65.0 and p["eta_s"] is None
    assert p["step"] == 2 and p["throughput"]["samples_per_s"] == 8.0 and p["throughput"]["tokens_per_s"] == 100.0
    assert p["throughput"]["mfu"] == pytest.approx(0.15)  # mean over recent steps, weighted by step time
    assert watch.validation_curve(snap["evals"]) == [
        {"epoch": 0, "accuracy": 0.3, "loss": None, "n": 10},
        {"epoch": 1, "accuracy": 0.5, "loss": None, "n": 10},
    ]

    write_status(
        run,
        state="running",
        pid=__import__("os").getpid(),
        finished_at=None,
        started_at=rundir.now_iso(),
        phase="training",
    )
    p = watch.snapshot(run, now=time.time() + 10)["progress"]
    assert p["eta_s"] == 2 * 1.0 + 1 * 1.0  # 2 steps left, 1 validation pass left, no test timed yet
    assert 0.7 < p["fraction"] < 0.99 and "training · epoch 1/2 · step 2/4 · about 3 s left" == p["text"]


def test_format_duration():
    assert [watch.format_duration(s) for s in (None, 4.4, 65, 3725)] == ["n/a", "4 s", "1 min 05 s", "1 h 02 min"]
    assert watch.format_duration(14 * 60 + 14, short=True) == "14 min"


def test_log_tail(tmp_path):
    assert watch.log_tail(tmp_path) == ""
    (tmp_path / "train.log").write_text("".join(f"line {i}\n" for i in range(100)))
    assert watch.log_tail(tmp_path, 3) == "line 97\nline 98\nline 99"
