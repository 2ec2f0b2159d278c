"""Shared test set-up: never touch the network, keep models tiny, make images on the fly."""

import io
import os
import sys
import tempfile
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # read at import time by huggingface_hub, datasets and transformers
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# pytest reuses tmp paths across runs; a shared datasets cache would hand one run's dataset to the next.
os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="fashion-hf-datasets-")

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.utils import logging as transformers_logging

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED_DATA = REPO.parent / "shared" / "data"
PRODUCT_IMAGES = SHARED_DATA / "fashion-product-images"

transformers_logging.set_verbosity_error()

import fashion_hf  # noqa: E402  (registers the Auto classes and the pipeline task)
from fashion_hf.configuration_fashion_tagger import EOS_TAG_ID  # noqa: E402

TINY_ENCODER = "test_efficientnet"  # timm's test-size EfficientNet: same code paths, a fraction of the compute


def tiny_config(**overrides) -> fashion_hf.FashionTaggerConfig:
    settings = dict(
        encoder_name=TINY_ENCODER,
        image_size=(64, 48),
        decoder_hidden_size=32,
        tag_embedding_size=16,
        max_tag_length=8,
    )
    settings.update(overrides)
    return fashion_hf.FashionTaggerConfig(**settings)


def tiny_model(**overrides) -> fashion_hf.FashionTaggerModel:
    return fashion_hf.FashionTaggerModel(tiny_config(**overrides)).eval()


def tagging_model(**overrides) -> fashion_hf.FashionTaggerModel:
    """A tiny model that tags every image up to the length limit: its end-of-sequence logit is pushed far down.

    An untrained model's first choice is a draw that can land on end-of-sequence (it did on a CI machine whose CPU
    rounds differently), and a test of how tags are shown would then have no tags to show."""
    torch.manual_seed(0)
    model = tiny_model(**overrides)
    with torch.no_grad():
        model.tag_classifier.bias[EOS_TAG_ID] = -1e4
    return model


def product_photo(colour=(200, 30, 30), size=(60, 80), mode="RGB") -> Image.Image:
    """A shirt-like shape on a white studio background."""
    image = Image.new("RGB", size, (255, 255, 255))
    width, height = size
    image.paste(Image.new("RGB", (width // 2, height // 2), colour), (width // 4, height // 4))
    return image.convert(mode) if mode != "RGB" else image


def encode(image: Image.Image, format="JPEG", **save_args) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **save_args)
    return buffer.getvalue()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A saved tiny model with its processor: the folder layout every consumer loads from."""
    folder = tmp_path_factory.mktemp("tiny-fashion-tagger")
    model = tagging_model()
    model.save_pretrained(folder)
    fashion_hf.FashionTaggerImageProcessor.from_model_config(model.config).save_pretrained(folder)
    return folder


@pytest.fixture
def photo() -> Image.Image:
    return product_photo()


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)
