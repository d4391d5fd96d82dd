"""Does watching a run slow it down? The demo preset from the CLI vs the same run watched live on
the app's Train page by 1, 3, ... Chromium sessions (Playwright, Debian's chromium).

    .venv/bin/python -m bench.live_view                          # viewers 0,1,3 (0 = CLI), the full demo
    .venv/bin/python -m bench.live_view --quick                  # 1 epoch of 200 train rows: a smoke run
    .venv/bin/python -m bench.live_view --viewers 1,3 --repeat 2 --json out.json
    .venv/bin/python -m bench.live_view --synthetic 30 --viewers 0,1,3   # no training: UI cost only

Each case trains the same config: viewers 0 runs `python -m core train --config ... --run-dir ...`
with nobody watching; viewers N starts the same trainer through core.jobs.launch (what the
Launch button does; --button clicks it instead) and opens `/?run=<id>` in N browser contexts (N
Streamlit sessions), then waits for the run to finish and for every page to show the done view.
Cases alternate (0, 1, 3, 0, 1, 3, ...) so a shared machine's noise falls on all of them; a CLI
case is added first when --viewers has no 0. Read the trainer's own total_s (report.json) and its
ratio to the CLI's; wall_s is launch to the done view. server/chromium CPU are the seconds of CPU
the Streamlit server and the browser used during the case, trainer CPU the mean of the trainer's
resources.jsonl samples (100% = one core).

--synthetic S measures only the UI: a fake running run (a `sleep` as its trainer) that gains a
step every 0.3 s and a resource sample every second, watched by N sessions for S seconds; it
prints the server's and Chromium's CPU in % of one core. Never `playwright install`: this uses
the chromium on PATH (apt-get install chromium).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
VIEWPORT = {"width": 1360, "height": 960}
QUICK = {"train.epochs": 1, "data.max_train_rows": 200}
ACTIVE = ("queued", "running")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(runs: Path, log_path: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    log = open(log_path, "wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "streamlit",
            "run",
            "app.py",
            "--server.headless",
            "true",
            "--server.address",
            "127.0.0.1",
            "--server.port",
            str(port),
            "--server.fileWatcherType",
            "none",
            "--browser.gatherUsageStats",
            "false",
        ],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "QLORA_STUDIO_RUNS": str(runs)},
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read() == b"ok":
                return proc, url
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("streamlit did not come up:\n" + log_path.read_text()[-3000:])
        time.sleep(0.3)


def cpu_s(proc: psutil.Process | None) -> float:
    try:
        t = proc.cpu_times()
        return t.user + t.system
    except (psutil.Error, AttributeError):
        return 0.0


def browser_cpu() -> dict[int, float]:
    """CPU seconds by pid of the chromium processes started below this script (Playwright's)."""
    out = {}
    for p in psutil.Process().children(recursive=True):
        try:
            if "chrom" in p.name().lower():
                out[p.pid] = cpu_s(p)
        except psutil.Error:
            pass
    return out


def browser_cpu_s(since: dict[int, float] | None = None) -> float:
    """CPU seconds chromium used since `since` (a browser_cpu() reading), over the processes
    alive now (a renderer that exited in between takes its seconds with it: a lower bound)."""
    since = since or {}
    return sum(max(0.0, s - since.get(pid, 0.0)) for pid, s in browser_cpu().items())


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def read_status(run: Path) -> dict:
    try:
        return json.loads((run / "status.json").read_text())
    except (OSError, ValueError):
        return {}


def trainer_numbers(run: Path) -> dict:
    from core.runs import rundir

    report = rundir.read_json(run / rundir.REPORT, {}) or {}
    m = rundir.read_metrics(run)
    end = m["end"][-1] if m["end"] else {}
    steps = [s["step_s"] for s in m["step"][1:] if s.get("step_s") is not None]
    res = [r["cpu_percent"] for r in rundir.read_jsonl(run / rundir.RESOURCES) if r.get("cpu_percent") is not None]
    return {
        "state": read_status(run).get("state"),
        "total_s": report.get("total_s", end.get("total_s")),
        "train_s": report.get("train_s"),
        "steps": len(m["step"]),
        "median_step_s": round(statistics.median(steps), 3) if steps else None,
        "max_step_s": round(max(steps), 3) if steps else None,
        "trainer_cpu_pct": round(statistics.mean(res), 1) if res else None,
    }


# --- one case -----------------------------------------------------------------------------------


def run_cli(cfg_path: Path, runs: Path, name: str) -> dict:
    run = runs / name
    t0 = time.monotonic()
    log = open(runs / f"{name}.log", "wb")
    subprocess.run(
        [sys.executable, "-m", "core", "train", "--config", str(cfg_path), "--run-dir", str(run)],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "QLORA_STUDIO_RUNS": str(runs), "PYTHONUNBUFFERED": "1"},
        check=False,
    )
    log.close()
    return {"viewers": 0, "run": name, "wall_s": round(time.monotonic() - t0, 1), **trainer_numbers(run)}


def open_viewer(browser, url: str, run_id: str | None):
    ctx = browser.new_context(viewport=VIEWPORT)
    page = ctx.new_page()
    page.set_default_timeout(120_000)
    page.goto(f"{url}/?run={run_id}" if run_id else url)
    return ctx, page


def settle(page, timeout_s: float = 180) -> None:
    """Wait until the script run the page triggered has finished."""
    page.wait_for_timeout(400)
    page.wait_for_selector("[data-testid=stApp][data-test-script-state=notRunning]", timeout=timeout_s * 1000)


def warm_up(browser, url: str) -> None:
    """Open the Train page once, as a user does before pressing Launch: the first page view of a
    server imports torch and builds the plan's model on the meta device (cached for the server)."""
    ctx, page = open_viewer(browser, url, None)
    page.get_by_role("button", name="Launch").wait_for(state="visible", timeout=300_000)
    settle(page, 300)
    ctx.close()


def launch_with_button(page, quick: bool, runs: Path, preset: str = "demo") -> Path:
    """Set the form like the config and press Launch on the Train page; returns the new run folder."""
    page.get_by_role("button", name="Launch").wait_for(state="visible")
    settle(page)
    from core.config import PRESETS

    if preset != next(iter(PRESETS)):  # the Preset box opens on the first preset
        from app_pages.launch import PRESET_LABELS

        option = page.get_by_role("option", name=PRESET_LABELS.get(preset, preset))
        for attempt in range(5):  # a rerun of the page can close the list just opened
            page.get_by_role("combobox", name="Preset").click()
            try:
                option.click(timeout=10_000)
                break
            except Exception:  # noqa: BLE001 (Playwright's TimeoutError)
                if attempt == 4:
                    raise
                settle(page)
        settle(page)
    if quick:
        for label, value in (("Epochs", QUICK["train.epochs"]), ("Max train rows", QUICK["data.max_train_rows"])):
            box = page.locator(f'input[aria-label="{label}"]')
            box.fill(str(value))
            box.press("Enter")
            settle(page)
    before = set(runs.glob("*/status.json"))
    page.get_by_role("button", name="Launch").click()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        new = set(runs.glob("*/status.json")) - before
        if new:
            return next(iter(new)).parent
        time.sleep(0.1)
    raise RuntimeError("the Launch button started no run")


class Timeline:
    """With --timeline: every 0.5 s, the CPU seconds the server and Chromium have used so far, to
    line up with the trainer's step records (their "t") and see which UI activity slows which steps."""

    def __init__(self, path: Path | None, server: psutil.Process):
        self.path, self.server, self.stop = path, server, threading.Event()
        if path:
            self.thread = threading.Thread(target=self.loop, daemon=True)
            self.thread.start()

    def loop(self) -> None:
        with open(self.path, "w") as f:
            while not self.stop.wait(0.5):
                f.write(
                    json.dumps(
                        {
                            "t": time.time(),
                            "server_s": round(cpu_s(self.server), 3),
                            "chromium_s": round(browser_cpu_s(), 3),
                        }
                    )
                    + "\n"
                )

    def close(self) -> None:
        self.stop.set()
        if self.path:
            self.thread.join()


def run_watched(
    n: int,
    cfg,
    runs: Path,
    url: str,
    browser,
    server: psutil.Process,
    button: bool,
    quick: bool,
    timeline: Path | None = None,
    preset: str = "demo",
) -> dict:
    from core import jobs

    server0, chrome0 = cpu_s(server), browser_cpu()
    tl = Timeline(timeline, server)
    t0 = time.monotonic()
    viewers = []
    if button:
        viewers.append(open_viewer(browser, url, None))
        run = launch_with_button(viewers[0][1], quick, runs, preset)
    else:
        run = jobs.launch(cfg)
    viewers += [open_viewer(browser, url, run.name) for _ in range(n - len(viewers))]
    while read_status(run).get("state") in ACTIVE or not (run / "status.json").exists():
        time.sleep(0.25)
    t_done = time.monotonic()
    # every page must leave the live view for the done view by itself (the fragment's st.rerun)
    switched = []
    for _, page in viewers:
        try:
            page.get_by_text("Test accuracy after").first.wait_for(state="visible", timeout=60_000)
            switched.append(round(time.monotonic() - t_done, 1))
        except Exception:  # noqa: BLE001 (Playwright's TimeoutError)
            switched.append(None)
    wall = time.monotonic() - t0
    server_s, chrome_s = cpu_s(server) - server0, browser_cpu_s(chrome0)
    tl.close()
    for ctx, _ in viewers:
        ctx.close()
    return {
        "viewers": n,
        "run": run.name,
        "wall_s": round(wall, 1),
        **trainer_numbers(run),
        "done_view_after_s": max(switched, key=lambda s: -1 if s is None else s) if None not in switched else None,
        "server_cpu_pct": round(100 * server_s / wall, 1),
        "chromium_cpu_pct": round(100 * chrome_s / wall, 1),
    }


# --- the synthetic UI-only measurement ---------------------------------------------------------


def fake_run(runs: Path, sleeper: subprocess.Popen, stop: threading.Event) -> Path:
    """A running run that gains a step every 0.3 s and a resources sample every second."""
    from core.config import get_preset
    from core.runs import liveness, rundir
    from core.runs.state import write_status

    run = runs / f"synthetic-{int(time.time())}"
    run.mkdir(parents=True)
    get_preset("demo").save(run / rundir.CONFIG)
    write_status(
        run,
        state="running",
        phase="training",
        pid=sleeper.pid,
        created_at=rundir.now_iso(),
        started_at=rundir.now_iso(),
    )
    m, r = run / rundir.METRICS, run / rundir.RESOURCES
    t = time.time()
    rundir.append_jsonl(
        m, {"t": t, "kind": "setup", "total_steps": 100000, "epochs": 4, "steps_per_epoch": 25000, "device": "cpu"}
    )
    rundir.append_jsonl(
        m,
        {
            "t": t,
            "kind": "eval",
            "split": "validation",
            "stage": "before",
            "accuracy": 0.35,
            "loss": 1.1,
            "n": 200,
            "seconds": 2.0,
        },
    )

    def writer():
        step, last_res = 0, 0.0
        while not stop.is_set():
            step += 1
            now = time.time()
            rundir.append_jsonl(
                m,
                {
                    "t": now,
                    "kind": "step",
                    "step": step,
                    "epoch": 1,
                    "epoch_step": step,
                    "steps_per_epoch": 25000,
                    "loss": 1.1 / (1 + step / 200),
                    "rows": 32,
                    "samples_per_s": 100.0,
                    "tokens_per_s": 2300.0,
                    "step_s": 0.3,
                },
            )
            if now - last_res >= 1:
                last_res = now
                if hasattr(rundir, "beat"):  # the trainer's sign of life, where rundir checks it
                    liveness.beat(run)
                rundir.append_jsonl(r, {"t": now, "cpu_percent": 190.0 + step % 7, "rss_gb": 0.9, "ram_used_gb": 1.2})
            stop.wait(0.3)

    threading.Thread(target=writer, daemon=True).start()
    return run


def synthetic(args, runs: Path, url: str, browser, server: psutil.Process) -> list[dict]:
    rows = []
    for _ in range(args.repeat):
        for n in args.viewers:
            sleeper = subprocess.Popen(["sleep", str(args.synthetic + 120)])
            stop = threading.Event()
            try:
                run = fake_run(runs, sleeper, stop)
                viewers = [open_viewer(browser, url, run.name) for _ in range(n)]
                for _, page in viewers:  # pages loaded, fragments running
                    page.locator("[data-testid=stProgress]").first.wait_for(state="visible")
                    settle(page)
                time.sleep(3)
                l0 = load()
                server0, chrome0, t0 = cpu_s(server), browser_cpu(), time.monotonic()
                time.sleep(args.synthetic)
                wall = time.monotonic() - t0
                row = {
                    "viewers": n,
                    "seconds": round(wall, 1),
                    "server_cpu_pct": round(100 * (cpu_s(server) - server0) / wall, 1),
                    "chromium_cpu_pct": round(100 * browser_cpu_s(chrome0) / wall, 1),
                    "load_before": l0,
                    "load_after": load(),
                }
                for ctx, _ in viewers:
                    ctx.close()
            finally:
                stop.set()
                sleeper.kill()
                sleeper.wait()
            print(json.dumps(row), flush=True)
            rows.append(row)
    print(f"\n{'viewers':>7}  {'server CPU %':>12}  {'chromium CPU %':>14}  load")
    for r in rows:
        print(
            f"{r['viewers']:>7}  {r['server_cpu_pct']:>12}  {r['chromium_cpu_pct']:>14}  "
            f"{r['load_before']} -> {r['load_after']}"
        )
    return rows


# --- main ---------------------------------------------------------------------------------------


def summarise(rows: list[dict]) -> dict:
    by_n: dict[int, list[dict]] = {}
    for r in rows:
        by_n.setdefault(r["viewers"], []).append(r)
    cli = [r["total_s"] for r in by_n.get(0, []) if r.get("total_s")]
    base = statistics.median(cli) if cli else None
    out = {}
    for n, rs in sorted(by_n.items()):
        tot = [r["total_s"] for r in rs if r.get("total_s")]
        med = statistics.median(tot) if tot else None
        out[n] = {
            "runs": len(rs),
            "median_total_s": med,
            "ratio_to_cli": round(med / base, 3) if med and base else None,
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--viewers", default="0,1,3", help="comma-separated session counts (0 = CLI, nobody watching)")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help=f"demo with {QUICK}: a smoke run of the benchmark")
    ap.add_argument(
        "--button", action="store_true", help="start watched runs with the Launch button of the first viewer"
    )
    ap.add_argument("--preset", default="demo", help="the preset every case trains (llm-demo: SmolLM2)")
    ap.add_argument("--synthetic", type=float, metavar="SECONDS", help="UI cost only: a fake run watched for SECONDS")
    ap.add_argument("--json", type=Path, help="also write the rows and summary to this file")
    ap.add_argument("--keep", action="store_true", help="keep the temporary runs folder")
    ap.add_argument(
        "--timeline",
        type=Path,
        metavar="DIR",
        help="write DIR/<run>.timeline.jsonl (server and Chromium CPU every 0.5 s) and copy each "
        "run's metrics.jsonl beside it",
    )
    args = ap.parse_args()
    args.viewers = [int(v) for v in args.viewers.split(",") if v.strip()]
    if args.timeline:
        args.timeline.mkdir(parents=True, exist_ok=True)
    if not args.synthetic and 0 not in args.viewers:
        args.viewers = [0] + args.viewers
    chromium = shutil.which("chromium")
    if not chromium:
        raise SystemExit("Debian's chromium is not on PATH (apt-get install -y chromium); never `playwright install`")

    from playwright.sync_api import sync_playwright

    from core.config import get_preset, override

    tmp = Path(tempfile.mkdtemp(prefix="live-view-bench-"))
    runs = tmp / "runs"
    runs.mkdir()
    os.environ["QLORA_STUDIO_RUNS"] = str(runs)  # jobs.launch() puts the runs here too
    cfg = override(get_preset(args.preset), QUICK) if args.quick else get_preset(args.preset)
    cfg_path = tmp / "config.json"
    cfg.save(cfg_path)
    proc, url = start_server(runs, tmp / "streamlit.log")
    server = psutil.Process(proc.pid)
    info = {
        "cpus": os.cpu_count(),
        "preset": args.preset,
        "quick": args.quick,
        "button": args.button,
        "load_start": load(),
        "viewers": args.viewers,
        "repeat": args.repeat,
    }
    print(json.dumps(info), flush=True)
    rows: list[dict] = []
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
            try:
                warm_up(browser, url)
                if args.synthetic:
                    rows = synthetic(args, runs, url, browser, server)
                else:
                    k = 0
                    for _ in range(args.repeat):
                        for n in args.viewers:
                            k += 1
                            l0 = load()
                            tl = args.timeline / f"case-{k}-viewers-{n}.timeline.jsonl" if args.timeline else None
                            row = (
                                run_cli(cfg_path, runs, f"cli-{k}")
                                if n == 0
                                else run_watched(
                                    n, cfg, runs, url, browser, server, args.button, args.quick, tl, args.preset
                                )
                            )
                            if args.timeline:
                                shutil.copy(
                                    runs / row["run"] / "metrics.jsonl",
                                    args.timeline / f"case-{k}-viewers-{n}.metrics.jsonl",
                                )
                            row.update(load_before=l0, load_after=load())
                            print(json.dumps(row), flush=True)
                            rows.append(row)
            finally:
                browser.close()
    finally:
        from core import jobs

        for st in runs.glob("*/status.json"):  # never leave a trainer behind
            if read_status(st.parent).get("state") in ACTIVE:
                jobs.stop(st.parent)
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    info["load_end"] = load()
    summary = {} if args.synthetic else summarise(rows)
    if not args.synthetic:
        print(
            f"\n{'viewers':>7}  {'total_s':>8}  {'train_s':>8}  {'step med/max':>13}  {'wall_s':>7}  "
            f"{'server %':>8}  {'chromium %':>10}  {'trainer %':>9}  {'done view':>9}  load"
        )
        for r in rows:
            print(
                f"{r['viewers']:>7}  {r['total_s'] or '-':>8}  {r['train_s'] or '-':>8}  "
                f"{str(r['median_step_s']) + '/' + str(r['max_step_s']):>13}  {r['wall_s']:>7}  "
                f"{r.get('server_cpu_pct', '-'):>8}  {r.get('chromium_cpu_pct', '-'):>10}  "
                f"{r['trainer_cpu_pct'] or '-':>9}  {r.get('done_view_after_s', '-') or '-':>9}  "
                f"{r['load_before']} -> {r['load_after']}"
            )
        print()
        for n, s in summary.items():
            print(
                f"viewers {n}: median total {s['median_total_s']} s over {s['runs']} run(s), "
                f"{s['ratio_to_cli']}x the CLI"
            )
    result = {"info": info, "rows": rows, "summary": summary}
    print(json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
