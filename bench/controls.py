"""Figures for the training controls (class weights, temperature scaling), on the CPU, offline.

    python -m bench.controls --out bench/controls-2026-12-02      # both; a results.json in --out

1. Class weights on an imbalanced sample: the demo preset on the built-in NLI sample with the
   training rows cut to entailment : neutral : contradiction = 240 : 24 : 24 (validation and test
   the built-in ones, balanced), trained with `--class-weights none` and `balanced`; test macro-F1
   and per-class recall of each (report.json: per_class_change, test_after).
2. Temperature scaling on the demo: `python -m core train --preset demo` as it is; the report's
   temperature and test ECE / NLL before and after scaling (report.json: temperature_scaling).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "assets" / "nli_sample"
IMBALANCE = {"entailment": 240, "neutral": 24, "contradiction": 24}


def imbalanced_train(path: Path) -> Path:
    """The first rows of each class of the built-in train split, in IMBALANCE's counts."""
    left = dict(IMBALANCE)
    rows = []
    for line in (SAMPLE / "train.jsonl").read_text().splitlines():
        r = json.loads(line)
        if left.get(r["label"], 0) > 0:
            left[r["label"]] -= 1
            rows.append(line)
    path.write_text("\n".join(rows) + "\n")
    return path


def train(run_dir: Path, *args: str) -> dict:
    t0 = time.time()
    subprocess.run(
        [sys.executable, "-m", "core", "train", "--preset", "demo", "--run-dir", str(run_dir), *args],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    report = json.loads((run_dir / "report.json").read_text())
    report["wall_s"] = round(time.time() - t0, 1)
    return report


def class_weight_figures(out: Path) -> dict:
    data = imbalanced_train(out / "train-imbalanced.jsonl")
    files = ["--train", str(data), "--validation", str(SAMPLE / "validation.jsonl"), "--test"]
    files.append(str(SAMPLE / "test.jsonl"))
    result = {"train_rows": IMBALANCE}
    for setting in ("none", "balanced"):
        r = train(out / f"weights-{setting}", *files, "--class-weights", setting)
        after = r["test_after"]
        result[setting] = {
            "macro_f1": r["per_class_change"]["macro"]["f1_after"],
            "accuracy": after["accuracy"],
            "recall": {c["label"]: c["recall"] for c in after["per_class"]},
            "weights": r["controls"]["class_weights_applied"],
            "best_epoch": r["best_epoch"],
            "wall_s": r["wall_s"],
        }
    return result


def temperature_figures(out: Path) -> dict:
    r = train(out / "demo")
    ts = r["temperature_scaling"]
    return {
        "temperature": ts["temperature"],
        "n_validation": ts["n_fit"],
        **ts["test"],
        "accuracy": r["test_after"]["accuracy"],
        "wall_s": r["wall_s"],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--only", choices=["weights", "temperature"])
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    if args.only in (None, "weights"):
        results["class_weights"] = class_weight_figures(out)
    if args.only in (None, "temperature"):
        results["temperature"] = temperature_figures(out)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
