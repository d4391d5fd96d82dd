"""One real-browser end-to-end test: `streamlit run app.py` on a loopback port, driven with
Playwright through Debian's chromium. Launch a small demo run from the Train page, watch live
progress reach done, read the accuracies and the statistics of the change on Report, follow its
"fixed" cell to Failures and open a fixed example there.

Screenshots of each page go to test-artifacts/ (git-ignored); with UPDATE_SCREENSHOTS=1 they
are also copied to assets/screenshots/ for the README. Run only this test with `pytest -m browser`.
Browsers cannot be downloaded here: never `playwright install`; CI installs Debian's chromium.
"""

import json
import os
import re
import time
from pathlib import Path

import pytest

from tests.helpers import CHROMIUM_FLAGS, ROOT, VIEWPORT, chromium_path, settle, streamlit_server

ARTIFACTS = ROOT / "test-artifacts"
SCREENSHOTS = ROOT / "assets" / "screenshots"
UPDATE = bool(os.environ.get("UPDATE_SCREENSHOTS"))
# A small run for the test; the README's screenshots show the demo preset as a new user gets it.
FORM = {} if UPDATE else {"Epochs": 2, "Max train rows": 160, "Max validation rows": 30, "Max test rows": 60}


@pytest.fixture
def server(tmp_path):
    """A Streamlit server for app.py with an empty runs folder; always killed at the end."""
    runs = tmp_path / "runs"
    try:
        with streamlit_server(tmp_path, {**os.environ, "QLORA_STUDIO_RUNS": str(runs)}) as url:
            yield url, runs
    finally:
        for run in runs.glob("*/status.json"):  # never leave a trainer behind
            from core import jobs

            jobs.stop(run.parent)


def shot(page, name):
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"))


def metric_value(page, label: str) -> str:
    metric = page.locator("[data-testid=stMetric]").filter(
        has=page.locator("[data-testid=stMetricLabel]", has_text=label)
    )
    return metric.first.locator("[data-testid=stMetricValue]").inner_text().strip()


def set_number(page, label: str, value: int):
    box = page.locator(f'input[aria-label="{label}"]')
    box.fill(str(value))
    box.press("Enter")
    settle(page)


@pytest.mark.browser
def test_demo_run_end_to_end_in_a_real_browser(server):
    from playwright.sync_api import expect, sync_playwright

    from core.config import get_preset, override
    from core.estimate import planned_rows

    executable = chromium_path()
    url, runs = server
    t0 = time.monotonic()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport=VIEWPORT)
            page.set_default_timeout(60_000)
            page.goto(url)
            expect(page.get_by_text("No runs yet.", exact=False).first).to_be_visible()
            settle(page)
            page.set_viewport_size({"width": VIEWPORT["width"], "height": 1280})  # the form and its plan
            shot(page, "train-empty")
            page.set_viewport_size(VIEWPORT)

            # --- Train: a small demo run ----------------------------------------------------------
            for label, value in FORM.items():
                set_number(page, label, value)
            cfg = get_preset("demo")
            epochs = FORM.get("Epochs", cfg.train.epochs)
            train_rows = planned_rows(override(cfg, {"data.max_train_rows": FORM.get("Max train rows")}))["train"]
            per_epoch = -(-train_rows // cfg.train.batch_size)
            expect(page.get_by_text(f"{per_epoch} per epoch × {epochs} epochs", exact=False)).to_be_visible()
            page.get_by_role("button", name="Launch").click()

            expect(page.get_by_role("button", name="Stop")).to_be_visible(timeout=60_000)
            progress = page.locator("[data-testid=stProgress]")
            # the README's live screenshot waits for a few steps, so the curves and the ETA have settled
            first = r"[1-9]\d" if UPDATE else r"[1-9]\d*"
            expect(progress).to_contain_text(
                re.compile(rf"step {first}/{per_epoch * epochs}\b"), timeout=(900 if UPDATE else 180) * 1000
            )
            page.wait_for_timeout(1600)  # one more refresh, so the charts hold a step
            shot(page, "train-live")
            assert re.search(r"\?run=", page.url), page.url  # a refresh keeps the selection
            # a new tab (no ?run=) re-attaches to the run from its folder alone
            (run,) = [p.parent for p in runs.glob("*/status.json")]
            other = browser.new_page(viewport=VIEWPORT)
            other.goto(url)
            expect(other.locator("[data-testid=stMain]").get_by_text(run.name)).to_be_visible()
            expect(
                other.locator("[data-testid=stProgress]").or_(other.get_by_text("Test accuracy after"))
            ).to_be_visible(timeout=30_000)
            other.close()

            expect(page.get_by_text("Test accuracy after")).to_be_visible(timeout=(1200 if UPDATE else 240) * 1000)
            settle(page)
            assert json.loads((run / "status.json").read_text())["state"] == "done"
            report = json.loads((run / "report.json").read_text())
            page.wait_for_timeout(1000)
            shot(page, "train")

            # --- Report: the accuracies -----------------------------------------------------------
            page.locator("[data-testid=stSidebarNav]").get_by_text("Report").click()
            expect(page.get_by_text("Accuracy on the test split, before vs after")).to_be_visible()
            settle(page)

            def pct(x: float) -> str:
                return f"{100 * x:.1f}%"

            assert metric_value(page, "Before fine-tuning") == pct(report["test_before"]["accuracy"])
            assert metric_value(page, f"After (epoch {report['best_epoch']})") == pct(report["test_after"]["accuracy"])
            n_test = report["test_after"]["n"]
            assert n_test == FORM.get("Max test rows", n_test)
            expect(page.get_by_text(f"n = {n_test} test examples", exact=False)).to_be_visible()
            shot(page, "report")

            # --- Report: the statistics of the change, transitions and calibration ------------------
            to_top = "e => e.scrollIntoView({block: 'start'})"
            headline = page.locator(".st-key-headline")
            expect(headline).to_contain_text(report["headline"].split(":")[0])
            expect(headline).to_contain_text(report["change"]["verdict"])
            headline.evaluate(to_top)
            page.wait_for_timeout(800)
            shot(page, "report-stats")
            page.get_by_text("Transitions: where the test examples went").evaluate(to_top)
            page.wait_for_timeout(800)
            shot(page, "report-transitions")

            # --- Failures: the report's "fixed" cell lists the fixed examples; open one -------------
            from core.results.report import load_comparison

            rows, _ = load_comparison(run)
            fixed = sorted((r for r in rows if r["category"] == "fixed"), key=lambda r: -r["gold_prob_change"])
            assert len(fixed) >= 2, "the demo run should fix at least two test examples"
            page.get_by_text(f"{len(fixed)} fixed", exact=True).click()
            expect(page.get_by_text(f"{len(fixed)} of {len(rows)} examples", exact=False)).to_be_visible()
            settle(page)
            assert metric_value(page, "Fixed") == str(len(fixed))
            # click the second row of the grid (the first one is shown without a click)
            grid = page.locator("[data-testid=stDataFrame]").first
            grid.scroll_into_view_if_needed()
            box = grid.bounding_box()
            page.mouse.click(box["x"] + 18, box["y"] + 35 * 1.5 + 35)
            settle(page)
            chosen = fixed[1]
            detail = page.locator(".st-key-detail")
            expect(detail).to_contain_text(chosen["id"])
            expect(detail).to_contain_text(chosen["premise"])
            expect(detail).to_contain_text(chosen["hypothesis"])
            expect(detail).to_contain_text(f"Gold: {chosen['gold']}")
            expect(detail).to_contain_text("Learning dynamics")
            page.set_viewport_size({"width": VIEWPORT["width"], "height": 1280})  # counts, table and detail
            page.locator("[data-testid=stMain]").evaluate("e => e.scrollTo(0, 0)")
            page.wait_for_timeout(800)
            shot(page, "failures")
            detail.evaluate(to_top)  # the example in detail: probabilities, p(gold) per epoch
            page.wait_for_timeout(800)
            shot(page, "failures-dynamics")
        finally:
            browser.close()
    elapsed = time.monotonic() - t0
    print(f"browser test took {elapsed:.0f} s")

    if UPDATE:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        for name in (
            "train-empty",
            "train-live",
            "train",
            "report",
            "report-stats",
            "report-transitions",
            "failures",
            "failures-dynamics",
        ):
            save_small_png(ARTIFACTS / f"{name}.png", SCREENSHOTS / f"{name}.png")


def save_small_png(src: Path, dst: Path) -> None:
    """Copy a screenshot for the README, reduced to a 256-colour palette (about 4x smaller)."""
    from PIL import Image

    Image.open(src).convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(dst, optimize=True)
