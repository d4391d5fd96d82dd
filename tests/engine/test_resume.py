"""Full-state checkpoints and resume: a real trainer killed with SIGKILL mid-epoch and resumed ends
where an uninterrupted run of the same seed ends; a clean stop resumes too; an interrupted save
never hides the previous checkpoint; a damaged checkpoint is refused with a plain message; out of
GPU memory, a step is retried once with half the micro-batch (a CPU seam)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from core import checkpoint
from tests.helpers import ROOT

# The embedded model on a slice of the built-in sample: 12 steps an epoch, 2 epochs, a full-state
# checkpoint every 3 steps, LoRA and model dropout on (so the RNG states matter), one thread (the
# same float sums in every process).
ARGS = [
    "--preset",
    "demo",
    "--max-train-rows",
    "96",
    "--max-validation-rows",
    "24",
    "--max-test-rows",
    "24",
    "--epochs",
    "2",
    "--batch-size",
    "8",
    "--lora-dropout",
    "0.1",
    "--threads",
    "1",
    "--checkpoint-every",
    "3",
]


def start(*args) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "core", "train", *map(str, args)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(proc: subprocess.Popen, code: int = 0) -> str:
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == code, f"exit {proc.returncode}\n{out[-4000:]}"
    return out


def step_losses(run: Path) -> list[tuple[int, float]]:
    return [
        (r["step"], r["loss"])
        for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
        if r["kind"] == "step"
    ]


def adapter(run: Path, epoch: int) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "checkpoints" / f"epoch-{epoch}" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("resume") / "straight"
    finish(start(*ARGS, "--run-dir", run))
    return run


@pytest.mark.real_model
@pytest.mark.e2e
def test_a_run_killed_mid_epoch_resumes_to_the_uninterrupted_result(uninterrupted, tmp_path):
    run = tmp_path / "killed"
    proc = start(*ARGS, "--run-dir", run)
    # wait for the second mid-epoch state (after step 6 of 12), then kill -9 at once
    deadline = time.time() + 600
    while not (run / "checkpoints" / "state-00000006" / "state.json").exists():
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.time() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(s for s, _ in step_losses(run))
    assert 6 <= killed_at < 24, killed_at  # mid-run: work after the checkpoint is lost and redone
    assert json.loads((run / "status.json").read_text())["state"] == "running"  # what a kill leaves

    out = finish(start("--resume", run))
    assert "resuming" in out
    assert json.loads((run / "status.json").read_text())["state"] == "done"
    records = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    resumes = [r for r in records if r["kind"] == "resume"]
    assert len(resumes) == 1 and resumes[0]["step"] >= 6 and resumes[0]["epoch"] == 1

    # the logged losses: the same steps, once each, equal to the uninterrupted run's
    want, got = step_losses(uninterrupted), step_losses(run)
    assert [s for s, _ in got] == list(range(1, 25)) == [s for s, _ in want]
    torch.testing.assert_close(
        torch.tensor([l for _, l in got]), torch.tensor([l for _, l in want]), rtol=1e-5, atol=1e-6
    )
    for epoch in (1, 2):
        a, b = adapter(uninterrupted, epoch), adapter(run, epoch)
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)
    r_want = json.loads((uninterrupted / "report.json").read_text())
    r_got = json.loads((run / "report.json").read_text())
    assert r_got["test_after"]["accuracy"] == r_want["test_after"]["accuracy"]
    assert r_got["best_epoch"] == r_want["best_epoch"]
    # only the newest state folder is kept, and no temporary folder is left
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["epoch-0", "epoch-1", "epoch-2", "state-00000024"], ckpts


@pytest.mark.real_model
@pytest.mark.e2e
def test_a_clean_stop_resumes_from_where_it_stopped(uninterrupted, tmp_path):
    run = tmp_path / "stopped"
    proc = start(*ARGS, "--checkpoint-every", "1000", "--run-dir", run)  # no mid-epoch states: the stop saves one
    deadline = time.time() + 600
    while not any(
        r.get("kind") == "step" and r["step"] >= 4
        for r in map(
            json.loads, ((run / "metrics.jsonl").read_text().splitlines() if (run / "metrics.jsonl").exists() else [])
        )
    ):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.01)
    (run / "STOP").write_text("now")
    finish(proc, code=3)
    assert json.loads((run / "status.json").read_text())["state"] == "stopped"
    state = checkpoint.latest_state(run / "checkpoints")
    assert state is not None and int(state.name.split("-")[1]) >= 4
    finish(start("--resume", run))
    got, want = step_losses(run), step_losses(uninterrupted)
    assert [s for s, _ in got] == list(range(1, 25))
    torch.testing.assert_close(
        torch.tensor([l for _, l in got]), torch.tensor([l for _, l in want]), rtol=1e-5, atol=1e-6
    )
    for k, v in adapter(uninterrupted, 2).items():
        torch.testing.assert_close(adapter(run, 2)[k], v, rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.real_model
@pytest.mark.e2e
def test_resume_refuses_a_finished_run_and_a_damaged_checkpoint(uninterrupted, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "core", "train", "--resume", str(uninterrupted)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "only a stopped or failed run can be resumed" in proc.stderr

    import shutil

    run = tmp_path / "damaged"
    shutil.copytree(uninterrupted, run)
    status = json.loads((run / "status.json").read_text())
    (run / "status.json").write_text(json.dumps({**status, "state": "failed"}))
    state = checkpoint.latest_state(run / "checkpoints")
    (state / "optimizer.safetensors").write_bytes(b"\x00garbage")
    proc = subprocess.run(
        [sys.executable, "-m", "core", "train", "--resume", str(run)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"checkpoint {state} is damaged" in proc.stderr and "Traceback" not in proc.stderr
    assert json.loads((run / "status.json").read_text())["state"] == "failed"


def test_an_interrupted_save_never_hides_the_previous_checkpoint(tmp_path, monkeypatch):
    good = tmp_path / "epoch-1"
    checkpoint.write_dir(good, {"a.bin": b"old"})
    # a crash between moving the old folder aside and renaming the new one into place
    real_rename = Path.rename

    def crash_on_new(self, target):
        if ".tmp-" in self.name:
            raise KeyboardInterrupt("killed")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", crash_on_new)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.write_dir(good, {"a.bin": b"new"})
    monkeypatch.undo()
    assert not good.exists() and list(tmp_path.glob(".epoch-1.old-*"))  # aside, not lost
    (tmp_path / ".epoch-2.tmp-dead").mkdir()  # a save killed while writing its files
    done = checkpoint.clean_leftovers(tmp_path)
    assert (good / "a.bin").read_bytes() == b"old"  # the previous good checkpoint is back
    assert sorted(done) == ["removed .epoch-2.tmp-dead", "restored epoch-1"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch-1"]
    checkpoint.write_dir(good, {"a.bin": b"new"})
    assert (good / "a.bin").read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["epoch-1"]


def test_state_round_trip_restores_weights_optimizer_scheduler_and_rng(tmp_path):
    """restore_state brings back exactly what state_files captured, RNG included: the next random
    draws and the next optimiser step are the same as without the save/restore."""
    import random

    import numpy as np

    def setup():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Dropout(0.5), torch.nn.Linear(3, 2))
        opt = torch.optim.AdamW(model.parameters(), lr=0.1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
        return model, opt, sched

    def step(model, opt, sched):
        loss = model(torch.randn(5, 4)).pow(2).sum()
        loss.backward()
        opt.step()
        opt.zero_grad()
        sched.step()

    model, opt, sched = setup()
    for _ in range(3):
        step(model, opt, sched)
    state = checkpoint.TrainState(
        step=3, epoch=1, epoch_step=3, best=None, epoch_loss_sum=1.5, epoch_rows=15, metrics_bytes=10
    )
    checkpoint.write_dir(tmp_path / "state-00000003", checkpoint.state_files(state, model, opt, sched, None))
    step(model, opt, sched)
    want = ([p.detach().clone() for p in model.parameters()], random.random(), np.random.rand(), torch.rand(2))

    model2, opt2, sched2 = setup()
    torch.manual_seed(99), random.seed(99), np.random.seed(99)  # different RNG states, restored below
    assert checkpoint.restore_state(checkpoint.latest_state(tmp_path), model2, opt2, sched2, None) == state
    step(model2, opt2, sched2)
    got = ([p.detach().clone() for p in model2.parameters()], random.random(), np.random.rand(), torch.rand(2))
    for a, b in zip(got[0], want[0]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert got[1:3] == want[1:3] and torch.equal(got[3], want[3])
    assert sched2.get_last_lr() == sched.get_last_lr()


def test_the_best_epoch_is_the_highest_accuracy_then_the_lower_loss_then_the_earlier_epoch():
    """One rule for the kept adapter, in train() and in `evaluate` without a report."""

    def record(epoch, accuracy, loss):
        return {"epoch": epoch, "val_accuracy": accuracy, "val_loss": loss}

    assert checkpoint.best_epoch([]) is None
    assert checkpoint.best_epoch([record(1, 0.5, 0.9), record(2, 0.7, 1.2)])["epoch"] == 2  # accuracy first
    assert checkpoint.best_epoch([record(1, 0.7, 0.9), record(2, 0.7, 0.6), record(3, 0.6, 0.1)])["epoch"] == 2
    assert checkpoint.best_epoch([record(2, 0.7, 0.6), record(1, 0.7, 0.6)])["epoch"] == 1  # a full tie: the earlier
    assert checkpoint.best_epoch([record(1, 0.7, None), record(2, 0.7, 0.8)])["epoch"] == 2  # null loss loses a tie
    assert checkpoint.best_epoch([record(1, None, 0.1), record(2, 0.2, 0.8)])["epoch"] == 2  # null accuracy: worst
    best = record(3, 0.8, 0.5)
    assert checkpoint.best_epoch([best, record(4, 0.8, 0.5)]) is best  # the record itself, as TrainState keeps it


def test_out_of_memory_retries_the_step_once_with_half_the_micro_batch(monkeypatch):
    """A CPU stand-in for a CUDA out-of-memory error: the first launch raises it; the step is
    redone with micro-batches of half the rows and gives the gradient of the whole step."""
    from core.speed.step import TrainStep

    torch.manual_seed(0)
    model = torch.nn.Module()
    emb = torch.nn.Embedding(50, 8)
    head = torch.nn.Linear(8, 3)

    class Out:
        def __init__(self, logits):
            self.logits = logits

    model.emb, model.head = emb, head
    model.forward = lambda input_ids, attention_mask=None, **kw: Out(
        head((emb(input_ids) * attention_mask[..., None]).sum(1) / attention_mask.sum(1, keepdim=True))
    )
    rows = [{"input_ids": list(range(1, 3 + i % 5)), "label": i % 3} for i in range(8)]

    def gradient(fail_times: int):
        step = TrainStep(model, torch.device("cpu"), torch.float32, 0, micro=8)
        real_launch, calls = step._launch, {"n": 0}

        def launch(batch):
            calls["n"] += 1
            if calls["n"] <= fail_times:
                step._fwd_bwd({k: v for k, v in batch.items()})  # a partial gradient, then the error
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
            return real_launch(batch)

        monkeypatch.setattr(step, "_launch", launch)
        step.forward_backward(rows)
        return step, [p.grad.clone() for p in (emb.weight, head.weight, head.bias)], step.take_loss()

    plain, g_plain, loss_plain = gradient(0)
    retried, g_retried, loss_retried = gradient(1)
    assert plain.oom_retries == 0 and retried.oom_retries == 1 and retried.micro == 4
    for a, b in zip(g_retried, g_plain):
        torch.testing.assert_close(a, b)
    assert loss_retried == pytest.approx(loss_plain)
    with pytest.raises(
        RuntimeError, match="out of GPU memory with micro-batches of 4 rows.*lower train.micro_batch_size"
    ):
        gradient(2)


def test_the_train_page_resumes_a_stopped_run_and_launches_seed_groups(tmp_path, monkeypatch):
    """The Resume button appears on a stopped run, says from which step, and starts
    `python -m core train --resume RUN`; the Seeds field passes --seeds K to the trainer."""
    from streamlit.testing.v1 import AppTest

    from core import jobs
    from core.runs import rundir
    from core.runs.state import write_status

    started = []

    class FakePopen:
        def __init__(self, args, **kw):
            started.append(args)
            self.pid = None

    import types

    monkeypatch.setattr(
        jobs,
        "subprocess",
        types.SimpleNamespace(  # only jobs' own Popen: streamlit uses it too
            Popen=FakePopen, STDOUT=subprocess.STDOUT, DEVNULL=subprocess.DEVNULL
        ),
    )
    root = tmp_path / "runs"
    run = root / "stopped-run"
    run.mkdir(parents=True)
    from core.config import get_preset

    get_preset("demo").save(run / "config.json")
    write_status(run, state="stopped", created_at=rundir.now_iso(), finished_at=rundir.now_iso())
    checkpoint.write_dir(run / "checkpoints" / "state-00000007", {"state.json": b"{}"})
    monkeypatch.setenv("QLORA_STUDIO_RUNS", str(root))
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
    at.query_params["run"] = run.name
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert any("Resume continues from step 7" in c.value for c in at.caption)
    monkeypatch.setattr(rundir, "wait_for", lambda *a, **k: True)
    next(b for b in at.button if b.label == "Resume").click().run()
    assert started and started[-1][-3:] == ["train", "--resume", str(run)]

    done = root / "done-run"
    done.mkdir()
    get_preset("demo").save(done / "config.json")
    write_status(done, state="done")
    with pytest.raises(ValueError, match="only a stopped or failed run can be resumed"):
        jobs.resume(done)
    run_dir = jobs.launch(get_preset("demo"), seeds=3)
    assert started[-1][-2:] == ["--seeds", "3"] and run_dir.parent == root
