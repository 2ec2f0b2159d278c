"""The app's similar items: the /similar endpoint through gradio_client, the catalogue it searches (the example photos,
or the index named in $FASHION_SIMILAR_INDEX), and the "Similar items" gallery in a real browser."""

import shutil
from pathlib import Path

import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from gradio_server import example_folder, import_app, serving
from helpers import COLOURS, encode, product_photo
from test_browser import CHROMIUM, CHROMIUM_FLAGS, TIMEOUT_MS

from fashion_hf.similar import INDEX_ENV, build_index


@pytest.fixture(scope="module")
def settings(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("similar-app")
    return import_app().Settings(
        model=str(shutil.copytree(tiny_model_dir, folder / "model")),
        feedback_dir=str(folder / "feedback"),
        examples_dir=str(example_folder(folder / "examples")),
    )


@pytest.fixture(scope="module")
def served(settings):
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv(INDEX_ENV, raising=False)
        demo = import_app().build_app(settings)
    with serving(demo, settings) as url:
        yield demo, url
    demo.service.store.close(push=False)


@pytest.fixture(scope="module")
def client(served):
    return Client(served[1], verbose=False)


def example_photos(settings) -> list[Path]:
    return sorted(Path(settings.examples_dir).iterdir())


def test_similar_finds_the_example_photo_itself_first(client, settings):
    first, second = example_photos(settings)
    found = client.predict(handle_file(str(second)), api_name="/similar")["items"]

    # The whole two-photo catalogue, best first.
    assert [item["image_path"] for item in found] == [second.name, first.name]
    assert found[0]["score"] == pytest.approx(1.0, abs=1e-4) and found[1]["score"] < found[0]["score"]
    assert {"id", "articleType", "baseColour", "gender"} <= set(found[0])


def test_similar_takes_k_and_filters(client, settings, served):
    photo = example_photos(settings)[0]
    items = served[0].similar_items.index.items
    article_type = items.loc[items["path"] == photo.name, "articleType"].iloc[0]

    assert len(client.predict(handle_file(str(photo)), 1, "", api_name="/similar")["items"]) == 1
    filters = f'{{"articleType": ["{article_type}"]}}'
    found = client.predict(handle_file(str(photo)), 8, filters, api_name="/similar")["items"]
    assert found and all(item["articleType"] == article_type for item in found)
    assert client.predict(handle_file(str(photo)), 8, '{"articleType": "No Such Type"}', api_name="/similar") == {
        "items": []
    }


@pytest.mark.parametrize(
    ("k", "filters", "message"),
    [
        (8, '{"colour": "Red"}', "no attribute 'colour' to filter on"),
        (8, "gender=Women", "filters must be a JSON object like"),
        (8, '{"gender": 3}', "give a label or a list of labels"),
        (0, "", "k must be a whole number from 1 to 50"),
        (2.5, "", "k must be a whole number from 1 to 50"),
    ],
)
def test_bad_similar_requests_are_clear_errors(client, settings, k, filters, message):
    with pytest.raises(AppError, match=message):
        client.predict(handle_file(str(example_photos(settings)[0])), k, filters, api_name="/similar")


def test_similar_with_a_bad_upload_is_a_clear_error(client, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    with pytest.raises(AppError, match="not a readable image"):
        client.predict(handle_file(str(broken)), api_name="/similar")


def test_the_app_searches_the_index_named_in_the_environment(settings, tiny_model_dir, tmp_path, monkeypatch):
    catalogue = tmp_path / "catalogue"
    catalogue.mkdir()
    for name, colour in COLOURS.items():
        (catalogue / f"{name}.jpg").write_bytes(encode(product_photo(colour)))
    build_index(str(catalogue), tmp_path / "index", settings.model, progress=False)
    monkeypatch.setenv(INDEX_ENV, str(tmp_path / "index"))
    demo = import_app().build_app(settings, feedback_dir=str(tmp_path / "feedback"))
    try:
        with serving(demo, settings) as url:
            found = Client(url, verbose=False).predict(handle_file(str(catalogue / "Blue.jpg")), api_name="/similar")
    finally:
        demo.service.store.close(push=False)
    assert len(demo.similar_items.index) == 3
    assert found["items"][0]["image_path"] == "Blue.jpg"


@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium")
def test_the_tag_tab_shows_similar_items_in_a_browser(served, settings, tmp_path):
    from playwright.sync_api import sync_playwright

    photo = example_photos(settings)[0]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1200})
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(served[1])
        page.locator("#tag-image input[type=file]").set_input_files(str(photo))
        page.locator("#similar-items img").nth(1).wait_for()  # both photos of the example catalogue
        captions = page.locator("#similar-items").inner_text()
        page.screenshot(path=tmp_path / "similar.png", full_page=True)
        browser.close()
    assert "(1.00)" in captions  # the photo itself, at cosine similarity 1
