"""The CLI's progress reporter (core/progress.py): fed a run folder written by hand, and through a
real, tiny `python -m core train`."""

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from core import progress
from core.runs import rundir
from tests.helpers import ROOT


def status(run: Path, **fields) -> None:
    rundir.atomic_write_json(run / "status.json", {"state": "running", "pid": os.getpid(), **fields})


def append(run: Path, *records: dict) -> None:
    with open(run / "metrics.jsonl", "a", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")


SETUP = {"kind": "setup", "epochs": 2, "total_steps": 8, "steps_per_epoch": 4}


def step(n: int, epoch: int = 1, loss: float = 1.0) -> dict:
    return {
        "kind": "step",
        "step": n,
        "epoch": epoch,
        "epoch_step": (n - 1) % 4 + 1,
        "steps_per_epoch": 4,
        "loss": loss,
        "rows": 8,
        "samples_per_s": 8.0,
        "step_s": 1.0,
    }


def reporter(run: Path, every: float = 0.0) -> tuple[progress.Reporter, io.StringIO]:
    out = io.StringIO()
    return progress.Reporter(run, stream=out, every=every), out


def last_line(out: io.StringIO) -> str:
    return out.getvalue().rstrip("\n").splitlines()[-1]


def test_plain_lines_show_phase_epoch_step_loss_speed_and_eta(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    status(run, phase="loading")
    rep, out = reporter(run)
    assert not rep.tty  # a StringIO is not a terminal: plain lines, no "\r"
    rep.tick()
    assert last_line(out).startswith("loading | ") and "elapsed" in last_line(out)

    append(
        run,
        SETUP,
        {"kind": "eval", "split": "validation", "stage": "before", "accuracy": 0.3, "seconds": 2.0},
        {"kind": "eval", "split": "test", "stage": "before", "accuracy": 0.3, "seconds": 3.0},
    )
    status(run, phase="training", epoch=1, step=0, total_steps=8)
    append(run, step(1, loss=1.2), step(2, loss=1.0), step(3, loss=0.8))
    rep.tick()
    line = last_line(out)
    # remaining: 5 steps x 1 s (the first step's time left out) + 2 validations x 2 s + the test pass 3 s
    assert line.startswith("training | epoch 1/2 | step 3/8 (38%) | loss 1.0000 | 8.0 pairs/s | ETA 12 s | "), line
    assert "\r" not in out.getvalue()


def test_only_new_bytes_are_read_and_a_half_written_line_waits_for_its_end(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    status(run, phase="training", epoch=1)
    append(run, SETUP, step(1), step(2))
    rep, out = reporter(run)
    rep.tick()
    assert "step 2/8" in last_line(out)
    size = (run / "metrics.jsonl").stat().st_size
    assert rep.tail.offset == size and rep.tail.bytes_read == size

    whole = json.dumps(step(3, loss=0.5)) + "\n"
    half = whole[:25]
    with open(run / "metrics.jsonl", "a") as f:
        f.write(half)  # the trainer is in the middle of writing this line
    rep.tick()
    assert "step 2/8" in last_line(out) and rep.tail.offset == size  # nothing half read
    with open(run / "metrics.jsonl", "a") as f:
        f.write(whole[25:])
    rep.tick()
    assert "step 3/8" in last_line(out)

    # What was read is not read again: the setup line changed in place (same length, same file)
    # still counts 2 epochs, and every byte was read once, the half line's twice.
    path = run / "metrics.jsonl"
    first = path.read_bytes().split(b"\n")[0]
    with open(path, "r+b") as f:
        f.write(first.replace(b'"epochs": 2', b'"epochs": 7'))
    append(run, step(4))
    rep.tick()
    assert "epoch 1/2 | step 4/8" in last_line(out), last_line(out)
    assert rep.tail.bytes_read == path.stat().st_size + len(half)


def test_a_new_metrics_file_starts_over(tmp_path):
    """train() starts metrics.jsonl afresh (a new file); a resume truncates it: both start over."""
    run = tmp_path / "run"
    run.mkdir()
    status(run, phase="training", epoch=1)
    append(run, SETUP, step(1), step(2), step(3))
    rep, out = reporter(run)
    rep.tick()
    assert "step 3/8" in last_line(out)
    rundir.atomic_write_text(run / "metrics.jsonl", "")
    append(run, SETUP, step(1, loss=2.0))
    rep.tick()
    assert "step 1/8" in last_line(out) and "loss 2.0000" in last_line(out)
    with open(run / "metrics.jsonl", "r+b") as f:  # a resume cut the file back to the setup record
        f.truncate(len(json.dumps(SETUP)) + 1)
    append(run, {"kind": "resume", "step": 0}, step(1, loss=3.0))
    rep.tick()
    assert "step 1/8" in last_line(out) and "loss 3.0000" in last_line(out), out.getvalue()


def test_not_a_terminal_a_line_on_each_new_phase_or_epoch_and_every_few_seconds(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    status(run, phase="training", epoch=1)
    append(run, SETUP, step(1))
    rep, out = reporter(run, every=1000)
    for _ in range(3):
        rep.tick()
    assert rep.lines == 1  # nothing new to say within `every` seconds
    append(run, step(2))
    rep.tick()
    assert rep.lines == 1
    status(run, phase="evaluating validation (epoch-1)", epoch=1)
    rep.tick()
    status(run, phase="training", epoch=2)  # epoch 2 starts: a line at once, before its first step
    rep.tick()
    append(run, step(5, epoch=2))
    rep.tick()
    assert rep.lines == 3
    lines = out.getvalue().splitlines()
    assert lines[1].startswith("evaluating validation (epoch-1) | epoch 1/2 | step 2/8")
    assert lines[2].startswith("training | epoch 2/2 | step 2/8")
    rep._last_print -= 1000  # `every` seconds later: a line even without a change
    rep.tick()
    assert rep.lines == 4


def test_the_thread_reports_while_the_block_runs_and_ends_with_a_final_line(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    status(run, phase="loading")
    out = io.StringIO()
    with progress.Reporter(run, stream=out, poll=0.05, every=0.2):
        time.sleep(0.3)
        append(run, SETUP)
        status(run, phase="training", epoch=1)
        for n in range(1, 5):
            append(run, step(n))
            time.sleep(0.1)
        status(run, state="done", phase="done", epoch=1)
    text = out.getvalue()
    assert text.endswith("\n") and text.startswith("loading | ")
    assert any(l.startswith("training | epoch 1/2 | step ") for l in text.splitlines()), text
    assert text.splitlines()[-1].startswith("done | epoch 1/2 | step 4/8 (50%) | loss 1.0000 | 8.0 pairs/s | ")
    assert "ETA" not in text.splitlines()[-1]  # a finished run has no time left


def test_on_a_terminal_one_line_is_redrawn_in_place_with_a_bar(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    status(run, phase="training", epoch=1)
    append(run, SETUP, step(1), step(2))
    out = io.StringIO()
    rep = progress.Reporter(run, stream=out, tty=True)
    rep.tick()
    append(run, step(3))
    rep.tick()
    append(run, step(4))  # the epoch's last step, then its validation
    status(run, phase="evaluating validation (epoch-1)", epoch=1)
    rep.tick()
    rep.stop()
    text = out.getvalue()
    assert text.startswith("\rtraining | epoch 1/2 | step 2/8 [#####---------------]  25% | ")
    assert "\rtraining | epoch 1/2 | step 3/8 [########------------]  38% | " in text  # redrawn in place
    kept, current = text.rstrip("\n").split("\n")  # the training line stays, with its last step
    assert kept.split("\r")[-1].startswith("training | epoch 1/2 | step 4/8 [##########----------]  50% | ")
    assert current.startswith("\revaluating validation (epoch-1) | ") and text.endswith("\n")


def test_summary_has_accuracy_with_intervals_best_epoch_and_total_time():
    report = {
        "test_before": {"n": 204, "correct": 69, "accuracy": 0.338, "ci95": [0.277, 0.405]},
        "test_after": {"n": 204, "correct": 161, "accuracy": 0.789, "ci95": [0.728, 0.840]},
        "best_epoch": 2,
        "epochs": [{"epoch": 1, "val_accuracy": 0.7}, {"epoch": 2, "val_accuracy": 0.8}],
        "total_s": 54.2,
        "train_s": 30.0,
        "eval_s": 10.0,
        "load_s": 5.0,
    }
    lines = progress.summary(report).splitlines()
    assert lines == [
        "test accuracy: 33.8% [27.7%, 40.5%] -> 78.9% [72.8%, 84.0%] (+45.1 points), n = 204, 95% Wilson intervals",
        "best epoch: 2 of 2 (validation accuracy 80.0%)",
        "total time: 54 s (training 30 s, evaluation 10 s, model load 5 s)",
    ]
    assert len(progress.summary({}).splitlines()) == 3  # a sparse report still gives its three lines


@pytest.mark.real_model
@pytest.mark.e2e
def test_the_cli_prints_progress_lines_and_the_summary(tmp_path):
    run = tmp_path / "runs" / "cli"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "core",
            "train",
            "--preset",
            "demo",
            "--max-train-rows",
            "32",
            "--max-validation-rows",
            "16",
            "--max-test-rows",
            "16",
            "--epochs",
            "1",
            "--run-dir",
            str(run),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "QLORA_STUDIO_RUNS": str(run.parent)},
    )
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    lines = proc.stdout.splitlines()
    assert lines[0] == f"run folder: {run}"
    progress_lines = [l for l in lines if " elapsed" in l and " | " in l]
    assert progress_lines and "\r" not in proc.stdout  # captured: not a terminal, plain lines
    assert any(l.startswith(("starting | ", "loading | ")) for l in progress_lines), progress_lines
    final = progress_lines[-1]
    total = json.loads((run / "status.json").read_text())["step"]
    assert final.startswith(f"done | epoch 1/1 | step {total}/{total} (100%) | loss "), final
    assert " pairs/s | " in final
    i = lines.index(final)
    assert lines[i + 1].startswith("test accuracy: ") and " -> " in lines[i + 1]
    assert lines[i + 2] == "best epoch: 1 of 1" or lines[i + 2].startswith("best epoch: 1 of 1 (")
    assert lines[i + 3].startswith("total time: ")
    assert "## Accuracy on the test split" in proc.stdout  # the Markdown report still follows
