"""One command: build the assets, run the reference and ours on the same GPU, print the table.

    python -m bench.run [--root /tmp/qlora-bench] [--ref-train-rows 240] [--out bench/out]

Each part runs in its own process (clean peak-memory figures). Writes <out>/*.json and
<out>/table.md. The reference's full-experiment time is extrapolated from its measured rates
unless --ref-train-rows 1000 --ref-epochs 5 (about 6 minutes on an H200).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def sh(args: list[str], log: Path, env: dict | None = None) -> float:
    """Run one part; returns its process wall time (Python start and imports included)."""
    print("$", " ".join(f"{k}={v}" for k, v in (env or {}).items()), " ".join(args), flush=True)
    t0 = time.time()
    with open(log, "a") as f:
        p = subprocess.run(
            args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})}
        )
        f.write(p.stdout)
    wall = time.time() - t0
    tail = p.stdout.strip().splitlines()[-3:]
    print("\n".join(t[:400] for t in tail), f"[rc {p.returncode}, {wall:.1f} s]", flush=True)
    return wall


def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def table(ref: dict | None, rows: list[dict]) -> str:
    head = (
        "| run | pairs/s | real tokens/s | MFU | peak GiB | eval pairs/s | total s | process s "
        "| x ref pairs/s | x ref eval | x ref total |"
    )
    lines = [head, "|" + "---|" * 11]
    for r in ([ref] if ref else []) + rows:

        def ratio(k: str, inv: bool = False, r: dict = r) -> str:
            if not (ref and r.get(k) and ref.get(k)):
                return "-"
            return fmt((ref[k] / r[k]) if inv else (r[k] / ref[k]), ".1f")

        lines.append(
            f"| {r['name']} | {fmt(r.get('pairs_per_s'), '.1f')} | {fmt(r.get('real_tokens_per_s'), '.0f')} | "
            f"{fmt(r.get('mfu'), '.1%')} | {fmt(r.get('peak_gib'), '.2f')} | {fmt(r.get('eval_pairs_per_s'), '.0f')} | "
            f"{fmt(r.get('total_s'), '.1f')}{'*' if r.get('total_s_is_extrapolated') else ''} | "
            f"{fmt(r.get('process_s'), '.1f')} | "
            f"{ratio('pairs_per_s')} | {ratio('eval_pairs_per_s')} | {ratio('total_s', inv=True)} |"
        )
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default="/tmp/qlora-bench")
    ap.add_argument("--out", default="bench/out")
    ap.add_argument("--ref-train-rows", type=int, default=240)
    ap.add_argument("--ref-epochs", type=int, default=1)
    ap.add_argument(
        "--skip",
        default="",
        help="comma list of parts to skip: ref,ours,nobudget,sweep,fp16,eval; all: only rebuild the table from --out",
    )
    ap.add_argument(
        "--variants",
        nargs="*",
        default=[],
        help="more runs of our experiment, each NAME:VAR=VALUE[,VAR=VALUE...] (environment switches)",
    )
    ap.add_argument("--sweep-batches", default="32,64,128,256,512")
    ap.add_argument("--profile-batch", default="32,256")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "bench.log"
    skip = set(filter(None, a.skip.split(",")))
    py = sys.executable
    t0 = time.time()
    if skip != {"all"}:
        sh([py, "-m", "bench.assets", a.root], log)
        # Import everything once first, so that every timed process starts as on a machine that has
        # run Python before (a fresh GPU image without bytecode caches compiles ~8 s of imports;
        # set PYTHONPYCACHEPREFIX where site-packages is read-only).
        sh(
            [
                py,
                "-c",
                "import core.train, core.model, core.speed.qlinear, core.speed.rope, peft, bitsandbytes, transformers; "
                "from transformers import AutoModelForSequenceClassification, Trainer",
            ],
            log,
        )
    parts = {
        "ref": [
            py,
            "-m",
            "bench.reference",
            a.root,
            "--train-rows",
            str(a.ref_train_rows),
            "--epochs",
            str(a.ref_epochs),
            "--out",
            str(out / "reference.json"),
        ],
        "ours": [
            py,
            "-m",
            "bench.ours",
            "experiment",
            a.root,
            "--micro",
            "32",
            "--out",
            str(out / "ours.json"),
            "--keep-metrics",
            str(out / "ours.metrics.jsonl"),
        ],
        "nobudget": [
            py,
            "-m",
            "bench.ours",
            "experiment",
            a.root,
            "--micro",
            "32",
            "--out",
            str(out / "ours_nobudget.json"),
        ],
        "sweep": [
            py,
            "-m",
            "bench.ours",
            "sweep",
            a.root,
            "--profile",
            "--batches",
            a.sweep_batches,
            "--profile-batch",
            a.profile_batch,
            "--out",
            str(out / "sweep.json"),
        ],
        "eval": [py, "-m", "bench.ours", "eval", a.root, "--out", str(out / "eval.json")],
        "fp16": [py, "-m", "bench.ours", "fp16", a.root, "--out", str(out / "fp16.json")],
    }
    envs = {"nobudget": {"QLORA_MICRO_TOKENS": "0"}, "sweep": {"QLORA_MICRO_TOKENS": "0"}}
    variants = []
    for v in a.variants:
        name, _, assigns = v.partition(":")
        variants.append(name)
        parts[name] = [
            py,
            "-m",
            "bench.ours",
            "experiment",
            a.root,
            "--micro",
            "32",
            "--out",
            str(out / f"variant_{name}.json"),
            "--keep-metrics",
            str(out / f"variant_{name}.metrics.jsonl"),
        ]
        envs[name] = dict(kv.split("=", 1) for kv in assigns.split(",") if kv)
    walls = {}
    for name, cmd in parts.items():
        if name not in skip and "all" not in skip:
            walls[name] = sh(cmd, log, envs.get(name))

    def read(n: str) -> dict | None:
        return json.loads((out / n).read_text()) if (out / n).is_file() else None

    ref = read("reference.json")
    rows = []
    for part, n in (
        ("ours", "ours.json"),
        ("nobudget", "ours_nobudget.json"),
        *((v, f"variant_{v}.json") for v in variants),
    ):
        r = read(n)
        if r:
            r["process_s"] = walls.get(part)
            if part == "nobudget":
                r["name"] += ", no token budget"
            elif part in variants:
                r["name"] += ", " + " ".join(f"{k}={v}" for k, v in envs[part].items())
            rows.append(r)
    sw = read("sweep.json")
    if sw:
        best = max(sw["sweep"], key=lambda r: r["real_tokens_per_s"])
        rows.append(
            {
                "name": f"ours, train only, best batch {best['batch']}",
                **{k: best[k] for k in ("pairs_per_s", "real_tokens_per_s", "mfu", "peak_gib")},
            }
        )
    text = table(ref, rows)
    if sw:
        text += "\n\nbatch sweep (train steps only, CUDA graphs, bf16):\n" + "\n".join(
            f"- batch {r['batch']}: {r['pairs_per_s']:.0f} pairs/s, {r['real_tokens_per_s']:.0f} tokens/s, "
            f"MFU {fmt(r['mfu'], '.1%')}, {r['step_ms']:.1f} ms/step, peak {r['peak_gib']:.2f} GiB"
            for r in sw["sweep"]
        )
    ev = read("eval.json")
    if ev:
        text += f"\n\nevaluation, test split ({ev['n']} pairs), best of 3 passes:\n" + "\n".join(
            f"- QLORA_EVAL_TOKENS={r['eval_tokens']}, {r.get('mode', 'eager')}: {r['pairs_per_s']:.0f} pairs/s, "
            f"peak {r['peak_gib']:.2f} GiB"
            for r in ev["budgets"]
        )
    fp = read("fp16.json")
    if fp:
        text += "\n\nfp16: " + json.dumps(
            {
                "losses_finite": fp["train_fp16"]["losses_finite"],
                "eval_losses_finite": fp["train_fp16"]["eval_losses_finite"],
                "stress": fp["stress"],
            }
        )
    text += f"\n\n(* extrapolated from the measured rates; bench wall {time.time() - t0:.0f} s)"
    (out / "table.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
