"""What the benchmarks share: offline set-up, a vocabulary the size of the shipped model's, interleaved timing."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # read at import time by huggingface_hub and transformers

import io
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow.parquet as pq
import torch
from PIL import Image
from transformers.utils import logging as transformers_logging

transformers_logging.set_verbosity_error()  # no "Loading weights" bars or backend notices between the figures
transformers_logging.disable_progress_bar()

from fashion_hf import FashionTaggerEnsembleModel  # noqa: E402  (after HF_HUB_OFFLINE is set)
from fashion_hf.configuration_fashion_tagger import DETAIL_GROUP  # noqa: E402
from fashion_hf.data import data_dir  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PRODUCT_IMAGES = data_dir() / "fashion-product-images"

# Head sizes of the shipped model's vocabulary (train split of Fashion Product Images, train/configs/
# fashion-product-images.yaml): 254 attribute labels, plus the 55 detail tags seen on >= 20 items = 309 tags.
REAL_HEAD_SIZES = {
    "gender": 5,
    "masterCategory": 7,
    "subCategory": 44,
    "articleType": 140,
    "baseColour": 46,
    "season": 4,
    "usage": 8,
}
REAL_DETAIL_TAG_COUNT = 55


def validation_photos(count: int, source: str | Path | None = None) -> list:
    """The first `count` photos of the validation split (`data/validation-*.parquet` under `source`, default the
    shared Fashion Product Images), decoded to RGB PIL images; an empty list when the split is absent or holds
    fewer photos."""
    files = sorted((Path(source or PRODUCT_IMAGES) / "data").glob("validation-*.parquet"))
    if not files:
        return []
    rows = pq.read_table(files[0], columns=["image"]).slice(0, count).column("image").to_pylist()
    photos = [Image.open(io.BytesIO(row["bytes"])).convert("RGB") for row in rows]
    return photos if len(photos) == count else []


def image_size(text: str) -> tuple[int, int]:
    """`--sizes` arguments: "HEIGHTxWIDTH" -> (height, width)."""
    height, width = text.lower().split("x")
    return int(height), int(width)


def real_size_vocabulary() -> tuple[dict[str, list[str]], list[list[str]]]:
    """`(attributes, tags)` with the shipped model's head sizes and tag count; the label names are placeholders."""
    attributes = {name: [f"{name}-{index}" for index in range(size)] for name, size in REAL_HEAD_SIZES.items()}
    tags = [[label, name] for name, labels in attributes.items() for label in labels]
    tags += [[f"detail-{index}", DETAIL_GROUP] for index in range(REAL_DETAIL_TAG_COUNT)]
    return attributes, tags


def interleaved(variants: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each variant, `repeats` rounds, the order reversed every other round.

    Running the variants side by side in one process lets load from other processes on the machine fall on both.
    """
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    seconds = {name: [] for name in names}
    for round_index in range(repeats):
        for name in names if round_index % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            variants[name]()
            seconds[name].append(time.perf_counter() - start)
    return seconds


def ratio_summary(numerators: list[float], denominators: list[float]) -> tuple[float, float, float, float]:
    """Median, lowest and highest per-round ratio (each round's pair ran under the same background load), and the
    ratio of the two fastest times (background load only ever adds time, so the minimum is the least disturbed)."""
    ratios = [a / b for a, b in zip(numerators, denominators)]
    return statistics.median(ratios), min(ratios), max(ratios), min(numerators) / min(denominators)


def verdict(met: bool) -> str:
    return "PASS" if met else "MISS"


def runtime_line() -> str:
    return (
        f"python {platform.python_version()}, torch {torch.__version__}, {torch.get_num_threads()} torch threads, "
        f"{os.cpu_count()} CPUs, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )


def members_of(model) -> list:
    """The taggers in `model`: an ensemble's members, or the model itself."""
    return list(model.members) if isinstance(model, FashionTaggerEnsembleModel) else [model]
