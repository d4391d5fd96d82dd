"""Experiment trackers: TensorBoard, MLflow and Weights & Biases, fed with the run's own records.

    check_installed(cfg.train.report_to)        # before a run starts: a missing package, with its pip line
    trackers = Trackers(cfg.train.report_to, run_dir, cfg)
    trackers.record(record)                     # every record train() appends to metrics.jsonl
    trackers.finish(run_dir / "checkpoints" / "epoch-2")   # the end: config, the checkpoint as artifact
    trackers.close()                            # always (a stopped or failed run is closed as such)

metrics.jsonl stays the record; a tracker is a copy of some of it, made as each record is written:

    step record     train/loss, train/lr, train/grad_norm, train/pairs_per_s       at its step
    epoch record    validation/accuracy, validation/loss, train/epoch_loss, epoch    at the epoch's last step
    end (done)      test/accuracy, test/accuracy_before (test/accuracy_zero_shot where there is one)
    finish()        the config as parameters (model.name, train.lr, ...), the selected checkpoint
                    folder as an artifact (MLflow, W&B)

Where each goes: TensorBoard event files in RUN/tensorboard/; MLflow to MLFLOW_TRACKING_URI (its
own variable; experiment qlora-studio or MLFLOW_EXPERIMENT_NAME, run name = run id); W&B as its
own WANDB_* variables say (project qlora-studio unless WANDB_PROJECT, files under RUN/wandb/
unless WANDB_DIR; WANDB_MODE=offline needs no network). RUN/trackers.json keeps the MLflow and W&B
run ids, so that `--resume` logs into the same tracker runs: TensorBoard's folder is written again
from metrics.jsonl (which the resume cut back to its checkpoint), MLflow and W&B get only the steps
they do not have yet (no step twice).

Nothing here fails a run: a tracker that cannot start or fails later (its server down, a full
disk) is a warning line in train.log and the run goes on without it. Opening happens at the
first record (setup, or resume), after the run folder is claimed.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import secrets
import shutil
import time
from pathlib import Path

from .config import TRACKERS, RunConfig
from .data import warn
from .runs import rundir

PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}  # import name per tracker
PIP = {"tensorboard": "pip install tensorboard", "mlflow": "pip install mlflow", "wandb": "pip install wandb"}
EXPERIMENT = "qlora-studio"  # MLflow experiment and W&B project, unless their own variables say otherwise
FLUSH_S = 5.0  # MLflow: metrics are sent in one batch at least this often (and at each epoch and the end)


def check_installed(names: list[str]) -> None:
    """A ValueError naming the pip line when a tracker's package is not installed."""
    missing = [n for n in names if importlib.util.find_spec(PACKAGES[n]) is None]
    if missing:
        lines = " && ".join(PIP[n] for n in missing)
        raise ValueError(
            f"train.report_to names {', '.join(missing)}, which is not installed: {lines} (or leave "
            f"{'it' if len(missing) == 1 else 'them'} out of --report-to)"
        )


def flat_params(cfg: RunConfig) -> dict[str, str | int | float | bool]:
    """The config as tracker parameters: section.field -> a number, a bool or a short string."""
    out = {}
    for section, fields in cfg.to_dict().items():
        if not isinstance(fields, dict):
            out[section] = fields if isinstance(fields, (int, float, bool)) else str(fields)
            continue
        for key, value in fields.items():
            out[f"{section}.{key}"] = value if isinstance(value, (int, float, bool)) else json.dumps(value)
    return out


class TensorBoardTracker:
    """Event files in RUN/tensorboard/ (torch's SummaryWriter); hyperparameters at the end."""

    name = "tensorboard"

    def __init__(self, run_dir: Path):
        self.folder = Path(run_dir) / rundir.TENSORBOARD
        self.writer = None

    def open(self, saved: dict, resumed: bool) -> dict:
        from torch.utils.tensorboard import SummaryWriter

        if resumed:  # written again from metrics.jsonl, which the resume cut back: no step twice
            shutil.rmtree(self.folder, ignore_errors=True)
        self.writer = SummaryWriter(str(self.folder), flush_secs=10)
        return {"folder": str(self.folder)}

    def logged(self, keys: list[str]) -> dict[str, int]:
        return {}  # a fresh folder: everything is written

    def log(self, metrics: dict[str, float], step: int, t: float) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, global_step=step, walltime=t)

    def finish(self, params: dict, summary: dict, artifact: Path | None) -> None:
        from torch.utils.tensorboard.summary import hparams

        for item in hparams(params, summary):
            self.writer.file_writer.add_summary(item)
        self.writer.add_text("config", "```\n" + json.dumps(params, indent=2) + "\n```")

    def close(self, state: str) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class MLflowTracker:
    """One MLflow run per run folder (MlflowClient at MLFLOW_TRACKING_URI), metrics sent in batches."""

    name = "mlflow"

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.client = self.run_id = None
        self.pending: list = []
        self.sent = time.time()

    def open(self, saved: dict, resumed: bool) -> dict:
        # a server that is down should cost seconds, not the minutes of MLflow's default retries
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient()
        if saved.get("run_id"):
            self.run_id = saved["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
            return saved
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or EXPERIMENT
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        run = self.client.create_run(
            experiment_id, run_name=self.run_dir.name, tags={"qlora_studio.run_dir": str(self.run_dir)}
        )
        self.run_id = run.info.run_id
        return {"run_id": self.run_id, "experiment_id": experiment_id, "tracking_uri": self.client.tracking_uri}

    def logged(self, keys: list[str]) -> dict[str, int]:
        steps = {}
        for key in keys:
            history = self.client.get_metric_history(self.run_id, key)
            if history:
                steps[key] = max(m.step for m in history)
        return steps

    def log(self, metrics: dict[str, float], step: int, t: float) -> None:
        from mlflow.entities import Metric

        self.pending += [Metric(key, float(value), int(t * 1000), step) for key, value in metrics.items()]
        if time.time() - self.sent >= FLUSH_S or not any(k.startswith("train/") for k in metrics):
            self.flush()

    def flush(self) -> None:
        while self.pending:
            batch, self.pending = self.pending[:1000], self.pending[1000:]  # MLflow's limit per call
            self.client.log_batch(self.run_id, metrics=batch)
        self.sent = time.time()

    def finish(self, params: dict, summary: dict, artifact: Path | None) -> None:
        from mlflow.entities import Param

        self.flush()
        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for s in range(0, len(items), 100):  # MLflow's limit of parameters per call
            self.client.log_batch(self.run_id, params=items[s : s + 100])
        if artifact is not None:
            self.client.log_artifacts(self.run_id, str(artifact), artifact_path="checkpoint")

    def close(self, state: str) -> None:
        if self.run_id is None:
            return
        try:
            self.flush()
        finally:
            status = {"done": "FINISHED", "stopped": "KILLED"}.get(state, "FAILED")
            self.client.set_terminated(self.run_id, status=status)
            self.run_id = None


class WandbTracker:
    """One W&B run per run folder (id kept in trackers.json: a resume continues it)."""

    name = "wandb"

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.run = None
        self.resume_step = 0

    def open(self, saved: dict, resumed: bool) -> dict:
        import wandb

        # W&B leaves its service's address in WANDB_SERVICE for child processes. A trainer that
        # inherits one (launched by a process that used W&B itself) would log through that
        # service, which outlives the trainer if it is killed and keeps the run id busy: a resume
        # then fails with "run ID ... is in use". The trainer starts its own service instead.
        os.environ.pop("WANDB_SERVICE", None)
        run_id = saved.get("run_id") or secrets.token_hex(4)  # W&B ids: 8 lowercase letters or digits
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT") or EXPERIMENT,
            name=self.run_dir.name,
            id=run_id,
            resume="allow",
            dir=os.environ.get("WANDB_DIR") or str(self.run_dir),
        )
        return {"run_id": self.run.id, "project": self.run.project}

    def logged(self, keys: list[str]) -> dict[str, int]:
        # W&B's history has one step counter: online it knows the resumed run's next step; offline
        # a resumed run starts a new offline folder, and the steps before the resume point are in the
        # first one (the records after it were cut from metrics.jsonl and are logged again)
        last = max(self.run.step - 1, self.resume_step)
        return {key: last for key in keys}

    def log(self, metrics: dict[str, float], step: int, t: float) -> None:
        self.run.log(metrics, step=step)

    def finish(self, params: dict, summary: dict, artifact: Path | None) -> None:
        import wandb

        self.run.config.update(params, allow_val_change=True)
        if artifact is not None:
            art = wandb.Artifact(f"{self.run_dir.name}-checkpoint", type="model")
            art.add_dir(str(artifact))
            self.run.log_artifact(art)

    def close(self, state: str) -> None:
        if self.run is not None:
            run, self.run = self.run, None
            run.finish(exit_code=0 if state == "done" else 1)


CLASSES = {"tensorboard": TensorBoardTracker, "mlflow": MLflowTracker, "wandb": WandbTracker}
KEYS = [
    "train/loss",
    "train/lr",
    "train/grad_norm",
    "train/pairs_per_s",
    "train/epoch_loss",
    "epoch",
    "validation/accuracy",
    "validation/loss",
    "test/accuracy",
    "test/accuracy_before",
    "test/accuracy_zero_shot",
]
assert set(CLASSES) == set(TRACKERS)


class Trackers:
    """The trackers of train.report_to, fed with train()'s records (see the module's docstring).
    With no tracker named, every method does nothing."""

    def __init__(self, names: list[str], run_dir: Path, cfg: RunConfig):
        self.names = list(names)
        self.run_dir = Path(run_dir)
        self.cfg = cfg
        self.active: list = []
        self.opened = self.closed = False
        self.logged: dict[str, dict[str, int]] = {}  # tracker -> key -> the last step it already has
        self.step = 0  # the last optimiser step seen
        self.test: dict[str, float] = {}  # test accuracies (before, zero-shot) seen in eval records
        self.state = "failed"  # how the run ended, from its end record

    def record(self, record: dict) -> None:
        """Pass one metrics.jsonl record on to every tracker (the first one opens them)."""
        if not self.names or self.closed:
            return
        if not self.opened:
            self._open(resumed=record.get("kind") == "resume")
            return  # _open replayed metrics.jsonl, this record included
        self._take(record)

    def finish(self, checkpoint: Path | None) -> None:
        """The end of a finished run: the config as parameters, `checkpoint` as an artifact."""
        if not self.active:
            return
        params = flat_params(self.cfg)
        summary = {k: v for k, v in self.test.items() if v is not None}
        for tracker in list(self.active):
            self._call(tracker, "finish", params, summary, checkpoint)
        self.close()

    def close(self) -> None:
        """Close every tracker (as done, stopped or failed, by the run's end record); idempotent."""
        if self.closed:
            return
        self.closed = True
        for tracker in list(self.active):
            self._call(tracker, "close", self.state)
        self.active = []

    # --- inside -------------------------------------------------------------------------------

    def _open(self, resumed: bool) -> None:
        self.opened = True
        saved = rundir.read_json(self.run_dir / rundir.TRACKER_RUNS) or {}
        saved = saved if isinstance(saved, dict) else {}
        for name in self.names:
            tracker = CLASSES[name](self.run_dir)
            if isinstance(tracker, WandbTracker):
                tracker.resume_step = self._resume_step() if resumed else 0
            opened = self._call(tracker, "open", saved.get(name) or {}, resumed, start=True)
            if opened is None:
                continue
            saved[name] = opened
            self.active.append(tracker)
            self.logged[name] = (self._call(tracker, "logged", KEYS) or {}) if resumed else {}
        if self.active:
            try:
                rundir.atomic_write_json(self.run_dir / rundir.TRACKER_RUNS, saved)
            except OSError as e:
                warn(f"could not write {rundir.TRACKER_RUNS} ({e}): a --resume would start new tracker runs")
        for record in rundir.iter_jsonl(self.run_dir / rundir.METRICS):  # a fresh run: its setup record
            self._take(record)

    def _resume_step(self) -> int:
        resumes = rundir.read_metrics(self.run_dir).get("resume") or []
        return int(resumes[-1].get("step") or 0) if resumes else 0

    def _take(self, record: dict) -> None:
        kind = record.get("kind")
        metrics: dict[str, float] = {}
        if kind == "step":
            self.step = int(record["step"])
            metrics = {
                "train/loss": record.get("loss"),
                "train/lr": record.get("lr"),
                "train/grad_norm": record.get("grad_norm"),
                "train/pairs_per_s": record.get("samples_per_s"),
            }
        elif kind == "resume":
            self.step = int(record.get("step") or 0)
        elif kind == "epoch":
            metrics = {
                "validation/accuracy": record.get("val_accuracy"),
                "validation/loss": record.get("val_loss"),
                "train/epoch_loss": record.get("train_loss"),
                "epoch": record.get("epoch"),
            }
        elif kind == "eval" and record.get("split") == "test" and record.get("stage") in ("before", "zero-shot"):
            key = "test/accuracy_before" if record["stage"] == "before" else "test/accuracy_zero_shot"
            self.test[key] = record.get("accuracy")
        elif kind == "end":
            self.state = record.get("state") or "failed"
            if self.state == "done":
                self.test["test/accuracy"] = record.get("test_accuracy")
                metrics = dict(self.test)
        metrics = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not math.isnan(v)}
        if metrics:
            t = float(record.get("t") or time.time())
            for tracker in list(self.active):
                done = self.logged.get(tracker.name, {})
                fresh = {k: v for k, v in metrics.items() if self.step > done.get(k, -1)}
                if fresh:
                    self._call(tracker, "log", fresh, self.step, t)
        if kind == "end" and self.state != "done":
            self.close()  # stopped or failed: finish() will not come

    def _call(self, tracker, method: str, *args, start: bool = False):
        """tracker.method(*args); a failure is a warning and the tracker is dropped (None returned)."""
        try:
            return getattr(tracker, method)(*args)
        except Exception as e:  # noqa: BLE001 - a tracker never fails the run, whatever goes wrong in it
            what = "could not start" if start else "failed"
            first = (str(e).strip().splitlines() or [""])[0][:300]
            warn(
                f"{tracker.name} {what} ({type(e).__name__}: {first}): the run goes on without it; "
                "metrics.jsonl has every record"
            )
            if tracker in self.active:
                self.active.remove(tracker)
                if method != "close":
                    try:
                        tracker.close("failed")
                    except Exception:  # noqa: BLE001 - it is already broken
                        pass
            return None
