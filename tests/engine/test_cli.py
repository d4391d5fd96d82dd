"""End to end through the command line: `python -m core train/evaluate/report` on the demo preset
(reduced size), asserting the run folder's files and their contents."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT


def cli(*args, env=None, check=True):
    proc = subprocess.run(
        [sys.executable, "-m", "core", *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, **(env or {})},
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def test_train_writes_the_whole_run_folder(tiny_run):
    run = tiny_run  # conftest: `python -m core train --preset demo`, 64/32/48 rows, 2 epochs
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "done" and status["pid"] and status["finished_at"] and status["error"] is None
    config = json.loads((run / "config.json").read_text())
    assert config["preset"] == "demo" and config["train"]["epochs"] == 2
    assert config["model"]["quantize"] == "bnb.nf4"
    from dataclasses import asdict, replace

    from core.config import SpeedConfig

    assert config["speed"] == asdict(replace(SpeedConfig(), micro_tokens=0))  # how it ran: --speed recorded

    metrics = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    kinds = [m["kind"] for m in metrics]
    assert kinds[0] == "setup" and kinds[-1] == "end"
    setup = metrics[0]
    assert setup["speed"] == config["speed"]
    assert setup["compute_dtype"] == "float32" and setup["device"] == "cpu"
    assert setup["data"]["train"]["used"] == 64 and setup["data"]["test"]["used"] == 48
    assert setup["params"]["trainable"] < setup["params"]["packed"] < setup["params"]["total"]
    steps = [m for m in metrics if m["kind"] == "step"]
    assert len(steps) == setup["total_steps"] == 2 * 2  # 64 rows / batch 32, two epochs
    assert all(s["loss"] > 0 and s["samples_per_s"] > 0 and s["tokens_per_s"] > 0 for s in steps)
    epochs = [m for m in metrics if m["kind"] == "epoch"]
    assert [e["epoch"] for e in epochs] == [1, 2] and all(0 <= e["val_accuracy"] <= 1 for e in epochs)
    evals = {(m["split"], m["stage"]) for m in metrics if m["kind"] == "eval"}
    assert evals == {
        ("validation", "before"),
        ("test", "before"),
        ("validation", "epoch-1"),
        ("test", "epoch-1"),
        ("validation", "epoch-2"),
        ("test", "epoch-2"),
        ("test", "after"),
    }  # test per epoch: dynamics only
    baseline = [m for m in metrics if m["kind"] == "baseline"]  # the embedded model is an encoder
    assert len(baseline) == 1 and "no zero-shot baseline" in baseline[0]["why_not"]
    dynamics = [json.loads(l) for l in (run / "predictions" / "dynamics.jsonl").read_text().splitlines()]
    assert [(d["split"], d["epoch"]) for d in dynamics] == [
        ("validation", 0),
        ("test", 0),
        ("validation", 1),
        ("test", 1),
        ("validation", 2),
        ("test", 2),
    ]
    assert all(len(d["probs"]) == len(d["ids"]) == setup["data"][d["split"]]["used"] for d in dynamics)
    assert (run / "resources.jsonl").exists() and json.loads((run / "resources.jsonl").read_text().splitlines()[0])[
        "rss_gb"
    ] > 0

    for k in (0, 1, 2):
        ckpt = run / "checkpoints" / f"epoch-{k}"
        assert (ckpt / "adapter_model.safetensors").stat().st_size > 0 and (ckpt / "adapter_config.json").exists()

    before = [json.loads(l) for l in (run / "predictions" / "test_before.jsonl").read_text().splitlines()]
    after = [json.loads(l) for l in (run / "predictions" / "test_after.jsonl").read_text().splitlines()]
    assert len(before) == len(after) == 48 and [r["id"] for r in before] == [r["id"] for r in after]
    assert all(abs(sum(r["probs"]) - 1) < 1e-3 and r["tag"] and r["premise"] for r in after)

    report = json.loads((run / "report.json").read_text())
    assert report["state"] == "done" and report["best_epoch"] in (1, 2)
    assert report["test_after"]["correct"] == sum(r["correct"] for r in after)
    assert report["test_before"]["accuracy"] == pytest.approx(sum(r["correct"] for r in before) / 48)
    assert sum(report["changes"].values()) == 48
    assert report["params"] == setup["params"]
    assert len(report["epochs"]) == 2 and report["resources"]["checkpoints_mb"] > 0


@pytest.mark.e2e
def test_evaluate_reproduces_the_before_and_after_models(tiny_run, tmp_path):
    """Scoring the run's own test rows again gives exactly the run's before/after accuracies:
    the "before" model (step-0 head included) and the selected adapter are reproducible."""
    import shutil

    run = shutil.copytree(tiny_run, tmp_path / "run")  # the session's run stays read-only
    before = [json.loads(l) for l in (run / "predictions" / "test_before.jsonl").read_text().splitlines()]
    data = tmp_path / "again.jsonl"
    data.write_text(
        "".join(
            json.dumps({"premise": r["premise"], "hypothesis": r["hypothesis"], "label": r["gold"]}) + "\n"
            for r in before
        )
        + json.dumps({"premise": "x", "hypothesis": "y", "label": "-"})
        + "\n"
    )
    proc = cli("evaluate", run, "--data", data, "--json")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    report = json.loads((run / "report.json").read_text())
    assert result["n"] == 48
    assert result["accuracy_before"] == pytest.approx(report["test_before"]["accuracy"])
    assert result["accuracy_after"] == pytest.approx(report["test_after"]["accuracy"])
    assert (run / "predictions" / "again_before.jsonl").exists() and (
        run / "predictions" / "again_after.jsonl"
    ).exists()


@pytest.mark.e2e
def test_report_command_prints_markdown_and_html(tiny_run, tmp_path):
    run = tiny_run  # conftest: `python -m core train --preset demo`, 64/32/48 rows, 2 epochs
    proc = cli("report", run, "--html", tmp_path / "r.html")
    report = json.loads((run / "report.json").read_text())
    acc = f"{100 * report['test_after']['accuracy']:.1f}%"
    assert "## Accuracy on the test split" in proc.stdout and acc in proc.stdout
    assert "| trainable (LoRA + head) |" in proc.stdout
    html = (tmp_path / "r.html").read_text()
    assert html.startswith("<!doctype html>") and acc in html and "<script" not in html


@pytest.mark.e2e
def test_bad_inputs_give_clear_errors_and_exit_2(tmp_path):
    p = cli(
        "train", "--preset", "demo", "--train", tmp_path / "missing.jsonl", "--run-dir", tmp_path / "r1", check=False
    )
    assert p.returncode == 2 and "data file not found" in p.stderr
    p = cli("train", "--preset", "demo", "--epochs", 0, "--run-dir", tmp_path / "r2", check=False)
    assert p.returncode == 2 and "train.epochs" in p.stderr
    p = cli("train", "--run-id", "../escape", check=False)
    assert p.returncode == 2 and "invalid run id" in p.stderr
    p = cli("report", tmp_path, check=False)
    assert p.returncode == 2 and "not a run folder" in p.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"premise": "a", "hypothesis": "b", "label": "maybe"}\n')
    p = cli("train", "--preset", "demo", "--train", bad, "--test", bad, "--run-dir", tmp_path / "r3", check=False)
    assert p.returncode == 2 and "unknown label 'maybe'" in p.stderr
    status = json.loads((tmp_path / "r3" / "status.json").read_text())
    assert status["state"] == "failed" and "unknown label" in status["error"]
    p = cli(
        "train",
        "--preset",
        "demo",
        "--model",
        "no-such-org/no-such-model",
        "--max-train-rows",
        30,
        "--run-dir",
        tmp_path / "r4",
        env={"HF_HUB_OFFLINE": "1"},
        check=False,
    )
    assert p.returncode == 2 and "could not load the tokenizer of model 'no-such-org/no-such-model'" in p.stderr
    assert json.loads((tmp_path / "r4" / "status.json").read_text())["state"] == "failed"


def test_the_plan_before_launch_counts_the_parameters_the_run_had(tiny_run):
    """core.estimate builds the model on the meta device (no weights): its counts must equal the
    loaded 4-bit model's, mean pooling of the embedded model included."""
    from core.config import RunConfig
    from core.estimate import model_facts_or_error

    cfg = RunConfig.load(tiny_run / "config.json")
    setup = json.loads((tiny_run / "metrics.jsonl").read_text().splitlines()[0])
    assert setup["pooling"] == "mean"
    assert model_facts_or_error(cfg)["params"] == setup["params"]


def test_speed_flag_rejects_unknown_switches_before_anything_loads(capsys):
    from core.__main__ import main

    assert main(["train", "--speed", "warp=9", "--run-dir", "/nonexistent/never-made"]) == 2
    err = capsys.readouterr().err
    assert "--speed takes NAME=VALUE" in err and "warp" in err and "cuda_graphs" in err
    assert main(["train", "--speed", "pack=sideways", "--run-dir", "/nonexistent/never-made"]) == 2
    assert "speed.pack must be auto, on or off" in capsys.readouterr().err
    assert not Path("/nonexistent/never-made").exists()
