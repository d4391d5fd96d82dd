"""The data-parallel path on a GPU machine with one GPU (issue 13): the Phi-2-shaped benchmark
model trained by one process and by two processes sharing the GPU (gloo between them:
QLORA_STUDIO_DIST_BACKEND=gloo, as NCCL refuses two processes on one GPU), same global batch,
no dropout, with CUDA graphs, packing and the fused layers on. Compares the two runs' losses and
final adapters. Says nothing about speed.

    python3 -m bench.ddp_check --root /tmp/qlora-bench --out /tmp/ddp-check.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from bench.ours import run_config
from core.runs import rundir


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default="/tmp/qlora-bench")
    ap.add_argument("--out", default="/tmp/ddp-check.json")
    ap.add_argument("--rows", type=int, default=512)
    a = ap.parse_args()
    cfg = run_config(a.root, None, epochs=2, train_rows=a.rows)
    cfg = replace(
        cfg,
        preset="bench-ddp-check",
        lora=replace(cfg.lora, dropout=0.0),
        data=replace(cfg.data, max_validation_rows=128, max_test_rows=128),
        train=replace(cfg.train, batch_size=32, track_test=False),
    )
    result = {}
    runs = {}
    # p1: one process; p2: two processes (16 rows each a step); m16: one process in micro-batches
    # of 16 rows, the same split of each step without a second process: how far bf16 rounding alone
    # moves a run when only the batch's split changes (the yardstick for p2 vs p1)
    for n in (1, 2, "m16"):
        run_dir = Path(f"/tmp/ddp-check/p{n}")
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        path = run_dir.parent / f"p{n}.json"
        replace(
            cfg, train=replace(cfg.train, processes=2 if n == 2 else 1, micro_batch_size=16 if n == "m16" else None)
        ).save(path)
        t0 = time.time()
        proc = subprocess.run(
            [sys.executable, "-m", "core", "train", "--config", str(path), "--run-dir", str(run_dir)],
            capture_output=True,
            text=True,
            env={**os.environ, "QLORA_STUDIO_DIST_BACKEND": "gloo", "QLORA_STUDIO_RUNS": str(run_dir.parent)},
        )
        if proc.returncode != 0:
            print(proc.stdout[-3000:], proc.stderr[-5000:])
            result[f"p{n}"] = {"exit": proc.returncode, "stderr": proc.stderr[-2000:]}
            Path(a.out).write_text(json.dumps(result, indent=1))
            return 1
        recs = rundir.read_metrics(run_dir)
        end = recs["end"][0]
        runs[n] = run_dir
        result[f"p{n}"] = {
            "wall_s": round(time.time() - t0, 1),
            "world_size": recs["setup"][0]["world_size"],
            "speedups": recs["setup"][0]["speedups"],
            "cuda_graphs": recs["step"][-1]["cuda_graphs"],
            "losses": [round(r["loss"], 5) for r in recs["step"]],
            "val_accuracy": [r["val_accuracy"] for r in recs["epoch"]],
            "test_after": end.get("test_accuracy"),
            "replicas_identical": end.get("replicas_identical"),
            "peaks_per_process": end.get("peaks_per_process"),
            "state": end["state"],
        }
    from safetensors.torch import load_file

    a1 = load_file(str(runs[1] / "checkpoints/epoch-2/adapter_model.safetensors"))
    a2 = load_file(str(runs[2] / "checkpoints/epoch-2/adapter_model.safetensors"))
    am = load_file(str(runs["m16"] / "checkpoints/epoch-2/adapter_model.safetensors"))

    def rel(x: dict) -> float:
        return max(float((x[k].float() - a1[k].float()).norm() / (a1[k].float().norm() + 1e-12)) for k in a1)

    l1, l2, lm = result["p1"]["losses"], result["p2"]["losses"], result["pm16"]["losses"]
    result["adapter_max_relative_difference"] = rel(a2)  # ||two - one|| / ||one||, worst tensor
    result["adapter_max_relative_difference_micro16"] = rel(am)  # the same for one process, micro 16
    result["loss_max_abs_difference"] = max(abs(x - y) for x, y in zip(l1, l2))
    result["loss_max_abs_difference_micro16"] = max(abs(x - y) for x, y in zip(l1, lm))
    Path(a.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if not k.startswith("p")}, indent=1))
    print("losses one:", l1[:5], "...", l1[-3:])
    print("losses two:", l2[:5], "...", l2[-3:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
