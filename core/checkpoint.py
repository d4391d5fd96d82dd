"""Checkpoints: adapters a user can load, and the full training state for an exact resume.

    saver = Checkpointer(model, run_dir / "checkpoints")
    saver.save_adapter("epoch-1")              # LoRA + head; copied now, written on a thread
    saver.save_state(TrainState(...), optimizer, scheduler, scaler)   # everything a resume needs
    saver.wait()                               # before reading a checkpoint back
    state = latest_state(ckpt_dir)             # the newest complete state folder, or None
    restore_state(state, model, optimizer, scheduler, scaler)

Every folder is written durably: files into a temporary folder, each fsynced, the folder renamed
into place and the parent fsynced. A folder being replaced is first renamed aside and deleted
only once the new one is in place, so an interrupted save never hides the previous good one;
clean_leftovers() undoes or removes what an interrupted save left at the next start.

The state holds the trainable weights, the optimiser's moments, the scheduler, the GradScaler,
the RNG states (Python, NumPy, torch CPU and CUDA), the step, the epoch and how many of its
batches are done, the best epoch so far, the epoch's running loss and the length of
metrics.jsonl at that point. safetensors and JSON only: nothing is unpickled on load.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import secrets
import shutil
import tempfile
import threading
from pathlib import Path

import numpy as np
import safetensors.torch
import torch

from .classifier import model_card, portable_adapter_config
from .dist import Ranks
from .runs.rundir import (
    ADAPTER_CONFIG,
    ADAPTER_FILE,
    CHECKPOINTS,
    CLASSIFIER_FILE,
    CONFIG,
    REPORT,
    atomic_write_bytes,
    read_json,
    read_metrics,
)

STATE_PREFIX = "state-"


# --- durable folders ---------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_dir(path: Path, files: dict[str, bytes | dict[str, torch.Tensor]]) -> None:
    """Write `files` (name -> bytes, or tensors saved as safetensors) as the folder `path`,
    durably and all at once (see above)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}")
    tmp.mkdir()
    try:
        for name, data in files.items():
            if isinstance(data, dict):
                data = _safetensors_bytes(data)
            with open(tmp / name, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        _fsync_dir(tmp)
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old-{secrets.token_hex(4)}")
            path.rename(old)
        tmp.rename(path)
        _fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def clean_leftovers(ckpt_dir: Path) -> list[str]:
    """Remove what interrupted saves left in `ckpt_dir`: temporary folders are deleted, and a
    folder renamed aside whose replacement never arrived is put back. Returns what was done."""
    done = []
    if not Path(ckpt_dir).is_dir():
        return done
    for entry in sorted(Path(ckpt_dir).iterdir()):
        name = entry.name
        if name.startswith(".") and ".tmp-" in name:
            shutil.rmtree(entry, ignore_errors=True)
            done.append(f"removed {name}")
        elif name.startswith(".") and ".old-" in name:
            target = entry.with_name(name[1 : name.index(".old-")])
            if target.exists():
                shutil.rmtree(entry, ignore_errors=True)
                done.append(f"removed {name}")
            else:
                entry.rename(target)
                done.append(f"restored {target.name}")
    return done


def _safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> bytes:
    return safetensors.torch.save(
        {k: v.contiguous() for k, v in tensors.items()}, metadata=metadata or {"format": "pt"}
    )


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(path))


# --- adapters -------------------------------------------------------------------------------------


def peft_files(model) -> dict[str, bytes]:
    """The files peft's save_pretrained writes for the adapter (safetensors), as bytes."""
    staging = Path(tempfile.mkdtemp(prefix="qlora-adapter-"))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        return {p.name: p.read_bytes() for p in staging.iterdir() if p.is_file()}
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def save_adapter(model, path: Path) -> None:
    """LoRA + head as peft saves them (adapter_model.safetensors + adapter_config.json), durably."""
    write_dir(path, peft_files(model))


def load_adapter_weights(model, path: Path) -> None:
    """Load a saved adapter's weights (LoRA + head) into a model that has the same adapter layout."""
    from peft import set_peft_model_state_dict  # here: peft loads transformers; the app reads latest_state

    file = Path(path) / ADAPTER_FILE
    if not file.is_file():
        raise FileNotFoundError(f"no adapter weights at {file}")
    try:
        state = _load_safetensors(file)
    except Exception as e:
        raise ValueError(f"checkpoint {file} is damaged ({type(e).__name__}: {e})") from None
    result = set_peft_model_state_dict(model, state)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise RuntimeError(f"adapter has weights the model does not: {unexpected[:5]}")


def run_checkpoint(run_dir: Path, epoch: int | None = None) -> tuple[Path, int]:
    """(checkpoints/epoch-K of a run, K): epoch `epoch`, else the epoch the run selected (report.json's
    best_epoch, else the best of metrics.jsonl's epoch records). A ValueError in one sentence when
    `run_dir` is not a run folder, has no finished epoch yet, or has no checkpoint of that epoch."""
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG).is_file():
        raise ValueError(f"{run_dir} is not a run folder (no {CONFIG})")
    if epoch is None:
        epoch = (read_json(run_dir / REPORT) or {}).get("best_epoch")
    if epoch is None:
        best = best_epoch(read_metrics(run_dir)["epoch"])
        if best is None:
            raise ValueError(f"run {run_dir.name} has no trained adapter yet (no finished epoch)")
        epoch = best["epoch"]
    folder = run_dir / CHECKPOINTS / f"epoch-{epoch}"
    if not (folder / ADAPTER_FILE).is_file():
        kept = sorted(p.name for p in (run_dir / CHECKPOINTS).glob("epoch-*") if (p / ADAPTER_FILE).is_file())
        raise ValueError(f"run {run_dir.name} has no checkpoint of epoch {epoch} (it has {', '.join(kept) or 'none'})")
    return folder, int(epoch)


# --- the training state ---------------------------------------------------------------------------


@dataclasses.dataclass
class TrainState:
    """Where training stands after `step` optimiser steps (what a resume continues from)."""

    step: int
    """Optimiser steps taken."""
    epoch: int
    """The epoch the next batch belongs to (1-based)."""
    epoch_step: int
    """Batches of that epoch already done (may equal its batch count: only its validation is left)."""
    best: dict | None
    """The best epoch so far by validation ({epoch, val_accuracy, val_loss}), None before any."""
    epoch_loss_sum: float
    """Sum of the epoch's step losses weighted by rows, so far."""
    epoch_rows: int
    """Rows of the epoch trained so far."""
    metrics_bytes: int
    """Length of metrics.jsonl when the state was taken: a resume cuts the file back to it."""


def best_epoch(epochs: list[dict]) -> dict | None:
    """The epoch record (epoch, val_accuracy, val_loss) whose adapter a run keeps: the highest
    validation accuracy; a lower validation loss breaks a tie, then the earlier epoch. None when
    there are none. A value missing from a record read back (NaN is written as null) counts as the
    worst. train() chooses with it as it goes, and `evaluate` (core/evaluate.py) from metrics.jsonl
    when a run has no report."""
    return max(epochs, key=_selection_key, default=None)


def _selection_key(epoch: dict) -> tuple:
    accuracy = epoch.get("val_accuracy")
    loss = epoch.get("val_loss")
    return (-math.inf if accuracy is None else accuracy, -math.inf if loss is None else -loss, -epoch["epoch"])


def _rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors = {"torch_cpu": torch.get_rng_state(), "numpy_keys": torch.from_numpy(keys.astype(np.int64))}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    meta = {
        "python": [version, list(internal), gauss],
        "numpy": {"kind": kind, "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
    }
    return tensors, meta


def _set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    n = meta["numpy"]
    np.random.set_state(
        (n["kind"], tensors["numpy_keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("torch_cuda_")), key=lambda k: int(k[11:]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])


def _param_names(model, optimizer) -> list[tuple[str, torch.nn.Parameter]]:
    """The optimiser's parameters in its own order, with their names in the model."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [(names[id(p)], p) for g in optimizer.param_groups for p in g["params"]]


def _json_safe(obj):
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items() if not callable(v)}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.item()
    return obj


def state_files(state: TrainState, model, optimizer, scheduler, scaler) -> dict[str, bytes | dict]:
    """The files of a state folder, from tensors copied now (training may change them after)."""
    params = _param_names(model, optimizer)
    weights = {n: p.detach().to("cpu", copy=True) for n, p in params}
    opt = optimizer.state_dict()
    moments, steps = {}, {}
    for i, (name, _) in enumerate(params):
        for key, value in opt["state"].get(i, {}).items():
            if isinstance(value, torch.Tensor) and value.ndim > 0:
                moments[f"{name}::{key}"] = value.detach().to("cpu", copy=True)
            else:
                steps[f"{name}::{key}"] = _json_safe(value)
    rng, rng_meta = _rng_state()
    meta = {
        "version": 1,
        **dataclasses.asdict(state),
        "rng": rng_meta,
        "optimizer_scalars": steps,
        "param_groups": [{k: _json_safe(v) for k, v in g.items() if k != "params"} for g in opt["param_groups"]],
        "scheduler": _json_safe(scheduler.state_dict()),
        "scaler": _json_safe(scaler.state_dict()) if scaler is not None else None,
    }
    return {
        "trainable.safetensors": weights,
        "optimizer.safetensors": moments,
        "rng.safetensors": rng,
        "state.json": (json.dumps(meta) + "\n").encode(),
    }  # written last: a folder with it is whole


def latest_state(ckpt_dir: Path) -> Path | None:
    """The newest state folder (highest step) in `ckpt_dir` that has its state.json, or None."""
    found = []
    if Path(ckpt_dir).is_dir():
        for entry in Path(ckpt_dir).iterdir():
            if entry.name.startswith(STATE_PREFIX) and entry.name[len(STATE_PREFIX) :].isdigit():
                if (entry / "state.json").is_file():
                    found.append((int(entry.name[len(STATE_PREFIX) :]), entry))
    return max(found)[1] if found else None


def restore_state(path: Path, model, optimizer, scheduler, scaler) -> TrainState:
    """Load the state folder `path` into the model, optimiser, scheduler, scaler and RNGs; returns
    where training stands. A damaged folder raises ValueError naming it and what to do."""
    path = Path(path)
    try:
        meta = json.loads((path / "state.json").read_text(encoding="utf-8"))
        weights = _load_safetensors(path / "trainable.safetensors")
        moments = _load_safetensors(path / "optimizer.safetensors")
        rng = _load_safetensors(path / "rng.safetensors")
        if meta.get("version") != 1:
            raise ValueError(f"unknown state version {meta.get('version')!r}")
        params = _param_names(model, optimizer)
        missing = [n for n, _ in params if n not in weights]
        if missing:
            raise ValueError(f"it lacks weights the model has, e.g. {missing[0]}")
        with torch.no_grad():
            for name, p in params:
                p.copy_(weights[name])
        state = {}
        for i, (name, _) in enumerate(params):
            entry = {k.split("::", 1)[1]: v for k, v in moments.items() if k.split("::", 1)[0] == name}
            for k, v in meta["optimizer_scalars"].items():
                if k.split("::", 1)[0] == name:
                    entry[k.split("::", 1)[1]] = torch.tensor(v, dtype=torch.float32)
            if entry:
                state[i] = entry
        groups = [
            {**g, **saved, "params": g["params"]}
            for g, saved in zip(optimizer.state_dict()["param_groups"], meta["param_groups"])
        ]
        optimizer.load_state_dict({"state": state, "param_groups": groups})
        scheduler.load_state_dict({**scheduler.state_dict(), **meta["scheduler"]})
        if scaler is not None and meta.get("scaler"):
            scaler.load_state_dict(meta["scaler"])
        _set_rng_state(rng, meta["rng"])
        fields = {f.name for f in dataclasses.fields(TrainState)}
        return TrainState(**{k: v for k, v in meta.items() if k in fields})
    except Exception as e:  # any damage: a plain message, never a traceback
        raise ValueError(
            f"checkpoint {path} is damaged and cannot be resumed from ({type(e).__name__}: {e}); "
            "delete that folder to resume from the one before it, or start a new run"
        ) from None


class Checkpointer:
    """A run's checkpoints, written in order on one background thread so training goes on: the
    tensors are copied when save_* is called, the files written after. The first adapter goes
    through peft's save_pretrained (its adapter_config.json is reused), later ones from the copies
    (peft rebuilds its state dict and model card each time: a few tenths of a second an epoch for
    Phi-2 on a GPU, bench/RESULTS.md). wait() before reading one back; a failed write raises there.

    `folder_files` (core.classifier.folder_files: the tokenizer and classifier.json) go into every
    adapter folder, with a model card and an adapter_config.json that names the base model as the
    user did, so that each epoch folder loads outside this project."""

    def __init__(
        self,
        model,
        ckpt_dir: Path,
        folder_files: dict[str, bytes] | None = None,
        run_id: str = "",
        keep_states: int = 1,
        ranks=None,
    ):
        """`ranks` (core.dist.Ranks) of a data-parallel run: rank 0 writes and reads the files, the
        other processes write nothing and receive what rank 0 loads."""
        self.ranks = ranks or Ranks()
        self.write = self.ranks.main
        self.model = model
        self.dir = Path(ckpt_dir)
        self.extras = dict(folder_files or {})
        self.info = json.loads(self.extras[CLASSIFIER_FILE]) if CLASSIFIER_FILE in self.extras else None
        self.run_id = run_id
        self.keep_states = keep_states
        self.keys: dict[str, torch.Tensor] | None = None  # peft's state-dict key -> live parameter
        self.config: bytes | None = None
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def _card(self, epoch: int, validation=None, test=None) -> dict[str, bytes]:
        if self.info is None:
            return {}
        return {"README.md": model_card(self.info, epoch, validation, self.run_id, test).encode()}

    def save_adapter(self, name: str, validation: tuple[float, int] | None = None) -> None:
        """checkpoints/<name>/ (name epoch-K): the adapter and head as they are now, the folder
        files, and a model card with `validation` = (accuracy, n) when given."""
        if not self.write:
            return
        self.wait()
        path = self.dir / name
        epoch = int(name.split("-")[-1]) if name.split("-")[-1].isdigit() else -1
        extras = {**self.extras, **self._card(epoch, validation)}
        if self.config is None or self.keys is None:  # the first, or no fast path for this model: peft
            files = peft_files(self.model)
            self.config = files[ADAPTER_CONFIG]
            if self.info:
                self.config = portable_adapter_config(self.config, self.info)
            write_dir(path, {**files, ADAPTER_CONFIG: self.config, **extras})
            self.keys = self._live_tensors()
            return
        tensors = {k: t.detach().to("cpu", copy=True) for k, t in self.keys.items()}
        self._write_later(lambda: write_dir(path, {ADAPTER_FILE: tensors, ADAPTER_CONFIG: self.config, **extras}))

    def load_adapter(self, name: str) -> None:
        """Wait for the writes, then load checkpoints/<name>/'s adapter and head into the model
        (rank 0's copy, sent to the other processes)."""
        if self.write:
            self.wait()
            load_adapter_weights(self.model, self.dir / name)
        self.ranks.broadcast_params([p for p in self.model.parameters() if p.requires_grad])

    def add_test_result(
        self, epoch: int, validation: tuple[float, int], test: tuple[float, int], temperature: float | None = None
    ) -> None:
        """The card of the selected epoch, with its test accuracy (after the run's test pass); with
        `temperature` (fitted on validation by the report, core/results/calibration.py) written
        into its classifier.json too, where load_classifier divides the logits by it."""
        if self.info is None or not self.write:
            return
        folder = self.dir / f"epoch-{epoch}"
        if temperature is not None:
            self.info = {**self.info, "temperature": temperature}
            atomic_write_bytes(folder / CLASSIFIER_FILE, (json.dumps(self.info, indent=2) + "\n").encode())
        atomic_write_bytes(folder / "README.md", self._card(epoch, validation, test)["README.md"])

    def save_state(self, state: TrainState, optimizer, scheduler, scaler) -> None:
        """The full training state as checkpoints/state-<step>/; older state folders are removed
        once it is in place."""
        if not self.write:
            return
        self.wait()
        files = state_files(state, self.model, optimizer, scheduler, scaler)
        path = self.dir / f"{STATE_PREFIX}{state.step:08d}"

        def write():
            write_dir(path, files)
            states = sorted(p for p in self.dir.iterdir() if p.name.startswith(STATE_PREFIX) and p != path)
            for old in states[: max(0, len(states) + 1 - self.keep_states)]:
                shutil.rmtree(old, ignore_errors=True)

        self._write_later(write)

    def wait(self) -> None:
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.error is not None:
            error, self.error = self.error, None
            raise RuntimeError(f"writing a checkpoint failed: {error}") from error

    def _write_later(self, write) -> None:
        def run():
            try:
                write()
            except BaseException as e:  # reported by wait()
                self.error = e

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def _live_tensors(self) -> dict[str, torch.Tensor] | None:
        """peft's state-dict keys mapped to the parameters they were read from (None when some key
        has no parameter of its own: every save then goes through peft)."""
        from peft import get_peft_model_state_dict  # as in load_adapter_weights

        params = {(p.data_ptr(), tuple(p.shape)): p for p in self.model.parameters() if p.requires_grad}
        keys = {}
        for k, t in get_peft_model_state_dict(self.model).items():
            p = params.get((t.data_ptr(), tuple(t.shape)))
            if p is None:
                return None
            keys[k] = p
        return keys
