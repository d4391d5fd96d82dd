"""`--report-to tensorboard,mlflow,wandb`: a run logs as it goes, read back with each tracker's own
reader (TensorBoard's EventAccumulator, MLflow's MlflowClient on a file store in a temporary folder,
W&B's offline run file through W&B's own record definitions); a missing package is refused before
anything is made; a tracker that fails is a warning, never a failed run; a run killed and resumed
logs every step once into the same tracker runs."""

from __future__ import annotations

import json
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from core import trackers as trackers_module
from core.__main__ import main
from core.config import TrainConfig
from tests.helpers import ROOT, free_port, train_tiny

ALL = ["tensorboard", "mlflow", "wandb"]


@pytest.fixture
def tracker_env(tmp_path, monkeypatch) -> str:
    """MLflow on a file store and W&B offline, both in tmp_path (no server, no network)."""
    uri = f"file:{tmp_path / 'mlruns'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks for it to use a file store
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("MLFLOW_EXPERIMENT_NAME", "WANDB_PROJECT", "WANDB_DIR"):
        monkeypatch.delenv(name, raising=False)
    return uri


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def tensorboard_scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def mlflow_run(run: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    run_id = json.loads((run / "trackers.json").read_text())["mlflow"]["run_id"]
    return client, client.get_run(run_id)


def wandb_records(path: Path):
    """The records of a W&B offline run file (run-<id>.wandb): W&B's header, then LevelDB log
    records (32 KiB blocks, each record a 7-byte header: crc32, length, type), each a W&B Record."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, chunks = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            pos += left
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        chunks = chunk if kind in (1, 2) else chunks + chunk  # FULL or FIRST start a record
        if kind in (1, 4):  # FULL or LAST end it
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            yield record


def wandb_history(run: Path) -> tuple[dict[str, dict], dict[int, dict]]:
    """({offline run folder name: {run_id, config keys, artifacts, exit_code}}, {step: values}) over
    every offline folder of the run (a resumed W&B run continues in a new one)."""
    folders, history = {}, {}
    for file in sorted((run / "wandb").glob("offline-run-*/run-*.wandb")):
        info = {"config": set(), "artifacts": [], "exit_code": None, "steps": []}
        for record in wandb_records(file):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                info["run_id"] = record.run.run_id
                info["name"] = record.run.display_name
            elif kind == "config":
                info["config"] |= {item.key for item in record.config.update}
            elif kind == "artifact":
                info["artifacts"].append((record.artifact.name, record.artifact.type))
            elif kind == "exit":
                info["exit_code"] = record.exit.exit_code
            elif kind == "history":
                values = {
                    item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item
                }
                step = int(values.get("_step", record.history.step.num))
                info["steps"].append(step)
                history.setdefault(step, {}).update(values)
        folders[file.parent.name] = info
    return folders, history


@pytest.mark.slow
def test_a_run_logs_to_tensorboard_mlflow_and_wandb_read_back_by_their_own_readers(tmp_path, tracker_env):
    run = train_tiny("llama", tmp_path, report_to=ALL)
    recs = records(run)
    steps = [(r["step"], r["loss"]) for r in recs if r["kind"] == "step"]
    epochs = [r for r in recs if r["kind"] == "epoch"]
    end = recs[-1]
    before = next(r for r in recs if r["kind"] == "eval" and r["split"] == "test" and r["stage"] == "before")
    last_step_of = {
        r["epoch"]: max(s["step"] for s in recs if s["kind"] == "step" and s["epoch"] == r["epoch"]) for r in epochs
    }

    # TensorBoard: the event files in RUN/tensorboard/, through TensorBoard's own reader
    tb = tensorboard_scalars(run)
    assert [s for s, _ in tb["train/loss"]] == [s for s, _ in steps]
    assert max(abs(a - b) for (_, a), (_, b) in zip(tb["train/loss"], steps)) < 1e-6
    for key in ("train/lr", "train/grad_norm", "train/pairs_per_s"):
        assert len(tb[key]) == len(steps), key
    assert [s for s, _ in tb["validation/accuracy"]] == [last_step_of[r["epoch"]] for r in epochs]
    assert [round(v, 6) for _, v in tb["validation/loss"]] == [round(r["val_loss"], 6) for r in epochs]
    assert tb["test/accuracy"] == [(steps[-1][0], pytest.approx(end["test_accuracy"]))]
    assert tb["test/accuracy_before"] == [(steps[-1][0], pytest.approx(before["accuracy"]))]

    # MLflow: experiment qlora-studio, run name = run id, every metric, the config, the checkpoint
    client, got = mlflow_run(run)
    assert client.get_experiment(got.info.experiment_id).name == "qlora-studio"
    assert got.info.run_name == run.name and got.info.status == "FINISHED"
    history = client.get_metric_history(got.info.run_id, "train/loss")
    assert [(m.step, round(m.value, 6)) for m in history] == [(s, round(v, 6)) for s, v in steps]
    assert [m.step for m in client.get_metric_history(got.info.run_id, "validation/accuracy")] == list(
        last_step_of.values()
    )
    assert got.data.metrics["test/accuracy"] == pytest.approx(end["test_accuracy"])
    assert got.data.metrics["test/accuracy_before"] == pytest.approx(before["accuracy"])
    assert got.data.params["train.lr"] == "0.003" and got.data.params["model.quantize"] == '"bnb.nf4"'
    artifacts = {a.path for a in client.list_artifacts(got.info.run_id, "checkpoint")}
    assert {"checkpoint/adapter_model.safetensors", "checkpoint/classifier.json", "checkpoint/README.md"} <= artifacts

    # W&B offline: its run file, through W&B's own record definitions
    folders, wb = wandb_history(run)
    (info,) = folders.values()
    assert info["run_id"] == json.loads((run / "trackers.json").read_text())["wandb"]["run_id"]
    assert info["name"] == run.name and info["exit_code"] == 0
    assert sorted(wb) == [s for s, _ in steps]
    assert all(abs(wb[s]["train/loss"] - loss) < 1e-6 for s, loss in steps)
    assert wb[steps[-1][0]]["test/accuracy"] == pytest.approx(end["test_accuracy"])
    assert {"train.lr", "model.name", "data.labels"} <= info["config"]
    assert info["artifacts"] == [(f"{run.name}-checkpoint", "model")]


def test_a_missing_tracker_package_is_refused_with_its_pip_line_before_anything_is_made(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(trackers_module.PACKAGES, "wandb", "no_such_package_wandb")  # as if not installed
    run = tmp_path / "run"
    assert main(["train", "--preset", "demo", "--report-to", "tensorboard,wandb", "--run-dir", str(run)]) == 2
    assert (
        "error: train.report_to names wandb, which is not installed: pip install wandb (or leave it out of "
        "--report-to)" in capsys.readouterr().err
    )
    assert not run.exists()
    assert main(["train", "--preset", "demo", "--report-to", "tb", "--run-dir", str(run)]) == 2
    assert "train.report_to must name each of tensorboard, mlflow, wandb at most once, not ['tb']" in (
        capsys.readouterr().err
    )
    assert TrainConfig(report_to="tensorboard, mlflow").report_to == ["tensorboard", "mlflow"]  # a config file's string
    assert TrainConfig(report_to="none").report_to == []


@pytest.mark.slow
def test_a_tracker_that_fails_is_a_warning_in_the_log_never_a_failed_run(tmp_path, tracker_env, monkeypatch, capfd):
    # MLflow's server down from the start: a warning, the run goes on, TensorBoard still logs
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    run = train_tiny("llama", tmp_path / "down", report_to=["mlflow", "tensorboard"])
    err = capfd.readouterr().err
    assert "warning: mlflow could not start (" in err and "the run goes on without it" in err
    assert json.loads((run / "status.json").read_text())["state"] == "done"
    assert "train/loss" in tensorboard_scalars(run)

    # MLflow failing mid-run: its file store replaced by a file once the first steps are logged
    store = tmp_path / "mlruns-mid"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file:{store}")
    metrics = tmp_path / "mid" / "run" / "metrics.jsonl"

    def break_the_store():
        deadline = time.time() + 300
        while time.time() < deadline and not (metrics.exists() and '"kind": "step"' in metrics.read_text()):
            time.sleep(0.005)
        import shutil

        shutil.rmtree(store, ignore_errors=True)
        store.write_text("not a folder any more")

    breaker = threading.Thread(target=break_the_store, daemon=True)
    breaker.start()
    run = train_tiny("llama", tmp_path / "mid", report_to=["mlflow"])
    breaker.join(timeout=60)
    err = capfd.readouterr().err
    assert "warning: mlflow failed (" in err and "metrics.jsonl has every record" in err
    assert json.loads((run / "status.json").read_text())["state"] == "done"
    assert err.count("warning: mlflow") == 1  # dropped after its first failure: no warning per step


# The embedded model (as tests/engine/test_resume.py): 12 steps an epoch, 2 epochs, a full-state
# checkpoint every 3 steps, one thread; killed with SIGKILL after the state of step 6.
RESUME_ARGS = [
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
    "--threads",
    "1",
    "--checkpoint-every",
    "3",
    "--report-to",
    "tensorboard,mlflow,wandb",
]


def test_a_trainer_starts_its_own_wandb_service_rather_than_one_it_inherits(tmp_path, tracker_env):
    """A process that used W&B leaves its service's address in WANDB_SERVICE; a trainer launched
    from it must not log through that service (it outlives a killed trainer and keeps the run id
    busy, so the resume failed with "run ID ... is in use"). Here the inherited address is one no
    service listens on: a trainer that used it could not start W&B at all."""
    import os

    script = (
        "import sys; from pathlib import Path; from core.trackers import WandbTracker\n"
        "t = WandbTracker(Path(sys.argv[1]))\n"
        "print(t.open({}, False)['run_id'])\n"
        "t.close('done')\n"
    )
    env = {**os.environ, "WANDB_SERVICE": f"3-{os.getpid()}-unix-{tmp_path / 'gone.sock'}"}
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "run")], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    run_id = done.stdout.split()[-1]
    assert [p.name.rsplit("-", 1)[1] for p in (tmp_path / "run" / "wandb").glob("offline-run-*")] == [run_id]


@pytest.mark.real_model
@pytest.mark.e2e
def test_a_killed_and_resumed_run_logs_every_step_once_into_the_same_tracker_runs(tmp_path, tracker_env):
    import os

    run = tmp_path / "killed"

    def start(*args):
        return subprocess.Popen(
            [sys.executable, "-m", "core", "train", *map(str, args)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "QLORA_STUDIO_RUNS": str(tmp_path)},
        )

    proc = start(*RESUME_ARGS, "--run-dir", run)
    deadline = time.time() + 600
    while not (run / "checkpoints" / "state-00000006" / "state.json").exists():
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.time() < deadline
        time.sleep(0.01)
    time.sleep(1.0)  # a few more steps logged to the trackers, which the resume does again
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = json.loads((run / "trackers.json").read_text())
    proc = start("--resume", run)
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-4000:]
    assert "warning:" not in out, out[-4000:]
    recs = records(run)
    steps = [(r["step"], r["loss"]) for r in recs if r["kind"] == "step"]
    assert [s for s, _ in steps] == list(range(1, 25))
    resumed_at = next(r["step"] for r in recs if r["kind"] == "resume")
    assert json.loads((run / "trackers.json").read_text()) == first  # the same tracker runs

    tb = tensorboard_scalars(run)
    assert [s for s, _ in tb["train/loss"]] == list(range(1, 25))  # each step once
    assert max(abs(a - b) for (_, a), (_, b) in zip(tb["train/loss"], steps)) < 1e-6
    assert [s for s, _ in tb["validation/accuracy"]] == [12, 24]

    client, got = mlflow_run(run)
    assert got.info.status == "FINISHED" and len(client.search_runs([got.info.experiment_id])) == 1
    history = client.get_metric_history(got.info.run_id, "train/loss")
    assert [m.step for m in history] == list(range(1, 25))  # each step once, none lost
    assert max(abs(m.value - loss) for m, (_, loss) in zip(history, steps)) < 1e-5  # resume is exact
    assert [m.step for m in client.get_metric_history(got.info.run_id, "validation/accuracy")] == [12, 24]

    # W&B offline: one run id; the resumed part continues in a second offline folder from the
    # checkpoint's step on (W&B drops a step it already has when the folders are synced). What the
    # killed process's W&B service wrote before it noticed is whatever it had flushed.
    folders, _ = wandb_history(run)
    assert len(folders) == 2 and {name.rsplit("-", 1)[1] for name in folders} == {first["wandb"]["run_id"]}
    killed, resumed = folders.values()
    assert resumed["run_id"] == first["wandb"]["run_id"] and resumed["exit_code"] == 0
    assert resumed["steps"] == list(range(resumed_at + 1, 25))  # each step once, from the checkpoint on
    assert len(set(killed["steps"])) == len(killed["steps"]) and set(killed["steps"]) <= set(range(1, 25))
