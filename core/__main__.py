"""Command line: the same code path as the app, headless.

    python -m core train --preset demo                       # the embedded default, offline, CPU
    python -m core train --preset phi2-snli                  # the reference experiment (Hub + GPU)
    python -m core train --preset demo --train a.jsonl --validation b.jsonl --test c.jsonl --epochs 3
    python -m core train --config my.json --run-dir runs/my-run
    python -m core evaluate RUN_DIR --data other.jsonl [--json]
    python -m core report RUN_DIR [--html report.html]
    python -m core presets
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

# Keep the Hub quiet about telemetry and progress bars in logs.
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# flag -> (dotted config field, type)
FLAGS = {
    "model": ("model.name", str),
    "quantize": ("model.quantize", lambda s: None if s.lower() in ("none", "null", "no") else s),
    "compute-dtype": ("model.compute_dtype", str),
    "device": ("model.device", str),
    "pooling": ("model.pooling", str),
    "dataset": ("data.source", str),
    "train": ("data.train", str),
    "validation": ("data.validation", str),
    "test": ("data.test", str),
    "premise-column": ("data.premise_column", str),
    "hypothesis-column": ("data.hypothesis_column", str),
    "text-column": ("data.text_column", str),
    "label-column": ("data.label_column", str),
    "labels": ("data.labels", lambda s: [x.strip() for x in s.split(",") if x.strip()]),
    "max-train-rows": ("data.max_train_rows", int),
    "max-validation-rows": ("data.max_validation_rows", int),
    "max-test-rows": ("data.max_test_rows", int),
    "max-length": ("data.max_length", int),
    "lora-r": ("lora.r", int),
    "lora-alpha": ("lora.alpha", float),
    "lora-dropout": ("lora.dropout", float),
    "target-modules": ("lora.target_modules", lambda s: s if s == "all-linear" else [x.strip() for x in s.split(",")]),
    "epochs": ("train.epochs", int),
    "lr": ("train.lr", float),
    "head-lr": ("train.head_lr", float),
    "batch-size": ("train.batch_size", int),
    "micro-batch-size": ("train.micro_batch_size", int),
    "eval-batch-size": ("train.eval_batch_size", int),
    "schedule": ("train.schedule", str),
    "warmup-ratio": ("train.warmup_ratio", float),
    "weight-decay": ("train.weight_decay", float),
    "seed": ("train.seed", int),
    "threads": ("train.threads", int),
}


def build_config(args):
    """The RunConfig of `train`: a preset or --config file, then the flags on top."""
    from .config import RunConfig, get_preset, override
    if args.config:
        cfg = RunConfig.load(Path(args.config))
    else:
        cfg = get_preset(args.preset or "demo")
    changes = {}
    for flag, (field, _) in FLAGS.items():
        value = getattr(args, flag.replace("-", "_"))
        if value is not None:
            changes[field] = value
    if any(getattr(args, s) for s in ("train", "validation", "test")) and not args.dataset:
        if cfg.data.source.startswith("builtin:"):
            changes["data.source"] = "files"
    if args.label_map:
        changes["data.label_map"] = dict(kv.split("=", 1) for kv in args.label_map)
    if args.speed:  # e.g. pack=off micro_tokens=1024, parsed as the QLORA_* overrides are
        import dataclasses
        from .config import SPEED_ENV, speed_from_env
        var = {name: env for env, name in SPEED_ENV.items()}
        pairs = [kv.partition("=") for kv in args.speed]
        bad = [k for k, eq, _ in pairs if k not in var or not eq]
        if bad:
            raise ValueError(f"--speed takes NAME=VALUE with NAME one of {', '.join(var)}; got {', '.join(bad)}")
        speed = speed_from_env(cfg.speed, {var[k]: v for k, _, v in pairs})
        changes.update({f"speed.{k}": v for k, v in dataclasses.asdict(speed).items()})
    for path_field in ("data.train", "data.validation", "data.test"):
        if path_field in changes:
            changes[path_field] = str(Path(changes[path_field]).resolve())
    return override(cfg, changes) if changes else cfg


def cmd_train(args) -> int:
    from .runs import rundir
    cfg = build_config(args)
    if args.run_dir:
        run_dir = Path(args.run_dir).resolve()
    else:
        run_dir = rundir.run_path(args.run_id or rundir.new_run_id(cfg.preset))
    status = rundir.read_json(run_dir / rundir.STATUS, {}) or {}
    if status.get("state") not in (None, "queued"):
        print(f"error: {run_dir} already holds a run ({status.get('state')}); choose a new --run-dir",
              file=sys.stderr)
        return 2
    print(f"run folder: {run_dir}", flush=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    # Claim the run before the heavy imports, so the app sees it running with our pid at once.
    rundir.write_status(run_dir, state="running", pid=os.getpid(), phase="starting",
                        created_at=status.get("created_at") or rundir.now_iso())
    from .train import train
    report = train(cfg, run_dir)
    if not report:
        print("stopped before the end; checkpoints so far are in the run folder")
        return 3
    from .report import render_markdown
    print(render_markdown(report))
    return 0


def cmd_evaluate(args) -> int:
    from .evaluate import evaluate_run
    result = evaluate_run(Path(args.run_dir), Path(args.data), name=args.name)
    print(f"{result['name']}: n={result['n']} (dropped {result['dropped_unlabelled']} unlabelled), "
          f"accuracy before {result['accuracy_before']:.4f}, after {result['accuracy_after']:.4f} "
          f"(epoch {result['best_epoch']})")
    if args.json:
        print(json.dumps({"n": result["n"], "accuracy_before": result["accuracy_before"],
                          "accuracy_after": result["accuracy_after"]}))
    return 0


def cmd_report(args) -> int:
    from .runs import rundir
    from .report import build_report, render_html, render_markdown
    run_dir = Path(args.run_dir)
    if not (run_dir / rundir.STATUS).exists() and not (run_dir / rundir.CONFIG).exists():
        print(f"error: {run_dir} is not a run folder", file=sys.stderr)
        return 2
    report = build_report(run_dir)
    if args.html:
        rundir.atomic_write_text(Path(args.html), render_html(report))
    print(render_markdown(report))
    return 0


def cmd_presets(args) -> int:
    from .config import PRESETS
    for name, fn in PRESETS.items():
        print(f"{name}: {fn.__doc__}")
        if args.verbose:
            print(json.dumps(fn().to_dict(), indent=2))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m core", description="QLoRA Studio: fine-tune and evaluate.")
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="run an experiment into a run folder")
    t.add_argument("--preset", choices=["demo", "phi2-snli"], help="starting settings (default demo)")
    t.add_argument("--config", help="a RunConfig JSON file (e.g. a run's config.json) instead of a preset")
    t.add_argument("--run-dir", help="folder for this run (default: a new folder in the runs folder)")
    t.add_argument("--run-id", help="name of the new run inside the runs folder")
    for flag, (field, typ) in FLAGS.items():
        t.add_argument(f"--{flag}", type=typ, default=None, help=f"sets {field}")
    t.add_argument("--label-map", nargs="*", metavar="RAW=NAME", help="rename raw label values, e.g. 0=entailment")
    t.add_argument("--speed", nargs="*", metavar="NAME=VALUE",
                   help="GPU speed switches (config.SpeedConfig), e.g. pack=off cuda_graphs=0 micro_tokens=1024")
    t.set_defaults(func=cmd_train)
    e = sub.add_parser("evaluate", help="score a run's before and after models on a labelled file")
    e.add_argument("run_dir")
    e.add_argument("--data", required=True, help="JSONL, CSV or Parquet file with the run's columns")
    e.add_argument("--name", help="name for the predictions files (default: the file's stem)")
    e.add_argument("--json", action="store_true", help="print the result as JSON on the last line")
    e.set_defaults(func=cmd_evaluate)
    r = sub.add_parser("report", help="print a run's report as Markdown")
    r.add_argument("run_dir")
    r.add_argument("--html", help="also write a self-contained HTML file here")
    r.set_defaults(func=cmd_report)
    p = sub.add_parser("presets", help="list the presets")
    p.add_argument("--verbose", "-v", action="store_true")
    p.set_defaults(func=cmd_presets)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
