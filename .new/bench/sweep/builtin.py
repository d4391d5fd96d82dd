"""Demo-recipe sweep on the built-in sample, and a batch-16 check with and without CUDA graphs
(same preparation as bench/sweep/snli.py)."""

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

root = Path(__file__).resolve().parents[2] / ".sweep"  # made by bench/sweep/prepare.sh
repo = root.parent
common = [
    "-m",
    "core",
    "train",
    "--preset",
    "demo",
    "--model",
    str(root / "model"),
    "--device",
    "cuda",
    "--compute-dtype",
    "float32",
    "--pooling",
    "mean",
]
snli = [
    "--train",
    str(root / "data/train.jsonl"),
    "--validation",
    str(root / "data/validation.jsonl"),
    "--test",
    str(root / "data/test.jsonl"),
]
C = {
    "b_lr1e-3_ep4": ("--lr 1e-3 --head-lr 3e-3 --epochs 4", None, {}),
    "b_lr1e-3_ep6": ("--lr 1e-3 --head-lr 3e-3 --epochs 6", None, {}),
    "b_lr2e-3_ep4": ("--lr 2e-3 --head-lr 3e-3 --epochs 4", None, {}),
    "b_lr2e-3_ep6": ("--lr 2e-3 --head-lr 1e-2 --epochs 6", None, {}),
    "b_lr1e-3_ep4_bs16": ("--lr 1e-3 --head-lr 3e-3 --epochs 4 --batch-size 16", None, {}),
    "b_lr1e-3_ep8": ("--lr 1e-3 --head-lr 3e-3 --epochs 8", None, {}),
    "b_lr1e-3_ep4_s1": ("--lr 1e-3 --head-lr 3e-3 --epochs 4 --seed 1", None, {}),
    "b_lr1e-3_ep6_wu0": ("--lr 1e-3 --head-lr 3e-3 --epochs 6 --warmup-ratio 0", None, {}),
    "s_bs16_graphs": ("--lr 7e-4 --head-lr 2e-3 --epochs 2 --batch-size 16 --max-train-rows 1500", snli, {}),
    "s_bs16_nographs": (
        "--lr 7e-4 --head-lr 2e-3 --epochs 2 --batch-size 16 --max-train-rows 1500",
        snli,
        {"QLORA_CUDA_GRAPHS": "0"},
    ),
    "s_bs32_graphs": ("--lr 7e-4 --head-lr 2e-3 --epochs 2 --batch-size 32 --max-train-rows 1500", snli, {}),
    "s_bs32_mb16_graphs": (
        "--lr 7e-4 --head-lr 2e-3 --epochs 2 --batch-size 32 --micro-batch-size 16 --max-train-rows 1500",
        snli,
        {},
    ),
}


def one(name):
    args, data, env = C[name]
    t = time.time()
    p = subprocess.run(
        [sys.executable] + common + args.split() + (data or []) + ["--run-dir", f"/tmp/sw/{name}"],
        capture_output=True,
        text=True,
        cwd=repo,
        env={**os.environ, **env},
    )
    m = (
        [json.loads(l) for l in open(f"/tmp/sw/{name}/metrics.jsonl")]
        if os.path.exists(f"/tmp/sw/{name}/metrics.jsonl")
        else []
    )
    vals = [round(r["val_accuracy"], 3) for r in m if r.get("kind") == "epoch"]
    losses = [round(r["train_loss"], 3) for r in m if r.get("kind") == "epoch"]
    end = [r for r in m if r.get("kind") == "end"]
    before = [r["accuracy"] for r in m if r.get("kind") == "eval" and r["split"] == "test" and r["stage"] == "before"]
    res = {
        "name": name,
        "rc": p.returncode,
        "wall": round(time.time() - t, 1),
        "val": vals,
        "train_loss": losses,
        "best_epoch": end[-1].get("best_epoch") if end else None,
        "test_before": before[0] if before else None,
        "test_after": end[-1].get("test_accuracy") if end else None,
        "err": p.stderr[-400:] if p.returncode else "",
    }
    print(json.dumps(res), flush=True)
    return res


with ThreadPoolExecutor(6) as ex:
    results = list(ex.map(one, C))
out = Path(os.environ.get("OUT", "/tmp/out"))
out.mkdir(parents=True, exist_ok=True)
(out / "sweep_builtin.json").write_text(json.dumps(results, indent=1))
