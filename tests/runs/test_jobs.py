"""The trainer as a detached process: launched like the app does, observed through the run folder
only, and stopped cleanly."""

import json

import pytest

from core import jobs
from core.config import get_preset, override
from core.runs import liveness, rundir
from core.runs.state import list_runs, read_status


@pytest.mark.real_model
@pytest.mark.e2e
def test_launch_observe_and_stop_a_detached_run(tmp_path, monkeypatch):
    monkeypatch.setenv(rundir.RUNS_ENV, str(tmp_path))
    cfg = override(
        get_preset("demo"),
        {"train.epochs": 3, "data.max_train_rows": 320, "data.max_validation_rows": 30, "data.max_test_rows": 30},
    )
    run = jobs.launch(cfg)
    assert run.parent == tmp_path.resolve()
    assert read_status(run)["state"] in ("queued", "running")
    assert [r["id"] for r in list_runs()] == [run.name]

    def stepping():
        steps = [m for m in rundir.read_jsonl(run / rundir.METRICS) if m.get("kind") == "step"]
        return len(steps) >= 2 or read_status(run).get("state") in ("failed", "done")

    assert rundir.wait_for(stepping, timeout=300), (run / rundir.LOG).read_text()[-2000:]
    status = read_status(run)
    assert status["state"] == "running", status
    assert liveness.pid_alive(status["pid"])

    jobs.stop(run)
    assert rundir.wait_for(lambda: read_status(run)["state"] != "running", timeout=120)
    status = read_status(run)
    assert status["state"] == "stopped" and status["finished_at"]
    metrics = rundir.read_jsonl(run / rundir.METRICS)
    assert metrics[-1]["kind"] == "end" and metrics[-1]["state"] == "stopped"
    steps = [m for m in metrics if m["kind"] == "step"]
    assert 2 <= len(steps) < 30  # it stopped long before the 30 steps of three epochs
    assert (run / "checkpoints" / "epoch-0" / "adapter_model.safetensors").exists()
    assert not (run / rundir.REPORT).exists()
    assert json.loads((run / "config.json").read_text())["train"]["epochs"] == 3
    assert rundir.wait_for(lambda: not liveness.pid_alive(status["pid"]), timeout=30)
