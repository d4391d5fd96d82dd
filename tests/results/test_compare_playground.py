"""core.results.compare on run folders written by hand, and the Compare and Playground pages under
streamlit.testing.v1.AppTest (Playground against a copy of the real tiny run, `tiny_run`)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from core.results import compare
from core.results.stats import wilson
from tests.helpers import ROOT

LABELS = ["entailment", "neutral", "contradiction"]


def _config(lr: float, r: int, epochs: int, extra: dict | None = None) -> dict:
    cfg = {
        "preset": "demo",
        "group": None,
        "model": {"name": "embedded:all-MiniLM-L6-v2", "quantize": "bnb.nf4"},
        "data": {"source": "builtin:nli-sample", "labels": LABELS, "max_length": 128},
        "lora": {"r": r, "alpha": 32, "target_modules": "all-linear"},
        "train": {"epochs": epochs, "lr": lr, "batch_size": 32, "seed": 0},
    }
    cfg.update(extra or {})
    return cfg


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _preds(n: int, k: int) -> list[dict]:
    """n test rows, the first k correct."""
    return [
        {
            "id": f"r{i}",
            "premise": "p",
            "hypothesis": "h",
            "gold": "neutral",
            "pred": "neutral" if i < k else "entailment",
            "correct": i < k,
            "probs": [0.2, 0.5, 0.3],
        }
        for i in range(n)
    ]


def make_run(
    root: Path,
    run_id: str,
    cfg: dict,
    losses: list[float],
    val: list[float],
    test: tuple[int, int, int],
    best: int,
    total_s: float,
    rss: list[float],
    gpu: list[float] | None = None,
    created: str = "2026-01-01T00:00:00+00:00",
) -> Path:
    """A finished run folder: config, status, metrics (steps, validation evals per epoch, end),
    resources, test predictions before/after; test = (n, k_before, k_after)."""
    run = root / run_id
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(cfg))
    (run / "status.json").write_text(
        json.dumps({"state": "done", "created_at": created, "finished_at": created, "error": None, "pid": None})
    )
    recs = [{"t": 1.0, "kind": "setup", "labels": LABELS}]
    recs.append({"t": 1.0, "kind": "eval", "split": "validation", "stage": "before", "accuracy": val[0], "n": 20})
    recs.append({"t": 1.0, "kind": "eval", "split": "test", "stage": "before", "accuracy": 0.11, "n": test[0]})
    for s, loss in enumerate(losses, 1):
        recs.append({"t": 2.0, "kind": "step", "step": s, "epoch": 1, "loss": loss})
    for e, acc in enumerate(val[1:], 1):
        recs.append({"t": 3.0, "kind": "eval", "split": "validation", "stage": f"epoch-{e}", "accuracy": acc, "n": 20})
        recs.append({"t": 3.0, "kind": "epoch", "epoch": e, "train_loss": 1.0, "val_accuracy": acc, "epoch_s": 1.0})
    recs.append({"t": 4.0, "kind": "eval", "split": "validation", "stage": "after", "accuracy": 0.99, "n": 20})
    recs.append({"t": 5.0, "kind": "end", "state": "done", "total_s": total_s, "best_epoch": best})
    _jsonl(run / "metrics.jsonl", recs)
    res = [{"t": float(i), "cpu_percent": 50.0, "rss_gb": v} for i, v in enumerate(rss)]
    for i, g in enumerate(gpu or []):
        res[i]["gpu_mem_gb"] = g
    _jsonl(run / "resources.jsonl", res)
    n, kb, ka = test
    _jsonl(run / "predictions" / "test_before.jsonl", _preds(n, kb))
    _jsonl(run / "predictions" / "test_after.jsonl", _preds(n, ka))
    return run


@pytest.fixture
def two_runs(tmp_path) -> tuple[Path, Path]:
    root = tmp_path / "runs"
    a = make_run(
        root,
        "run-a",
        _config(1e-3, 16, 2),
        [1.1, 1.0, 0.9, 0.8],
        [0.3, 0.5, 0.6],
        (40, 12, 30),
        best=2,
        total_s=71.5,
        rss=[0.3, 0.8, 0.5],
        gpu=[1.5, 2.25, 2.0],
        created="2026-01-01T00:00:00+00:00",
    )
    b = make_run(
        root,
        "run-b",
        _config(2e-4, 8, 3, {"speed": {"pack": "auto"}}),
        [1.2, 1.15, 1.1],
        [0.35, 0.4, 0.45, 0.42],
        (40, 14, 20),
        best=2,
        total_s=100.0,
        rss=[0.4, 0.6],
        created="2026-01-02T00:00:00+00:00",
    )
    # run-a also has a report.json (written by the real builder): load_report's path; run-b has none
    from core.results.report import build_report

    (a / "report.json").write_text(json.dumps(build_report(a)))
    return a, b


# --- core.results.compare -------------------------------------------------------------------------------


def test_flatten_nested_config():
    assert compare.flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": None, "f": {}}) == {
        "a.b": 1,
        "a.c.d": [1, 2],
        "e": None,
        "f": {},
    }


def test_config_diff_lists_exactly_the_differing_keys(two_runs):
    a, b = two_runs
    diff = compare.config_diff(compare.read_configs([a, b]))
    assert set(diff) == {"lora.r", "train.lr", "train.epochs", "speed.pack"}
    assert diff["lora.r"] == {"run-a": 16, "run-b": 8}
    assert diff["train.lr"] == {"run-a": 1e-3, "run-b": 2e-4}
    assert diff["speed.pack"] == {"run-a": compare.MISSING, "run-b": "auto"}
    assert compare.config_diff(compare.read_configs([a])) == {}
    assert compare.config_diff(compare.read_configs([a, a])) == {}


def test_curves(two_runs):
    a, b = two_runs
    assert compare.loss_curve(a) == ([1, 2, 3, 4], [1.1, 1.0, 0.9, 0.8])
    assert compare.val_accuracy_curve(a) == ([0, 1, 2], [0.3, 0.5, 0.6])  # "after" is left out
    assert compare.val_accuracy_curve(b) == ([0, 1, 2, 3], [0.35, 0.4, 0.45, 0.42])
    assert compare.stage_epoch("before") == 0 and compare.stage_epoch("epoch-12") == 12
    assert compare.stage_epoch("after") is None


def test_headline_rows_hold_the_right_numbers(two_runs):
    a, b = two_runs
    ra, rb = compare.headline_rows([a, b])
    assert ra["run"] == "run-a" and ra["state"] == "done"
    assert ra["test_before"] == pytest.approx(12 / 40) and ra["test_after"] == pytest.approx(30 / 40)
    assert ra["test_before_ci95"] == pytest.approx(list(wilson(12, 40)))
    assert ra["test_after_ci95"] == pytest.approx(list(wilson(30, 40)))
    assert ra["best_epoch"] == 2 and ra["total_s"] == 71.5
    assert ra["peak_gpu_gb"] == 2.25 and ra["peak_rss_gb"] == 0.8
    assert rb["test_before"] == pytest.approx(14 / 40) and rb["test_after"] == pytest.approx(20 / 40)
    assert rb["test_after_ci95"] == pytest.approx(list(wilson(20, 40)))
    assert rb["best_epoch"] == 2 and rb["total_s"] == 100.0
    assert rb["peak_gpu_gb"] is None and rb["peak_rss_gb"] == 0.6


def test_damaged_run_never_raises(tmp_path):
    run = tmp_path / "bad"
    run.mkdir()
    (run / "config.json").write_text("{not json")
    (run / "status.json").write_text("")
    (run / "metrics.jsonl").write_bytes(b"\xff\xfe garbage\n")
    assert compare.curves(run) == {"loss": ([], []), "val_accuracy": ([], [])}
    row = compare.headline_row(run)
    assert row["run"] == "bad" and row["test_after"] is None and row["best_epoch"] is None
    assert compare.read_configs([run]) == {"bad": {}}
    assert compare.checkpoint_folders(run) is None
    assert compare.classifier_input_kind(run) is None


# --- pages --------------------------------------------------------------------------------------


def start(runs_root: Path, monkeypatch, page: str) -> AppTest:
    monkeypatch.setenv("QLORA_STUDIO_RUNS", str(runs_root))
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=300)
    at.run()
    at.switch_page(f"app_pages/{page}.py").run()
    assert not at.exception, [e.value for e in at.exception]
    assert not any("could not be shown" in e.value for e in at.error)
    return at


def test_compare_page(two_runs, monkeypatch):
    a, b = two_runs
    bad = a.parent / "broken"
    bad.mkdir()
    (bad / "status.json").write_text("{")
    at = start(a.parent, monkeypatch, "compare")
    ms = at.multiselect(key="compare_runs")
    assert "broken" not in ms.options
    ms.set_value(["run-a", "run-b"]).run()
    assert not at.exception, [e.value for e in at.exception]
    specs = [json.loads(e.proto.spec) for e in at.get("plotly_chart")]
    assert len(specs) == 2
    loss, acc = specs
    assert {t["name"] for t in loss["data"]} == {"run-a", "run-b"}
    trace = next(t for t in acc["data"] if t["name"] == "run-b")
    assert list(trace["x"]) == [0, 1, 2, 3] and list(trace["y"]) == [0.35, 0.4, 0.45, 0.42]
    head = at.dataframe[0].value.set_index("run")
    assert head.loc["run-a", "test after"] == "75.0%" and head.loc["run-b", "test before"] == "35.0%"
    lo, hi = wilson(30, 40)
    assert head.loc["run-a", "after 95% CI"] == f"{100 * lo:.1f}–{100 * hi:.1f}%"
    assert head.loc["run-a", "best epoch"] == 2 and head.loc["run-b", "total time (s)"] == 100.0
    assert head.loc["run-a", "peak GPU memory (GB)"] == 2.25 and head.loc["run-a", "peak RSS (GB)"] == 0.8
    diff = at.dataframe[1].value.set_index("field")
    assert set(diff.index) == {"lora.r", "train.lr", "train.epochs", "speed.pack"}
    assert diff.loc["lora.r", "run-a"] == "16" and diff.loc["lora.r", "run-b"] == "8"


def test_playground_page_matches_load_classifier(tiny_run, tmp_path, monkeypatch):
    from core.classifier import load_classifier

    root = tmp_path / "runs"
    run = Path(shutil.copytree(tiny_run, root / tiny_run.name))
    at = start(root, monkeypatch, "playground")
    assert at.selectbox(key="playground_run").value == run.name
    premise, hypothesis = "A man is playing a guitar on stage.", "Nobody is making music."
    at.text_area(key="playground_premise").input(premise)
    at.text_area(key="playground_hypothesis").input(hypothesis).run()
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    table = at.dataframe[0].value
    labels = [c for c in table.columns if c != "model"]
    best = json.loads((run / "report.json").read_text())["best_epoch"]
    row = [{"premise": premise, "hypothesis": hypothesis}]
    want_before = load_classifier(run / "checkpoints" / "epoch-0").predict(row)[0]
    want_after = load_classifier(run / "checkpoints" / f"epoch-{best}").predict(row)[0]
    got_before, got_after = table[labels].to_numpy(dtype=float)
    np.testing.assert_allclose(got_before, want_before, atol=1e-4)
    np.testing.assert_allclose(got_after, want_after, atol=1e-4)
    assert not np.allclose(got_before, got_after, atol=1e-4)
    assert len(at.get("plotly_chart")) == 1


def test_playground_without_classifier_json(tiny_run, tmp_path, monkeypatch):
    root = tmp_path / "runs"
    run = Path(shutil.copytree(tiny_run, root / tiny_run.name))
    for f in (run / "checkpoints").glob("epoch-*/classifier.json"):
        f.unlink()
    at = start(root, monkeypatch, "playground")
    assert any("classifier.json" in e.value for e in at.info)
