"""Several seeds as one group (`python -m core train --seeds K`, core/results/seeds.py): K real runs of
one config that differ only in train.seed, scored on the same test rows, summed up as mean +- std
with the per-example agreement across seeds."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

import pytest

from core.results.seeds import group_runs, group_summary
from tests.helpers import ROOT


@pytest.mark.real_model
@pytest.mark.e2e
def test_two_seeds_run_as_one_group_on_the_same_rows(tmp_path):
    base = tmp_path / "runs" / "grp"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "core",
            "train",
            "--preset",
            "demo",
            "--max-train-rows",
            "48",
            "--max-validation-rows",
            "16",
            "--max-test-rows",
            "24",
            "--epochs",
            "1",
            "--seed",
            "5",
            "--seeds",
            "2",
            "--run-dir",
            str(base),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = group_runs(base)
    assert [r.name for r in runs] == ["grp", "grp-seed6"]
    configs = [json.loads((r / "config.json").read_text()) for r in runs]
    assert [c["train"]["seed"] for c in configs] == [5, 6] and {c["group"] for c in configs} == {"grp"}
    assert {c["data"]["sample_seed"] for c in configs} == {5}  # every seed scored on the same rows
    ids = [
        [json.loads(l)["id"] for l in (r / "predictions" / "test_after.jsonl").read_text().splitlines()] for r in runs
    ]
    assert ids[0] == ids[1] and len(ids[0]) == 24

    g = group_summary(runs[1])  # from any member
    reports = [json.loads((r / "report.json").read_text()) for r in runs]
    after = [r["test_after"]["accuracy"] for r in reports]
    assert g["finished"] == 2 and [r["seed"] for r in g["runs"]] == [5, 6]
    assert abs(g["accuracy_after"]["mean"] - statistics.mean(after)) < 1e-12
    assert abs(g["accuracy_after"]["std"] - statistics.stdev(after)) < 1e-12
    preds = [
        [json.loads(l)["pred"] for l in (r / "predictions" / "test_after.jsonl").read_text().splitlines()] for r in runs
    ]
    assert g["agreement"] == sum(a == b for a, b in zip(*preds)) / 24 and g["agreement_n"] == 24
    assert g["runs"][1]["checkpoint"] == f"grp-seed6/checkpoints/epoch-{reports[1]['best_epoch']}"
    assert "group grp: 2 seeds; test accuracy after" in proc.stdout
    assert group_summary(tmp_path) is None  # not a run in a group
