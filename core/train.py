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
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import baseline, checkpoint, dist
from .classifier import folder_files
from .config import RunConfig, speed_from_env
from .data import Example, batch_indices, encode, load_splits, prompt_for
from .evaluate import accuracy, predict, prediction_rows
from .model import (
    add_lora,
    count_parameters,
    init_head,
    load_model,
    load_tokenizer,
    pick_compute_dtype,
    pick_device,
    resolve_pooling,
)
from .results.report import build_report
from .results.seeds import group_summary
from .runs import rundir
from .runs.resources import ResourceSampler, hardware_info
from .runs.state import stop_requested, write_status
from .speed import packing
from .speed.accounting import PeakMemory, StepLog
from .speed.graphs import EvalGraphs
from .speed.step import TrainStep, class_weights
from .speed.tune import checkpoint_layers, tune_model
from .trackers import Trackers


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


def make_optimizer(model, cfg: RunConfig, device: torch.device, dtype: torch.dtype, total_steps: int):
    """(optimizer, scheduler, scaler): AdamW over the trainable weights (LoRA at lr, the head at
    head_lr, no decay on biases), the warmup + schedule of cfg.train, and a GradScaler for fp16
    on a GPU (None otherwise)."""
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
    optimizer = torch.optim.AdamW(list(groups.values()), betas=(0.9, 0.999), eps=1e-8, fused=device.type == "cuda")
    warmup = round(cfg.train.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, warmup, cfg.train.schedule)
    )
    scaler = torch.amp.GradScaler("cuda") if (device.type == "cuda" and dtype == torch.float16) else None
    return optimizer, scheduler, scaler


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


@dataclasses.dataclass
class Setup:
    """What train() works with, made by load_everything()."""

    splits: dict[str, list[Example]]
    """The examples of train, validation and test."""
    encoded: dict[str, list[dict]]
    """The same examples tokenised (input_ids, label), in the same order."""
    model: torch.nn.Module
    """The 4-bit model with its LoRA adapters, new head and speed-ups, on `device`."""
    tokenizer: Any
    """The model's tokenizer (its pad_token_id pads the batches)."""
    device: torch.device
    """Where this process trains: the CPU, or its GPU."""
    dtype: torch.dtype
    """The compute dtype of the forward and backward passes."""
    memory: PeakMemory
    """Peak GPU memory per phase of the run, from the end of loading on."""
    class_weights: list[float] | None
    """Each class's weight in the training loss (train.class_weights, rescaled); None: all 1."""
    record: dict
    """The `setup` record of metrics.jsonl: where and how the run trains, and on what."""


def load_everything(cfg: RunConfig, t_start: float, ranks: dist.Ranks | None = None) -> Setup:
    """Data, tokenizer and the 4-bit model with its LoRA adapters, new head and speed-ups, seeded
    (the trainable weights are rank 0's in every process of a data-parallel run)."""
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    seed_everything(cfg.train.seed)
    sample_seed = cfg.train.seed if cfg.data.sample_seed is None else cfg.data.sample_seed
    splits, data_stats = load_splits(cfg.data, sample_seed)
    timings = {"data_s": time.time() - t_start}
    ranks = ranks or dist.Ranks()
    device = ranks.device(pick_device(cfg.model.device))
    dtype = pick_compute_dtype(device, cfg.model.compute_dtype, cfg.speed.cpu_bf16)
    tokenizer = load_tokenizer(cfg.model)
    t_load = time.time()
    timings["tokenizer_s"] = t_load - t_start - timings["data_s"]
    seed_everything(cfg.train.seed)  # the new head and the LoRA matrices start from the seed
    labels = cfg.data.labels
    model = load_model(cfg.model, len(labels), tokenizer.pad_token_id, device, dtype, id2label=dict(enumerate(labels)))
    prompt = prompt_for(cfg.data, tokenizer, text=bool(splits["train"][0].text))
    head_init = init_head(model, cfg.model, prompt, tokenizer)  # the label words' LM-head rows, or random
    model = add_lora(model, cfg.lora)
    tuned = tune_model(model, dtype, cfg.speed)  # fused layers and kernels: the same function, faster
    if cfg.train.gradient_checkpointing:  # the same gradients, less activation memory, more time
        tuned = sorted([*tuned, checkpoint_layers(model)])
    ranks.broadcast_params([p for p in model.parameters() if p.requires_grad])  # as DDP does at the start
    if ranks.world > 1:
        torch.manual_seed(cfg.train.seed * 1000 + ranks.rank)  # each process its own dropout
    load_s = time.time() - t_load
    memory = PeakMemory(device)
    load_peak_gb = memory.phase(in_overall=False)  # loading peaks apart (16-bit shards before quantising)
    t0 = time.time()
    encoded = {s: encode(ex, tokenizer, cfg.data, split=s) for s, ex in splits.items()}
    timings["encode_s"] = time.time() - t0
    steps_per_epoch = math.ceil(len(encoded["train"]) / cfg.train.batch_size)
    t0 = time.time()
    hardware = hardware_info()
    timings["hardware_s"] = time.time() - t0
    mean_tokens = {s: round(float(np.mean([len(e["input_ids"]) for e in v])), 1) for s, v in encoded.items()}
    counts = [sum(e.label == c for e in splits["train"]) for c in range(len(labels))]
    weights = class_weights(cfg.train.class_weights, counts, labels)  # None for "none"
    record = dict(
        kind="setup",
        device=str(device),
        world_size=ranks.world,
        compute_dtype=str(dtype).replace("torch.", ""),
        hardware=hardware,
        params=count_parameters(model),
        setup_s=round(time.time() - t_start, 3),
        timings={k: round(v, 3) for k, v in timings.items()},
        data=data_stats,
        labels=labels,
        steps_per_epoch=steps_per_epoch,
        total_steps=steps_per_epoch * cfg.train.epochs,
        epochs=cfg.train.epochs,
        track_test=cfg.train.track_test,
        load_s=round(load_s, 3),
        load_peak_gb=load_peak_gb,
        model_type=model.config.model_type,
        speedups=tuned,
        speed=dataclasses.asdict(cfg.speed),
        pooling=resolve_pooling(cfg.model),
        head_init=head_init,
        target_modules=sorted(model.peft_config["default"].target_modules),
        lora_variant=cfg.lora.variant,
        class_weights=None if weights is None else dict(zip(labels, (round(w, 6) for w in weights))),
        mean_tokens=mean_tokens,
    )
    return Setup(splits, encoded, model, tokenizer, device, dtype, memory, weights, record)


def train(cfg: RunConfig, run_dir: Path, resume: bool = False) -> dict:
    """Run the whole experiment of `cfg` into `run_dir` and return the report. With `resume`,
    continue from the run's last full-state checkpoint (from the start if it has none). Under
    torchrun every process calls this; rank 0 alone writes (core/dist.py)."""
    run_dir = Path(run_dir)
    ranks = dist.setup(pick_device(cfg.model.device).type)  # one process, or this one of torchrun's
    main = ranks.main
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_dir = run_dir / rundir.CHECKPOINTS
    metrics = run_dir / rundir.METRICS
    # what an interrupted save, and the failed processes of a previous attempt, left behind
    cleaned = checkpoint.clean_leftovers(ckpt_dir) + dist.clear_errors(run_dir) if main else []
    state_dir = checkpoint.latest_state(ckpt_dir) if resume else None
    if state_dir is None:  # a fresh start; config.json says how it ran
        cfg = dataclasses.replace(cfg, speed=speed_from_env(cfg.speed))
        if main:
            cfg.save(run_dir / rundir.CONFIG)
            rundir.atomic_write_text(metrics, "")

    trackers = Trackers(cfg.train.report_to if main else [], run_dir, cfg)  # TensorBoard, MLflow, W&B

    # rank 0 alone writes metrics.jsonl and status.json; in the other processes these do nothing
    def log(**record) -> None:
        if main:
            record = {"t": round(time.time(), 3), **record}
            rundir.append_jsonl(metrics, record)
            trackers.record(record)  # the trackers of train.report_to get a copy (core/trackers.py)

    def status(**fields) -> None:
        if main:
            write_status(run_dir, **fields)

    def status_step(step: int) -> None:
        status(step=step)

    created = (rundir.read_json(run_dir / rundir.STATUS, {}) or {}).get("created_at") or rundir.now_iso()
    status(
        state="running",
        pid=os.getpid(),
        phase="loading",
        created_at=created,
        started_at=rundir.now_iso(),
        finished_at=None,
        error=None,
        step=0,
        total_steps=None,
        epoch=0,
    )
    stop = StopRequest(run_dir, ranks)
    sampler = ResourceSampler(run_dir / rundir.RESOURCES, enabled=main).start()
    saver = None
    position = None  # (epoch, batches done) while a stop can save the state
    t_start = time.time()
    try:
        # --- setup: data, tokenizer, the 4-bit model with its LoRA adapters and new head, optimiser --------
        setup = load_everything(cfg, t_start, ranks)
        model = setup.model
        encoded = setup.encoded
        total_steps = setup.record["total_steps"]
        # on a thread; rank 0 writes, the others follow it
        files = folder_files(cfg, setup.tokenizer, setup.record["head_init"])  # tokenizer, classifier.json
        saver = checkpoint.Checkpointer(model, ckpt_dir, files, run_dir.name, ranks=ranks)
        evaluate = Evaluator(setup, cfg, log, run_dir, ranks)
        optimizer, scheduler, scaler = make_optimizer(model, cfg, setup.device, setup.dtype, total_steps)
        if state_dir is not None:  # --- resume: weights, optimiser, scheduler, RNGs, position --------------
            at = checkpoint.restore_state(state_dir, model, optimizer, scheduler, scaler)
            if main:
                os.truncate(metrics, min(at.metrics_bytes, metrics.stat().st_size))  # later records are redone
            elif ranks.world > 1:
                torch.manual_seed(cfg.train.seed * 1000 + ranks.rank + at.step)  # its own dropout again
            log(
                kind="resume",
                step=at.step,
                epoch=at.epoch,
                epoch_step=at.epoch_step,
                checkpoint=state_dir.name,
                cleaned=cleaned,
                world_size=ranks.world,
                setup_s=round(time.time() - t_start, 3),
            )
        else:  # --- before: the untrained adapter and head --------------------------------------------------
            log(**setup.record)
            saver.save_adapter("epoch-0")  # the "before" model, head initialisation included
            stop.check()
            evaluate("validation", "before")
            stop.check()
            evaluate("test", "before", save=True)  # the random-head baseline
            evaluate.zero_shot(setup.tokenizer)  # the pretrained LM's own answer, for causal LMs
            at = checkpoint.TrainState(
                step=0, epoch=1, epoch_step=0, best=None, epoch_loss_sum=0.0, epoch_rows=0, metrics_bytes=0
            )

        # --- train: epochs of optimiser steps, validation and checkpoints --------------------------------
        trainable = [p for p in model.parameters() if p.requires_grad]
        stepper = TrainStep(
            model,
            setup.device,
            setup.dtype,
            setup.tokenizer.pad_token_id,
            cfg.speed,
            scaler=scaler,
            data=encoded["train"],
            micro=cfg.train.micro_batch_size or cfg.train.batch_size,
            class_weights=setup.class_weights,
        )  # grads allocated, zero
        steps = StepLog(log, status_step, model, setup.device, devices=ranks.world)
        step = at.step
        best = at.best  # {epoch, val_accuracy, val_loss} of the best epoch so far (checkpoint.best_epoch)

        def save_state(epoch: int, done: int) -> None:  # everything a resume needs, as of now
            steps.flush(last=True)
            state = checkpoint.TrainState(
                step=step,
                epoch=epoch,
                epoch_step=done,
                best=best,
                epoch_loss_sum=steps.loss_sum,
                epoch_rows=steps.rows,
                metrics_bytes=metrics.stat().st_size if main else 0,
            )
            saver.save_state(state, optimizer, scheduler, scaler)

        patience = cfg.train.early_stopping_patience
        early_stop = None  # why training ended before its last epoch, when it did
        model.train()
        for epoch in range(at.epoch, cfg.train.epochs + 1):
            # early stopping: the best epoch (checkpoint.best_epoch's rule) is `patience` epochs old;
            # checked before an epoch starts, so a resumed run counts from the best epoch it saved
            if patience and best is not None and epoch - 1 - best["epoch"] >= patience:
                early_stop = {
                    "epoch": epoch - 1,
                    "best_epoch": best["epoch"],
                    "patience": patience,
                    "epochs": cfg.train.epochs,
                    "reason": f"no epoch beat epoch {best['epoch']}'s validation accuracy "
                    f"({100 * best['val_accuracy']:.1f}%, or matched it with a lower loss) in the "
                    f"{patience} epoch{'s' if patience > 1 else ''} after it",
                }
                break
            status(phase="training", epoch=epoch, step=step, total_steps=total_steps)
            batches = batch_indices(
                encoded["train"],
                cfg.train.batch_size,
                shuffle=True,
                seed=cfg.train.seed * 1000 + epoch,
                bucket=cfg.train.length_bucketing,
            )
            done = at.epoch_step if epoch == at.epoch else 0  # batches a resumed epoch has already trained
            if done:
                steps.start_epoch(epoch, len(batches), at.epoch_loss_sum, at.epoch_rows)
            else:
                steps.start_epoch(epoch, len(batches))
            for b, idx in enumerate(batches[done:], start=done):
                position = (epoch, b)
                stop.check()
                rows = [encoded["train"][i] for i in ranks.shard(idx)]  # all of them with one process
                tokens = stepper.forward_backward(rows) if rows else (0, 0)  # grad of the mean CE over rows
                loss, tokens = ranks.reduce_gradients(
                    trainable, stepper.take_loss_tensor(), tokens, len(rows), len(idx)
                )
                grad_norm = optimizer_step(optimizer, scaler, trainable, cfg.train.max_grad_norm)
                stepper.zero_grad()  # in place: CUDA graphs accumulate into the same .grad tensors
                step += 1
                lr = scheduler.get_last_lr()[0]
                steps.add(step, b + 1, len(idx), loss, grad_norm, lr, tokens, stepper.graphs)
                scheduler.step()
                steps.flush(last=b + 1 == len(batches))  # reads step n-1 while the GPU runs step n
                if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0 and b + 1 < len(batches):
                    save_state(epoch, b + 1)
            position = (epoch, len(batches))
            epoch_s = time.time() - steps.t_epoch
            train_peak_gb = setup.memory.phase()
            stop.check()
            val_probs, val_acc, val_loss = evaluate("validation", f"epoch-{epoch}")
            if cfg.train.track_test:  # for the per-example learning dynamics only: chooses nothing
                evaluate("test", f"epoch-{epoch}")
            validation = (val_acc, len(setup.splits["validation"]))
            saver.save_adapter(f"epoch-{epoch}", validation=validation)  # files on a thread
            this = {"epoch": epoch, "val_accuracy": val_acc, "val_loss": val_loss}
            candidates = [this] if best is None else [best, this]
            best = checkpoint.best_epoch(candidates)
            if best is this:  # the kept epoch's validation predictions: the report fits its temperature on them
                evaluate.write_predictions("validation", "after", val_probs)
            log(
                kind="epoch",
                epoch=epoch,
                train_loss=steps.train_loss,
                val_accuracy=val_acc,
                val_loss=val_loss,
                epoch_s=round(epoch_s, 3),
                best_epoch=best["epoch"],
                train_peak_gb=train_peak_gb,
                graph_captures=stepper.captures,
                capture_s=round(stepper.capture_s, 3),
                oom_retries=stepper.oom_retries,
                checkpoint=f"{rundir.CHECKPOINTS}/epoch-{epoch}",
            )
            save_state(epoch + 1, 0)
            position = None
            model.train()

        # --- after: the best epoch by validation, scored once on test ---------------------------------
        stop.check()
        saver.load_adapter(f"epoch-{best['epoch']}")  # into every process
        _, test_acc, _ = evaluate("test", "after", save=True)
        validation = (best["val_accuracy"], len(setup.splits["validation"]))
        test = (test_acc, len(setup.splits["test"]))
        peaks = {**sampler.stop(), **setup.memory.totals()}  # CPU, RAM, disk; torch's peak and reserved GPU memory
        replicas = {}
        if ranks.world > 1:  # collectives: every process computes these, rank 0 logs them
            replicas["peaks_per_process"] = ranks.gather(setup.memory.totals())
            replicas["replicas_identical"] = ranks.identical(trainable)
        log(
            kind="end",
            state="done",
            total_s=round(time.time() - t_start, 3),
            best_epoch=best["epoch"],
            test_accuracy=test_acc,
            early_stop=early_stop,
            peaks=peaks,
            **replicas,
        )
        if not main:
            return {}
        report = {**build_report(run_dir, group=group_summary(run_dir)), "state": "done"}
        temperature = (report.get("temperature_scaling") or {}).get("temperature")
        saver.add_test_result(best["epoch"], validation, test, temperature)  # its model card and classifier.json
        rundir.atomic_write_json(run_dir / rundir.REPORT, report)
        saver.wait()  # the model card written, before the folder goes to the trackers as an artifact
        trackers.finish(ckpt_dir / f"epoch-{best['epoch']}")
        status(state="done", phase="done", finished_at=rundir.now_iso(), step=step)
        return report
    except (Stopped, KeyboardInterrupt) as e:  # the Stop button, SIGTERM, or Ctrl-C in a terminal
        if position is not None:  # a clean stop keeps its place: --resume continues from here
            save_state(*position)
            saver.wait()
        if main:
            error = dist.rank_errors(run_dir) if ranks.world > 1 else None  # a process that failed first
            end_run(run_dir, log, sampler, t_start, "stopped", error=error)
        if isinstance(e, KeyboardInterrupt):
            raise
        return {}
    except BaseException as e:
        if main:
            error = dist.rank_errors(run_dir) if ranks.world > 1 else None  # a process that failed first
            end_run(run_dir, log, sampler, t_start, "failed", error=error or f"{type(e).__name__}: {e}")
        else:
            dist.write_error(run_dir, ranks, e)
        raise
    finally:
        if saver is not None:  # a checkpoint being written is finished, not cut off
            with contextlib.suppress(Exception):
                saver.wait()
        trackers.close()  # as the end record says: stopped or failed (a finished run closed them already)
        stop.restore()


def end_run(run_dir: Path, log, sampler, t_start: float, state: str, error: str | None = None) -> None:
    """The `end` record and status of a run that stopped or failed (with the traceback if failed);
    a stop caused by another process's failure (torchrun stops the others) is that failure."""
    sampler.stop()
    state = "failed" if error else state
    log(kind="end", state=state, total_s=round(time.time() - t_start, 3), **({"error": error} if error else {}))
    write_status(
        run_dir,
        state=state,
        phase=state,
        finished_at=rundir.now_iso(),
        **({"error": error, "traceback": traceback.format_exc(limit=20)} if error else {}),
    )


class Evaluator:
    """evaluate(split, stage) -> (probs, accuracy, loss) of the model as it is now, logged as an
    `eval` record. Validation is scored before training and after every epoch: where batches are
    padded its shapes are captured once as CUDA graphs and replayed. Test is scored twice, where a
    capture costs more than it saves; packed evaluation runs a few large batches, which graphs do
    not speed up."""

    def __init__(self, setup: Setup, cfg: RunConfig, log, run_dir: Path, ranks: dist.Ranks | None = None):
        self.model = setup.model
        self.encoded = setup.encoded
        self.splits = setup.splits
        self.device = setup.device
        self.dtype = setup.dtype
        self.pad_id = setup.tokenizer.pad_token_id
        self.memory = setup.memory
        self.cfg = cfg
        self.log = log
        self.run_dir = run_dir
        self.ranks = ranks or dist.Ranks()  # several processes: each scores its shard, rank 0 writes
        if self.ranks.main:
            (run_dir / rundir.PREDICTIONS).mkdir(parents=True, exist_ok=True)
        self.graphs = EvalGraphs(self.device, enabled=cfg.speed.eval_graphs)
        packed = packing.enabled(self.model, self.device, self.dtype, cfg.speed.pack)
        self.graph_splits = {"validation"} if cfg.train.epochs >= 2 and not packed else set()

    def __call__(self, split: str, stage: str, save: bool = False) -> tuple[np.ndarray, float, float]:
        """Score `split` now, log it; with `save`, write predictions/<split>_<stage>.jsonl."""
        ranks = self.ranks
        main = ranks.main
        n = len(self.splits[split])
        if main:
            write_status(self.run_dir, phase=f"evaluating {split} ({stage})")
        t0 = time.time()
        graphs = self.graphs if split in self.graph_splits else None
        probs, loss = predict(
            self.model,
            ranks.shard(self.encoded[split]),
            self.cfg.train.eval_batch_size,
            self.pad_id,
            self.device,
            self.dtype,
            graphs=graphs,
            speed=self.cfg.speed,
        )
        if ranks.world > 1:  # every process's rows, back in the split's order; the loss weighted by rows
            parts = ranks.gather((probs, loss * len(ranks.shard(self.encoded[split]))))
            probs = ranks.unshard([p for p, _ in parts], n)
            loss = sum(l for _, l in parts if l == l) / n  # an empty shard's loss is nan
        secs = time.time() - t0
        acc = accuracy(probs, self.splits[split])
        if not main:
            return probs, acc, loss
        self.log(
            kind="eval",
            split=split,
            stage=stage,
            accuracy=acc,
            loss=loss,
            n=n,
            seconds=round(secs, 3),
            pairs_per_s=round(n / max(secs, 1e-9), 1),
            peak_gb=self.memory.phase(),
            cuda_graphs=graphs is not None and self.graphs.enabled,
            **({"graph_error": self.graphs.error} if self.graphs.error else {}),
        )
        if save:
            self.write_predictions(split, stage, probs)
        if stage == "before" or stage.startswith("epoch-"):  # per-example learning dynamics: probabilities only
            rundir.append_jsonl(
                self.run_dir / rundir.PREDICTIONS / rundir.DYNAMICS,
                {
                    "split": split,
                    "epoch": 0 if stage == "before" else int(stage.split("-")[1]),
                    "ids": [e.id for e in self.splits[split]],
                    "probs": np.round(probs, 4).tolist(),
                },
            )
        return probs, acc, loss

    def write_predictions(self, split: str, stage: str, probs: np.ndarray) -> None:
        """predictions/<split>_<stage>.jsonl of `probs` (rank 0 writes; the others do nothing)."""
        if self.ranks.main:
            rundir.atomic_write_jsonl(
                rundir.predictions_file(self.run_dir, split, stage),
                prediction_rows(self.splits[split], probs, self.cfg.data.labels),
            )

    def zero_shot(self, tokenizer) -> None:
        """The zero-shot baseline on test (core/baseline.py): predictions/test_zero_shot.jsonl and
        an `eval` record, or a `baseline` record saying why this model has none."""
        if not self.ranks.main:  # rank 0 alone: the others wait at their next collective
            return
        write_status(self.run_dir, phase="evaluating test (zero-shot baseline)")
        t0 = time.time()
        test = self.splits["test"]
        result = baseline.zero_shot(
            self.model,
            tokenizer,
            self.cfg.model,
            test,
            self.cfg.data.labels,
            self.device,
            self.dtype,
            self.cfg.data.template,
            max_length=self.cfg.data.max_length,
        )
        if "why_not" in result:
            self.log(kind="baseline", name="zero-shot", why_not=result["why_not"])
            return
        rundir.atomic_write_jsonl(
            rundir.predictions_file(self.run_dir, "test", "zero_shot"),
            prediction_rows(test, result["probs"], self.cfg.data.labels),
        )
        self.log(
            kind="eval",
            split="test",
            stage="zero-shot",
            accuracy=accuracy(result["probs"], test),
            loss=None,
            n=len(test),
            seconds=round(time.time() - t0, 3),
            prompt=result["prompt"],
            words=result["words"],
        )


class StopRequest:
    """A stop asked for by the STOP file in the run folder (the app's Stop button), SIGTERM or Ctrl-C:
    check() raises Stopped (KeyboardInterrupt after Ctrl-C) at the next step; restore() puts the
    previous handlers back.

    Ctrl-C still raises KeyboardInterrupt at once, and is remembered too: a library that swallows it
    (an import inside a bare `except:` while the model loads) cannot make the run carry on to the end."""

    def __init__(self, run_dir: Path, ranks: dist.Ranks | None = None):
        self.run_dir = run_dir
        self.ranks = ranks or dist.Ranks()  # several processes agree, so all stop at the same step
        self.signalled = False
        self.interrupted = False
        self.previous = None
        if _main_thread():
            sigint = signal.getsignal(signal.SIGINT)  # ignored (a background job's) stays ignored
            own_int = self._on_sigint if sigint is signal.default_int_handler else sigint
            self.previous = (signal.signal(signal.SIGTERM, self._on_sigterm), signal.signal(signal.SIGINT, own_int))

    def _on_sigterm(self, signum, frame):
        self.signalled = True

    def _on_sigint(self, signum, frame):
        self.interrupted = True
        signal.default_int_handler(signum, frame)  # KeyboardInterrupt, as Python's own handler

    def check(self) -> None:
        if self.ranks.agree(self.signalled or self.interrupted or stop_requested(self.run_dir)):
            raise KeyboardInterrupt() if self.interrupted else Stopped()

    def restore(self) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous[0])
            signal.signal(signal.SIGINT, self.previous[1])


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()
