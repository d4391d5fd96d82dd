"""Reliability of the run folder contract with real processes: liveness (pid + start time +
heartbeat), Stop never signalling a reused pid, queued runs whose trainer died, one GPU run at a
time (an OS file lock), atomic claims of a run folder, and pages that survive damaged files."""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from core import jobs
from core.config import get_preset, override
from core.results.report import damaged_files
from core.runs import liveness, rundir, state
from core.runs.state import claim_run, list_runs, read_status, stop_requested, write_status
from tests.helpers import ROOT, run_lock_holder


def old_iso(seconds_ago: float) -> str:
    return datetime.fromtimestamp(time.time() - seconds_ago, UTC).isoformat(timespec="seconds")


def set_status(run: Path, **fields) -> None:
    """Write status.json fields as they are (write_status would refresh updated_at)."""
    status = json.loads((run / rundir.STATUS).read_text())
    rundir.atomic_write_json(run / rundir.STATUS, {**status, **fields})


# --- liveness -----------------------------------------------------------------------------------


def test_a_reused_pid_is_never_signalled_and_the_run_reads_failed(tmp_path, sleeper):
    run = tmp_path / "run"
    started = liveness.process_start(sleeper.pid)
    # the trainer that had this pid started a minute before the process that has it now
    claim_run(run, state="running", pid=sleeper.pid, pid_start=started - 60)
    liveness.beat(run)  # even a fresh heartbeat does not make another process the trainer
    status = read_status(run)
    assert status["state"] == "failed", status
    assert f"pid {sleeper.pid}" in status["error"] and "belongs to another process" in status["error"]
    assert jobs.stop(run) is False
    time.sleep(0.5)
    assert sleeper.poll() is None, "jobs.stop signalled a process that is not the run's trainer"
    assert stop_requested(run)  # the STOP file is still written

    # the same pid with its own start time reads running, but Stop signals only the process that
    # holds the run's trainer lock (tests/app/test_hardening.py: a forged pid never gets a signal)
    set_status(run, pid_start=started)
    assert read_status(run)["state"] == "running"
    sleeper = run_lock_holder(run)  # the trainer: its own pid, start time and the run's lock
    set_status(run, pid=sleeper.pid, pid_start=liveness.process_start(sleeper.pid))
    assert read_status(run)["state"] == "running"
    assert jobs.stop(run) is True
    assert sleeper.wait(timeout=10) == -signal.SIGTERM


def test_write_status_records_the_start_time_of_the_pid_it_writes(tmp_path, sleeper):
    status = write_status(tmp_path, state="running", pid=sleeper.pid)
    assert status["pid_start"] == pytest.approx(liveness.process_start(sleeper.pid))
    assert liveness.pid_alive(sleeper.pid, status["pid_start"])
    assert not liveness.pid_alive(sleeper.pid, status["pid_start"] - 5)
    assert write_status(tmp_path, pid=None)["pid_start"] is None


def test_a_live_trainer_without_a_recent_heartbeat_reads_failed_and_a_fresh_one_running(tmp_path):
    run = tmp_path / "run"
    claim_run(run, state="running", pid=os.getpid())  # this process is alive and matches
    set_status(run, updated_at=old_iso(600))  # no status write for ten minutes either
    (run / rundir.HEARTBEAT).write_text(
        json.dumps({"t": time.time() - rundir.HEARTBEAT_STALE_S - 5, "pid": os.getpid()})
    )
    status = read_status(run)
    assert status["state"] == "failed" and "heartbeat" in status["error"], status
    liveness.beat(run)
    assert read_status(run)["state"] == "running"
    # the same heartbeat read a little more than the threshold later
    assert read_status(run, now=time.time() + rundir.HEARTBEAT_STALE_S + 2)["state"] == "failed"
    # a status write is a sign of life too (a trainer between beats, or from before heartbeats)
    (run / rundir.HEARTBEAT).unlink()
    write_status(run, phase="training")
    assert read_status(run)["state"] == "running"


def test_the_heartbeat_thread_beats_until_the_run_ends(tmp_path):
    run = tmp_path / "run"
    claim_run(run, state="running", pid=os.getpid())
    hb = liveness.Heartbeat(run, every=0.05).start()
    try:
        first = liveness.last_beat(run)
        assert first is not None
        assert rundir.wait_for(lambda: liveness.last_beat(run) > first, timeout=5)
        write_status(run, state="done")
        assert rundir.wait_for(lambda: not hb._thread.is_alive(), timeout=5)  # a finished run gets no beats
    finally:
        hb.stop()


def test_a_queued_run_whose_trainer_died_on_start_reads_failed_with_the_log_reason(tmp_path, monkeypatch):
    monkeypatch.setenv(rundir.RUNS_ENV, str(tmp_path / "runs"))
    shadow = tmp_path / "shadow"  # a psutil that cannot be imported, ahead of the real one for the trainer
    shadow.mkdir()
    (shadow / "psutil.py").write_text("raise ImportError('psutil is broken on purpose')\n")
    cfg = override(get_preset("demo"), {"model.device": "cpu"})
    run = jobs.launch(cfg, env={"PYTHONPATH": str(shadow)})
    assert read_status(run)["state"] in ("queued", "failed")
    assert rundir.wait_for(lambda: read_status(run)["state"] != "queued", timeout=60)
    status = read_status(run)
    assert status["state"] == "failed", status
    assert "ended before it started the run" in status["error"]
    assert "ImportError: psutil is broken on purpose" in status["error"]
    assert [r["state"] for r in list_runs()] == ["failed"]


def test_a_queued_run_with_no_trainer_at_all_fails_after_the_grace_period(tmp_path):
    run = tmp_path / "run"
    claim_run(run, state="queued", pid=None)
    (run / rundir.LOG).write_text("starting\nerror: something went wrong early\n")
    assert read_status(run)["state"] == "queued"
    status = read_status(run, now=time.time() + rundir.QUEUED_GRACE_S + 1)
    assert status["state"] == "failed" and "never started" in status["error"]
    assert "error: something went wrong early" in status["error"]


# --- one GPU run at a time ----------------------------------------------------------------------

HOLD_GPU = (
    "import sys, time; from pathlib import Path; from core.runs import liveness; "
    "liveness.gpu_lock(Path(sys.argv[1]), 'cuda'); print('locked', flush=True); time.sleep(120)"
)


def test_the_gpu_lock_refuses_a_second_launch_and_is_released_when_its_holder_is_killed(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    monkeypatch.setenv(rundir.RUNS_ENV, str(runs))
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_GPU, str(runs / "gpu-run")],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        env={**os.environ, rundir.RUNS_ENV: str(runs)},
    )
    try:
        assert holder.stdout.readline().strip() == b"locked"
        started = []
        monkeypatch.setattr(jobs.subprocess, "Popen", lambda args, **kw: started.append(args))
        assert liveness.gpu_holder() == "gpu-run"
        gpu_cfg = get_preset("demo")  # device auto: the GPU when there is one, and a held lock says there is
        with pytest.raises(ValueError, match=r"^another run \(gpu-run\) is using the GPU; wait for it or stop it$"):
            jobs.launch(gpu_cfg)
        with pytest.raises(ValueError, match=r"another run \(gpu-run\) is using the GPU"):
            jobs.launch_with_uploads(gpu_cfg, {"train": ("t.jsonl", b"{}\n")})
        assert not started and sorted(p.name for p in runs.iterdir()) == [rundir.GPU_LOCK]  # nothing made
        # a trainer that loses the race fails at once with that message
        with pytest.raises(ValueError, match=r"another run \(gpu-run\) is using the GPU"):
            liveness.gpu_lock(runs / "late", "cuda", tries=2)
        # CPU runs take no lock and are not refused
        assert liveness.gpu_lock(runs / "late", "cpu") is None
        cpu_run = jobs.launch(override(gpu_cfg, {"model.device": "cpu"}))
        assert started and read_status(cpu_run)["state"] == "queued"
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert liveness.gpu_holder() is None  # released by the OS with the process
    run = jobs.launch(gpu_cfg)
    assert read_status(run)["state"] == "queued"
    fd = liveness.gpu_lock(run, "cuda")
    try:
        assert liveness.gpu_holder() == run.name
    finally:
        os.close(fd)
    assert liveness.gpu_holder() is None


def test_a_cli_trainer_that_finds_the_gpu_taken_fails_with_the_message_in_its_status(tmp_path, monkeypatch):
    import torch

    import core.model
    from core.__main__ import main

    runs = tmp_path / "runs"
    monkeypatch.setenv(rundir.RUNS_ENV, str(runs))
    monkeypatch.setattr(core.model, "pick_device", lambda requested="auto": torch.device("cuda", 0))
    fd = liveness.gpu_lock(runs / "holder", "cuda")  # another run's trainer holds the GPU
    try:
        run = tmp_path / "second"
        assert main(["train", "--preset", "demo", "--run-dir", str(run)]) == 2
        status = read_status(run)
        assert status["state"] == "failed"
        assert status["error"] == "another run (holder) is using the GPU; wait for it or stop it"
    finally:
        os.close(fd)


# --- claiming a run folder ----------------------------------------------------------------------

CLAIM = """import sys, time
from core.runs.state import claim_run
time.sleep(max(0.0, float(sys.argv[2]) - time.time()))
try:
    claim_run(sys.argv[1], state="running", pid=None)
    print("won")
except ValueError as e:
    print("lost", e)
"""


def test_of_two_processes_claiming_one_run_folder_exactly_one_wins(tmp_path):
    for i in range(10):
        run = tmp_path / f"run-{i}"
        at = str(time.time() + 1.5)  # both processes claim at the same moment
        procs = [
            subprocess.Popen([sys.executable, "-c", CLAIM, str(run), at], cwd=ROOT, stdout=subprocess.PIPE, text=True)
            for _ in range(2)
        ]
        outs = sorted(p.communicate(timeout=60)[0].strip() for p in procs)
        assert [o.split()[0] for o in outs] == ["lost", "won"], outs
        assert f"{run} already holds a run" in outs[0]
        assert json.loads((run / rundir.STATUS).read_text())["state"] == "running"
        assert sorted(p.name for p in run.iterdir()) == [rundir.STATUS]  # no claim temp files left


def test_of_many_threads_claiming_one_run_folder_exactly_one_wins(tmp_path):
    for i in range(10):
        run = tmp_path / f"run-{i}"
        barrier = threading.Barrier(8)
        results = []

        def claim(run=run, barrier=barrier, results=results):
            barrier.wait()
            try:
                claim_run(run, state="running", pid=None)
                results.append("won")
            except ValueError as e:
                results.append(str(e))

        threads = [threading.Thread(target=claim) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results.count("won") == 1, results
        assert all("already holds a run" in r for r in results if r != "won"), results


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "core", *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


@pytest.mark.e2e
def test_the_cli_refuses_a_run_folder_that_is_taken_or_is_not_a_run_folder(tmp_path, monkeypatch):
    run = tmp_path / "taken"
    claim_run(run, state="done", pid=None)
    before = (run / rundir.STATUS).read_bytes()
    p = cli("train", "--preset", "demo", "--run-dir", run)
    assert p.returncode == 2 and f"error: {run} already holds a run" in p.stderr, p.stderr
    assert (run / rundir.STATUS).read_bytes() == before

    mine = tmp_path / "my-folder"  # the user's own files, one of them named like a run file
    mine.mkdir()
    (mine / "config.json").write_text('{"my": "own settings"}\n')
    (mine / "notes.txt").write_text("do not touch\n")
    files = {f.name: f.read_bytes() for f in mine.iterdir()}
    p = cli("train", "--preset", "demo", "--run-dir", mine)
    assert p.returncode == 2 and "is not empty and is not a run folder" in p.stderr, p.stderr
    assert {f.name: f.read_bytes() for f in mine.iterdir()} == files
    monkeypatch.setattr(jobs.subprocess, "Popen", lambda args, **kw: pytest.fail("started a trainer"))
    with pytest.raises(ValueError, match="is not empty and is not a run folder"):
        jobs.launch(get_preset("demo"), run_dir=mine)
    assert {f.name: f.read_bytes() for f in mine.iterdir()} == files


def test_a_launched_trainer_takes_over_its_queued_run_and_nobody_else_can(tmp_path):
    run = tmp_path / "run"
    claim_run(run, state="queued", pid=None, claim="secret-token")
    with pytest.raises(ValueError, match="already holds a run"):
        claim_run(run, state="running", pid=os.getpid())  # a second CLI into the same folder
    with pytest.raises(ValueError, match="already holds a run"):
        claim_run(run, token="wrong", state="running", pid=os.getpid())
    status = claim_run(run, token="secret-token", state="running", pid=os.getpid())
    assert status["state"] == "running" and status["pid"] == os.getpid() and status["claim"] is None
    with pytest.raises(ValueError, match="already holds a run"):  # the token works once
        claim_run(run, token="secret-token", state="running", pid=os.getpid())


# --- damaged files ------------------------------------------------------------------------------


def test_readers_return_defaults_for_damaged_files(tmp_path):
    f = tmp_path / "x.json"
    for data in (b"", b'{"a": ', b"\xff\xfe{}", b"[1, 2]", b"3"):
        f.write_bytes(data)
        assert rundir.read_json(f, {}) == {}
    f.write_bytes(b"[1, 2]")
    assert rundir.read_json(f) == [1, 2]  # no default, no type asked for
    log = tmp_path / "m.jsonl"
    log.write_bytes(b'{"step": 1}\n\xff\xfe garbage\n[1, 2]\n42\nnot json\n{"step": 2, "text": "a\xe2\x80\xa8b"}\n{"st')
    assert rundir.read_jsonl(log) == [{"step": 1}, {"step": 2, "text": "a\u2028b"}]
    assert rundir.scan_jsonl(log) == ([{"step": 1}, {"step": 2, "text": "a\u2028b"}], 4)
    assert rundir.scan_jsonl(log, complete=True)[1] == 5


def test_a_real_run_folder_has_no_damage(tiny_run):
    assert state.damaged_files(tiny_run) == []
    assert list_runs(tiny_run.parent)[0]["damaged"] is None


def damage(path: Path, how: str) -> None:
    """Damage one file of a run folder the way a full disk, a crash or a stray editor would."""
    data = path.read_bytes()
    if how == "empty":
        path.write_bytes(b"")
    elif how == "truncated":
        cut = len(data) // 2
        path.write_bytes(data[: cut + 1 if data[cut - 1 : cut] == b"\n" else cut])  # cut inside a line
    elif how == "not-utf8":
        cut = data.index(b"\n", len(data) // 3) + 1 if b"\n" in data[len(data) // 3 :] else len(data) // 2
        path.write_bytes(data[:cut] + b"\xff\xfe\x00garbage \x80\x81\n" + data[cut:])
    elif how == "wrong-type":
        wrong = {rundir.STATUS: b"[1, 2, 3]\n", rundir.CONFIG: b'{"model": 3, "data": {"labels": "abc"}}\n'}
        if path.name in wrong:
            path.write_bytes(wrong[path.name])
        elif path.name == rundir.REPORT:
            report = json.loads(data)
            path.write_text(json.dumps({**report, "test_after": 5, "epochs": {"1": "x"}}))
        elif path.name == rundir.METRICS:
            path.write_bytes(data + b'[1, 2]\n42\n{"kind": "step", "step": "three", "loss": "low"}\n')
        else:  # predictions
            path.write_bytes(data + b'[1, 2]\n{"id": 7, "gold": 3, "pred": null, "probs": "x", "correct": "yes"}\n')


FILES = [rundir.STATUS, rundir.CONFIG, rundir.REPORT, rundir.METRICS, f"{rundir.PREDICTIONS}/test_after.jsonl"]
HOWS = ["empty", "truncated", "not-utf8", "wrong-type"]


def page_text(at) -> str:
    parts = []
    for kind in ("title", "markdown", "caption", "info", "warning", "error", "success"):
        parts += [str(e.value) for e in getattr(at, kind)]
    parts += [str(e.value) for e in at.sidebar.caption]
    return "\n".join(parts)


@pytest.mark.parametrize("name", FILES)
def test_pages_survive_a_damaged_file_and_name_it(name, tiny_run, tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    root = tmp_path / "runs"
    good = root / "20990101-000000-good"
    shutil.copytree(tiny_run, good, ignore=shutil.ignore_patterns("checkpoints"))
    for how in HOWS:
        bad = root / f"20990101-000000-bad-{how}"
        shutil.copytree(good, bad)
        damage(bad / name, how)
        problems = damaged_files(bad)
        assert any(p.startswith(f"{name}:") for p in problems), (how, problems)
    monkeypatch.setenv(rundir.RUNS_ENV, str(root))
    for how in HOWS:
        bad = f"20990101-000000-bad-{how}"
        at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
        at.query_params["run"] = bad
        at.run()
        options = at.sidebar.radio[0].options
        assert len(options) == len(HOWS) + 1  # every run is listed, the damaged one too
        if name in (rundir.STATUS, rundir.CONFIG):  # the sidebar itself says which run is damaged, and why
            assert any(bad in o and "damaged" in o for o in options), options
            assert any(bad in c.value and name in c.value for c in at.sidebar.caption)
        for page in ("train", "report", "failures"):
            if page != "train":
                at.switch_page(f"app_pages/{page}.py").run()
            assert not at.exception, (how, page, [e.value for e in at.exception])
            text = page_text(at)
            assert "could not be shown" not in text, (how, page, text)  # the page coped, not the frame's guard
            assert f"{bad}` is damaged" in text and name in text, (how, page, text)
        # another run is still selectable and browsable
        at.sidebar.radio[0].set_value(next(o for o in options if "good" in o)).run()
        at.switch_page("app_pages/report.py").run()
        assert not at.exception and at.session_state["run"] == good.name
        assert "Before fine-tuning" in {m.label for m in at.metric}
        assert not any("is damaged" in w.value for w in at.warning)
