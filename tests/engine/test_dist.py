"""Data-parallel training (core/dist.py) on CPU: two gloo processes under torchrun, started by
`python -m core train --nproc 2`, train a tiny BERT exactly as one process does with the same
global batch; the replicas stay identical; rank 0 alone writes the run folder; a stop is agreed
by both; a failing process ends the run with its error in status.json instead of hanging."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import ROOT, SNLI, save_word_tokenizer


def make_tiny_bert(folder: Path) -> Path:
    """A tiny random BERT without dropout (the two runs must differ only in how they split each
    batch) and a word-level tokenizer over the SNLI slice."""
    from transformers import AutoModelForSequenceClassification, BertConfig

    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(
        BertConfig(
            vocab_size=256,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_labels=3,
            pad_token_id=0,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
    ).save_pretrained(folder)
    rows = [json.loads(line) for line in (SNLI / "train.jsonl").read_text().splitlines()]
    save_word_tokenizer(folder, [w for r in rows for w in (r["premise"] + " " + r["hypothesis"]).split()], causal=False)
    return folder


def args(model: Path, *extra) -> list[str]:
    # 37 train rows in batches of 8: 5 steps an epoch, the last of 5 rows (3 for rank 0, 2 for
    # rank 1: the gradients are weighted by rows); 2 epochs; one thread per process
    return [
        "--model",
        str(model),
        "--device",
        "cpu",
        "--pooling",
        "model",
        "--train",
        str(SNLI / "train.jsonl"),
        "--validation",
        str(SNLI / "validation.jsonl"),
        "--test",
        str(SNLI / "test.jsonl"),
        "--max-train-rows",
        "37",
        "--max-validation-rows",
        "15",
        "--max-test-rows",
        "15",
        "--max-length",
        "48",
        "--epochs",
        "2",
        "--batch-size",
        "8",
        "--lora-r",
        "4",
        "--lora-dropout",
        "0",
        "--threads",
        "1",
        *map(str, extra),
    ]


def run(*argv, timeout=600, env=None, check=0) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "core", "train", *map(str, argv)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
    assert proc.returncode == check, f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def adapter(run_dir: Path, epoch: int) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "checkpoints" / f"epoch-{epoch}" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same experiment with one process and with two (same global batch of 8)."""
    tmp = tmp_path_factory.mktemp("dist")
    model = make_tiny_bert(tmp / "tiny-bert")
    one, two = tmp / "one", tmp / "two"
    run(*args(model), "--run-dir", one)
    out = run(*args(model), "--nproc", 2, "--run-dir", two)
    return model, one, two, out.stdout + out.stderr


@pytest.mark.e2e
def test_two_processes_train_the_adapter_one_process_trains(runs):
    _, one, two, _ = runs
    for epoch in (1, 2):
        a, b = adapter(one, epoch), adapter(two, epoch)
        assert a.keys() == b.keys()
        for k in a:
            # float32 on CPU; the two runs differ in how the batch's mean gradient is summed
            # (one process over 8 rows; two over 4 + 4, then all-reduced) and in padding width
            torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=f"{k} at epoch {epoch}")
    start = adapter(one, 0)  # and training moved them: the comparison is not of two untouched adapters
    assert any(not torch.allclose(start[k], adapter(one, 2)[k]) for k in start)
    l1 = [r["loss"] for r in records(one) if r["kind"] == "step"]
    l2 = [r["loss"] for r in records(two) if r["kind"] == "step"]
    assert len(l1) == len(l2) == 10
    assert l2 == pytest.approx(l1, rel=1e-4, abs=1e-5)  # the logged loss is the global batch's mean
    e1 = {r["stage"]: r["accuracy"] for r in records(one) if r["kind"] == "eval" and r["split"] == "test"}
    e2 = {r["stage"]: r["accuracy"] for r in records(two) if r["kind"] == "eval" and r["split"] == "test"}
    assert e1 == e2  # sharded, gathered evaluation: the same predictions


@pytest.mark.e2e
def test_the_replicas_are_identical_and_rank_0_alone_wrote_the_run_folder(runs):
    _, one, two, out = runs
    recs = records(two)
    kinds = [r["kind"] for r in recs]
    assert kinds.count("setup") == 1 and kinds.count("end") == 1 and kinds.count("epoch") == 2
    setup, end = recs[0], recs[-1]
    assert setup["world_size"] == 2 and records(one)[0]["world_size"] == 1
    assert end["state"] == "done" and end["replicas_identical"] is True
    assert len(end["peaks_per_process"]) == 2
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())  # no rank-1 files
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == sorted(
        p.name for p in (one / "checkpoints").iterdir()
    )
    assert len((two / "predictions" / "test_after.jsonl").read_text().splitlines()) == 15
    assert (two / "predictions" / "test_after.jsonl").read_text() == (
        one / "predictions" / "test_after.jsonl"
    ).read_text()
    assert json.loads((two / "config.json").read_text())["train"]["processes"] == 2
    assert json.loads((two / "status.json").read_text())["state"] == "done"
    assert out.count("run folder:") == 1  # one process prints
    assert json.loads((two / "report.json").read_text())["world_size"] == 2
    assert "device cpu x 2 processes (data-parallel)" in out  # the report printed at the end


@pytest.mark.e2e
def test_a_stop_is_agreed_and_the_run_resumes_with_two_processes(runs, tmp_path):
    model, one, _, _ = runs
    run_dir = tmp_path / "stopped"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "core",
            "train",
            *args(model),
            "--checkpoint-every",
            "2",
            "--nproc",
            "2",
            "--run-dir",
            str(run_dir),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )

    from core.runs.rundir import read_metrics  # skips a half-written last line

    def stepped() -> bool:  # the first step record (status.json says so only every 5 steps)
        return bool(read_metrics(run_dir)["step"])

    deadline = time.time() + 300
    while time.time() < deadline and not stepped() and proc.poll() is None:
        time.sleep(0.01)  # the ten steps take about a second here: stop early in the first epoch
    (run_dir / "STOP").write_text("")  # what the Stop button writes (it also signals rank 0)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 3, out[-3000:]
    assert json.loads((run_dir / "status.json").read_text())["state"] == "stopped"
    run("--resume", run_dir)  # two processes again: config.json says so
    assert json.loads((run_dir / "status.json").read_text())["state"] == "done"
    assert [r["world_size"] for r in records(run_dir) if r["kind"] == "resume"] == [2]
    a, b = adapter(one, 2), adapter(run_dir, 2)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)


@pytest.mark.e2e
def test_a_failing_process_ends_the_run_with_its_error_not_a_hang(runs, tmp_path):
    model = runs[0]
    run_dir = tmp_path / "broken"
    t0 = time.time()
    proc = run(*args(model), "--nproc", 2, "--run-dir", run_dir, env={"QLORA_STUDIO_FAIL_RANK": "1"}, check=2)
    assert time.time() - t0 < 240
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "failed"
    assert "rank 1 failed" in status["error"] and "QLORA_STUDIO_FAIL_RANK" in status["error"], status["error"]
    assert "rank 1 failed" in proc.stderr + proc.stdout


def test_nproc_needs_gpus_unless_the_device_is_cpu(tmp_path, capsys):
    from core.__main__ import main

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    code = main(["train", "--preset", "demo", "--nproc", "2", "--run-dir", str(tmp_path / "r")])
    assert code == 2
    assert "needs GPUs and this machine has none" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_the_train_page_offers_the_gpus_when_there_are_several(tmp_path, monkeypatch):
    """With two GPUs the Train page has a GPUs field, and a launch with 2 saves
    train.processes = 2 in the run's config.json (the trainer then starts torchrun); with one GPU
    or none, no such field."""
    import types

    import streamlit as st
    from streamlit.testing.v1 import AppTest

    from core import jobs
    from core.config import RunConfig
    from core.runs import resources

    started = []

    class FakePopen:
        def __init__(self, args, **kw):
            started.append(args)
            self.pid = None

    monkeypatch.setattr(
        jobs, "subprocess", types.SimpleNamespace(Popen=FakePopen, STDOUT=subprocess.STDOUT, DEVNULL=subprocess.DEVNULL)
    )
    monkeypatch.setenv("QLORA_STUDIO_RUNS", str(tmp_path / "runs"))
    real = resources.hardware_info

    def app(gpus: int) -> AppTest:
        monkeypatch.setattr(
            resources,
            "hardware_info",
            lambda: {**real(), "gpus": [{"name": "H200", "memory_gb": 139.8, "capability": "9.0"}] * gpus},
        )
        st.cache_resource.clear()
        at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
        at.run()
        assert not at.exception, [e.value for e in at.exception]
        return at

    assert not [n for n in app(1).number_input if n.label == "GPUs"]
    at = app(2)
    field = next(n for n in at.number_input if n.label == "GPUs")
    assert field.max == 2
    field.set_value(2).run()
    next(b for b in at.button if b.label == "Launch").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert started, "no trainer was started"
    config = Path(started[-1][started[-1].index("--config") + 1])
    assert RunConfig.load(config).train.processes == 2
    st.cache_resource.clear()
