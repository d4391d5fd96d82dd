"""Public mode in a real browser: `streamlit run app.py` with QLORA_STUDIO_READ_ONLY=1 over a runs
folder holding a finished run (a copy of the session's real tiny run, its test texts replaced by a
link, an image and HTML), driven with Playwright through Debian's chromium as tests/browser/test_browser.py
is. The Train page has no Launch, Stop or Resume button and no file input; the Report offers the
adapter download but no push; the Failures page shows the texts as typed, with no link or image.
Never `playwright install`; run with `pytest -m browser`."""

import os

import pytest

from tests.helpers import (
    CHROMIUM_FLAGS,
    EVIL_HYPOTHESIS,
    EVIL_PREMISE,
    VIEWPORT,
    chromium_path,
    evil_run,
    settle,
    streamlit_server,
)


@pytest.fixture
def read_only_server(tiny_run, tmp_path):
    """A read-only Streamlit server over a runs folder with one finished run; killed at the end."""
    run = evil_run(tiny_run, tmp_path / "runs", checkpoints=True)  # the adapters, for the download
    env = {k: v for k, v in os.environ.items() if not k.startswith("QLORA_STUDIO_")}
    with streamlit_server(
        tmp_path, {**env, "QLORA_STUDIO_RUNS": str(run.parent), "QLORA_STUDIO_READ_ONLY": "1"}
    ) as url:
        yield url, run


@pytest.mark.browser
def test_a_read_only_deployment_in_a_real_browser(read_only_server):
    from playwright.sync_api import expect, sync_playwright

    executable = chromium_path()
    url, run = read_only_server
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport=VIEWPORT)
            page.set_default_timeout(60_000)
            expect.set_options(timeout=60_000)  # the first script run imports torch: slow on 2 busy cores
            page.goto(url)
            main = page.locator("[data-testid=stMain]")
            expect(page.get_by_text("This is a read-only deployment", exact=False)).to_be_visible(timeout=120_000)
            expect(page.get_by_text("Test accuracy after")).to_be_visible()  # the finished run is shown
            settle(page)
            expect(main.get_by_text(run.name).first).to_be_visible()
            for name in ("Launch", "Stop", "Resume"):
                assert page.get_by_role("button", name=name).count() == 0, name
            assert page.locator("input[type=file]").count() == 0 and page.locator("input[type=password]").count() == 0
            assert page.get_by_text("Start a new run").count() == 0

            page.locator("[data-testid=stSidebarNav]").get_by_text("Report").click()
            expect(page.get_by_text("Accuracy on the test split, before vs after")).to_be_visible()
            settle(page)
            expect(page.get_by_role("button", name="Download adapter")).to_be_visible()
            assert page.get_by_text("Push to the Hugging Face Hub").count() == 0

            page.locator("[data-testid=stSidebarNav]").get_by_text("Failures").click()
            detail = page.locator(".st-key-detail")
            expect(detail).to_contain_text("Premise:")
            settle(page)
            seen = " ".join(detail.inner_text().replace("\u2060", "").split())  # less the invisible word joiners
            assert f"Premise: {EVIL_PREMISE}" in seen and f"Hypothesis: {EVIL_HYPOTHESIS}" in seen  # as typed
            assert page.locator("a[href*='evil.example']").count() == 0  # no link, not even an autolink
            assert page.locator("img[src*='evil.example'], img[src=x]").count() == 0
            assert detail.locator("b, em, code, span.katex").count() == 0  # no HTML, emphasis, code or math
        finally:
            expect.set_options(timeout=5_000)  # Playwright's default again, for the tests after this one
            browser.close()
