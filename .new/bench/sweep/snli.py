"""Hyperparameter sweep of the demo recipe on the SNLI 1.0 sample (3,000 train rows), run on the
GPU machine in float32 (closest to the CPU's numerics), 6 runs at a time.

    bash bench/sweep/prepare.sh PATH/TO/snli_sample  # here: .sweep/ = model (fp16 copy, < 64 MiB), SNLI rows, slim bnb wheel
    # on the device, in the repo root, carrying .sweep:
    pip install --target /tmp/site .sweep/*.whl && PYTHONPATH=/tmp/site python3 bench/sweep/snli.py SET
    # SET: cls (first sweep), mean (second), seeds (six seeds of the chosen and the plain recipe)

Results of 2026-11-29 are in bench/sweeps-2026-11-29/; the choice is made on validation accuracy.
"""

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

root = Path(__file__).resolve().parents[2] / ".sweep"  # made by bench/sweep/prepare.sh
out = Path(os.environ.get("OUT", "/tmp/out"))
base = [
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
    "--train",
    str(root / "data/train.jsonl"),
    "--validation",
    str(root / "data/validation.jsonl"),
    "--test",
    str(root / "data/test.jsonl"),
]
SETS = {
    # first sweep: the model's own [CLS] pooler -> bench/sweeps-2026-11-29/snli_cls_pooling.json
    "cls": {
        "a1_lr1e-3_ep4_do05": "--pooling model --lr 1e-3 --head-lr 3e-3 --epochs 4 --lora-dropout 0.05",
        "lr1e-3_ep6_do05": "--pooling model --lr 1e-3 --head-lr 3e-3 --epochs 6 --lora-dropout 0.05",
        "lr1e-3_ep6_do0": "--pooling model --lr 1e-3 --head-lr 3e-3 --epochs 6 --lora-dropout 0",
        "lr1e-3_ep6_do0_s1": "--pooling model --lr 1e-3 --head-lr 3e-3 --epochs 6 --lora-dropout 0 --seed 1",
        "lr1e-3_ep6_do0_s2": "--pooling model --lr 1e-3 --head-lr 3e-3 --epochs 6 --lora-dropout 0 --seed 2",
        "lr1e-3_ep8_do0": "--pooling model --lr 1e-3 --head-lr 3e-3 --epochs 8 --lora-dropout 0",
        "lr7e-4_ep6_do0": "--pooling model --lr 7e-4 --head-lr 3e-3 --epochs 6 --lora-dropout 0",
        "lr1.5e-3_ep6_do0": "--pooling model --lr 1.5e-3 --head-lr 3e-3 --epochs 6 --lora-dropout 0",
        "lr2e-3_ep6_do0_wu1": "--pooling model --lr 2e-3 --head-lr 3e-3 --epochs 6 --lora-dropout 0 --warmup-ratio 0.1",
        "lr1e-3_ep6_do0_r32": "--pooling model --lr 1e-3 --head-lr 3e-3 --epochs 6 --lora-dropout 0 --lora-r 32 --lora-alpha 64",
        "lr1e-3_ep6_do0_cos": "--pooling model --lr 1e-3 --head-lr 3e-3 --epochs 6 --lora-dropout 0 --schedule cosine",
        "lr1e-3_ep6_do0_head1e-3": "--pooling model --lr 1e-3 --head-lr 1e-3 --epochs 6 --lora-dropout 0",
        "plain_lr5e-4_ep4": "--pooling model --lr 5e-4 --head-lr 5e-4 --epochs 4 --lora-dropout 0.05 --warmup-ratio 0 --schedule constant",
        "lr1e-3_ep5_do0_wd01": "--pooling model --lr 1e-3 --head-lr 3e-3 --epochs 5 --lora-dropout 0 --weight-decay 0.01",
        "lr1e-3_ep6_do10": "--pooling model --lr 1e-3 --head-lr 3e-3 --epochs 6 --lora-dropout 0.1",
        "lr1e-3_ep10_do0": "--pooling model --lr 1e-3 --head-lr 3e-3 --epochs 10 --lora-dropout 0",
        "lr2e-3_ep4_do0_r8": "--pooling model --lr 2e-3 --head-lr 3e-3 --epochs 4 --lora-dropout 0 --lora-r 8 --lora-alpha 16",
        "lr1e-3_ep6_do0_bs16": "--pooling model --lr 7e-4 --head-lr 2e-3 --epochs 6 --lora-dropout 0 --batch-size 16",
    },
    # second sweep: mean pooling -> snli_mean_pooling.json
    "mean": {
        "model_lr1e-3_ep6_do0": "--pooling model --lr 1e-3 --head-lr 3e-3 --epochs 6 --lora-dropout 0",
        "mean_lr1e-3_ep6_do0": "--pooling mean --lr 1e-3 --head-lr 3e-3 --epochs 6 --lora-dropout 0",
        "mean_lr1e-3_ep6_do0_s1": "--pooling mean --lr 1e-3 --head-lr 3e-3 --epochs 6 --lora-dropout 0 --seed 1",
        "mean_lr1e-3_ep6_do0_s2": "--pooling mean --lr 1e-3 --head-lr 3e-3 --epochs 6 --lora-dropout 0 --seed 2",
        "mean_lr1e-3_ep4_do0": "--pooling mean --lr 1e-3 --head-lr 3e-3 --epochs 4 --lora-dropout 0",
        "mean_lr7e-4_ep6_do0": "--pooling mean --lr 7e-4 --head-lr 3e-3 --epochs 6 --lora-dropout 0",
        "mean_lr1.5e-3_ep6_do0": "--pooling mean --lr 1.5e-3 --head-lr 3e-3 --epochs 6 --lora-dropout 0",
        "mean_lr2e-3_ep4_do0": "--pooling mean --lr 2e-3 --head-lr 3e-3 --epochs 4 --lora-dropout 0",
        "mean_lr1e-3_ep6_do05": "--pooling mean --lr 1e-3 --head-lr 3e-3 --epochs 6 --lora-dropout 0.05",
        "mean_lr5e-4_ep4_plain": "--pooling mean --lr 5e-4 --head-lr 5e-4 --epochs 4 --lora-dropout 0.05 --warmup-ratio 0 --schedule constant",
        "mean_lr1e-3_ep6_head1e-2": "--pooling mean --lr 1e-3 --head-lr 1e-2 --epochs 6 --lora-dropout 0",
        "mean_lr1e-3_ep5_do0": "--pooling mean --lr 1e-3 --head-lr 3e-3 --epochs 5 --lora-dropout 0",
    },
    # the seed study of the chosen recipe vs the plain one -> seeds.json
    "seeds": {
        "demo_s0": "--pooling mean --seed 0",
        "demo_s1": "--pooling mean --seed 1",
        "demo_s2": "--pooling mean --seed 2",
        "demo_s3": "--pooling mean --seed 3",
        "demo_s4": "--pooling mean --seed 4",
        "demo_s5": "--pooling mean --seed 5",
        "plain_s0": "--pooling model --lr 5e-4 --head-lr 5e-4 --epochs 4 --lora-dropout 0.05 --warmup-ratio 0 --schedule constant --seed 0",
        "plain_s1": "--pooling model --lr 5e-4 --head-lr 5e-4 --epochs 4 --lora-dropout 0.05 --warmup-ratio 0 --schedule constant --seed 1",
        "plain_s2": "--pooling model --lr 5e-4 --head-lr 5e-4 --epochs 4 --lora-dropout 0.05 --warmup-ratio 0 --schedule constant --seed 2",
        "plain_s3": "--pooling model --lr 5e-4 --head-lr 5e-4 --epochs 4 --lora-dropout 0.05 --warmup-ratio 0 --schedule constant --seed 3",
        "plain_s4": "--pooling model --lr 5e-4 --head-lr 5e-4 --epochs 4 --lora-dropout 0.05 --warmup-ratio 0 --schedule constant --seed 4",
        "plain_s5": "--pooling model --lr 5e-4 --head-lr 5e-4 --epochs 4 --lora-dropout 0.05 --warmup-ratio 0 --schedule constant --seed 5",
    },
}
which = sys.argv[1] if len(sys.argv) > 1 else "mean"
C = SETS[which]


def one(name):
    t = time.time()
    p = subprocess.run(
        [sys.executable] + base + C[name].split() + ["--run-dir", f"/tmp/sw/{name}"], capture_output=True, text=True
    )
    wall = time.time() - t
    m = (
        [json.loads(l) for l in open(f"/tmp/sw/{name}/metrics.jsonl")]
        if os.path.exists(f"/tmp/sw/{name}/metrics.jsonl")
        else []
    )
    vals = [round(r["val_accuracy"], 3) for r in m if r.get("kind") == "epoch"]
    end = [r for r in m if r.get("kind") == "end"]
    res = {
        "name": name,
        "rc": p.returncode,
        "wall": round(wall, 1),
        "val": vals,
        "best_epoch": end[-1].get("best_epoch") if end else None,
        "test_after": end[-1].get("test_accuracy") if end else None,
        "err": p.stderr[-400:] if p.returncode else "",
    }
    print(json.dumps(res), flush=True)
    return res


with ThreadPoolExecutor(int(os.environ.get("WORKERS", 6))) as ex:
    results = list(ex.map(one, C))
out.mkdir(parents=True, exist_ok=True)
(out / f"sweep-{which}.json").write_text(json.dumps(results, indent=1))
for r in sorted(results, key=lambda r: -(max(r["val"]) if r["val"] else 0)):
    print(
        f"{r['name']:28s} val_best {max(r['val']) if r['val'] else None}  test {r['test_after']}  ep {r['best_epoch']}  vals {r['val']}  {r['wall']}s"
    )
