"""The core helpers behind the app: live progress and ETA (core.runs.watch), the pre-launch plan
(core.estimate), and uploaded files (core.uploads). No Streamlit, no training."""

import json
import time
from pathlib import Path

import pytest

from core import estimate, jobs, uploads
from core.config import get_preset, override
from core.runs import rundir, watch
from core.runs.state import read_status, write_status

ROOT = Path(__file__).resolve().parents[1]
SNLI = Path(__file__).resolve().parent / "data" / "snli"  # 240/60/60 genuine SNLI rows, see its README


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


# --- uploads ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, safe",
    [
        ("train.csv", "train.csv"),
        ("../../etc/passwd.jsonl", "passwd.jsonl"),
        ("C:\\Users\\me\\my data.CSV", "my_data.csv"),
        ("a b;rm -rf.jsonl", "a_b_rm_-rf.jsonl"),
        (".hidden.tsv", "hidden.tsv"),
        ("..csv", "data.csv"),
    ],
)
def test_safe_filename(name, safe):
    assert uploads.safe_filename(name) == safe


@pytest.mark.parametrize("name", ["model.exe", "noext", "data.csv.sh"])
def test_unsupported_upload_types_are_refused(name):
    with pytest.raises(ValueError, match="unsupported file type"):
        uploads.safe_filename(name)


def test_uploads_parse_like_the_trainer_and_stay_inside_the_run(tmp_path):
    rows = uploads.read_upload("x.csv", b"sentence1,sentence2,gold_label\nA,B,neutral\n")
    assert rows == [{"sentence1": "A", "sentence2": "B", "gold_label": "neutral"}]
    assert uploads.guess_columns(list(rows[0])) == {
        "premise": "sentence1",
        "hypothesis": "sentence2",
        "label": "gold_label",
        "text": None,
    }
    with pytest.raises(ValueError, match="not valid JSON"):
        uploads.read_upload("x.jsonl", b'{"a": 1}\n{oops\n')
    saved = uploads.save_uploads(tmp_path / "run", {"train": ("../../../x.jsonl", b"{}\n")})
    assert Path(saved["train"]) == tmp_path / "run" / "uploads" / "train-x.jsonl"


def test_launch_with_uploads_points_the_config_at_the_saved_files(tmp_path, monkeypatch):
    monkeypatch.setenv("QLORA_STUDIO_RUNS", str(tmp_path))
    started = []
    monkeypatch.setattr(jobs.subprocess, "Popen", lambda args, **kw: started.append(args))
    run = jobs.launch_with_uploads(get_preset("demo"), {"train": ("t.jsonl", b"{}\n"), "test": ("e.csv", b"a\n1\n")})
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["data"]["source"] == "files" and cfg["data"]["validation"] is None
    assert cfg["data"]["train"] == str(run / "uploads" / "train-t.jsonl")
    assert cfg["data"]["test"] == str(run / "uploads" / "test-e.csv")
    assert read_status(run)["state"] == "queued" and started and started[0][-1] == str(run)
    with pytest.raises(ValueError, match="already holds a run"):
        jobs.launch(get_preset("demo"), run_dir=run)


# --- estimate -----------------------------------------------------------------------------------


def test_planned_rows_follow_the_trainer(tmp_path):
    from core.data import BUILTIN_DIR

    n = {s: sum(1 for _ in open(BUILTIN_DIR / f"{s}.jsonl")) for s in ("train", "validation", "test")}
    assert estimate.planned_rows(get_preset("demo")) == n
    capped = override(get_preset("demo"), {"data.max_train_rows": 50, "data.max_test_rows": 10**6})
    assert estimate.planned_rows(capped) == {**n, "train": 50}
    # files without validation: 10% of train (240 rows -> 24) is carved out first (as load_splits does), then capped
    files = override(
        get_preset("demo"),
        {
            "data.source": "files",
            "data.train": str(SNLI / "train.jsonl"),
            "data.test": str(SNLI / "test.jsonl"),
            "data.max_train_rows": 64,
        },
    )
    assert estimate.planned_rows(files) == {"train": 64, "validation": 24, "test": 60}
    assert estimate.planned_rows(files, known={"train": 20, "test": 5}) == {"train": 18, "validation": 2, "test": 5}


def test_gpu_memory_estimate_is_close_to_the_measured_phi2_peak(monkeypatch):
    from transformers import PhiConfig

    from core.estimate import estimate_parameters_from_config

    cfg = get_preset("phi2-snli")
    phi2 = PhiConfig(
        vocab_size=51200,
        hidden_size=2560,
        intermediate_size=10240,
        num_hidden_layers=32,
        num_attention_heads=32,
        partial_rotary_factor=0.4,
        num_labels=3,
        pad_token_id=50256,
    )
    params = estimate_parameters_from_config(phi2, cfg.lora)
    shape = {"hidden": 2560, "layers": 32}
    gb = estimate.gpu_memory_gb(params, shape, cfg, "bfloat16")
    assert 3.52 <= gb <= 4.5  # measured on an H200: 3.52 GiB, micro-batches of <= 768 tokens (bench/RESULTS.md)
    monkeypatch.setenv("QLORA_MICRO_TOKENS", "1024")
    assert 4.20 <= estimate.gpu_memory_gb(params, shape, cfg, "bfloat16") <= 5.2  # measured: 4.20 GiB
    monkeypatch.setenv("QLORA_MICRO_TOKENS", "0")  # no split: the whole batch at max_length
    whole = estimate.gpu_memory_gb(params, shape, cfg, "bfloat16")
    smaller = override(cfg, {"train.batch_size": 8})
    assert estimate.gpu_memory_gb(params, shape, smaller, "bfloat16") < whole - 4


def test_plan_of_the_demo_and_the_time_estimate_from_an_earlier_run(tmp_path, tiny_run):
    cfg = override(get_preset("demo"), {"data.max_train_rows": 128, "train.epochs": 2})
    p = estimate.plan(cfg, root=tmp_path)
    assert p["device"] in ("cpu", "cuda") and p["error"] is None
    assert p["params"]["total"] > p["params"]["packed"] > p["params"]["trainable"] > 0
    assert p["steps_per_epoch"] == 4 and p["total_steps"] == 8
    assert p["time"] is None  # no earlier run in this runs folder
    p = estimate.plan(cfg, root=tiny_run.parent)
    report = json.loads((tiny_run / "report.json").read_text())
    assert p["time"]["from_run"] == tiny_run.name
    per_row = report["train_s"] / (2 * 64)
    assert p["time"]["seconds"] > 2 * 128 * per_row  # at least the training rows at the measured speed
    bad = estimate.plan(override(cfg, {"model.name": str(tmp_path / "no-such-model")}), root=tmp_path)
    assert bad["params"] is None and bad["params_error"]
