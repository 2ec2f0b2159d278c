"""Training augmentation changes geometry and backdrop, never the item's colour; the phone-photo shift likewise."""

import datasets
import numpy as np
import pytest
from helpers import product_photo

from fashion_hf import FashionTaggerImageProcessor
from fashion_hf.training.augment import AUGMENTATIONS, phone_photo_shift, replace_background
from fashion_hf.training.evaluate import shift_like_phone_photos

RED = (200, 30, 30)


def item_colour(image) -> np.ndarray:
    pixels = np.asarray(image.convert("RGB")).reshape(-1, 3).astype(int)
    reddish = pixels[(pixels[:, 0] > 150) & (pixels[:, 1] < 80) & (pixels[:, 2] < 80)]
    assert len(reddish) > 20, "the item disappeared"
    return np.median(reddish, axis=0)


@pytest.mark.parametrize("name", sorted(AUGMENTATIONS))
def test_augmentation_keeps_the_items_colour(name):
    for seed in range(25):
        augmented = AUGMENTATIONS[name](product_photo(RED), np.random.default_rng(seed))
        assert np.abs(item_colour(augmented) - RED).max() <= 4


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
