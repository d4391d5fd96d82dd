"""CPU accuracy check: the demo recipe on 1,000 genuine SNLI rows, 2 epochs, one thread.

    python bench/accuracy_cpu.py --data PATH/TO/snli_sample CODE_DIR RUN_DIR [key=value ...]

--data: a folder holding train.jsonl, validation.jsonl and test.jsonl (e.g. the SNLI 1.0 sample of
3,000/500/500 rows; tests/data/snli is a small slice of it). CODE_DIR: a checkout of this repo (a
worktree of an older commit, or .); key=value: config overrides (e.g. lora.dropout=0.05). Switches
such as QLORA_FUSED=0 come from the environment.
Prints the test accuracy, every evaluation and the last step losses as JSON."""

import argparse
import json
import sys
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True, help="folder with train.jsonl, validation.jsonl and test.jsonl")
    ap.add_argument("code_dir", help="a checkout of this repo whose core/ is measured")
    ap.add_argument("run_dir", type=Path, help="where the run's files are written")
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    args = ap.parse_args()
    files = {s: args.data / f"{s}.jsonl" for s in ("train", "validation", "test")}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        ap.error(f"--data: missing {', '.join(missing)}")

    sys.path.insert(0, args.code_dir)
    from core.config import override, preset_demo
    from core.train import train

    extra = dict(kv.split("=", 1) for kv in args.overrides)
    extra = {
        k: (int(v) if v.isdigit() else float(v) if v.replace(".", "", 1).isdigit() else v) for k, v in extra.items()
    }  # train.epochs=3 is an int, lora.dropout=0.05 a float
    cfg = override(
        preset_demo(),
        {
            "data.source": "files",
            "data.train": str(files["train"]),
            "data.validation": str(files["validation"]),
            "data.test": str(files["test"]),
            "data.max_train_rows": 1000,
            "train.epochs": 2,
            "train.threads": 1,
            **extra,
        },
    )
    t = time.time()
    train(cfg, args.run_dir)
    recs = [json.loads(line) for line in open(args.run_dir / "metrics.jsonl")]
    end = [x for x in recs if x["kind"] == "end"][0]
    ev = [x for x in recs if x["kind"] == "eval"]
    steps = [x for x in recs if x["kind"] == "step"]
    print(
        json.dumps(
            {
                "code": args.code_dir,
                "overrides": extra,
                "test_accuracy": end.get("test_accuracy"),
                "evals": [(x["split"], x["stage"], x["accuracy"]) for x in ev],
                "last_losses": [round(x["loss"], 5) for x in steps[-2:]],
                "wall": round(time.time() - t, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
