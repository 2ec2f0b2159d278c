"""Grad-CAM heatmaps and the uncertainty score behind the annotation queue."""

import numpy as np
import pytest
import torch
from helpers import product_photo, tiny_model
from PIL import Image

from fashion_hf import FashionTaggerImageProcessor
from fashion_hf.explain import colorize, explained_attribute, grad_cam, overlay_heatmap, uncertainty


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def processor(model):
    return FashionTaggerImageProcessor.from_model_config(model.config)


def test_grad_cam_explains_the_top_article_type_of_each_image(model, processor):
    images = [product_photo(colour=(200, 30, 30)), product_photo(colour=(30, 30, 200), size=(120, 60))]
    pixel_values = processor(images, return_tensors="pt")["pixel_values"]
    cam = grad_cam(model, pixel_values)
    assert cam.attribute == "articleType"
    with torch.no_grad():
        top = model(pixel_values).attribute_logits["articleType"].argmax(-1).tolist()
    assert cam.labels == [model.config.attributes["articleType"][i] for i in top]
    assert cam.maps.shape[0] == 2 and cam.maps.ndim == 3
    assert cam.maps.min() >= 0 and cam.maps.max() <= 1 + 1e-6


def test_grad_cam_is_the_same_alone_or_in_a_batch(model, processor):
    images = [product_photo(colour=(200, 30, 30)), product_photo(colour=(30, 200, 30))]
    batched = grad_cam(model, processor(images, return_tensors="pt")["pixel_values"]).maps
    alone = grad_cam(model, processor(images[1], return_tensors="pt")["pixel_values"]).maps
    np.testing.assert_allclose(batched[1], alone[0], atol=1e-4)


def test_grad_cam_leaves_no_gradients_on_the_model(model, processor):
    grad_cam(model, processor(product_photo(), return_tensors="pt")["pixel_values"], attribute="gender", label_ids=[0])
    assert all(parameter.grad is None for parameter in model.parameters())


def test_explained_attribute_falls_back_to_the_first_head():
    config = tiny_model(attributes={"gender": ["Men", "Women"], "season": ["Fall", "Summer"]}).config
    assert explained_attribute(config) == "gender"
    with pytest.raises(ValueError, match="unknown attribute"):
        explained_attribute(config, "colour")


@pytest.mark.parametrize("size", [(60, 80), (200, 50), (1, 1)])
def test_overlay_matches_the_photo_shape_at_display_size(size):
    heatmap = np.linspace(0, 1, 12, dtype=np.float32).reshape(4, 3)
    overlay = overlay_heatmap(Image.new("RGB", size, "white"), heatmap, (128, 96), max_side=300)
    assert overlay.mode == "RGB" and max(overlay.size) == 300
    assert overlay.size[0] / overlay.size[1] == pytest.approx(size[0] / size[1], rel=0.05)


def test_colorize_runs_from_cold_to_hot():
    colours = colorize(np.array([[0.0, 1.0]]))
    assert colours.dtype == np.uint8 and colours[0, 0, 2] > colours[0, 0, 0] and colours[0, 1, 0] > colours[0, 1, 2]


def test_uncertainty_is_one_minus_the_mean_top_score():
    sure = {"attributes": {"a": [{"label": "x", "score": 1.0}], "b": [{"label": "y", "score": 1.0}]}, "tags": []}
    unsure = {"attributes": {"a": [{"label": "x", "score": 0.4}], "b": [{"label": "y", "score": 0.6}]}, "tags": []}
    assert uncertainty(sure) == pytest.approx(0.0)
    assert uncertainty(unsure) == pytest.approx(0.5)
