"""The training run: one function, top to bottom.

    python -m core train --preset demo                 # the CLI (see core/__main__.py)
    train(RunConfig(...), Path("runs/my-run"))         # the same thing from Python

Order of events: load data and model -> save the step-0 adapter (the "before" model) ->
evaluate it on validation and test -> for each epoch: train, evaluate validation, save the
adapter -> load the best epoch's adapter -> evaluate test once -> write the report.
Everything is written into the run folder as it happens (see core/rundir.py).
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import signal
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from . import packing, perf, rundir
from .config import RunConfig
from .data import batch_indices, collate, encode, load_splits
from .evaluate import accuracy, predict, prediction_rows
from .model import (AdapterSaver, add_lora, count_parameters, load_adapter_weights, load_model, load_tokenizer,
                    pick_compute_dtype, pick_device, resolve_pooling)
from .resources import ResourceSampler, hardware_info


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


def train(cfg: RunConfig, run_dir: Path) -> dict:
    """Run the whole experiment of `cfg` into `run_dir` and return the report."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.save(run_dir / rundir.CONFIG)
    metrics_path = run_dir / rundir.METRICS
    log = lambda **rec: rundir.append_jsonl(metrics_path, {"t": round(time.time(), 3), **rec})
    status = rundir.read_json(run_dir / rundir.STATUS, {}) or {}
    rundir.write_status(run_dir, state="running", pid=os.getpid(), phase="loading",
                        created_at=status.get("created_at") or rundir.now_iso(), started_at=rundir.now_iso(),
                        finished_at=None, error=None, step=0, total_steps=None, epoch=0)
    stop_signal = {"set": False}

    def on_sigterm(signum, frame):
        stop_signal["set"] = True
    previous_handler = signal.signal(signal.SIGTERM, on_sigterm) if _main_thread() else None

    def check_stop():
        if stop_signal["set"] or rundir.stop_requested(run_dir):
            raise Stopped()

    sampler = ResourceSampler(run_dir / rundir.RESOURCES).start()
    saver = None
    t_start = time.time()
    try:
        # --- setup --------------------------------------------------------------------------
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        seed_everything(cfg.train.seed)
        labels = cfg.data.labels
        splits, data_stats = load_splits(cfg.data, cfg.train.seed)
        timings = {"data_s": time.time() - t_start}
        device = pick_device(cfg.model.device)
        dtype = pick_compute_dtype(device, cfg.model.compute_dtype)
        tokenizer = load_tokenizer(cfg.model)
        pad_id = tokenizer.pad_token_id
        t_load = time.time()
        timings["tokenizer_s"] = t_load - t_start - timings["data_s"]
        seed_everything(cfg.train.seed)  # the new head and the LoRA matrices start from the seed
        model = load_model(cfg.model, len(labels), pad_id, device, dtype, id2label=dict(enumerate(labels)))
        model = add_lora(model, cfg.lora)
        tuned = perf.tune_model(model, dtype)  # fused GELU, 16-bit LayerNorm out, fp32 residual on fp16
        load_s = time.time() - t_load
        memory = perf.PeakMemory(device)
        load_peak_gb = memory.phase(in_overall=False)  # loading peaks apart (16-bit shards before quantising)
        t0 = time.time()
        encoded = {s: encode(ex, tokenizer, cfg.data) for s, ex in splits.items()}
        timings["encode_s"] = time.time() - t0
        steps_per_epoch = math.ceil(len(encoded["train"]) / cfg.train.batch_size)
        total_steps = steps_per_epoch * cfg.train.epochs
        params = count_parameters(model)
        t0 = time.time()
        hardware = hardware_info()
        timings["hardware_s"] = time.time() - t0
        log(kind="setup", device=str(device), compute_dtype=str(dtype).replace("torch.", ""),
            hardware=hardware, params=params, setup_s=round(time.time() - t_start, 3),
            timings={k: round(v, 3) for k, v in timings.items()}, data=data_stats, labels=labels,
            steps_per_epoch=steps_per_epoch, total_steps=total_steps, epochs=cfg.train.epochs,
            load_s=round(load_s, 3), load_peak_gb=load_peak_gb, model_type=model.config.model_type, speedups=tuned,
            pooling=resolve_pooling(cfg.model),
            target_modules=sorted(model.peft_config["default"].target_modules),
            mean_tokens={s: round(float(np.mean([len(e["input_ids"]) for e in v])), 1) for s, v in encoded.items()})
        ckpt_dir = run_dir / rundir.CHECKPOINTS
        # Validation is scored before training and after every epoch: its padded batches are captured
        # once as CUDA graphs and replayed. Test is scored twice, where a capture costs more than it
        # saves; packed evaluation runs a few large batches, which graphs do not speed up.
        eval_graphs = perf.EvalGraphs(device)
        graph_splits = {"validation"} if cfg.train.epochs >= 2 and not packing.enabled(model, device, dtype) else set()
        saver = AdapterSaver(model)  # later checkpoints are written while training goes on
        saver.save(ckpt_dir / "epoch-0")  # the "before" model, head initialisation included

        def evaluate(split: str, stage: str) -> tuple[np.ndarray, float, float]:
            rundir.write_status(run_dir, phase=f"evaluating {split} ({stage})")
            t0 = time.time()
            graphs = eval_graphs if split in graph_splits else None
            probs, loss = predict(model, encoded[split], cfg.train.eval_batch_size, pad_id, device, dtype,
                                  graphs=graphs)
            secs = time.time() - t0
            acc = accuracy(probs, splits[split])
            log(kind="eval", split=split, stage=stage, accuracy=acc, loss=loss, n=len(splits[split]),
                seconds=round(secs, 3), pairs_per_s=round(len(splits[split]) / max(secs, 1e-9), 1),
                peak_gb=memory.phase(), cuda_graphs=graphs is not None and eval_graphs.enabled,
                **({"graph_error": eval_graphs.error} if eval_graphs.error else {}))
            return probs, acc, loss

        # --- before ----------------------------------------------------------------------------
        check_stop()
        evaluate("validation", "before")
        check_stop()
        probs, _, _ = evaluate("test", "before")
        rundir.atomic_write_jsonl(run_dir / rundir.PREDICTIONS / "test_before.jsonl",
                                  prediction_rows(splits["test"], probs, labels))

        # --- train -----------------------------------------------------------------------------
        optimizer = make_optimizer(model, cfg, device)
        warmup = round(cfg.train.warmup_ratio * total_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(s, total_steps, warmup, cfg.train.schedule))
        scaler = torch.amp.GradScaler("cuda") if (device.type == "cuda" and dtype == torch.float16) else None
        trainable = [p for p in model.parameters() if p.requires_grad]
        stepper = perf.TrainStep(model, device, dtype, pad_id, scaler=scaler)  # CUDA graphs on GPU
        flops = perf.flops_info(model)
        peak = perf.peak_flops(device)
        stepper.zero_grad()
        micro = cfg.train.micro_batch_size or cfg.train.batch_size
        max_len = packing.max_len(encoded["train"])
        best = None  # the epoch with the highest validation accuracy (lower loss breaks ties)
        step = 0
        model.train()
        for epoch in range(1, cfg.train.epochs + 1):
            rundir.write_status(run_dir, phase="training", epoch=epoch, step=step, total_steps=total_steps)
            batches = batch_indices(encoded["train"], cfg.train.batch_size, shuffle=True,
                                    seed=cfg.train.seed * 1000 + epoch, bucket=cfg.train.length_bucketing)
            t_epoch = time.time()
            epoch_loss, epoch_rows = 0.0, 0
            launched = []  # steps sent to the device whose loss has not been read yet
            t_done = t_epoch
            for b, idx in enumerate(batches):
                check_stop()
                # sum of CE over rows / rows in the step: micro-batches of any size weigh each row once
                if stepper.packed:  # rows end to end, no padding (core/packing.py)
                    real_tokens, padded_tokens = stepper.run_packed(
                        [encoded["train"][i] for i in idx], step_rows=len(idx), max_rows=micro, max_len=max_len)
                else:
                    real_tokens, padded_tokens = 0, 0
                    for s in range(0, len(idx), micro):
                        batch = collate(encoded["train"], idx[s:s + micro], pad_id)
                        stepper.run(batch, step_rows=len(idx), rows=micro)
                        real_tokens += int(batch["attention_mask"].sum())
                        padded_tokens += len(batch["input_ids"]) * stepper.width(batch["input_ids"].shape[1])
                loss = stepper.take_loss_tensor()  # stays on the device: no wait here
                if scaler:
                    scaler.unscale_(optimizer)
                grad_norm = (torch.nn.utils.clip_grad_norm_(trainable, cfg.train.max_grad_norm)
                             if cfg.train.max_grad_norm else None)
                if scaler:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                stepper.zero_grad()  # in place: CUDA graphs accumulate into the same .grad tensors
                launched.append({"step": step + 1, "epoch_step": b + 1, "rows": len(idx),
                                 "values": perf.fetch_later(loss, grad_norm), "lr": scheduler.get_last_lr()[0],
                                 "real": real_tokens, "padded": padded_tokens})
                scheduler.step()
                step += 1
                # Log the previous step now that this one is queued behind it: the GPU keeps working
                # while Python reads, logs and collates the next batch (all of them at the epoch's end).
                while len(launched) > (0 if b + 1 == len(batches) else 1):
                    r = launched.pop(0)
                    step_loss, grad_norm = r["values"]()  # waits until the GPU has finished that step
                    now = time.time()
                    dt, t_done = now - t_done, now
                    epoch_loss += step_loss * r["rows"]
                    epoch_rows += r["rows"]
                    log(kind="step", step=r["step"], epoch=epoch, epoch_step=r["epoch_step"],
                        steps_per_epoch=len(batches), loss=step_loss, lr=r["lr"],
                        grad_norm=grad_norm if grad_norm is not None else float("nan"),
                        rows=r["rows"], samples_per_s=round(r["rows"] / dt, 2),
                        tokens_per_s=round(r["real"] / dt, 1),
                        mfu=perf.round_or_none(perf.mfu(perf.flops_per_token(flops, r["padded"] / r["rows"]),
                                                        r["real"] / dt, peak), 4),
                        cuda_graphs=stepper.graphs, pad_fraction=round(1 - r["real"] / r["padded"], 4),
                        step_s=round(dt, 4))
                    if r["step"] % 5 == 0 or r["epoch_step"] == len(batches):
                        rundir.write_status(run_dir, step=r["step"])
            epoch_s = time.time() - t_epoch
            train_peak_gb = memory.phase()
            check_stop()
            _, val_acc, val_loss = evaluate("validation", f"epoch-{epoch}")
            t_save = time.time()
            saver.save(ckpt_dir / f"epoch-{epoch}")  # a copy now, the file on a thread
            save_s = time.time() - t_save
            if best is None or (val_acc, -val_loss) > (best["val_accuracy"], -best["val_loss"]):
                best = {"epoch": epoch, "val_accuracy": val_acc, "val_loss": val_loss}
            log(kind="epoch", epoch=epoch, train_loss=epoch_loss / max(1, epoch_rows), val_accuracy=val_acc,
                val_loss=val_loss, epoch_s=round(epoch_s, 3), best_epoch=best["epoch"], train_peak_gb=train_peak_gb,
                graph_captures=stepper.captures, capture_s=round(stepper.capture_s, 3), save_s=round(save_s, 3),
                checkpoint=f"{rundir.CHECKPOINTS}/epoch-{epoch}")
            model.train()

        # --- after: the best epoch by validation, scored once on test ---------------------------------
        check_stop()
        saver.wait()
        load_adapter_weights(model, ckpt_dir / f"epoch-{best['epoch']}")
        probs, test_acc, _ = evaluate("test", "after")
        rundir.atomic_write_jsonl(run_dir / rundir.PREDICTIONS / "test_after.jsonl",
                                  prediction_rows(splits["test"], probs, labels))
        peaks = sampler.stop()
        memory.phase()
        if memory.overall is not None:
            peaks["torch_peak_gb"] = memory.overall  # the highest of the phases after loading
            # what torch holds from the driver, CUDA graphs' memory pools included
            peaks["torch_reserved_gb"] = round(torch.cuda.memory_reserved(device) / 2**30, 3)
        log(kind="end", state="done", total_s=round(time.time() - t_start, 3), best_epoch=best["epoch"],
            test_accuracy=test_acc, peaks=peaks)
        from .report import build_report
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
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)


def _main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()
