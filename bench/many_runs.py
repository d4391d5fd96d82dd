"""Page times with many runs and a large metrics.jsonl: the server's time per page, under AppTest.

    .venv/bin/python -m bench.many_runs                        # 2,000 runs, then a 200 MB metrics.jsonl
    .venv/bin/python -m bench.many_runs --runs 500 --metrics-mb 50 --repeat 3
    .venv/bin/python -m bench.many_runs --template runs/<id>   # copy this run instead of training one

The template is a finished run: --template, else the demo preset trained here on 64 rows for one
epoch (about a minute on 2 CPU cores). Case "runs": the template copied N times beside itself (no
checkpoints), the Train, Report and Failures pages of one of them opened (each directly, as a link
to it would); also list_runs() alone, cold (first read) and warm, and the sidebar alone (AppTest of
ui.sidebar()). Case "metrics": one run whose metrics.jsonl is padded with step records to M MB,
its Train and Report pages. Each page is timed from AppTest.run() to its return (the frame and the
sidebar included), first visit (cold) and then --repeat more (warm: the server's caches filled),
median of the warm ones. Prints one JSON object; --json also writes it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def train_template(folder: Path) -> Path:
    run = folder / "template"
    cmd = [sys.executable, "-m", "core", "train", "--preset", "demo", "--max-train-rows", "64"]
    cmd += ["--max-validation-rows", "32", "--max-test-rows", "48", "--epochs", "1", "--run-dir", str(run)]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, env={**os.environ, "QLORA_STUDIO_RUNS": str(folder)})
    return run


def copy_run(template: Path, dest: Path) -> None:
    shutil.copytree(template, dest, ignore=shutil.ignore_patterns("checkpoints", "train.log", ".trainer.lock"))


def pad_metrics(run: Path, megabytes: int) -> int:
    """Append step records to the run's metrics.jsonl until it holds `megabytes` MB; returns lines."""
    from core.runs import rundir

    path = run / rundir.METRICS
    records = rundir.read_jsonl(path)
    step = next((r for r in records if r.get("kind") == "step"), None) or {"kind": "step", "loss": 1.0, "step_s": 0.1}
    head = [r for r in records if r.get("kind") != "end"]
    end = [r for r in records if r.get("kind") == "end"]
    lines = 0
    with open(path, "w") as f:
        for r in head:
            f.write(json.dumps(r) + "\n")
        i = 0
        while f.tell() < megabytes * 1_000_000:
            i += 1
            f.write(json.dumps({**step, "step": i, "loss": 1.0 / (1 + i * 1e-4)}) + "\n")
            lines += 1
        for r in end:
            f.write(json.dumps(r) + "\n")
    return lines


def time_page(root: Path, run_id: str, page: str, repeat: int) -> dict:
    """Seconds of one page (AppTest, this process): the first visit, then `repeat` more."""
    from streamlit.testing.v1 import AppTest

    os.environ["QLORA_STUDIO_RUNS"] = str(root)
    times = []
    for _ in range(1 + repeat):
        at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=600)
        at.query_params["run"] = run_id
        if page != "train":
            at.switch_page(f"app_pages/{page}.py")  # opened directly, as a link to it would
        t = time.perf_counter()
        at.run()
        times.append(time.perf_counter() - t)
        assert not at.exception, [e.value for e in at.exception]
    return {
        "first_s": round(times[0], 3),
        "warm_median_s": round(statistics.median(times[1:]), 3) if repeat else None,
        "all_s": [round(t, 3) for t in times],
    }


SIDEBAR = """
import sys
sys.path.insert(0, {root!r})
from app_pages import ui
ui.sidebar()
"""


def time_sidebar(root: Path, repeat: int) -> dict:
    """Seconds of the sidebar alone (the run list: list_runs, the radio, the captions), AppTest."""
    from streamlit.testing.v1 import AppTest

    os.environ["QLORA_STUDIO_RUNS"] = str(root)
    times = []
    for _ in range(1 + repeat):
        at = AppTest.from_string(SIDEBAR.format(root=str(ROOT)), default_timeout=600)
        t = time.perf_counter()
        at.run()
        times.append(time.perf_counter() - t)
        assert not at.exception, [e.value for e in at.exception]
    return {"first_s": round(times[0], 3), "warm_median_s": round(statistics.median(times[1:]), 3) if repeat else None}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=2000)
    p.add_argument("--metrics-mb", type=int, default=200)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--template", type=Path)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    out: dict = {"runs": args.runs, "metrics_mb": args.metrics_mb, "repeat": args.repeat}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        template = args.template or train_template(tmp / "train")
        # --- many runs ---
        root = tmp / "many"
        root.mkdir()
        for i in range(args.runs):
            copy_run(template, root / f"20990101-{i:06d}-copy")
        chosen = f"20990101-{args.runs // 2:06d}-copy"
        os.environ["QLORA_STUDIO_RUNS"] = str(root)
        from core.runs.state import list_runs

        t = time.perf_counter()
        n = len(list_runs(root))
        cold = time.perf_counter() - t
        t = time.perf_counter()
        list_runs(root)
        out["list_runs"] = {"runs": n, "cold_s": round(cold, 3), "warm_s": round(time.perf_counter() - t, 3)}
        out["sidebar"] = time_sidebar(root, args.repeat)
        out["many_runs"] = {
            page: time_page(root, chosen, page, args.repeat) for page in ("train", "report", "failures")
        }
        # --- one large metrics.jsonl ---
        big = tmp / "big"
        big.mkdir()
        copy_run(template, big / "20990101-000000-big")
        lines = pad_metrics(big / "20990101-000000-big", args.metrics_mb)
        size = (big / "20990101-000000-big" / "metrics.jsonl").stat().st_size
        out["big_metrics"] = {"bytes": size, "step_lines": lines}
        out["big_metrics"].update(
            {page: time_page(big, "20990101-000000-big", page, args.repeat) for page in ("train", "report")}
        )
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
