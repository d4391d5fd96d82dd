"""The app's pages under streamlit.testing.v1.AppTest, against a real tiny training run (the
session fixture `tiny_run`) and a few run folders written by hand (failed, running, empty).
Each test asserts what the page shows: numbers from report.json, counts, example texts."""

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from app_pages.ui import plain
from core import jobs
from core.results.report import CATEGORIES, load_comparison
from core.runs.resources import describe_hardware, hardware_info
from core.runs.state import list_runs, stop_requested, write_status
from tests.helpers import make_failed_run, make_running_run, run_lock_holder, start, text_of


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def metrics(at: AppTest) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def svg_charts(at: AppTest) -> dict[str, str]:
    """The live view's SVG charts (st.image of an SVG: a data URL), by their title."""
    import base64
    import xml.etree.ElementTree as ET

    out = {}
    for url in (u for e in at.image for u in e.value if u.startswith("data:image/svg+xml;base64,")):
        svg = base64.b64decode(url.split(",", 1)[1]).decode()
        out[ET.fromstring(svg).find("{http://www.w3.org/2000/svg}text").text] = svg
    return out


def plotly_specs(at: AppTest) -> list[dict]:
    return [json.loads(e.proto.spec) for e in at.get("plotly_chart")]


@pytest.fixture
def report(tiny_run) -> dict:
    return json.loads((tiny_run / "report.json").read_text())


# --- frame --------------------------------------------------------------------------------------


def test_empty_runs_folder_explains_what_to_do(tmp_path, monkeypatch):
    at = start(tmp_path / "runs", monkeypatch)
    text = text_of(at)
    assert "No runs yet" in text and "Launch" in text
    assert "Start one on the **Train** page" in "\n".join(c.value for c in at.sidebar.caption)
    assert describe_hardware(hardware_info()) in "\n".join(c.value for c in at.sidebar.caption)
    for page in ("report", "failures"):
        at.switch_page(f"app_pages/{page}.py").run()
        assert "No run selected yet" in text_of(at)


def test_sidebar_lists_runs_with_state_and_query_param_selects(tiny_run, tmp_path, monkeypatch):
    root = tmp_path / "runs"
    shutil.copytree(tiny_run, root / tiny_run.name, ignore=shutil.ignore_patterns("checkpoints"))
    failed = make_failed_run(root)
    at = start(root, monkeypatch)
    radio = at.sidebar.radio[0]
    assert len(radio.options) == 2
    assert any(failed.name in o and "failed" in o for o in radio.options)
    assert any(tiny_run.name in o and "done" in o for o in radio.options)
    assert at.session_state["run"] == failed.name  # the newest run is selected by default
    at = start(root, monkeypatch, run=tiny_run.name)
    assert at.session_state["run"] == tiny_run.name and at.query_params["run"] == tiny_run.name
    assert "Test accuracy before" in metrics(at)
    # picking another run in the sidebar changes what every page shows
    at.sidebar.radio[0].set_value(next(o for o in at.sidebar.radio[0].options if failed.name in o)).run()
    assert at.session_state["run"] == failed.name and "boom" in text_of(at)


# --- Train --------------------------------------------------------------------------------------


def test_train_page_shows_the_done_run(tiny_run, monkeypatch, report):
    at = start(tiny_run.parent, monkeypatch)
    m = metrics(at)
    assert m["Test accuracy before"] == pct(report["test_before"]["accuracy"])
    assert m["Test accuracy after"] == pct(report["test_after"]["accuracy"])
    assert m["Test examples"] == "48"
    assert m["Best epoch"] == str(report["best_epoch"])
    assert m["Steps"] == "4/4"  # 64 rows / batch 32 = 2 steps per epoch, 2 epochs
    specs = plotly_specs(at)
    titles = [s["layout"]["title"]["text"] for s in specs]
    assert "Training loss" in titles and "RAM" in titles
    loss = next(s for s in specs if s["layout"]["title"]["text"] == "Training loss")
    assert loss["data"][0]["x"] == [1, 2, 3, 4]
    val = next(s for s in specs if s["layout"]["title"]["text"].startswith("Validation accuracy"))
    assert val["data"][0]["x"] == [0, 1, 2]
    assert [p.label for p in at.get("page_link")][:2] == ["Open the report", "Open the failure cases"]


def test_plan_before_launch_shows_dtype_params_and_rows(tmp_path, monkeypatch):
    at = start(tmp_path / "runs", monkeypatch)
    at.number_input(key="max_train@demo").set_value(96).run()
    text = text_of(at)
    assert "Runs on **the CPU** in **float32**" in text
    assert "**96** train" in text and "→ **12** optimiser steps (3 per epoch × 4 epochs)" in text
    m = metrics(at)
    assert m["Total parameters"] == "23.2 M" and m["Trainable (LoRA + head)"].endswith(" M")
    assert m["Estimated time"] == "unknown" and m["GPU memory"] == "none"


def test_invalid_settings_are_shown_and_block_launch(tmp_path, monkeypatch):
    at = start(tmp_path / "runs", monkeypatch)
    at.text_input(key="model@demo").set_value("   ").run()
    assert any("model.name must not be empty" in e.value for e in at.error)
    assert at.button(key="launch_disabled").disabled
    assert not list((tmp_path / "runs").glob("*"))


class FakePopen:
    """Stands in for the trainer process: records the command, starts nothing."""

    calls: list = []

    def __init__(self, args, **kwargs):
        FakePopen.calls.append(args)


def test_launch_writes_the_form_into_config_and_selects_the_run(tmp_path, monkeypatch):
    monkeypatch.setattr(jobs.subprocess, "Popen", FakePopen)
    FakePopen.calls = []
    at = start(tmp_path / "runs", monkeypatch)
    for key, value in (
        ("epochs@demo", 1),
        ("max_train@demo", 80),
        ("max_validation@demo", 24),
        ("max_test@demo", 30),
        ("lora_r@demo", 8),
        ("seed@demo", 7),
    ):
        at.number_input(key=key).set_value(value)
    at.text_input(key="target_modules@demo").set_value("query, value")
    at.run()
    at.button(key="launch").click().run()
    assert not at.exception
    runs = list_runs(tmp_path / "runs")
    assert len(runs) == 1 and at.session_state["run"] == runs[0]["id"]
    cfg = json.loads((runs[0]["path"] / "config.json").read_text())
    assert cfg["train"]["epochs"] == 1 and cfg["train"]["seed"] == 7 and cfg["lora"]["r"] == 8
    assert cfg["data"]["max_train_rows"] == 80 and cfg["data"]["max_test_rows"] == 30
    assert cfg["lora"]["target_modules"] == ["query", "value"] and cfg["data"]["source"] == "builtin:nli-sample"
    assert FakePopen.calls and FakePopen.calls[0][-1] == str(runs[0]["path"])
    assert "queued" in text_of(at)  # the page now follows the new run


def test_uploaded_files_preview_mapping_and_launch(tmp_path, monkeypatch):
    monkeypatch.setattr(jobs.subprocess, "Popen", FakePopen)
    FakePopen.calls = []
    train = "s1,s2,gold\n" + "".join(f"A man plays guitar {i}.,A person plays music.,{i % 3}\n" for i in range(30))
    test = "s1,s2,gold\nA dog runs.,An animal moves.,0\nA cat sleeps.,The cat is awake.,2\n"
    at = start(tmp_path / "runs", monkeypatch)
    at.radio(key="data_kind@demo").set_value("upload").run()
    assert "Upload a **train** and a **test** file" in text_of(at)
    at.file_uploader(key="upload:train").set_value(("../../My Train!.csv", train.encode(), "text/csv"))
    at.file_uploader(key="upload:test").set_value(("test.csv", test.encode(), "text/csv"))
    at.run()
    preview = at.dataframe[0].value
    assert list(preview.columns) == ["s1", "s2", "gold"] and len(preview) == 5
    assert "30 rows" in text_of(at)
    # no column is named like a premise: the mapping must be chosen, and the trainer's own check says so
    assert any("column/label mapping" in w.value for w in at.warning)
    assert at.button(key="launch").disabled
    at.selectbox(key="prem_col@demo").set_value("s1")
    at.selectbox(key="hyp_col@demo").set_value("s2")
    at.selectbox(key="label_col@demo").set_value("gold")
    at.run()
    assert not any("column/label mapping" in w.value for w in at.warning)
    assert "Label values in the train file: 0, 1, 2" in text_of(at)
    at.button(key="launch").click().run()
    run = list_runs(tmp_path / "runs")[0]["path"]
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["data"]["source"] == "files" and cfg["data"]["label_column"] == "gold"
    assert cfg["data"]["premise_column"] == "s1" and cfg["data"]["validation"] is None
    assert Path(cfg["data"]["train"]) == run / "uploads" / "train-My_Train.csv"
    assert (run / "uploads" / "train-My_Train.csv").read_text() == train
    assert Path(cfg["data"]["test"]).read_text() == test


def test_failed_run_shows_error_traceback_and_log(tmp_path, monkeypatch):
    run = make_failed_run(tmp_path / "runs")
    at = start(run.parent, monkeypatch)
    assert any(plain("RuntimeError: boom at step 3") in e.value for e in at.error)
    labels = [e.label for e in at.expander]
    assert "Traceback" in labels and "Last lines of train.log" in labels
    codes = "\n".join(c.value for c in at.code)
    assert 'File "core/train.py"' in codes and "loading model" in codes


def test_running_run_reattaches_with_progress_eta_and_stop(tmp_path, monkeypatch):
    run = make_running_run(tmp_path / "runs", os.getpid())
    trainer = run_lock_holder(run)  # stands in for the trainer process: it holds the run's lock, as a trainer does
    try:
        write_status(run, pid=trainer.pid)
        check_running_run(run, trainer, monkeypatch)
    finally:
        trainer.kill()
        trainer.wait()


def test_viewers_of_a_cpu_run_share_one_refresh_budget(tmp_path, monkeypatch, sleeper):
    run = make_running_run(tmp_path / "runs", sleeper.pid)  # its setup record says device cpu
    first = start(run.parent, monkeypatch)
    assert "browser sessions are watching" not in text_of(first)
    second = start(run.parent, monkeypatch)  # another browser session (the watcher is shared)
    assert (
        "2 browser sessions are watching this run, which trains on the CPU: each refreshes every 6 s "
        "(charts every 24 s)"
    ) in text_of(second)
    first.run()
    assert "2 browser sessions are watching" in text_of(first)
    setup = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for rec in setup:
        if rec["kind"] == "setup":
            rec["device"] = "cuda:0"  # the same run on a GPU: the viewers do not slow each other
    gpu_run = run.parent / "20990101-000000-demo-gpu"
    shutil.copytree(run, gpu_run)
    (gpu_run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in setup))
    a, b = start(run.parent, monkeypatch, run=gpu_run.name), start(run.parent, monkeypatch, run=gpu_run.name)
    assert "browser sessions are watching" not in text_of(a) + text_of(b)
    assert a.get("progress") and b.get("progress")


def check_running_run(run: Path, trainer, monkeypatch):
    at = start(run.parent, monkeypatch)
    bar = at.get("progress")[0]
    assert "training · epoch 1/2 · step 3/8 · about" in bar.proto.text
    m = metrics(at)
    assert m["Time left"] != "measuring…" and m["Pairs / s"] == "10.0"
    assert m["Validation accuracy"] == "40.0%"
    charts = svg_charts(at)  # light SVG charts while live (the Plotly figures come when it is done)
    assert set(charts) == {
        "Training loss",
        "Validation accuracy by epoch (0 = before training)",
        "CPU (100% = one core)",
        "RAM",
    } and not plotly_specs(at)
    assert charts["Training loss"].count("<polyline") == 1 and "step loss" in charts["Training loss"]
    assert ">40.0%<" in charts["Validation accuracy by epoch (0 = before training)"]  # the before pass
    assert "browser sessions are watching" not in text_of(at)  # one viewer: the full refresh rate
    at.button(key=f"stop:{run.name}").click().run()
    assert stop_requested(run)
    assert trainer.wait(timeout=10) == -signal.SIGTERM  # Stop also sends SIGTERM to the trainer
    write_status(run, pid=os.getpid())  # still running (as far as the folder says)
    for page in ("report", "failures"):
        at.switch_page(f"app_pages/{page}.py").run()
        assert "is still running" in text_of(at)


# --- Report -------------------------------------------------------------------------------------


def test_report_page_shows_every_section_with_the_run_numbers(tiny_run, monkeypatch, report):
    at = start(tiny_run.parent, monkeypatch, page="report")
    b, a = report["test_before"], report["test_after"]
    m = metrics(at)
    assert m["Before fine-tuning"] == pct(b["accuracy"])
    assert m[f"After (epoch {report['best_epoch']})"] == pct(a["accuracy"])
    for cat in CATEGORIES:
        assert m[cat.capitalize()] == str(report["changes"][cat])
    frames = [d.value for d in at.dataframe]
    acc = frames[0]
    assert list(acc["correct"]) == [b["correct"], a["correct"]] and list(acc["n"]) == [48, 48]
    epochs = next(f for f in frames if "train loss" in f.columns)
    assert list(epochs["epoch"]) == [1, 2]
    params = next(f for f in frames if "count" in f.columns)
    assert f"{report['params']['trainable']:,}" in params["value"].iloc[2]
    assert f"{report['params']['packed']:,}" == params["value"].iloc[1]
    resources = next(f for f in frames if "resource" in f.columns)
    assert resources["peak"].iloc[5] == f"{report['resources']['checkpoints_mb']:.1f} MB"
    per_class = next(f for f in frames if "F1 after" in f.columns)
    assert list(per_class["class"]) == ["entailment", "neutral", "contradiction"]
    slices = next(f for f in frames if "slice" in f.columns and "before" in f.columns)
    assert sum(slices[slices["group"] == "tag"]["n"]) == 48 and sum(slices[slices["group"] == "length"]["n"]) == 48
    first_fixed = report["change_examples"]["fixed"][0] if report["change_examples"]["fixed"] else None
    if first_fixed:
        assert any(first_fixed["premise"] in list(f.get("premise", [])) for f in frames)
    specs = {s["layout"]["title"]["text"]: s for s in plotly_specs(at)}
    bars = specs[f"Test accuracy with 95% Wilson intervals (n = {a['n']})"]["data"][0]
    assert bars["y"] == pytest.approx([100 * b["accuracy"], 100 * a["accuracy"]])
    assert specs["Confusion after (rows gold, columns predicted)"]["data"][0]["z"] == a["confusion"]
    downloads = [d.proto.label for d in at.get("download_button")]
    assert downloads == [
        "Download Markdown",
        "Download HTML",
        "Download reproducibility bundle",
        "Download adapter",
        "Download merged model",  # a small run: built on click (core/export.py)
    ]
    assert f"**{report['headline']}**" in text_of(at)
    assert "CPU only" in text_of(at) or "GPU" in text_of(at)


# --- Failures -----------------------------------------------------------------------------------


def test_failures_page_counts_filters_search_and_detail(tiny_run, monkeypatch):
    rows, labels = load_comparison(tiny_run)
    counts = {c: sum(r["category"] == c for r in rows) for c in CATEGORIES}
    at = start(tiny_run.parent, monkeypatch, page="failures")
    m = metrics(at)
    for cat in CATEGORIES:
        assert next(v for k, v in m.items() if k.endswith(cat.capitalize())) == str(counts[cat])
    assert f"{len(rows)} of {len(rows)} examples" in text_of(at)
    table = at.dataframe[0].value
    assert len(table) == len(rows)
    assert list(table["Δ p(gold)"]) == sorted(table["Δ p(gold)"], reverse=True)
    best = max(rows, key=lambda r: r["gold_prob_change"])
    assert f"**Premise:** {plain(best['premise'])}" in text_of(at)  # the detail shows the first row (escaped)

    # one category; the detail follows it
    cat = next(c for c in ("fixed", "regressed", "still failing") if counts[c])
    at.radio(key="fail_category").set_value(cat).run()
    shown = sorted((r for r in rows if r["category"] == cat), key=lambda r: -r["gold_prob_change"])
    assert f"{len(shown)} of {len(rows)} examples" in text_of(at)
    assert set(at.dataframe[0].value["category"]) == {cat}
    text = text_of(at)
    assert f"**Hypothesis:** {plain(shown[0]['hypothesis'])}" in text and f"**Gold:** {plain(shown[0]['gold'])}" in text
    assert f"**Before:** {plain(shown[0]['pred_before'])}" in text
    probs = next(s for s in plotly_specs(at) if s["layout"]["title"]["text"] == "Predicted probabilities")
    assert probs["data"][0]["y"] == shown[0]["probs_before"] and probs["data"][1]["y"] == shown[0]["probs_after"]

    # gold label and tag filters, then the reverse sort
    at.radio(key="fail_category").set_value("all")
    at.multiselect(key="fail_gold").set_value(["neutral"]).run()
    assert set(at.dataframe[0].value["gold"]) == {"neutral"}
    tag = rows[0]["tag"]
    at.multiselect(key="fail_gold").set_value([])
    at.multiselect(key="fail_tag").set_value([tag]).run()
    assert set(at.dataframe[0].value["tag"]) == {tag}
    assert len(at.dataframe[0].value) == sum(r["tag"] == tag for r in rows)
    at.multiselect(key="fail_tag").set_value([])
    at.selectbox(key="fail_sort").set_value("largest loss in p(gold) first").run()
    col = list(at.dataframe[0].value["Δ p(gold)"])
    assert col == sorted(col)

    # search by a word of one hypothesis
    target = rows[len(rows) // 2]
    at.text_input(key="fail_search").set_value(target["id"]).run()
    assert list(at.dataframe[0].value["id"]) == [target["id"]]
    assert f"**Premise:** {plain(target['premise'])}" in text_of(at)
    at.text_input(key="fail_search").set_value("zzzz no such text").run()
    assert "No example matches these filters" in text_of(at)


# --- hand-made run folders ----------------------------------------------------------------------
