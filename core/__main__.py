"""Command line: the same code path as the app, headless.

python -m core train --preset demo                       # the embedded default, offline, CPU
python -m core train --preset phi2-snli                  # the reference experiment (Hub + GPU)
python -m core train --preset demo --train a.jsonl --validation b.jsonl --test c.jsonl --epochs 3
python -m core train --config my.json --run-dir runs/my-run
python -m core evaluate RUN_DIR --data other.jsonl [--json]
python -m core predict RUN_DIR --data new.csv [--out predicted.csv]   # rows without labels too
python -m core export RUN_DIR --out merged/ [--dtype float32]           # one plain transformers model
python -m core report RUN_DIR [--html report.html]
python -m core presets
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import json
import os
import sys
from pathlib import Path

# Only modules that load neither torch nor numpy are imported here: `python -m core --help` and
# `presets` stay instant. The rest (dist, model, train, evaluate, results/) are imported inside
# the commands that use them.
from . import progress
from .config import PRESETS, SPEED_ENV, RunConfig, get_preset, override, speed_from_env
from .runs import liveness, rundir
from .runs.state import claim_run, read_status, update_status, write_status
from .text import terminal_text

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
    "head-init": ("model.head_init", str),
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
    "lora-variant": ("lora.variant", str),
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
    "checkpoint-every": ("train.checkpoint_every", int),
    "nproc": ("train.processes", int),
    "report-to": ("train.report_to", lambda s: [x.strip() for x in s.split(",") if x.strip() not in ("", "none")]),
    "early-stopping": ("train.early_stopping_patience", int),
    "class-weights": ("train.class_weights", str),  # none, balanced or W1,W2,...: TrainConfig parses it
}


def build_config(args):
    """The RunConfig of `train`: a preset or --config file, then the flags on top."""
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
    if args.gradient_checkpointing:
        changes["train.gradient_checkpointing"] = True
    if args.label_map:
        changes["data.label_map"] = dict(kv.split("=", 1) for kv in args.label_map)
    if args.speed:  # e.g. pack=off micro_tokens=1024, parsed as the QLORA_* overrides are
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


def cmd_resume(args) -> int:
    """`train --resume RUN_DIR`: continue a stopped, failed or killed run from its last checkpoint
    (with as many processes as it had, or --nproc)."""
    from . import dist  # torch

    run_dir = Path(args.resume).resolve()
    if not (run_dir / rundir.STATUS).is_file():
        raise ValueError(f"{run_dir} is not a run folder (no {rundir.STATUS})")
    cfg = RunConfig.load(run_dir / rundir.CONFIG)
    from .trackers import check_installed

    check_installed(cfg.train.report_to)
    if args.nproc is not None:
        cfg = override(cfg, {"train.processes": args.nproc})
    ranks = dist.ranks_for(cfg)
    cfg = dist.with_world_size(cfg, ranks)

    def check() -> None:
        status = read_status(run_dir)
        raw = rundir.read_json(run_dir / rundir.STATUS, {}) or {}
        if status.get("state") in ("running", "done") or liveness.pid_alive(raw.get("pid"), raw.get("pid_start")):
            state = (
                "still has a live trainer (hung?): stop it first"
                if status.get("state") not in ("running", "done")
                else status["state"]
            )
            raise ValueError(f"run {run_dir.name} is {state}: only a stopped or failed run can be resumed")

    if ranks is None and cfg.train.processes > 1:  # start the processes; each comes back here
        check()
        return dist.run_processes(args, cfg, run_dir)
    if ranks is None:
        check()
    else:
        ranks.main_first(check)  # rank 0 checks; its error is every process's
    if ranks is None or ranks.main:
        (run_dir / rundir.STOP).unlink(missing_ok=True)
        print(f"resuming: {run_dir}", flush=True)
        write_status(run_dir, state="running", pid=os.getpid(), phase="resuming", error=None)
        _hold_device(run_dir, cfg)
    from .train import train

    with progress.Reporter(run_dir) if ranks is None or ranks.main else contextlib.nullcontext():
        report = train(cfg, run_dir, resume=True)
    return _finish(report, ranks)


def _finish(report: dict, ranks=None) -> int:
    if ranks is not None and not ranks.main:
        return 0  # rank 0 prints
    if not report:
        print("stopped before the end; continue with: python -m core train --resume RUN_DIR")
        return 3
    from .results.render import render_markdown  # numpy

    print(progress.summary(report))  # accuracy before -> after, best epoch, total time
    print()
    print(render_markdown(report))
    return 0


def _hold_device(run_dir: Path, cfg) -> int | None:
    """A heartbeat for the claimed run, and the GPU lock when it trains on a GPU (one GPU run at a
    time: the lock's fd stays open, so it is ours until this process ends, kill -9 included)."""
    liveness.Heartbeat(run_dir).start()  # until the run ends (ResourceSampler beats inside train() too)
    try:
        if cfg.model.device == "cpu":
            device_type = "cpu"
        else:
            from .model import pick_device  # the choice train() makes (torch: only for a GPU run)

            device_type = pick_device(cfg.model.device).type
        return liveness.gpu_lock(run_dir, device_type)  # the lock's fd, None on CPU
    except (ValueError, RuntimeError) as e:
        write_status(run_dir, state="failed", phase="failed", finished_at=rundir.now_iso(), error=str(e))
        raise


def cmd_train(args) -> int:
    if args.resume:
        return cmd_resume(args)
    from . import dist  # torch
    from .model import check_model

    cfg = build_config(args)
    check_model(cfg)  # from the model's config.json: its folder, remote code, max_length; before any claim
    from .trackers import check_installed

    check_installed(cfg.train.report_to)  # --report-to mlflow without mlflow: the pip line, nothing made
    ranks = dist.ranks_for(cfg)  # under torchrun: this process's rank (rank 0 names the run folder)
    cfg = dist.with_world_size(cfg, ranks)
    if args.run_dir:
        run_dir = Path(args.run_dir).resolve()
    else:
        run_dir = rundir.run_path(args.run_id or rundir.new_run_id(cfg.preset))
    if ranks is not None:
        run_dir = ranks.broadcast_object(run_dir)
    elif cfg.train.processes > 1:  # --nproc N: N processes under torchrun, each back in cmd_train
        return dist.run_processes(args, cfg, run_dir)
    # Claim the run before the heavy imports, so the app sees it running with our pid at once:
    # status.json created exclusively (a second CLI into the same folder gets "already holds a
    # run", exit 2), or the queued run jobs.launch made for us (its token in CLAIM_ENV); a
    # non-empty folder that is not a run folder is refused untouched. pid_start comes with the pid.
    token = os.environ.pop(rundir.CLAIM_ENV, None)
    if args.seeds is not None and not 1 <= args.seeds <= 100:
        raise ValueError(f"--seeds must be between 1 and 100, not {args.seeds}")
    if (args.seeds or 1) == 1:
        return _train_one(cfg, run_dir, token, ranks)
    # --seeds K: K runs of this config, seeds seed .. seed+K-1, one after another, as one group
    # (core/results/seeds.py): the first in run_dir, the others beside it as <run_dir>-seed<S>
    for i in range(args.seeds):
        seed = cfg.train.seed + i
        one = dataclasses.replace(
            cfg,
            group=run_dir.name,
            train=dataclasses.replace(cfg.train, seed=seed),
            data=dataclasses.replace(cfg.data, sample_seed=cfg.train.seed),
        )  # the same rows
        code = _train_one(
            one,
            run_dir if i == 0 else run_dir.with_name(f"{run_dir.name}-seed{seed}"),
            token if i == 0 else None,
            ranks,
        )
        if code != 0:
            return code  # a stop or a failure ends the group
    if ranks is not None and not ranks.main:
        return 0
    from .results.seeds import group_summary  # numpy

    g = group_summary(run_dir)
    agree = "n/a" if g["agreement"] is None else f"{100 * g['agreement']:.1f}%"
    after = _mean_std(g["accuracy_after"])
    before = _mean_std(g["accuracy_before"])
    print(
        f"group {g['group']}: {g['finished']} seeds; test accuracy after {after} "
        f"(before {before}); all seeds agree on {agree} of {g['agreement_n']} test examples"
    )
    return 0


def _mean_std(x: dict | None) -> str:
    """A group's accuracy as `81.2% +- 1.3`, or n/a."""
    if not x or x["mean"] is None:
        return "n/a"
    return f"{100 * x['mean']:.1f}% +- {100 * (x['std'] or 0):.1f}"


def _train_one(cfg, run_dir: Path, token: str | None = None, ranks=None) -> int:
    """Claim `run_dir`, hold the device, train, print the result (the body of `train`). Under
    torchrun, rank 0 claims, holds and prints; every process trains."""
    main = ranks is None or ranks.main

    def claim() -> None:
        claim_run(run_dir, token=token, state="running", pid=os.getpid(), phase="starting")

    if ranks is None:
        claim()
    else:
        ranks.main_first(claim)
    lock = None
    if main:
        print(f"run folder: {run_dir}", flush=True)
        lock = _hold_device(run_dir, cfg)
    from .train import train

    try:
        with progress.Reporter(run_dir) if main else contextlib.nullcontext():  # a progress line while it trains
            report = train(cfg, run_dir)
    finally:
        if lock is not None:
            os.close(lock)  # the GPU is free for the next seed (or the next launch)
    return _finish(report, ranks)


def cmd_evaluate(args) -> int:
    from .evaluate import evaluate_run  # torch

    result = evaluate_run(Path(args.run_dir), Path(args.data), name=args.name)
    print(
        f"{result['name']}: n={result['n']} (dropped {result['dropped_unlabelled']} unlabelled, "
        f"{result.get('dropped_empty', 0)} with an empty text), "
        f"accuracy before {result['accuracy_before']:.4f}, after {result['accuracy_after']:.4f} "
        f"(epoch {result['best_epoch']})"
    )
    print("predictions: " + ", ".join(result.get("files", [])))
    if args.json:
        print(
            json.dumps(
                {
                    "n": result["n"],
                    "accuracy_before": result["accuracy_before"],
                    "accuracy_after": result["accuracy_after"],
                }
            )
        )
    return 0


def cmd_predict(args) -> int:
    from .predict import predict_file  # torch

    out = Path(args.out) if args.out else None
    result = predict_file(
        Path(args.run_dir), Path(args.data), out=out, epoch=args.epoch, temperature=not args.no_temperature
    )
    scored = f", accuracy {result['accuracy']:.4f} on the {result['labelled']} labelled" if result["labelled"] else ""
    print(f"predicted {result['n']} rows with epoch {result['epoch']}{scored}: {result['out']}")
    return 0


def cmd_export(args) -> int:
    from .export import export_merged  # torch

    result = export_merged(Path(args.run_dir), Path(args.out), epoch=args.epoch, dtype=args.dtype)
    print(f"merged model of epoch {result['epoch']} ({result['dtype']}, {result['architecture']}): {result['out']}")
    if result["parity"] is not None:
        print(
            f"parity: max |p_export - p_run| = {result['parity']:.2e} over {result['parity_rows']} test rows "
            f"({result['dtype']})"
        )
    if result["note"]:
        print(f"note: {result['note']}")
    print(f"load: {result['load']}")
    return 0


def cmd_report(args) -> int:
    from .results.render import render_html, render_markdown  # numpy
    from .results.report import build_report
    from .results.seeds import group_summary

    run_dir = Path(args.run_dir)
    if not (run_dir / rundir.STATUS).exists() and not (run_dir / rundir.CONFIG).exists():
        print(f"error: {terminal_text(run_dir)} is not a run folder", file=sys.stderr)
        return 2
    report = build_report(run_dir, group=group_summary(run_dir))
    if args.html:
        rundir.atomic_write_text(Path(args.html), render_html(report))
    if args.bundle:  # the reproducibility bundle (core/results/bundle.py)
        from .results.bundle import build_bundle  # numpy

        rundir.atomic_write_bytes(Path(args.bundle), build_bundle(run_dir))
    print(render_markdown(report))
    if args.bundle:
        print(f"reproducibility bundle: {args.bundle}", file=sys.stderr)
    return 0


def cmd_presets(args) -> int:
    for name, fn in PRESETS.items():
        print(f"{name}: {fn.__doc__}")
        if args.verbose:
            print(json.dumps(fn().to_dict(), indent=2))
    return 0


def _raw_equals_name(text: str) -> str:
    if "=" not in text or not text.partition("=")[2].strip():
        raise argparse.ArgumentTypeError(f"--label-map takes RAW=NAME pairs such as 0=entailment, not {text!r}")
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m core", description="QLoRA Studio: fine-tune and evaluate.")
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="run an experiment into a run folder")
    t.add_argument("--preset", choices=list(PRESETS), help="starting settings (default demo)")
    t.add_argument("--config", help="a RunConfig JSON file (e.g. a run's config.json) instead of a preset")
    t.add_argument("--run-dir", help="folder for this run (default: a new folder in the runs folder)")
    t.add_argument("--run-id", help="name of the new run inside the runs folder")
    t.add_argument(
        "--seeds",
        type=int,
        default=None,
        metavar="K",
        help="run the config K times with seeds seed..seed+K-1 as one group (mean +- std in the report)",
    )
    t.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue a stopped, failed or killed run from its last checkpoint (other flags are ignored)",
    )
    for flag, (field, typ) in FLAGS.items():
        t.add_argument(f"--{flag}", type=typ, default=None, help=f"sets {field}")
    t.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        default=None,
        help="sets train.gradient_checkpointing: less activation memory, more time per step",
    )
    t.add_argument(
        "--label-map",
        nargs="*",
        metavar="RAW=NAME",
        type=_raw_equals_name,
        help="rename raw label values, e.g. 0=entailment",
    )
    t.add_argument(
        "--speed",
        nargs="*",
        metavar="NAME=VALUE",
        help="GPU speed switches (config.SpeedConfig), e.g. pack=off cuda_graphs=0 micro_tokens=1024",
    )
    t.set_defaults(func=cmd_train)
    e = sub.add_parser("evaluate", help="score a run's before and after models on a labelled file")
    e.add_argument("run_dir")
    e.add_argument("--data", required=True, help="JSONL, CSV or Parquet file with the run's columns")
    e.add_argument("--name", help="name for the predictions files (default: the file's stem)")
    e.add_argument("--json", action="store_true", help="print the result as JSON on the last line")
    e.set_defaults(func=cmd_evaluate)
    pr = sub.add_parser("predict", help="predict the labels of a file's rows (labels optional) with a run's model")
    pr.add_argument("run_dir")
    pr.add_argument("--data", required=True, help="JSONL, CSV or Parquet file with the run's input columns")
    pr.add_argument("--out", help="OUT.jsonl or OUT.csv (default: RUN/predictions/<file stem>_predicted.jsonl)")
    pr.add_argument("--epoch", type=int, help="the checkpoint of this epoch (default: the epoch the run selected)")
    pr.add_argument(
        "--no-temperature",
        action="store_true",
        help="the model's raw probabilities, not divided by the temperature in the checkpoint's classifier.json",
    )
    pr.set_defaults(func=cmd_predict)
    x = sub.add_parser("export", help="write a run's model as one merged transformers model (no peft, no bitsandbytes)")
    x.add_argument("run_dir")
    x.add_argument("--out", required=True, help="folder for the merged model (new, empty, or an earlier export)")
    x.add_argument("--epoch", type=int, help="the checkpoint of this epoch (default: the epoch the run selected)")
    x.add_argument(
        "--dtype",
        choices=["float16", "bfloat16", "float32"],
        help="the weights' dtype (default: bfloat16 if the run trained in bf16, float16 for other GPU runs, "
        "float32 for CPU runs)",
    )
    x.set_defaults(func=cmd_export)
    r = sub.add_parser("report", help="print a run's report as Markdown")
    r.add_argument("run_dir")
    r.add_argument("--html", help="also write a self-contained HTML file here")
    r.add_argument("--bundle", metavar="ZIP", help="also write the reproducibility bundle (a zip) here")
    r.set_defaults(func=cmd_report)
    p = sub.add_parser("presets", help="list the presets")
    p.add_argument("--verbose", "-v", action="store_true")
    p.set_defaults(func=cmd_presets)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what --nproc passes on to torchrun
    try:
        return args.func(args)
    except KeyboardInterrupt:  # Ctrl-C: one line, no traceback; the run (if any) reads stopped
        where = "".join(f"; run folder {d} marked stopped, what it wrote is kept" for d in _after_failure(args, None))
        print(f"interrupted (Ctrl-C){where}", file=sys.stderr)
        return 130
    except OSError as e:  # FileNotFoundError, a read-only or full disk, a file where a folder should be
        message = describe_os_error(e, _folder_of(args))
    except (ValueError, RuntimeError) as e:
        message = str(e)
    finally:
        if "core.dist" in sys.modules:  # leave torchrun's process group cleanly (imported only if a command did)
            sys.modules["core.dist"].shutdown()
    print(f"error: {terminal_text(message)}", file=sys.stderr)
    _after_failure(args, message)
    return 2


# --- when a command fails: one sentence, and the run folder says how it ended ------------------


def describe_os_error(e: OSError, folder: Path | None = None) -> str:
    """One sentence for an OSError: what could not be done, where, and what to do."""
    path = Path(e.filename) if e.filename else folder
    where = f" {path}" if path else ""
    if e.errno is None:
        return str(e)
    if e.errno == errno.ENOSPC or e.errno == errno.EDQUOT:
        return (
            f"no space left on the disk of{where}: free some space (old run folders can go) or set "
            "QLORA_STUDIO_RUNS to a folder on another disk"
        )
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return (
            f"cannot write{where} ({e.strerror}): make it writable, or set QLORA_STUDIO_RUNS (or --run-dir) "
            "to a folder you can write"
        )
    if e.errno in (errno.ENOTDIR, errno.EEXIST) and path is not None:
        blocker = next((p for p in [path, *path.parents] if p.exists() and not p.is_dir()), None)
        if blocker is not None:
            return (
                f"{blocker} is a file where a folder is needed: set QLORA_STUDIO_RUNS (or --run-dir) to a "
                "folder, or move the file"
            )
    if e.errno == errno.ENOENT and e.filename:
        return f"not found: {e.filename}"
    return f"{e.strerror or e}:{where}"


def _folder_of(args) -> Path | None:
    """The folder a command writes into, for messages: the run folder, else the runs folder."""
    if args.command == "train":
        target = getattr(args, "resume", None) or args.run_dir
        if target:
            return Path(target)
        try:
            return rundir.run_path(args.run_id) if args.run_id else rundir.runs_root()
        except ValueError:
            return rundir.runs_root()
    if args.command in ("export", "predict") and args.out:
        return Path(args.out) if args.command == "export" else Path(args.out).parent
    if args.command == "evaluate":
        return Path(args.run_dir) / rundir.PREDICTIONS
    if args.command == "report" and args.html:
        return Path(args.html).parent
    return None


def _after_failure(args, error: str | None) -> list[Path]:
    """Record how a `train` that this process claimed ended outside train(): failed with `error`,
    or stopped (Ctrl-C, error None); train() records failures inside it itself, and a Ctrl-C there
    (recorded as a KeyboardInterrupt failure) is turned into stopped. A queued run that the app
    launched for this process and that failed before the claim gets the error too. Never raises
    (the disk may be full); returns the run folders it marked."""
    if getattr(args, "command", None) != "train":
        return []
    marked = []
    try:
        named = getattr(args, "resume", None) or args.run_dir or (args.run_id and rundir.run_path(args.run_id))
        candidates = [Path(named)] if named else [p for p in rundir.runs_root().iterdir() if p.is_dir()]
    except (OSError, ValueError):
        return []
    me, token = os.getpid(), os.environ.get(rundir.CLAIM_ENV)
    start = liveness.process_start(me)

    def ours(s: dict) -> bool:
        if s.get("pid") == me and s.get("pid_start") in (None, start):
            if error is not None:
                return s.get("state") == "running"
            return s.get("state") in ("running", "stopped") or (
                s.get("state") == "failed" and str(s.get("error") or "").startswith("KeyboardInterrupt")
            )
        return error is not None and bool(token) and s.get("state") == "queued" and s.get("claim") == token

    for run_dir in candidates:
        try:
            if not (run_dir / rundir.STATUS).is_file():
                continue
            if error is None:
                fields = dict(state="stopped", phase="stopped", error=None, traceback=None)
            else:
                fields = dict(state="failed", phase="failed", error=error)
            if update_status(run_dir, {**fields, "finished_at": rundir.now_iso()}, only_if=ours):
                marked.append(run_dir)
        except Exception:  # noqa: BLE001 - reporting the first error matters more
            continue
    return marked


if __name__ == "__main__":
    sys.exit(main())
