"""Two browser sessions watching one run that trains on the CPU, in a real browser (Debian's
chromium through Playwright, as tests/browser/test_browser.py): they share one refresh budget, each tab
says so, and the first tab goes back to the full rate once the second is closed. The live charts
are SVG images. The run is a running run folder whose trainer is a `sleep` (with a heartbeat), so
nothing trains. Never `playwright install`; run with `pytest -m browser`."""

import os

import pytest

from core.runs import liveness
from tests.helpers import CHROMIUM_FLAGS, VIEWPORT, chromium_path, make_running_run, streamlit_server

SHARED = "2 browser sessions are watching this run"


@pytest.mark.browser
def test_tabs_on_a_cpu_run_share_one_refresh_budget(tmp_path, sleeper):
    from playwright.sync_api import expect, sync_playwright

    run = make_running_run(tmp_path / "runs", sleeper.pid)  # its setup record says device cpu
    heartbeat = liveness.Heartbeat(run)
    heartbeat.start()
    env = {k: v for k, v in os.environ.items() if not k.startswith("QLORA_STUDIO_")}
    try:
        with streamlit_server(tmp_path, {**env, "QLORA_STUDIO_RUNS": str(run.parent)}) as url, sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_FLAGS)
            expect.set_options(timeout=60_000)
            try:
                first = browser.new_context(viewport=VIEWPORT).new_page()
                first.goto(f"{url}/?run={run.name}")
                expect(first.locator("[data-testid=stProgress]")).to_be_visible(timeout=120_000)
                charts = first.locator("[data-testid=stMain] img[src^='data:image/svg+xml']")
                expect(charts).to_have_count(4)  # loss, validation, CPU, RAM: SVG, no Plotly
                assert first.locator(".js-plotly-plot").count() == 0
                assert first.get_by_text("browser sessions are watching", exact=False).count() == 0

                second_context = browser.new_context(viewport=VIEWPORT)  # another browser session
                second = second_context.new_page()
                second.goto(f"{url}/?run={run.name}")
                expect(second.get_by_text(SHARED, exact=False)).to_be_visible()
                expect(second.get_by_text("each refreshes every 6 s (charts every 24 s)", exact=False)).to_be_visible()
                # the first tab learns it at its next refresh and takes the new intervals
                expect(first.get_by_text(SHARED, exact=False)).to_be_visible()

                second_context.close()  # counted until 2 x 6 s + 5 s without a refresh from it
                expect(first.get_by_text("browser sessions are watching", exact=False)).to_have_count(0)
                expect(first.locator("[data-testid=stProgress]")).to_be_visible()
            finally:
                browser.close()
    finally:
        heartbeat.stop()
