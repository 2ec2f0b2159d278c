"""What the tests share besides fixtures: paths, tiny models, images made on the fly, a tiny catalogue, training runs.

Fixtures live in conftest.py, which also sets the environment (offline Hub, no analytics) before this is imported.
"""

import io
import os
import subprocess
from pathlib import Path

import datasets
import torch
from PIL import Image

import fashion_hf
from fashion_hf.configuration_fashion_tagger import EOS_TAG_ID
from fashion_hf.data import data_dir
from fashion_hf.pipeline_fashion_tagging import save_tagger

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = data_dir()  # $FASHION_DATA_DIR, else ../shared/data
PRODUCT_IMAGES = SHARED_DATA / "fashion-product-images"

# The first lines of a subprocess script that must run as where fashion_hf is not installed: the package is
# installed (editable) in the test environment, so it is blocked rather than left off sys.path.
WITHOUT_FASHION_HF = "import sys\nsys.modules['fashion_hf'] = None  # `import fashion_hf` now raises ImportError\n"
ONE_PROCESS_LAUNCH = ("accelerate", "launch", "--config_file", str(REPO / "train" / "accelerate" / "one-process.yaml"))

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


COLOURS = {"Red": (200, 30, 30), "Blue": (30, 30, 200), "Green": (30, 160, 60)}
ARTICLES = ["Tshirts", "Shirts"]


def write_product_parquet(folder, split, rows):
    """A tiny copy of the Fashion Product Images layout (data/<split>-00000-of-00001.parquet)."""
    records = []
    for i in range(rows):
        colour = list(COLOURS)[i % 3]
        article = ARTICLES[i % 2]
        records.append({
            "id": i, "image": {"bytes": encode(product_photo(COLOURS[colour])), "path": f"{i}.jpg"},
            "gender": "Men" if i % 2 else "Women", "masterCategory": "Apparel", "subCategory": "Topwear",
            "articleType": article, "baseColour": colour, "season": None if i == 0 else "Summer", "usage": "Casual",
            "productDisplayName": f"Brand Men {colour} {'Checked' if i % 2 else 'Striped'} {article}", "year": 2012,
        })
    (folder / "data").mkdir(parents=True, exist_ok=True)
    features = datasets.Features({**{k: datasets.Value("string") for k in records[0]}, "id": datasets.Value("int64"),
                                  "year": datasets.Value("int32"), "image": datasets.Image()})
    datasets.Dataset.from_list(records, features=features).to_parquet(folder / "data" / f"{split}-00000-of-00001.parquet")


# --- a model that says "not sure" and flags what is not a product photo (test_app.py, test_browser.py) ----------

def flat_colour(colour=(30, 120, 200), size=(60, 80)) -> Image.Image:
    """A photo of nothing: one colour, no product."""
    return Image.new("RGB", size, colour)


def save_model_with_detector(folder: Path, confidence_thresholds: dict[str, float], upright_search: bool = False) -> Path:
    """A tiny tagging model whose out-of-distribution detector was fitted on `product_photo()` alone: its mean is
    that photo's features, its precision the identity (the distance is the one to those features), and its distance
    limit half way to a flat colour photo's. So `product_photo()` (sent losslessly) passes and `flat_colour()` is
    flagged; the heads' uncertainty never decides (an untrained model's heads are all uncertain). With
    `upright_search`, a random orientation probe sharp enough that some photos look turned and one of their turns
    clearly upright."""
    never = 1e9
    limits = {"distance": never, "uncertainty": never, "turned": never}
    model = tagging_model(ood_thresholds=limits, confidence_thresholds=confidence_thresholds)
    processor = fashion_hf.FashionTaggerImageProcessor.from_model_config(model.config)
    with torch.no_grad():
        pixels = processor([product_photo(), flat_colour()], return_tensors="pt")["pixel_values"]
        product, flat = model.ood_features(model.encode_images(pixels))
        model.ood_means.copy_(product[None])
        model.ood_precision.copy_(torch.eye(len(product)))
    distance = float((flat - product).norm())
    assert distance > 1e-4, "the tiny encoder must tell a flat colour from a product photo, or these tests mean nothing"
    model.config.ood_thresholds = {**limits, "distance": distance / 2}
    if upright_search:
        model.config.upright_search = {"below": 0.5, "margin": 0.3}
        probe = torch.randn(4, len(product) + 1, generator=torch.Generator().manual_seed(6)) * 50  # turns one photo
        model.register_buffer("ood_orientation", probe)
    save_tagger(model, processor, folder)
    return folder


# --- train/train.py end to end (test_train.py, test_distillation.py) -------------------------------------------

TINY_FLAGS = [
    "--encoder-name", "test_efficientnet", "--pretrained", "none", "--image-size", "64", "48",
    "--decoder-hidden-size", "32", "--tag-embedding-size", "16", "--min-tag-count", "2",
    "--batch-size", "8", "--num-workers", "0", "--cache-views", "2", "--frozen-stages", "2",
]


def run_training(args, timeout=600, launcher=ONE_PROCESS_LAUNCH):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [*launcher, str(REPO / "train" / "train.py"), *args]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result.stdout + result.stderr
