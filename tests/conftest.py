"""Shared fixtures (one real, tiny training run for the whole session; a live process that is not a
trainer) and the test tiers. Plain helper functions and constants (paths, tiny random models, the app
under AppTest, hand-made run folders, the browser's server) live in tests/helpers.py.

Layout: one folder per room of the code: tests/engine/ (model, data, config, training, checkpoints,
baseline, estimate, CLI, progress, resume, dist), tests/speed/ (core/speed/), tests/runs/ (the run
folder, liveness, watch, jobs), tests/results/ (stats, report, seeds, compare), tests/app/ (the pages
under AppTest, uploads, public mode, deploy), tests/browser/ (Playwright through Debian's chromium).

Tiers (markers registered in pytest.ini):
  fast       everything not marked slow: units, tiny random-weight models built offline, AppTest pages
             on hand-made run folders. Every room is covered. About 2-3 minutes on 2 CPU cores.
  real_model trains or loads the real embedded model (the demo preset); every test that uses the
             session fixture `tiny_run` gets this marker automatically (the fixture trains it).
  e2e        end to end through a subprocess: `python -m core train/...`, torchrun, detached trainers.
  browser    a real browser (Debian's chromium through Playwright); skipped when chromium is missing.
  slow       added automatically to every real_model, e2e and browser test.

Commands:
  .venv/bin/python -m pytest -m "not slow" -q     the fast tier
  .venv/bin/python -m pytest -m slow -ra          the slow tiers only (or -m real_model / e2e / browser)
  .venv/bin/python -m pytest -ra                  everything (the README's command)
"""

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


SLOW_TIERS = ("real_model", "e2e", "browser")


def pytest_collection_modifyitems(config, items):
    """A test that uses `tiny_run` trains the real model (once a session): real_model. Every test of a
    slow tier is also `slow`, so that `-m "not slow"` is the fast tier."""
    for item in items:
        if "tiny_run" in item.fixturenames and not item.get_closest_marker("real_model"):
            item.add_marker(pytest.mark.real_model)
        if any(item.get_closest_marker(tier) for tier in SLOW_TIERS) and not item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.slow)
