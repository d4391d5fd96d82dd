"""The Train page's look at the data in a real browser (Debian's chromium through Playwright): upload
an imbalanced train file and a test file that repeats some train rows, see the table, the class
balance and token-length charts, the duplicate and imbalance warnings, press "Use balanced class
weights" and find it in the form. Its screenshot is the README's train-data-preview.png (copied to
assets/screenshots/ with UPDATE_SCREENSHOTS=1). Never `playwright install`."""

import json
import os

import pytest

from tests.browser.test_browser import ARTIFACTS, SCREENSHOTS, UPDATE, save_small_png, server  # noqa: F401
from tests.helpers import CHROMIUM_FLAGS, SNLI, VIEWPORT, chromium_path, settle


def files(tmp_path):
    """An imbalanced slice of the SNLI rows (every entailment pair, 12 of each other class) and a test
    file holding 3 of its rows among the real test rows."""
    rows = [json.loads(line) for line in (SNLI / "train.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["label"] == "entailment"]
    train += [r for r in rows if r["label"] == "neutral"][:12] + [r for r in rows if r["label"] == "contradiction"][:12]
    test = [json.loads(line) for line in (SNLI / "test.jsonl").read_text().splitlines()] + train[:3]
    paths = {}
    for name, data in (("train", train), ("test", test)):
        paths[name] = tmp_path / f"snli-{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in data))
    return paths


@pytest.mark.browser
def test_the_data_preview_in_a_real_browser(server, tmp_path):  # noqa: F811
    from playwright.sync_api import expect, sync_playwright

    executable = chromium_path()
    url, _ = server
    paths = files(tmp_path)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport=VIEWPORT)
            page.set_default_timeout(60_000)
            page.goto(url)
            settle(page)
            page.get_by_text("Upload files (CSV / JSONL)").click()
            settle(page)
            inputs = page.locator("[data-testid=stFileUploaderDropzoneInput]")
            inputs.nth(0).set_input_files(str(paths["train"]))
            settle(page)
            inputs.nth(2).set_input_files(str(paths["test"]))
            settle(page)
            heading = page.get_by_text("A look at the data", exact=True)
            expect(heading).to_be_visible()
            expect(page.get_by_text("The training split is imbalanced", exact=False)).to_be_visible()
            expect(page.get_by_text("have the same text as a train row", exact=False)).to_be_visible()
            expect(page.get_by_text("would be cut", exact=False)).to_be_visible()
            charts = page.locator(".st-key-data_preview [data-testid=stPlotlyChart]")
            expect(charts).to_have_count(2)
            page.wait_for_timeout(1500)  # the charts drawn
            heading.scroll_into_view_if_needed()
            page.mouse.wheel(0, -60)
            page.wait_for_timeout(500)
            ARTIFACTS.mkdir(exist_ok=True)
            box = heading.bounding_box()
            below = page.get_by_role("button", name="Use balanced class weights").bounding_box()
            clip = {
                "x": 0,
                "y": max(0, box["y"] - 16),
                "width": VIEWPORT["width"],
                "height": below["y"] + below["height"] + 16 - max(0, box["y"] - 16),
            }
            page.set_viewport_size({"width": VIEWPORT["width"], "height": int(clip["y"] + clip["height"] + 40)})
            page.wait_for_timeout(800)
            page.screenshot(path=str(ARTIFACTS / "train-data-preview.png"), clip=clip)
            page.set_viewport_size(VIEWPORT)
            page.get_by_role("button", name="Use balanced class weights").click()
            settle(page)
            expect(page.get_by_role("button", name="Use balanced class weights")).to_have_count(0)
            page.get_by_role("button", name="More settings").click()
            expect(page.locator('input[aria-label="Class weights"]')).to_have_value("balanced")
        finally:
            browser.close()
    if UPDATE or os.environ.get("UPDATE_PREVIEW_SCREENSHOT"):
        save_small_png(ARTIFACTS / "train-data-preview.png", SCREENSHOTS / "train-data-preview.png")
