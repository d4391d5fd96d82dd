"""The training run: one function, top to bottom.

    python -m core train --preset demo                 # the CLI (see core/__main__.py)
    train(RunConfig(...), Path("runs/my-run"))         # the same thing from Python

Order of events: load data and model -> save the step-0 adapter (the "before" model) ->
evaluate it on validation and test -> for each epoch: train, evaluate validation, save the
adapter -> load the best epoch's adapter -> evaluate test once -> write the report.
Everything is written into the run folder as it happens (see core/runs/rundir.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import random
import signal
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from .config import RunConfig, speed_from_env
from .data import batch_indices, encode, load_splits
from .evaluate import accuracy, predict, prediction_rows
from .model import (AdapterSaver, add_lora, count_parameters, load_adapter_weights, load_model, load_tokenizer,
                    pick_compute_dtype, pick_device, resolve_pooling)
from .report import build_report
from .runs import rundir
from .runs.resources import ResourceSampler, hardware_info
from .speed import packing
from .speed.accounting import PeakMemory, StepLog
from .speed.graphs import EvalGraphs
from .speed.step import TrainStep
from .speed.tune import tune_model


class Stopped(Exception):
    """Raised inside the loop when a stop was requested (STOP file or SIGTERM)."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the peak learning rate at optimiser step `step` (0-based)."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return max(0.0, 1.0 - progress)


def make_optimizer(model, cfg: RunConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW over the trainable weights: LoRA at lr, the head at head_lr; no decay on biases."""
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_head = "modules_to_save" in name
        decay = p.ndim >= 2 and cfg.train.weight_decay > 0
        key = (is_head, decay)
        if key not in groups:
            lr = (cfg.train.head_lr or cfg.train.lr) if is_head else cfg.train.lr
            groups[key] = {"params": [], "lr": lr, "weight_decay": cfg.train.weight_decay if decay else 0.0}
        groups[key]["params"].append(p)
    for g in groups.values():
        g["initial_lr"] = g["lr"]
    return torch.optim.AdamW(list(groups.values()), betas=(0.9, 0.999), eps=1e-8,
                             fused=device.type == "cuda")


def optimizer_step(optimizer, scaler, params: list, max_grad_norm: float | None) -> torch.Tensor | None:
    """Unscale (fp16), clip and apply the gradients in .grad; returns the gradient norm before
    clipping as a device tensor (None without clipping). Does not wait for the GPU."""
    if scaler:
        scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm) if max_grad_norm else None
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return grad_norm


def load_everything(cfg: RunConfig, t_start: float):
    """Data, tokenizer and the 4-bit model with its LoRA adapters, new head and speed-ups, seeded;
    returns (splits, encoded splits, model, pad id, device, dtype, PeakMemory, the `setup` record
    of metrics.jsonl: where and how the run trains, and on what)."""
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    seed_everything(cfg.train.seed)
    splits, data_stats = load_splits(cfg.data, cfg.train.seed)
    timings = {"data_s": time.time() - t_start}
    device = pick_device(cfg.model.device)
    dtype = pick_compute_dtype(device, cfg.model.compute_dtype)
    tokenizer = load_tokenizer(cfg.model)
    t_load = time.time()
    timings["tokenizer_s"] = t_load - t_start - timings["data_s"]
    seed_everything(cfg.train.seed)  # the new head and the LoRA matrices start from the seed
    labels = cfg.data.labels
    model = load_model(cfg.model, len(labels), tokenizer.pad_token_id, device, dtype, id2label=dict(enumerate(labels)))
    model = add_lora(model, cfg.lora)
    tuned = tune_model(model, dtype, cfg.speed)  # fused layers and kernels: the same function, faster
    load_s = time.time() - t_load
    memory = PeakMemory(device)
    load_peak_gb = memory.phase(in_overall=False)  # loading peaks apart (16-bit shards before quantising)
    t0 = time.time()
    encoded = {s: encode(ex, tokenizer, cfg.data) for s, ex in splits.items()}
    timings["encode_s"] = time.time() - t0
    steps_per_epoch = math.ceil(len(encoded["train"]) / cfg.train.batch_size)
    t0 = time.time()
    hardware = hardware_info()
    timings["hardware_s"] = time.time() - t0
    setup = dict(kind="setup", device=str(device), compute_dtype=str(dtype).replace("torch.", ""),
                 hardware=hardware, params=count_parameters(model), setup_s=round(time.time() - t_start, 3),
                 timings={k: round(v, 3) for k, v in timings.items()}, data=data_stats, labels=labels,
                 steps_per_epoch=steps_per_epoch, total_steps=steps_per_epoch * cfg.train.epochs,
                 epochs=cfg.train.epochs, load_s=round(load_s, 3), load_peak_gb=load_peak_gb,
                 model_type=model.config.model_type, speedups=tuned, speed=dataclasses.asdict(cfg.speed),
                 pooling=resolve_pooling(cfg.model), target_modules=sorted(model.peft_config["default"].target_modules),
                 mean_tokens={s: round(float(np.mean([len(e["input_ids"]) for e in v])), 1) for s, v in encoded.items()})
    return splits, encoded, model, tokenizer.pad_token_id, device, dtype, memory, setup


def train(cfg: RunConfig, run_dir: Path) -> dict:
    """Run the whole experiment of `cfg` into `run_dir` and return the report."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = dataclasses.replace(cfg, speed=speed_from_env(cfg.speed))  # config.json says how it ran
    cfg.save(run_dir / rundir.CONFIG)
    log = lambda **rec: rundir.append_jsonl(run_dir / rundir.METRICS, {"t": round(time.time(), 3), **rec})
    status = rundir.read_json(run_dir / rundir.STATUS, {}) or {}
    rundir.write_status(run_dir, state="running", pid=os.getpid(), phase="loading",
                        created_at=status.get("created_at") or rundir.now_iso(), started_at=rundir.now_iso(),
                        finished_at=None, error=None, step=0, total_steps=None, epoch=0)
    stop = StopRequest(run_dir)
    sampler = ResourceSampler(run_dir / rundir.RESOURCES).start()
    saver = None
    t_start = time.time()
    try:
        # --- setup: data, tokenizer, the 4-bit model with its LoRA adapters and new head ---------------------
        splits, encoded, model, pad_id, device, dtype, memory, setup = load_everything(cfg, t_start)
        labels = cfg.data.labels
        log(**setup)
        total_steps = setup["total_steps"]
        ckpt_dir = run_dir / rundir.CHECKPOINTS
        saver = AdapterSaver(model)  # later checkpoints are written while training goes on
        saver.save(ckpt_dir / "epoch-0")  # the "before" model, head initialisation included
        evaluate = Evaluator(model, encoded, splits, cfg, device, dtype, pad_id, memory, log,
                             phase=lambda text: rundir.write_status(run_dir, phase=text))

        # --- before: the untrained adapter and head ------------------------------------------------------------
        stop.check()
        evaluate("validation", "before")
        stop.check()
        probs, _, _ = evaluate("test", "before")
        rundir.atomic_write_jsonl(run_dir / rundir.PREDICTIONS / "test_before.jsonl",
                                  prediction_rows(splits["test"], probs, labels))

        # --- train: epochs of optimiser steps, validation and a checkpoint after each ----------------------------
        optimizer = make_optimizer(model, cfg, device)
        warmup = round(cfg.train.warmup_ratio * total_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(s, total_steps, warmup, cfg.train.schedule))
        scaler = torch.amp.GradScaler("cuda") if (device.type == "cuda" and dtype == torch.float16) else None
        trainable = [p for p in model.parameters() if p.requires_grad]
        stepper = TrainStep(model, device, dtype, pad_id, cfg.speed, scaler=scaler, data=encoded["train"])
        steps = StepLog(log, lambda s: rundir.write_status(run_dir, step=s), model, device)
        stepper.zero_grad()
        micro = cfg.train.micro_batch_size or cfg.train.batch_size
        best = None  # the epoch with the highest validation accuracy (lower loss breaks ties)
        step = 0
        model.train()
        for epoch in range(1, cfg.train.epochs + 1):
            rundir.write_status(run_dir, phase="training", epoch=epoch, step=step, total_steps=total_steps)
            batches = batch_indices(encoded["train"], cfg.train.batch_size, shuffle=True,
                                    seed=cfg.train.seed * 1000 + epoch, bucket=cfg.train.length_bucketing)
            steps.start_epoch(epoch, len(batches))
            for b, idx in enumerate(batches):
                stop.check()
                tokens = stepper.forward_backward([encoded["train"][i] for i in idx], micro)  # grad of the mean CE
                loss = stepper.take_loss_tensor()  # stays on the device: no wait here
                grad_norm = optimizer_step(optimizer, scaler, trainable, cfg.train.max_grad_norm)
                stepper.zero_grad()  # in place: CUDA graphs accumulate into the same .grad tensors
                step += 1
                steps.add(step, b + 1, len(idx), loss, grad_norm, scheduler.get_last_lr()[0], tokens, stepper.graphs)
                scheduler.step()
                steps.flush(last=b + 1 == len(batches))  # reads step n-1 while the GPU runs step n
            epoch_s = time.time() - steps.t_epoch
            train_peak_gb = memory.phase()
            stop.check()
            _, val_acc, val_loss = evaluate("validation", f"epoch-{epoch}")
            t_save = time.time()
            saver.save(ckpt_dir / f"epoch-{epoch}")  # a copy now, the file on a thread
            save_s = time.time() - t_save
            if best is None or (val_acc, -val_loss) > (best["val_accuracy"], -best["val_loss"]):
                best = {"epoch": epoch, "val_accuracy": val_acc, "val_loss": val_loss}
            log(kind="epoch", epoch=epoch, train_loss=steps.train_loss, val_accuracy=val_acc, val_loss=val_loss,
                epoch_s=round(epoch_s, 3), best_epoch=best["epoch"], train_peak_gb=train_peak_gb,
                graph_captures=stepper.captures, capture_s=round(stepper.capture_s, 3), save_s=round(save_s, 3),
                checkpoint=f"{rundir.CHECKPOINTS}/epoch-{epoch}")
            model.train()

        # --- after: the best epoch by validation, scored once on test ---------------------------------
        stop.check()
        saver.wait()
        load_adapter_weights(model, ckpt_dir / f"epoch-{best['epoch']}")
        probs, test_acc, _ = evaluate("test", "after")
        rundir.atomic_write_jsonl(run_dir / rundir.PREDICTIONS / "test_after.jsonl",
                                  prediction_rows(splits["test"], probs, labels))
        peaks = {**sampler.stop(), **memory.totals()}  # CPU, RAM, disk; torch's peak and reserved GPU memory
        log(kind="end", state="done", total_s=round(time.time() - t_start, 3), best_epoch=best["epoch"],
            test_accuracy=test_acc, peaks=peaks)
        report = {**build_report(run_dir), "state": "done"}
        rundir.atomic_write_json(run_dir / rundir.REPORT, report)
        rundir.write_status(run_dir, state="done", phase="done", finished_at=rundir.now_iso(), step=step)
        return report
    except Stopped:
        sampler.stop()
        log(kind="end", state="stopped", total_s=round(time.time() - t_start, 3))
        rundir.write_status(run_dir, state="stopped", phase="stopped", finished_at=rundir.now_iso())
        return {}
    except BaseException as e:
        sampler.stop()
        message = f"{type(e).__name__}: {e}"
        log(kind="end", state="failed", total_s=round(time.time() - t_start, 3), error=message)
        rundir.write_status(run_dir, state="failed", phase="failed", finished_at=rundir.now_iso(),
                            error=message, traceback=traceback.format_exc(limit=20))
        raise
    finally:
        if saver is not None:  # a checkpoint being written is finished, not cut off
            with contextlib.suppress(Exception):
                saver.wait()
        stop.restore()


class Evaluator:
    """evaluate(split, stage) -> (probs, accuracy, loss) of the model as it is now, logged as an
    `eval` record. Validation is scored before training and after every epoch: where batches are
    padded its shapes are captured once as CUDA graphs and replayed. Test is scored twice, where a
    capture costs more than it saves; packed evaluation runs a few large batches, which graphs do
    not speed up."""

    def __init__(self, model, encoded, splits, cfg: RunConfig, device, dtype, pad_id, memory, log, phase):
        self.model, self.encoded, self.splits, self.cfg = model, encoded, splits, cfg
        self.device, self.dtype, self.pad_id, self.memory, self.log, self.phase = device, dtype, pad_id, memory, log, phase
        self.graphs = EvalGraphs(device, enabled=cfg.speed.eval_graphs)
        packed = packing.enabled(model, device, dtype, cfg.speed.pack)
        self.graph_splits = {"validation"} if cfg.train.epochs >= 2 and not packed else set()

    def __call__(self, split: str, stage: str) -> tuple[np.ndarray, float, float]:
        self.phase(f"evaluating {split} ({stage})")
        t0 = time.time()
        graphs = self.graphs if split in self.graph_splits else None
        probs, loss = predict(self.model, self.encoded[split], self.cfg.train.eval_batch_size, self.pad_id,
                              self.device, self.dtype, graphs=graphs, speed=self.cfg.speed)
        secs = time.time() - t0
        acc = accuracy(probs, self.splits[split])
        n = len(self.splits[split])
        self.log(kind="eval", split=split, stage=stage, accuracy=acc, loss=loss, n=n, seconds=round(secs, 3),
                 pairs_per_s=round(n / max(secs, 1e-9), 1), peak_gb=self.memory.phase(),
                 cuda_graphs=graphs is not None and self.graphs.enabled,
                 **({"graph_error": self.graphs.error} if self.graphs.error else {}))
        return probs, acc, loss


class StopRequest:
    """A stop asked for by the STOP file in the run folder (the app's Stop button) or SIGTERM:
    check() raises Stopped at the next step; restore() puts the previous SIGTERM handler back."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.signalled = False
        self.previous = signal.signal(signal.SIGTERM, self._on_sigterm) if _main_thread() else None

    def _on_sigterm(self, signum, frame):
        self.signalled = True

    def check(self) -> None:
        if self.signalled or rundir.stop_requested(self.run_dir):
            raise Stopped()

    def restore(self) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


def _main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()
