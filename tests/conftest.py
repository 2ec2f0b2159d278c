"""Shared test set-up: never touch the network, keep models tiny, make images on the fly.

The fixtures live here; what test modules import (paths, tiny models, images, training runs) lives in helpers.py.
"""

import atexit
import os
import shutil
import tempfile
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # read at import time by huggingface_hub, datasets and transformers
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# pytest reuses tmp paths across runs; a shared datasets cache would hand one run's dataset to the next.
os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="fashion-hf-datasets-")
atexit.register(shutil.rmtree, os.environ["HF_DATASETS_CACHE"], ignore_errors=True)

import numpy as np
import pytest
from PIL import Image
from transformers.utils import logging as transformers_logging

transformers_logging.set_verbosity_error()

import fashion_hf  # noqa: E402  (registers the Auto classes and the pipeline task)
from fashion_hf.pipeline_fashion_tagging import save_tagger  # noqa: E402
from helpers import TINY_FLAGS, product_photo, run_training, tagging_model, write_product_parquet  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A saved tiny model with its processor: the folder layout every consumer loads from."""
    folder = tmp_path_factory.mktemp("tiny-fashion-tagger")
    model = tagging_model()
    save_tagger(model, fashion_hf.FashionTaggerImageProcessor.from_model_config(model.config), folder)
    return folder


@pytest.fixture
def photo() -> Image.Image:
    return product_photo()


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


# --- train/train.py end to end (test_train.py, test_distillation.py): one tiny first-stage run per session ----


@pytest.fixture(scope="session")
def tiny_catalogue(tmp_path_factory):
    folder = tmp_path_factory.mktemp("products")
    write_product_parquet(folder, "train", 24)
    write_product_parquet(folder, "validation", 12)
    return folder


@pytest.fixture(scope="session")
def trained(tiny_catalogue, tmp_path_factory):
    output = tmp_path_factory.mktemp("run")
    log = run_training([
        "--data-source", str(tiny_catalogue), *TINY_FLAGS, "--epochs", "1", "--finetune-epochs", "1",
        "--output-dir", str(output),
    ])
    return output, log
