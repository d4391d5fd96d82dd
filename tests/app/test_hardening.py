"""The app held up as a stranger would try it: text from the URL, the data and the run folder is
inert on the pages and in the charts; the password slows and locks out guesses; local paths off
means no `datasets` file loader either; a crafted run folder's links are never followed and its
forged pid never gets Stop's signal; run ids end where they end; the Playground's models survive a
cache clearing and a crowd gets "busy", not a timeout; a read-only server takes no upload bytes."""

import io
import json
import logging
import os
import shutil
import subprocess
import threading
import time
import zipfile

import pytest
import streamlit as st
from markdown_it import MarkdownIt

from app_pages import ui
from core import access, jobs, share
from core.config import get_preset, override
from core.model_pool import ModelPool
from core.runs import liveness, rundir, watch
from core.runs.state import claim_run, list_runs, read_status, stop_requested, write_status
from tests.helpers import ROOT, make_failed_run, run_lock_holder, start
from tests.results.test_exports_inert import LABELS, make_hostile_run

LIVE = {"link_open", "image", "html_inline", "html_block"}
HOSTILE = '<a href="http://evil.example/x">click</a><img src="http://evil.example/i.png">'


def live_elements(markdown: str) -> set[str]:
    kinds = set()
    for t in MarkdownIt("commonmark", {"html": True}).enable(["table", "strikethrough"]).parse(markdown):
        kinds.add(t.type)
        kinds.update(c.type for c in t.children or [])
    return kinds & LIVE


# --- injection --------------------------------------------------------------------------------------


def test_a_run_id_from_the_url_is_shown_inert_in_the_sidebar(tmp_path, monkeypatch):
    make_failed_run(tmp_path / "runs")
    crafted = "x` [click](http://evil.example/x) ![i](http://evil.example/i.png) <img src=x onerror=alert(1)> `"
    at = start(tmp_path / "runs", monkeypatch, run=crafted)
    warning = next(w.value for w in at.sidebar.warning if "is not in the runs folder" in w.value)
    assert not live_elements(warning), warning
    assert "http://" not in warning  # no autolink literal left for Streamlit's renderer either


def test_labels_reach_the_charts_as_text():
    figures = [
        ui.confusion_figure([[1, 0, 0], [0, 1, 0], [0, 0, 1]], [HOSTILE, *LABELS[1:]], "t"),
        ui.moves_figure([[1, 0, 0], [0, 1, 0], [0, 0, 1]], [HOSTILE, *LABELS[1:]]),
        ui.probs_figure([HOSTILE, *LABELS[1:]], [0.2, 0.3, 0.5], [0.6, 0.2, 0.2], HOSTILE),
        ui.trajectory_figure(
            {
                "epochs": [0, 1],
                "p_gold": [0.2, 0.8],
                "correct": [False, True],
                "pred": [HOSTILE, "x"],
                "split": HOSTILE,
            },
            1,
        ),
        ui.reliability_figure({HOSTILE: {"ece": 0.1, "bins": [{"n": 3, "confidence": 0.5, "accuracy": 0.4}]}}),
    ]
    for fig in figures:
        spec = json.dumps(fig.to_dict())
        assert "<a " not in spec and "<img" not in spec and "<b>" not in spec, spec[:500]
        assert "&lt;a href=" in spec  # shown as typed: Plotly turns &lt; back into <


def test_the_report_and_failures_pages_keep_hostile_labels_and_names_inert(tmp_path, monkeypatch):
    run = make_hostile_run(tmp_path / "runs")
    at = start(run.parent, monkeypatch, page="report", run=run.name)
    specs = [e.proto.spec for e in at.get("plotly_chart")]
    assert specs and not any("<a " in s or "<b>" in s or "<img" in s for s in specs)
    group = next(h.value for h in at.subheader if h.value.startswith("Several seeds"))
    assert not live_elements(group)  # the seed group's name (from config.json) is a code span, not markup
    tokens = MarkdownIt("commonmark").parseInline(group)[0].children
    assert [t.content for t in tokens if t.type == "code_inline"] == ["![img](http://evil.example/a.png)"]
    for kind in ("markdown", "caption", "warning", "info", "subheader"):
        for e in getattr(at, kind):
            assert not live_elements(str(e.value)), (kind, e.value)
    links = [p for p in at.get("page_link") if p.proto.query_string]
    assert links and all(f"run={run.name}" in p.proto.query_string for p in links)
    at = start(run.parent, monkeypatch, page="failures", run=run.name)
    specs = [e.proto.spec for e in at.get("plotly_chart")]
    assert specs and not any("<a " in s or "<b>" in s for s in specs)


# --- the password ------------------------------------------------------------------------------------


@pytest.fixture
def failures(monkeypatch):
    """access.FAILURES on a fake clock that never sleeps: (Failures, clock, the waits it asked for)."""
    now = [1000.0]
    waits: list[float] = []
    f = access.Failures(clock=lambda: now[0], sleep=waits.append)
    monkeypatch.setattr(access, "FAILURES", f)
    monkeypatch.setenv(access.PASSWORD_ENV, "s3cret pass")
    return f, now, waits


def test_wrong_passwords_wait_longer_each_time_lock_out_and_are_logged(failures, caplog):
    _, now, waits = failures
    caplog.set_level(logging.WARNING, logger="qlora_studio.access")
    for i in range(access.LOCKOUT_FAILURES):
        with pytest.raises(access.Refused, match="^Wrong password: launching a run was refused.$"):
            access.check("launch", f"guess-{i}", who="session-a")
    assert waits[:4] == [0.5, 1.1, 2.2, 4.3] and max(waits) == access.MAX_DELAY_S  # doubling, capped
    assert len(caplog.records) == access.LOCKOUT_FAILURES
    assert not any("guess-" in r.getMessage() for r in caplog.records)  # never the guess
    assert "wrong password for launching a run (session session-a)" in caplog.records[0].getMessage()
    # locked out: even the right password is refused, without a comparison or a wait
    with pytest.raises(access.Refused, match="^Too many wrong passwords: launching a run was refused"):
        access.check("launch", "s3cret pass", who="session-a")
    assert len(waits) == access.LOCKOUT_FAILURES
    # another session is slowed by the server's count, not locked out
    access.check("launch", "s3cret pass", who="session-b")
    with pytest.raises(access.Refused, match="Wrong password"):
        access.check("launch", "nope", who="session-b")
    assert waits[-1] == pytest.approx(0.5 + access.SERVER_DELAY_S * access.LOCKOUT_FAILURES)
    now[0] += access.LOCKOUT_WINDOW_S + 1  # the window passes
    access.check("launch", "s3cret pass", who="session-a")


def test_the_whole_server_locks_out_after_many_failures_from_many_sessions(failures):
    f, now, waits = failures
    for i in range(access.SERVER_LOCKOUT_FAILURES):
        with pytest.raises(access.Refused):
            access.check("stop", "x", who=f"s{i}")  # a new session for every guess
    with pytest.raises(access.Refused, match="Too many wrong passwords"):
        access.check("launch", "s3cret pass", who="fresh")
    with pytest.raises(access.Refused, match="Too many wrong passwords"):
        access.check("launch", "s3cret pass")  # a call without a session too
    assert not access.allowed("launch", "s3cret pass")  # the pages hide the actions meanwhile
    now[0] += access.LOCKOUT_WINDOW_S + 1
    assert access.allowed("launch", "s3cret pass")
    assert access.password_ok("s3cret pass") and not access.password_ok("s3cret pas") and not access.password_ok("")


def test_the_password_field_counts_its_sessions_failures(failures, tmp_path, monkeypatch):
    _, _, waits = failures
    at = start(tmp_path / "runs", monkeypatch)
    at.text_input(key="password_field").input("wrong one").run()
    assert at.error and at.error[0].value == "Wrong password: launching a run was refused."
    at.text_input(key="password_field").input("wrong two").run()
    assert waits == [0.5, 1.1]  # the same session: the second wait doubled
    at.text_input(key="password_field").input("s3cret pass").run()
    assert not at.error


# --- local paths off means off -------------------------------------------------------------------------


def test_datasets_file_loaders_are_not_hub_dataset_ids(monkeypatch):
    from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES

    assert set(_PACKAGED_DATASETS_MODULES) <= set(access.DATASETS_BUILDERS)  # the list is complete
    monkeypatch.setenv(access.LOCAL_PATHS_ENV, "0")
    base = get_preset("demo")
    for name in ("json", "csv", "text", "parquet", "JSON", "arrow", "imagefolder"):
        cfg = override(base, {"data.source": name, "data.train_split": "train"})
        with pytest.raises(access.Refused, match=f"Hub dataset id '{name}' is the name of a file loader"):
            access.check_sources(cfg)
    access.check_sources(override(base, {"data.source": "stanfordnlp/snli"}))  # a Hub id is taken
    access.check_sources(override(base, {"data.source": "someone/json"}))  # owner/name is a Hub repo


# --- crafted run folders -------------------------------------------------------------------------------


def test_a_linked_train_log_is_never_shown(tmp_path, monkeypatch):
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0:SECRET-LINE\n")
    root = tmp_path / "runs"
    run = make_failed_run(root)
    (run / "train.log").unlink()
    (run / "train.log").symlink_to(secret)
    assert "SECRET-LINE" not in watch.log_tail(run) and "symbolic link" in watch.log_tail(run)
    assert "SECRET-LINE" not in liveness.log_reason(run)
    monkeypatch.setenv(access.READ_ONLY_ENV, "1")
    at = start(root, monkeypatch, run=run.name)
    assert not any("SECRET-LINE" in c.value for c in at.code)
    # a linked status.json, metrics.jsonl or predictions/ folder reads as damaged, never as its target
    (run / "status.json").rename(run / "status.real")
    (run / "status.json").symlink_to(run / "status.real")
    assert read_status(run)["state"] == rundir.DAMAGED and "symbolic link" in read_status(run)["damaged"]
    real = tmp_path / "elsewhere"
    real.mkdir()
    (real / "test_after.jsonl").write_text('{"id": "a", "gold": "x", "pred": "x", "probs": [1], "correct": true}\n')
    (run / "predictions").symlink_to(real, target_is_directory=True)
    assert rundir.read_predictions(run / "predictions" / "test_after.jsonl") == ([], 1)
    # a run folder that is itself a link is listed as damaged, and nothing in it is read
    (root / "20990101-000000-linked").symlink_to(real, target_is_directory=True)
    linked = next(r for r in list_runs(root) if r["id"] == "20990101-000000-linked")
    assert linked["state"] == rundir.DAMAGED and "symbolic link" in linked["damaged"]


def test_links_in_a_checkpoint_are_never_zipped(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "id_rsa").write_text("PRIVATE KEY")
    epoch = tmp_path / "run" / "checkpoints" / "epoch-1"
    epoch.mkdir(parents=True)
    (epoch / "adapter_config.json").write_text("{}")
    (epoch / "README.md").write_text("card")
    (epoch / "key").symlink_to(outside / "id_rsa")
    (epoch / "folder").symlink_to(outside, target_is_directory=True)
    names = zipfile.ZipFile(io.BytesIO(share.zip_folder(epoch))).namelist()
    assert names == ["epoch-1/README.md", "epoch-1/adapter_config.json"]
    linked = tmp_path / "run" / "checkpoints" / "epoch-2"
    linked.symlink_to(epoch, target_is_directory=True)
    with pytest.raises(ValueError, match="is a symbolic link"):
        share.zip_folder(linked)


def test_stop_signals_only_the_holder_of_the_runs_lock_never_a_forged_pid(tmp_path, sleeper):
    run = tmp_path / "run"
    # a forged status: an unrelated live process, its real start time, a fresh heartbeat
    claim_run(run, state="running", pid=sleeper.pid, pid_start=liveness.process_start(sleeper.pid))
    liveness.beat(run)
    assert read_status(run)["state"] == "running"  # it looks alive ...
    assert jobs.stop(run) is False  # ... but holds no lock on this run: no signal
    time.sleep(0.3)
    assert sleeper.poll() is None and stop_requested(run)  # the STOP file is still written
    # a lock file that links to another run's held lock, or a second name of it, proves nothing
    other = tmp_path / "other"
    other.mkdir()
    holder = run_lock_holder(other)
    try:
        assert liveness.holds_run_lock(holder.pid, other) and not liveness.holds_run_lock(sleeper.pid, other)
        write_status(run, pid=holder.pid)
        (run / rundir.RUN_LOCK).symlink_to(other / rundir.RUN_LOCK)
        assert not liveness.holds_run_lock(holder.pid, run) and jobs.stop(run) is False
        (run / rundir.RUN_LOCK).unlink()
        os.link(other / rundir.RUN_LOCK, run / rundir.RUN_LOCK)
        assert not liveness.holds_run_lock(holder.pid, run) and jobs.stop(run) is False
        assert holder.poll() is None
    finally:
        holder.kill()
        holder.wait()
    # the real trainer (it holds its run's lock from its Heartbeat on): signalled
    (run / rundir.RUN_LOCK).unlink()
    trainer = run_lock_holder(run)
    write_status(run, pid=trainer.pid)
    assert jobs.stop(run) is True and trainer.wait(timeout=10) < 0


def test_the_heartbeat_holds_the_run_lock_until_the_run_ends(tmp_path):
    run = tmp_path / "run"
    claim_run(run, state="running", pid=os.getpid())
    beat = liveness.Heartbeat(run, every=0.05).start()
    assert liveness.holds_run_lock(os.getpid(), run)
    write_status(run, state="done")
    assert rundir.wait_for(lambda: not liveness.holds_run_lock(os.getpid(), run), timeout=5)
    beat.stop()


def test_run_ids_end_where_they_end(tmp_path):
    for bad in ("abc\n", "abc\r\n", "\nabc", "a/b", "..", "a" * 81):
        with pytest.raises(ValueError, match="invalid run id"):
            rundir.validate_run_id(bad)
    root = tmp_path / "runs"
    (root / "abc\n").mkdir(parents=True)
    write_status(root / "abc\n", state="done")
    assert list_runs(root) == []  # not a run id: not listed


# --- the Playground and Streamlit's cache -------------------------------------------------------------


class FakeModel:
    labels = ("a", "b")

    def predict(self, rows):
        import numpy as np

        return np.array([[0.5, 0.5]] * len(rows))


def test_a_crowd_of_loads_gets_busy_quickly_never_a_timeout(tmp_path):
    def slow(folder):
        time.sleep(1.0)
        return FakeModel()

    pool = ModelPool(slow, max_models=4, max_loading=1, wait_s=0.3)
    folders = []
    for i in range(6):
        (tmp_path / f"m{i}").mkdir()
        (tmp_path / f"m{i}" / "classifier.json").write_text("{}")
        folders.append(tmp_path / f"m{i}")
    results: dict[int, str] = {}

    def visit(i):
        t = time.perf_counter()
        try:
            pool.get(folders[i])
            results[i] = f"model {time.perf_counter() - t:.1f}"
        except Exception as e:  # noqa: BLE001
            results[i] = f"{type(e).__name__} {time.perf_counter() - t:.1f}"

    threads = [threading.Thread(target=visit, args=(i,)) for i in range(6)]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=10)
    assert time.perf_counter() - t < 3 and len(results) == 6
    kinds = sorted(r.split()[0] for r in results.values())
    assert kinds == ["Busy"] * 5 + ["model"], results
    assert all(float(r.split()[1]) < 0.8 for r in results.values() if r.startswith("Busy")), results
    # the one loaded is kept: the next visit gets it at once; two visits of one folder share one load
    loaded = [folders[i] for i, r in results.items() if r.startswith("model")][0]
    t = time.perf_counter()
    assert isinstance(pool.get(loaded), FakeModel) and time.perf_counter() - t < 0.1


def test_clearing_streamlits_caches_keeps_the_playgrounds_models(tmp_path):
    pool = ModelPool(lambda folder: FakeModel())
    (tmp_path / "m").mkdir()
    model = pool.get(tmp_path / "m")
    st.cache_data.clear()  # what Streamlit does on any browser's clear-cache message
    st.cache_resource.clear()
    assert pool.get(tmp_path / "m") is model and pool.loaded() == [str((tmp_path / "m").resolve())]
    source = (ROOT / "app_pages" / "playground.py").read_text()
    assert "cache_resource" not in source and "POOL.get(" in source  # the page keeps its models in core


# --- a read-only server takes no upload bytes ----------------------------------------------------------


def test_start_sh_sets_no_upload_bytes_on_a_read_only_deployment(tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "python").write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$ARGS_OUT"\n')
    (fake / "python").chmod(0o755)
    for value, expected in (("1", True), ("yes", True), ("0", False), ("", False), ("off", False)):
        out = tmp_path / f"args-{value or 'empty'}"
        env = {
            "PATH": f"{fake}{os.pathsep}/usr/bin:/bin",
            "HOME": str(tmp_path),
            "QLORA_STUDIO_DATA": str(tmp_path / "none"),
            "QLORA_STUDIO_READ_ONLY": value,
            "ARGS_OUT": str(out),
        }
        subprocess.run(["sh", "deploy/start.sh"], cwd=ROOT, env=env, check=True, capture_output=True)
        args = out.read_text().split("\n")
        assert ("--server.maxUploadSize" in args and args[args.index("--server.maxUploadSize") + 1] == "0") is expected
        assert args[:4] == ["-m", "streamlit", "run", "app.py"]


UPLOAD = """
async (sid) => {
  const xsrf = document.cookie.split('; ').find(c => c.startsWith('_streamlit_xsrf='))?.slice(16) || '';
  const body = new FormData();
  body.append('file', new Blob([new Uint8Array(1 << 20)]), 'x.csv');
  const r = await fetch(`/_stcore/upload_file/${sid}/probe`, {method: 'PUT', body, headers: {'X-Xsrftoken': xsrf}});
  return r.status;
}
"""


@pytest.mark.browser
def test_a_read_only_server_refuses_every_upload_at_streamlits_endpoint(tmp_path):
    from playwright.sync_api import sync_playwright
    from streamlit.proto.ForwardMsg_pb2 import ForwardMsg

    from tests.helpers import chromium_path, settle, streamlit_server

    statuses = {}
    for mode, extra in (("read-only", {access.READ_ONLY_ENV: "1"}), ("password", {access.PASSWORD_ENV: "pw"})):
        env = {**os.environ, rundir.RUNS_ENV: str(tmp_path / "runs"), **extra}
        env.pop(access.READ_ONLY_ENV if mode == "password" else access.PASSWORD_ENV, None)
        folder = tmp_path / mode
        folder.mkdir()
        with streamlit_server(folder, env) as url, sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium_path())
            page = browser.new_page()
            sessions = []

            def frames(ws, sessions=sessions):
                def received(payload):
                    if isinstance(payload, bytes):
                        msg = ForwardMsg.FromString(payload)
                        if msg.HasField("new_session"):
                            sessions.append(msg.new_session.initialize.session_id)

                ws.on("framereceived", received)

            page.on("websocket", frames)
            page.goto(url)
            settle(page)
            assert sessions, "no session id seen"
            statuses[mode] = page.evaluate(UPLOAD, sessions[-1])
            browser.close()
    assert statuses == {"read-only": 413, "password": 204}, statuses


@pytest.mark.slow
def test_the_playground_keeps_its_models_outside_streamlits_cache(tiny_run, tmp_path, monkeypatch):
    from core import model_pool

    pool = ModelPool(lambda folder: FakeModel())
    monkeypatch.setattr(model_pool, "POOL", pool)  # the page imports it at each run
    root = tmp_path / "runs"
    shutil.copytree(tiny_run, root / tiny_run.name, ignore=shutil.ignore_patterns("state-*"))
    at = start(root, monkeypatch, page="playground")
    at.text_area(key="playground_premise").input("A man plays.")
    at.text_area(key="playground_hypothesis").input("A person plays.").run()
    assert len(pool.loaded()) == 2
    st.cache_resource.clear()
    st.cache_data.clear()
    assert len(pool.loaded()) == 2
