"""Shared fixtures: one real, tiny training run for the whole session, and helpers to build
other run folders (failed, running) by hand."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """The run folder of a real training run: the demo preset on the built-in NLI sample,
    64 train / 32 validation / 48 test rows, 2 epochs (about a minute on 2 CPU cores).
    Tests must treat it as read-only: it is shared by the whole session."""
    run = tmp_path_factory.mktemp("tiny-runs") / "tiny-run"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "core",
            "train",
            "--preset",
            "demo",
            "--max-train-rows",
            "64",
            "--max-validation-rows",
            "32",
            "--max-test-rows",
            "48",
            "--epochs",
            "2",
            "--run-dir",
            str(run),
            "--speed",
            "micro_tokens=0",
        ],  # CPU's default (no split), named: config.json must record it
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "QLORA_STUDIO_RUNS": str(run.parent)},
    )
    if proc.returncode != 0:
        raise AssertionError(
            f"tiny training run failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    assert json.loads((run / "status.json").read_text())["state"] == "done"
    return run


@pytest.fixture
def sleeper():
    """A real live process that is not a trainer: it stands in for a trainer, or for whoever got a
    reused pid."""
    proc = subprocess.Popen(["sleep", "120"])
    yield proc
    proc.kill()
    proc.wait()
