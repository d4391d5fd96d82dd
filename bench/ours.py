"""Our path on the benchmark assets: the app's own training loop (core.train.train), plus a
batch-size sweep for MFU, a profile, and an fp16 check.

    python -m bench.ours experiment ROOT --micro 32 --out ours.json   # the whole reference experiment
    python -m bench.ours sweep ROOT --out sweep.json                  # tokens/s and MFU per batch size, profile
    python -m bench.ours fp16 ROOT --out fp16.json                    # fp16 training stays finite (the T4 path)

Every command takes --arch (bench/assets.py's ARCHS; default phi2): the model of that shape under
ROOT, LoRA on that architecture's targets, the same rows and prompt (assets.TEMPLATE) for all.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path

import torch

from bench.assets import ARCHS, TEMPLATE, model_dir
from core.config import DataConfig, LoraSettings, ModelConfig, RunConfig, SpeedConfig, TrainConfig, speed_from_env
from core.runs import rundir
from core.speed import accounting
from core.speed.graphs import EvalGraphs
from core.speed.step import TrainStep
from core.speed.tune import tune_model

SPEED = speed_from_env(SpeedConfig())  # the QLORA_* overrides of a variant


def run_config(
    root: str,
    micro: int | None,
    dtype: str = "auto",
    epochs: int = 5,
    train_rows: int = 1000,
    eval_bs: int = 512,
    arch: str = "phi2",
    eval_rows: tuple[int, int] = (500, 1000),
    speed: SpeedConfig | None = None,
) -> RunConfig:
    """The benchmark's run: `arch`'s model under `root`, the prompt every script uses
    (assets.TEMPLATE), validation and test rows `eval_rows`."""
    return RunConfig(
        preset="bench",
        model=ModelConfig(name=str(model_dir(root, arch)), compute_dtype=dtype),
        data=DataConfig(
            source="files",
            train=f"{root}/data/train.jsonl",
            validation=f"{root}/data/validation.jsonl",
            test=f"{root}/data/test.jsonl",
            max_train_rows=train_rows,
            max_validation_rows=eval_rows[0],
            max_test_rows=eval_rows[1],
            max_length=128,
            template=TEMPLATE,
        ),
        lora=LoraSettings(r=16, alpha=32, dropout=0.05, target_modules=ARCHS[arch]["targets"]),
        speed=speed or SpeedConfig(),
        train=TrainConfig(
            epochs=epochs,
            lr=2e-4,
            batch_size=32,
            micro_batch_size=micro,
            schedule="linear",
            warmup_ratio=0.06,
            seed=0,
            eval_batch_size=eval_bs,
            # a test pass after every epoch (learning dynamics) costs time: BENCH_TRACK_TEST=0 skips it
            track_test=os.environ.get("BENCH_TRACK_TEST", "1") != "0",
        ),
    )


def summarise(run_dir: Path) -> dict:
    recs = rundir.read_metrics(run_dir)
    setup = recs["setup"][0]
    steps, epochs = recs["step"], recs["epoch"]
    steady = [r for r in steps if r["epoch"] >= 2] or steps
    dt = sum(r["step_s"] for r in steady)
    rows = sum(r["rows"] for r in steady)
    toks = sum(r["tokens_per_s"] * r["step_s"] for r in steady)
    mfus = [r.get("mfu") for r in steady]
    evals = recs["eval"]
    val_after = [r for r in evals if r["split"] == "validation" and r["stage"].startswith("epoch-")]
    end = recs["end"][0]
    return {
        "pairs_per_s": rows / dt,
        "pairs_per_s_all_steps": sum(r["rows"] for r in steps) / sum(r["step_s"] for r in steps),
        "real_tokens_per_s": toks / dt,
        "mfu": (sum(m * r["step_s"] for m, r in zip(mfus, steady)) / dt) if all(m is not None for m in mfus) else None,
        "eval_pairs_per_s": sum(r["n"] for r in val_after) / sum(r["seconds"] for r in val_after),
        "eval_pairs_per_s_all": sum(r["n"] for r in evals) / sum(r["seconds"] for r in evals),
        "peak_gib": (end.get("peaks") or {}).get("torch_peak_gb"),
        "reserved_gib": (end.get("peaks") or {}).get("torch_reserved_gb"),
        "eval_graphs": evals[-1].get("cuda_graphs") if evals else None,
        "eval_graph_error": next((r["graph_error"] for r in evals if r.get("graph_error")), None),
        "setup_s": setup.get("setup_s"),
        "setup_timings": setup.get("timings"),
        "total_s": end["total_s"],
        "load_s": setup["load_s"],
        "load_peak_gib": setup.get("load_peak_gb"),
        "state": end["state"],
        "cuda_graphs": steps[-1].get("cuda_graphs"),
        "speedups": setup.get("speedups"),
        "mean_tokens": setup.get("mean_tokens"),
        "test_accuracy": end.get("test_accuracy"),
        "losses_finite": all(math.isfinite(r["loss"]) for r in steps),
        "eval_losses_finite": all(math.isfinite(r["loss"]) for r in evals),
        "first_losses": [round(r["loss"], 4) for r in steps[:3]],
        "last_losses": [round(r["loss"], 4) for r in steps[-3:]],
        "epoch_s": [r["epoch_s"] for r in epochs],
        "train_peak_gib": max((r.get("train_peak_gb") or 0 for r in epochs), default=None),
        "eval_peak_gib": max((r.get("peak_gb") or 0 for r in evals), default=None),
        "eval_s": sum(r["seconds"] for r in evals),
        "save_s": sum(r.get("save_s") or 0 for r in epochs),
        "capture_s": epochs[-1].get("capture_s") if epochs else None,
        "graph_captures": epochs[-1].get("graph_captures") if epochs else None,
    }


def experiment(a) -> dict:
    from core.train import train

    run_dir = Path(a.run_dir or f"/tmp/ours-{a.arch}-{a.micro}-{a.dtype}")
    shutil.rmtree(run_dir, ignore_errors=True)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    cfg = run_config(a.root, a.micro, a.dtype, a.epochs, a.train_rows, a.eval_bs, a.arch, (a.val_rows, a.test_rows))
    train(cfg, run_dir)
    out = {"name": f"ours (batch 32, micro {a.micro}, {a.dtype})", "arch": a.arch, **summarise(run_dir)}
    if a.keep_metrics:
        shutil.copy(run_dir / "metrics.jsonl", a.keep_metrics)
    return out


def load(root: str, dtype=torch.bfloat16, arch: str = "phi2"):
    from core.model import add_lora, load_model, load_tokenizer

    cfg = run_config(root, None, arch=arch)
    tok = load_tokenizer(cfg.model)
    torch.manual_seed(0)
    model = load_model(cfg.model, 3, tok.pad_token_id, torch.device("cuda", 0), dtype)
    model = add_lora(model, cfg.lora)
    tune_model(model, dtype, SPEED)
    return cfg, tok, model


def step_fn(stepper, enc, params, opt, bs):
    """One optimiser step over the rows `idx` of `enc`, as core.train's loop runs it (packed where
    the stepper packs; no wait for the loss), returning (real tokens, tokens processed)."""

    def one(idx):
        real, processed = stepper.forward_backward([enc[i] for i in idx], micro=bs)
        stepper.take_loss_tensor()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        stepper.zero_grad()
        return real, processed

    return one


def sweep(a) -> dict:
    from core.data import batch_indices, encode, load_splits

    cfg, tok, model = load(a.root, arch=a.arch)
    dev = torch.device("cuda", 0)
    splits, _ = load_splits(cfg.data, 0)
    enc = encode(splits["train"], tok, cfg.data)
    info = accounting.flops_info(model)
    peak = accounting.peak_flops(dev)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=True)
    model.train()
    results = []
    for bs in [int(x) for x in a.batches.split(",")]:
        stepper = TrainStep(model, dev, torch.bfloat16, tok.pad_token_id, SPEED, data=enc)
        stepper.zero_grad()
        batches = batch_indices(enc, bs, shuffle=True, seed=1, bucket=True)
        batches = [b for b in batches if len(b) == bs] or batches
        torch.cuda.reset_peak_memory_stats()
        one = step_fn(stepper, enc, params, opt, bs)
        # capture every shape first (warm-up), then time a pass over the same batches
        for idx in batches:
            one(idx)
        torch.cuda.synchronize()
        reps = max(1, math.ceil(a.min_steps / len(batches)))
        t0 = time.time()
        real = padded_rows_w = rows = 0
        for _ in range(reps):
            for idx in batches:
                r, p = one(idx)
                real += r
                padded_rows_w += p
                rows += len(idx)
        torch.cuda.synchronize()
        dt = time.time() - t0
        f = accounting.flops_per_token(info, padded_rows_w / rows)
        r = {
            "batch": bs,
            "pairs_per_s": rows / dt,
            "real_tokens_per_s": real / dt,
            "mfu": accounting.mfu(f, real / dt, peak),
            "step_ms": 1000 * dt / (reps * len(batches)),
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
            "graphs": stepper.graphs,
            "captures": stepper.captures,
            "graph_error": stepper.graph_error,
            "packed": stepper.packed,
            "pad_fraction": 1 - real / padded_rows_w,
        }
        print(json.dumps(r), flush=True)
        results.append(r)
        del stepper
        torch.cuda.empty_cache()
    out = {"flops_info": info, "peak_flops": peak, "sweep": results}
    if a.profile:
        out["profile"] = {}
        for i, bs in enumerate(int(x) for x in str(a.profile_batch).split(",")):
            modes = ("eager", "graphs") if i == 0 else ("graphs",)
            out["profile"][str(bs)] = profile(model, enc, tok.pad_token_id, params, opt, bs, modes)
    return out


def profile(model, enc, pad_id, params, opt, bs, modes=("eager", "graphs")) -> dict:
    """Where a step's time goes, eager and with CUDA graphs: wall vs summed GPU kernel time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    from core.data import batch_indices

    dev = torch.device("cuda", 0)
    batches = [b for b in batch_indices(enc, bs, shuffle=True, seed=2, bucket=True) if len(b) == bs][:6]
    out = {}
    for mode in modes:
        stepper = TrainStep(model, dev, torch.bfloat16, pad_id, replace(SPEED, cuda_graphs=mode == "graphs"), data=enc)
        stepper.zero_grad()
        one = step_fn(stepper, enc, params, opt, bs)
        for idx in batches:
            one(idx)
        torch.cuda.synchronize()
        with tprofile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            t0 = time.time()
            for idx in batches:
                one(idx)
            torch.cuda.synchronize()
            wall = time.time() - t0
        ev = prof.key_averages()
        gpu_us = sum(e.self_device_time_total for e in ev if e.device_type == torch.autograd.DeviceType.CUDA)
        kernels = sum(e.count for e in ev if e.device_type == torch.autograd.DeviceType.CUDA)
        top = sorted(
            (e for e in ev if e.device_type == torch.autograd.DeviceType.CUDA), key=lambda e: -e.self_device_time_total
        )[:25]
        out[mode] = {
            "batch": bs,
            "steps": len(batches),
            "wall_ms_per_step": 1000 * wall / len(batches),
            "gpu_kernel_ms_per_step": gpu_us / 1000 / len(batches),
            "kernels_per_step": kernels / len(batches),
            "top_kernels": [
                {
                    "name": e.key[:90],
                    "ms_per_step": e.self_device_time_total / 1000 / len(batches),
                    "count_per_step": e.count / len(batches),
                }
                for e in top
            ],
        }
        print(json.dumps({k: v for k, v in out[mode].items() if k != "top_kernels"}), flush=True)
        del stepper
    return out


def eval_speed(a) -> dict:
    """Evaluation throughput (pairs/s) and peak memory per speed.eval_tokens budget, on the test
    split (1,000 pairs), after one warm-up pass; plus a profile of one pass at the first budget."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    from core.data import encode, load_splits
    from core.evaluate import predict

    cfg, tok, model = load(a.root, arch=a.arch)
    dev = torch.device("cuda", 0)
    splits, _ = load_splits(cfg.data, 0)
    enc = encode(splits["test"], tok, cfg.data)
    out = {"n": len(enc), "budgets": []}
    for budget in [int(x) for x in a.eval_tokens.split(",")]:
        speed = replace(SPEED, eval_tokens=budget)
        for mode in ("eager", "graphs"):
            graphs = EvalGraphs(dev) if mode == "graphs" else None
            predict(model, enc, 1024, tok.pad_token_id, dev, torch.bfloat16, graphs=graphs, speed=speed)  # warm-up
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated() / 2**30
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                predict(model, enc, 1024, tok.pad_token_id, dev, torch.bfloat16, graphs=graphs, speed=speed)
                times.append(time.perf_counter() - t0)
            r = {
                "eval_tokens": budget,
                "mode": mode,
                "pairs_per_s": len(enc) / min(times),
                "seconds": times,
                "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
                "resident_gib": base,
                "reserved_gib": torch.cuda.memory_reserved() / 2**30,
                "graph_error": graphs.error if graphs else None,
            }
            print(json.dumps(r), flush=True)
            out["budgets"].append(r)
            del graphs
    speed = replace(SPEED, eval_tokens=int(a.eval_tokens.split(",")[0]))
    with tprofile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        predict(model, enc, 1024, tok.pad_token_id, dev, torch.bfloat16, speed=speed)
        wall = time.perf_counter() - t0
    ev = prof.key_averages()
    cuda = [e for e in ev if e.device_type == torch.autograd.DeviceType.CUDA]
    out["profile"] = {
        "wall_s": wall,
        "gpu_kernel_s": sum(e.self_device_time_total for e in cuda) / 1e6,
        "kernels": sum(e.count for e in cuda),
        "top_kernels": [
            {"name": e.key[:90], "ms": e.self_device_time_total / 1000, "count": e.count}
            for e in sorted(cuda, key=lambda e: -e.self_device_time_total)[:25]
        ],
    }
    print(json.dumps({k: v for k, v in out["profile"].items() if k != "top_kernels"}), flush=True)
    return out


def fp16(a) -> dict:
    """Train and evaluate in float16 as on a T4 (GradScaler, CUDA graphs, padded batches: no
    FlashAttention varlen on Turing, and no Triton rotary): every loss finite? Also a stress case:
    hidden states pushed past fp16's range by scaling the embedding, where an fp16 residual stream
    overflows and our fp32 residual stream (tune_model on fp16) does not."""
    from core.train import train

    run_dir = Path(f"/tmp/ours-fp16-{a.arch}")
    shutil.rmtree(run_dir, ignore_errors=True)
    t4 = SpeedConfig(pack="off", triton_rotary=False)
    cfg = run_config(a.root, None, "float16", 1, min(a.train_rows, 256), arch=a.arch, eval_rows=(128, 128), speed=t4)
    train(cfg, run_dir)
    out = {"arch": a.arch, "train_fp16": summarise(run_dir)}
    cfg, tok, model = load(a.root, torch.float16, a.arch)  # tuned: fp32 embedding
    ids = torch.randint(5, 20000, (8, 32), device="cuda")
    res = {}
    model.eval()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
        emb = model.get_input_embeddings()
        for scale in (1.0, 5e6):
            w0 = emb.weight.data.clone()
            emb.weight.data.mul_(scale)
            tuned = model(input_ids=ids).logits.float()
            emb.weight.data = emb.weight.data.half()  # the plain layout: fp16 embedding, fp16 residual
            plain = model(input_ids=ids).logits.float()
            emb.weight.data = w0
            res[f"embedding_x{scale:g}"] = {
                "fp32_residual_finite": bool(torch.isfinite(tuned).all()),
                "fp16_residual_finite": bool(torch.isfinite(plain).all()),
            }
    out["stress"] = res
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("cmd", choices=["experiment", "sweep", "fp16", "eval"])
    ap.add_argument("root")
    ap.add_argument("--arch", default="phi2", choices=sorted(ARCHS))
    ap.add_argument("--val-rows", type=int, default=500)
    ap.add_argument("--test-rows", type=int, default=1000)
    ap.add_argument("--micro", type=int, default=None)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--train-rows", type=int, default=1000)
    ap.add_argument("--eval-bs", type=int, default=512)
    ap.add_argument("--run-dir", default=None)
    ap.add_argument("--batches", default="32,64,128,256,512")
    ap.add_argument("--min-steps", type=int, default=12)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--profile-batch", default="32", help="comma list; eager vs graphs at the first")
    ap.add_argument("--eval-tokens", default="16384,32768")
    ap.add_argument("--keep-metrics", default=None, help="copy the run's metrics.jsonl here")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    out = {"experiment": experiment, "sweep": sweep, "fp16": fp16, "eval": eval_speed}[a.cmd](a)
    print(json.dumps(out)[:3000])
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        json.dump(out, open(a.out, "w"), indent=1)


if __name__ == "__main__":
    main()
