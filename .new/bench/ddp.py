"""Data-parallel weak scaling (issue 13): the Phi-2-shaped benchmark model at a fixed batch per
GPU, on 1 GPU and on N GPUs, through the user's own command.

    BENCH_TRAIN_ROWS=6144 python3 -m bench.assets /tmp/qlora-bench
    python3 -m bench.ddp --root /tmp/qlora-bench --gpus 1,2 --per-gpu 32,128,256 --out /tmp/ddp

Each case is `python -m core train --config CASE.json --run-dir RUN --nproc G` (G > 1: the CLI
starts torchrun itself), the global batch being G x the per-GPU batch, 2 epochs over all training
rows (>= 12 steps an epoch at 2 x 256), validation and test cut to 256 rows, no per-epoch test
pass. Pairs/s and MFU come from the step records of epoch 2 (MFU against G x one GPU's peak),
peak memory per process from the run's end record. Writes OUT/CASE.json files and OUT/table.md.
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


def case_config(root: str, gpus: int, per_gpu: int):
    cfg = run_config(root, None, epochs=2, train_rows=None)
    return replace(
        cfg,
        preset="bench-ddp",
        data=replace(cfg.data, max_validation_rows=256, max_test_rows=256),
        train=replace(cfg.train, batch_size=per_gpu * gpus, track_test=False, processes=gpus),
    )


def summarise(run_dir: Path, gpus: int, per_gpu: int, wall: float) -> dict:
    recs = rundir.read_metrics(run_dir)
    steady = [r for r in recs["step"] if r["epoch"] >= 2]
    dt = sum(r["step_s"] for r in steady)
    end = recs["end"][0]
    each = end.get("peaks_per_process") or [end.get("peaks") or {}]
    mfus = [r.get("mfu") for r in steady]
    return {
        "gpus": gpus,
        "per_gpu_batch": per_gpu,
        "global_batch": per_gpu * gpus,
        "world_size": recs["setup"][0].get("world_size"),
        "steps": len(steady),
        "pairs_per_s": round(sum(r["rows"] for r in steady) / dt, 1),
        "mfu": round(sum(m * r["step_s"] for m, r in zip(mfus, steady)) / dt, 4) if all(mfus) else None,
        "peak_gib_per_gpu": [p.get("torch_peak_gb") for p in each],
        "reserved_gib_per_gpu": [p.get("torch_reserved_gb") for p in each],
        "replicas_identical": end.get("replicas_identical"),
        "state": end["state"],
        "total_s": end["total_s"],
        "process_wall_s": round(wall, 1),
        "speedups": recs["setup"][0].get("speedups"),
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default="/tmp/qlora-bench")
    ap.add_argument("--gpus", default="1,2")
    ap.add_argument("--per-gpu", default="32,128,256")
    ap.add_argument("--out", default="/tmp/ddp")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for per_gpu in map(int, a.per_gpu.split(",")):
        for gpus in map(int, a.gpus.split(",")):
            name = f"g{gpus}-b{per_gpu}"
            run_dir = Path(f"/tmp/ddp-runs/{name}")
            shutil.rmtree(run_dir, ignore_errors=True)
            run_dir.parent.mkdir(parents=True, exist_ok=True)
            cfg_path = out / f"{name}.config.json"
            case_config(a.root, gpus, per_gpu).save(cfg_path)
            t0 = time.time()
            proc = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "core",
                    "train",
                    "--config",
                    str(cfg_path),
                    "--run-dir",
                    str(run_dir),
                    "--nproc",
                    str(gpus),
                ],
                capture_output=True,
                text=True,
                env={**os.environ, "QLORA_STUDIO_RUNS": str(run_dir.parent)},
            )
            wall = time.time() - t0
            if proc.returncode != 0:
                print(f"{name}: exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}", flush=True)
                rows.append({"gpus": gpus, "per_gpu_batch": per_gpu, "error": proc.stderr[-500:]})
                continue
            row = summarise(run_dir, gpus, per_gpu, wall)
            shutil.copy(run_dir / "metrics.jsonl", out / f"{name}.metrics.jsonl")
            (out / f"{name}.json").write_text(json.dumps(row, indent=1))
            rows.append(row)
            print(json.dumps(row), flush=True)
    base = {r["per_gpu_batch"]: r["pairs_per_s"] for r in rows if r.get("gpus") == 1 and "error" not in r}
    lines = [
        "| GPUs | batch per GPU | global batch | pairs/s | x 1 GPU | MFU | peak GiB per GPU (reserved) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['gpus']} | {r['per_gpu_batch']} | | failed | | | |")
            continue
        x = r["pairs_per_s"] / base[r["per_gpu_batch"]] if r["per_gpu_batch"] in base else None
        peaks = ", ".join(f"{p} ({q})" for p, q in zip(r["peak_gib_per_gpu"], r["reserved_gib_per_gpu"]))
        ratio = "" if x is None else f"{x:.2f}x"
        mfu = "" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        lines.append(
            f"| {r['gpus']} | {r['per_gpu_batch']} | {r['global_batch']} | {r['pairs_per_s']} | {ratio} | "
            f"{mfu} | {peaks} |"
        )
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
