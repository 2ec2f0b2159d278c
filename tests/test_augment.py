"""Training augmentation changes geometry, backdrop and (for phone photos) light, never the item's hue; the
phone-photo shift likewise."""

import colorsys

import datasets
import numpy as np
import pytest
from helpers import product_photo
from PIL import Image

from fashion_hf import FashionTaggerImageProcessor
from fashion_hf.training.augment import (
    AUGMENTATIONS,
    augment_phone_photo,
    backdrop_patches,
    background_mask,
    phone_photo_shift,
    replace_background,
)
from fashion_hf.training.evaluate import shift_like_phone_photos

RED = (200, 30, 30)


def item_colour(image) -> np.ndarray:
    pixels = np.asarray(image.convert("RGB")).reshape(-1, 3).astype(int)
    reddish = pixels[(pixels[:, 0] > 150) & (pixels[:, 1] < 80) & (pixels[:, 2] < 80)]
    assert len(reddish) > 20, "the item disappeared"
    return np.median(reddish, axis=0)


@pytest.mark.parametrize("name", ["product", "geometric"])
def test_augmentation_keeps_the_items_colour(name):
    for seed in range(25):
        augmented = AUGMENTATIONS[name](product_photo(RED), np.random.default_rng(seed))
        assert np.abs(item_colour(augmented) - RED).max() <= 4


def hues(image, saturated=0.5) -> np.ndarray:
    pixels = np.asarray(image.convert("RGB")).reshape(-1, 3) / 255
    hsv = np.array([colorsys.rgb_to_hsv(*pixel) for pixel in pixels])
    return hsv[(hsv[:, 1] > saturated) & (hsv[:, 2] > 0.3), 0]


def test_phone_augmentation_changes_light_but_not_the_items_hue():
    grey_backdrops = backdrop_patches([Image.new("RGB", (100, 120), (90, 90, 90))])
    changed_light = 0
    for seed in range(25):
        augmented = augment_phone_photo(product_photo(RED), np.random.default_rng(seed), 1.0, grey_backdrops)
        red = hues(augmented)
        assert len(red) > 20, "the item disappeared"
        assert np.all(np.minimum(red, 1 - red) < 0.02)  # every saturated pixel is still red (hue 0 wraps at 1)
        changed_light += not np.isin(np.asarray(augmented).reshape(-1, 3), RED).all(axis=1).any()
    assert changed_light >= 5  # room light: some views keep no pixel of the studio's exact red


def test_phone_augmentation_puts_photographed_backdrops_behind_studio_shots():
    green_floor = backdrop_patches([Image.new("RGB", (300, 400), (40, 170, 60))])
    assert len(green_floor) == 4 and green_floor[0].size == (64, 64)
    behind = 0
    for seed in range(25):
        augmented = augment_phone_photo(product_photo(RED), np.random.default_rng(seed), 1.0, green_floor)
        hue = hues(augmented, saturated=0.4)
        behind += bool(np.any(np.abs(hue - 0.36) < 0.03))  # the green floor's hue, 128 degrees
    assert 10 <= behind <= 24  # usually, and not always: some views stay on studio white


def test_backdrop_patches_are_the_photos_corners():
    photo = Image.new("RGB", (100, 200), (128, 128, 128))
    photo.paste((250, 0, 0), (0, 0, 30, 30))  # top left
    photo.paste((0, 0, 250), (70, 170, 100, 200))  # bottom right
    top_left, top_right, bottom_left, bottom_right = backdrop_patches([photo], size=8)
    assert top_left.getpixel((4, 4)) == (250, 0, 0) and bottom_right.getpixel((4, 4)) == (0, 0, 250)
    assert top_right.getpixel((4, 4)) == bottom_left.getpixel((4, 4)) == (128, 128, 128)


def test_from_border_mask_keeps_a_white_items_inside():
    white_shirt = Image.new("RGB", (60, 80), (255, 255, 255))
    white_shirt.paste((20, 20, 20), (15, 20, 45, 60))
    white_shirt.paste((255, 255, 255), (18, 23, 42, 57))  # the white body inside a dark outline
    assert background_mask(white_shirt).getpixel((30, 40)) == 255  # every white pixel counts as studio
    inside = background_mask(white_shirt, from_border=True)
    assert inside.getpixel((30, 40)) == 0 and inside.getpixel((2, 2)) == 255


def test_background_replacement_leaves_the_item_untouched():
    photo = product_photo(RED)
    replaced = replace_background(photo, np.random.default_rng(1))
    assert replaced.getpixel((30, 40)) == RED  # the item's centre
    assert replaced.getpixel((1, 1)) != (255, 255, 255)  # the studio white is gone


def test_phone_shift_keeps_colour_and_changes_the_framing():
    photo = product_photo(RED)
    shifted = phone_photo_shift(photo, np.random.default_rng(3))
    assert np.abs(item_colour(shifted) - RED).max() <= 4
    assert np.asarray(shifted).shape != np.asarray(photo).shape or shifted.tobytes() != photo.tobytes()


def test_shifted_evaluation_set_keeps_rows_and_labels():
    dataset = datasets.Dataset.from_dict(
        {"image": [product_photo(RED), product_photo((30, 30, 200))], "baseColour": ["Red", "Blue"]},
        features=datasets.Features({"image": datasets.Image(), "baseColour": datasets.Value("string")}),
    )
    shifted = shift_like_phone_photos(dataset, FashionTaggerImageProcessor())
    assert shifted["baseColour"] == ["Red", "Blue"]
    assert np.asarray(shifted[0]["image"]).tobytes() != np.asarray(dataset[0]["image"]).tobytes()
    again = shift_like_phone_photos(dataset, FashionTaggerImageProcessor())
    assert np.asarray(again[0]["image"]).tobytes() == np.asarray(shifted[0]["image"]).tobytes()  # seeded
