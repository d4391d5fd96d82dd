"""One command: build the assets, run the reference and ours on the same GPU, print the table.

    python -m bench.run [--root /tmp/qlora-bench] [--ref-train-rows 240] [--out bench/out]
    python -m bench.run --arch phi2,llama3b,qwen1p5b,gemma3-1b [--parts ours,tuned,seed] --out bench/out

Each part runs in its own process (clean peak-memory figures). Writes <out>/*.json and
<out>/table.md. The reference's full-experiment time is extrapolated from its measured rates
unless --ref-train-rows 1000 --ref-epochs 5 (about 6 minutes on an H200).

With --arch (bench/assets.py's ARCHS), per architecture: its assets, then ours (core.train, batch
32), the tuned HF Trainer and the seed-like script (bench/reference.py), and with --parts sweep and
fp16 the batch sweep (MFU at the best batch) and the fp16 (T4 path) check, all on the same rows;
one table for all of them in <out>/families.md (family_table), read back from <out>/<arch>/*.json,
so a later call with other parts adds to it; --table-only runs nothing and only rebuilds that table
(from the folders of several GPU calls: bench/families_gpu.sh runs the parts there). Rows and
epochs are options (--rows, --epochs, --tuned-rows, --seed-rows, --eval-rows). On one H200
(2026-12-03, the defaults but --seed-rows 128 and --sweep-batches 128,512) an architecture took
170-225 s with all five parts and its assets, ours alone 35 s: two architectures a call.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench.assets import ARCHS


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


FAMILY_PARTS = ("ours", "tuned", "seed", "sweep", "fp16")
GOALS = [  # (figure, what it is, at least or at most, bound): the per-family issue's goals
    ("x_tuned", "x the tuned HF Trainer", ">=", 12.0),
    ("x_seed", "x the seed-like script", ">=", 40.0),
    ("best_mfu", "MFU at the best batch", ">=", 0.30),
    ("peak_x_seed", "peak memory / the seed-like script's", "<=", 1.6),
]


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def family_row(arch: str, r: dict) -> dict:
    """The figures of one architecture's table row from its parts' JSON (None where not run)."""
    ours, tuned, seed, sweep = (r.get(k) or {} for k in ("ours", "tuned", "seed", "sweep"))
    best = max(sweep.get("sweep") or [], key=lambda b: b.get("mfu") or 0.0, default={})
    not_packed = [c for c in ours.get("speedups") or [] if c.startswith("rows not packed")]
    return {
        "arch": arch,
        "name": ARCHS[arch]["name"],
        "pairs_per_s": ours.get("pairs_per_s"),
        "mfu": ours.get("mfu"),
        "peak_gib": ours.get("peak_gib"),
        "tuned_pairs_per_s": tuned.get("pairs_per_s"),
        "seed_pairs_per_s": seed.get("pairs_per_s"),
        "seed_peak_gib": seed.get("peak_gib"),
        "x_tuned": ratio(ours.get("pairs_per_s"), tuned.get("pairs_per_s")),
        "x_seed": ratio(ours.get("pairs_per_s"), seed.get("pairs_per_s")),
        "peak_x_seed": ratio(ours.get("peak_gib"), seed.get("peak_gib")),
        "best_batch": best.get("batch"),
        "best_mfu": best.get("mfu"),
        "best_pairs_per_s": best.get("pairs_per_s"),
        "packed": None if not ours else not not_packed,
        "why_not_packed": not_packed[0] if not_packed else None,
        "fp16_finite": None
        if not r.get("fp16")
        else bool(r["fp16"]["train_fp16"]["losses_finite"] and r["fp16"]["train_fp16"]["eval_losses_finite"]),
    }


def times(value: float | None, ours_to_it: float | None) -> str:
    """A table cell: the value, and the ratio of ours to it where there is one."""
    spec = ".2f" if value is not None and value < 10 else ".1f"
    return fmt(value, spec) + (f" ({ours_to_it:.1f}x)" if ours_to_it else "")


def yes_no(flag: bool | None) -> str:
    return "-" if flag is None else ("yes" if flag else "NO")


def goals_met(f: dict) -> str:
    """One line per architecture: each goal of GOALS that was measured, met or not."""
    said = []
    for key, what, op, bound in GOALS:
        value = f[key]
        if value is None:
            continue
        met = value >= bound if op == ">=" else value <= bound
        shown = f"{value:.1%} ({op} {bound:.0%}" if key == "best_mfu" else f"{value:.2f} ({op} {bound:g}"
        said.append(f"{what} {shown}: {'met' if met else 'NOT met'})")  # 29.6%, not a rounded 0.30
    if f["why_not_packed"]:
        said.append(f["why_not_packed"])
    return f"- {f['arch']}: " + ("; ".join(said) or "not measured")


def family_table(results: dict[str, dict]) -> str:
    """The per-architecture table (ours at batch 32 against the tuned HF Trainer and the seed-like
    script, with ours' ratio to each), the best batch of the sweep, and each goal met or not."""
    lines = [
        "| model shape | ours pairs/s | MFU | peak GiB | HF Trainer tuned (bf16, dynamic pad, length groups, "
        "fused AdamW, bs 32) | seed-like script (fp16, pad 128, bs 8, checkpointing, paged 8-bit AdamW) "
        "| seed-like peak GiB (ours / it) | best sweep batch: pairs/s, MFU | packed | fp16 losses finite |",
        "|" + "---|" * 10,
    ]
    rows = [family_row(arch, r) for arch, r in results.items()]
    for f in rows:
        best = "-"
        if f["best_batch"]:
            best = f"{f['best_batch']}: {fmt(f['best_pairs_per_s'], '.0f')}, {fmt(f['best_mfu'], '.1%')}"
        cells = [
            f["name"],
            fmt(f["pairs_per_s"], ".1f"),
            fmt(f["mfu"], ".1%"),
            fmt(f["peak_gib"], ".2f"),
            times(f["tuned_pairs_per_s"], f["x_tuned"]),
            times(f["seed_pairs_per_s"], f["x_seed"]),
            times(f["seed_peak_gib"], f["peak_x_seed"]),
            best,
            yes_no(f["packed"]),
            yes_no(f["fp16_finite"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\ngoals:\n" + "\n".join(goals_met(f) for f in rows)


def families(a) -> None:
    """The --arch mode (see the module docstring)."""
    archs = [x for x in a.arch.split(",") if x]
    parts = [p for p in FAMILY_PARTS if p in set(a.parts.split(","))]
    unknown = sorted(set(archs) - set(ARCHS)) + sorted(set(a.parts.split(",")) - set(FAMILY_PARTS))
    if unknown:
        raise SystemExit(
            f"unknown architecture or part: {', '.join(unknown)} "
            f"(archs: {', '.join(ARCHS)}; parts: {', '.join(FAMILY_PARTS)})"
        )
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "bench.log"
    py = sys.executable
    t0 = time.time()
    walls = {}
    if not a.table_only:
        sh([py, "-c", PREWARM], log)
    for arch in [] if a.table_only else archs:
        d = out / arch
        d.mkdir(exist_ok=True)
        sh([py, "-m", "bench.assets", a.root, "--arch", arch], log)
        common = ["--arch", arch]
        evals = ["--val-rows", str(a.eval_rows), "--test-rows", str(a.eval_rows)]
        cmds = {
            "ours": [
                py,
                "-m",
                "bench.ours",
                "experiment",
                a.root,
                *common,
                "--micro",
                "32",
                "--train-rows",
                str(a.rows),
            ]
            + [
                "--epochs",
                str(a.epochs),
                *evals,
                "--out",
                str(d / "ours.json"),
                "--keep-metrics",
                str(d / "ours.metrics.jsonl"),
            ],
            "tuned": [py, "-m", "bench.reference", a.root, *common, "--tuned", "--train-rows", str(a.tuned_rows)]
            + ["--eval-rows", str(a.eval_rows), "--out", str(d / "tuned.json")],
            "seed": [py, "-m", "bench.reference", a.root, *common, "--train-rows", str(a.seed_rows)]
            + ["--eval-rows", str(a.eval_rows), "--out", str(d / "seed.json")],
            "sweep": [py, "-m", "bench.ours", "sweep", a.root, *common, "--batches", a.sweep_batches]
            + ["--min-steps", "6", "--out", str(d / "sweep.json")],
            "fp16": [py, "-m", "bench.ours", "fp16", a.root, *common, "--out", str(d / "fp16.json")],
        }
        envs = {"sweep": {"QLORA_MICRO_TOKENS": "0"}}
        for part in parts:
            walls[f"{arch}/{part}"] = round(sh(cmds[part], log, envs.get(part)), 1)
    results = {}
    for d in sorted(p for p in out.iterdir() if p.is_dir() and p.name in ARCHS):
        results[d.name] = {
            k: json.loads((d / f"{k}.json").read_text()) for k in FAMILY_PARTS if (d / f"{k}.json").is_file()
        }
    order = [x for x in ARCHS if x in results]
    text = family_table({x: results[x] for x in order})
    text += f"\n\n(process s: {json.dumps(walls)}; bench wall {time.time() - t0:.0f} s)"
    (out / "families.md").write_text(text + "\n")
    print(text)


# Import everything once first, so that every timed process starts as on a machine that has run
# Python before (a fresh GPU image without bytecode caches compiles ~8 s of imports; set
# PYTHONPYCACHEPREFIX where site-packages is read-only).
PREWARM = (
    "import core.train, core.model, core.speed.qlinear, core.speed.rope, peft, bitsandbytes, transformers; "
    "from transformers import AutoModelForSequenceClassification, Trainer"
)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default="/tmp/qlora-bench")
    ap.add_argument("--out", default="bench/out")
    ap.add_argument("--arch", default=None, help=f"comma list of {', '.join(ARCHS)}: the per-family table")
    ap.add_argument(
        "--parts", default="ours,tuned,seed", help=f"with --arch, a comma list of {', '.join(FAMILY_PARTS)}"
    )
    ap.add_argument(
        "--table-only", action="store_true", help="with --arch: run nothing, only rebuild families.md from --out"
    )
    ap.add_argument("--rows", type=int, default=1000, help="with --arch: ours' training rows")
    ap.add_argument("--epochs", type=int, default=2, help="with --arch: ours' epochs (pairs/s over the last)")
    ap.add_argument("--tuned-rows", type=int, default=256, help="with --arch: the tuned Trainer's training rows")
    ap.add_argument("--seed-rows", type=int, default=160, help="with --arch: the seed-like script's training rows")
    ap.add_argument("--eval-rows", type=int, default=128, help="with --arch: validation (and ours' test) rows")
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
    if a.arch:
        return families(a)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "bench.log"
    skip = set(filter(None, a.skip.split(",")))
    py = sys.executable
    t0 = time.time()
    if skip != {"all"}:
        sh([py, "-m", "bench.assets", a.root], log)
        sh([py, "-c", PREWARM], log)
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
