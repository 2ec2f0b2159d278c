"""The "fashion-tagging" pipeline honours its output contract for every input kind."""

import numpy as np
import pytest
from conftest import encode, product_photo
from transformers import pipeline

from fashion_hf import InvalidImageError


@pytest.fixture(scope="module")
def tagger(tiny_model_dir):
    return pipeline("fashion-tagging", model=str(tiny_model_dir))


def assert_contract(result, config, top_k):
    assert set(result) == {"attributes", "tags"}
    assert list(result["attributes"]) == list(config.attributes)
    for name, predictions in result["attributes"].items():
        assert len(predictions) == min(top_k, len(config.attributes[name]))
        scores = [p["score"] for p in predictions]
        assert scores == sorted(scores, reverse=True) and all(0 <= s <= 1 for s in scores)
        assert all(p["label"] in config.attributes[name] and isinstance(p["score"], float) for p in predictions)
    vocabulary = {(text, group) for text, group in config.tags}
    for tag in result["tags"]:
        assert set(tag) == {"tag", "group", "score"}
        assert (tag["tag"], tag["group"]) in vocabulary and 0 < tag["score"] <= 1


def test_single_image(tagger):
    assert_contract(tagger(product_photo(), top_k=3), tagger.model.config, 3)


def test_path_bytes_and_numpy_agree_with_pil(tagger, tmp_path):
    image = product_photo()
    path = tmp_path / "photo.png"
    path.write_bytes(encode(image, "PNG"))
    expected = tagger(image, top_k=2)
    for same_image in (str(path), encode(image, "PNG"), np.asarray(image)):
        result = tagger(same_image, top_k=2)
        assert_contract(result, tagger.model.config, 2)
        assert result["tags"] == pytest.approx(expected["tags"]) or [t["tag"] for t in result["tags"]] == [
            t["tag"] for t in expected["tags"]
        ]


def test_list_gives_one_result_per_image_in_order(tagger):
    images = [product_photo(colour=(i * 40, 100, 200 - i * 40)) for i in range(5)]
    batched = tagger(images, batch_size=3, top_k=2)
    assert isinstance(batched, list) and len(batched) == 5
    one_by_one = [tagger(image, top_k=2) for image in images]
    for got, expected in zip(batched, one_by_one):
        assert_contract(got, tagger.model.config, 2)
        assert [t["tag"] for t in got["tags"]] == [t["tag"] for t in expected["tags"]]
        for name in expected["attributes"]:
            assert got["attributes"][name][0]["score"] == pytest.approx(expected["attributes"][name][0]["score"], abs=1e-5)


def test_default_top_k_and_beam_search(tagger):
    result = tagger(product_photo(), num_beams=3, max_tags=2)
    assert len(result["tags"]) <= 2
    assert all(len(p) == min(5, len(tagger.model.config.attributes[n])) for n, p in result["attributes"].items())


def test_bad_input_raises_a_clear_error(tagger):
    with pytest.raises(InvalidImageError, match="not a readable image"):
        tagger(b"GIF89a but not really")
