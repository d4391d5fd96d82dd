"""Seed study on the shared SNLI sample (GPU, float32, as bench/sweep/snli.py): the demo recipe
(mean pooling, lr 1e-3, head 3e-3, no LoRA dropout, 4 epochs) vs the plain recipe ([CLS], lr 5e-4
constant, LoRA dropout 0.05, 4 epochs), six seeds each."""
import json, os, subprocess, sys, time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
root = Path(__file__).resolve().parents[2] / ".sweep"  # made by bench/sweep/prepare.sh
out = Path(os.environ.get("OUT", "/tmp/out"))
base = ["-m", "core", "train", "--preset", "demo", "--model", str(root / "model"), "--device", "cuda",
        "--compute-dtype", "float32", "--train", str(root / "data/train.jsonl"),
        "--validation", str(root / "data/validation.jsonl"), "--test", str(root / "data/test.jsonl")]
C = {
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
}
def one(name):
    t = time.time()
    p = subprocess.run([sys.executable] + base + C[name].split() + ["--run-dir", f"/tmp/sw/{name}"],
                       capture_output=True, text=True)
    wall = time.time() - t
    m = [json.loads(l) for l in open(f"/tmp/sw/{name}/metrics.jsonl")] if os.path.exists(f"/tmp/sw/{name}/metrics.jsonl") else []
    vals = [round(r["val_accuracy"], 3) for r in m if r.get("kind") == "epoch"]
    end = [r for r in m if r.get("kind") == "end"]
    res = {"name": name, "rc": p.returncode, "wall": round(wall, 1), "val": vals,
           "best_epoch": end[-1].get("best_epoch") if end else None,
           "test_after": end[-1].get("test_accuracy") if end else None, "err": p.stderr[-400:] if p.returncode else ""}
    print(json.dumps(res), flush=True)
    return res
with ThreadPoolExecutor(int(os.environ.get("WORKERS", 6))) as ex:
    results = list(ex.map(one, C))
out.mkdir(parents=True, exist_ok=True)
(out / "seeds.json").write_text(json.dumps(results, indent=1))
for r in sorted(results, key=lambda r: -(max(r["val"]) if r["val"] else 0)):
    print(f"{r['name']:28s} val_best {max(r['val']) if r['val'] else None}  test {r['test_after']}  ep {r['best_epoch']}  vals {r['val']}  {r['wall']}s")
