"""A real browser (Debian's Chromium driven by Playwright) tags a photo, corrects it and submits the feedback."""

import json
import os
import re
import shutil
from pathlib import Path

import pytest
from conftest import REPO, encode, product_photo
from gradio_server import example_folder, import_app, serving

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
SCREENSHOT = REPO / "docs" / "app-screenshot.png"
# UPDATE_SCREENSHOT=1 python -m pytest tests/test_browser.py: serve the shipped model and retake the README's screenshot.
UPDATE_SCREENSHOT = bool(os.environ.get("UPDATE_SCREENSHOT"))
TIMEOUT_MS = 30_000

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium (apt-get install chromium)"
)


@pytest.fixture(scope="module")
def served(tiny_model_dir, tmp_path_factory):
    app = import_app()
    folder = tmp_path_factory.mktemp("browser-app")
    examples = example_folder(folder / "examples")
    feedback = folder / "feedback"
    model = REPO / "models" / "fashion-tagger" if UPDATE_SCREENSHOT else tiny_model_dir
    settings = app.Settings(model=str(model), feedback_dir=str(feedback), examples_dir=str(examples))
    demo = app.build_app(settings)
    with serving(demo, settings) as url:
        yield demo.service, url


@pytest.fixture
def page(served):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.set_default_timeout(TIMEOUT_MS)
        yield page
        browser.close()


def test_upload_see_labels_correct_consent_submit_and_confirm(served, page, tmp_path):
    service, url = served
    photo = next(iter(sorted((REPO / "examples").glob("*.jpg"))), None)
    if photo is None:
        photo = tmp_path / "photo.jpg"
        photo.write_bytes(encode(product_photo()))
    predicted = service.tagger(str(photo))["attributes"]["articleType"][0]["label"]

    page.goto(url)
    page.locator("#tag-image input[type=file]").set_input_files(str(photo))
    page.locator("#label-articleType").get_by_text(predicted).first.wait_for()
    page.locator("#heatmap img").wait_for()
    page.locator("#tag-chips .chip").first.wait_for()
    page.screenshot(path=tmp_path / "tagged.png", full_page=True)

    page.get_by_role("tab", name="Help us label").click()
    article_type = page.locator("#fix-articleType input")
    assert article_type.input_value() == predicted  # the prediction is pre-filled
    corrected = next(label for label in service.config.attributes["articleType"] if label != predicted)
    article_type.click()
    page.get_by_role("option", name=corrected, exact=True).click()
    page.locator("#fix-free-text textarea, #fix-free-text input").first.fill("round neck")
    page.locator("#consent input[type=checkbox]").check()
    page.locator("#submit-feedback").click()

    confirmation = page.locator("#confirmation")
    confirmation.get_by_text("Saved as record").wait_for()
    record_id = re.search(r"[0-9a-f]{32}", confirmation.inner_text()).group(0)
    page.screenshot(path=tmp_path / "feedback.png", full_page=True)

    record = service.store.get(record_id)
    assert json.loads(record["corrected_attributes"])["articleType"] == corrected
    assert "round neck" in record["corrected_tags"] and record["consent"] is True and record["annotator"] == "anonymous"
    page.get_by_text("Withdraw my submission").click()  # the id is ready in the withdraw box
    assert page.locator("#withdraw-id input, #withdraw-id textarea").first.input_value() == record_id

    if UPDATE_SCREENSHOT:  # opt in: a plain test run leaves the working tree as it found it
        SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copy(tmp_path / "tagged.png", SCREENSHOT)  # the README's screenshot: the Tag tab with a prediction
