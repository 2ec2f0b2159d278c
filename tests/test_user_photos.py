"""Real phone photos (clothing-user-photos): the loader's column contract, evaluate.py scoring only the two heads the
photos know with a per-label table, and predict() agreeing with the public pipeline on real photos."""

import io
import json

import datasets
import numpy as np
import pyarrow.parquet as pq
import pytest
from datasets import Dataset, Features, Image, Value
from helpers import REPO, SHARED_DATA, encode, tagging_model, tiny_config
from PIL import Image as PILImage
from test_evaluate import PerfectModel, coloured_images
from transformers import AutoImageProcessor, AutoModel, pipeline

from fashion_hf import FashionTaggerImageProcessor, data
from fashion_hf.pipeline_fashion_tagging import save_tagger
from fashion_hf.evaluation import label_breakdown, predict, scalars
from fashion_hf.training.evaluate import main

USER_PHOTOS = SHARED_DATA / data.CLOTHING_USER_PHOTOS
# A tiny model with the two heads the phone photos label, and one they do not.
PHONE_HEADS = {"gender": ["Men", "Women"], "subCategory": ["Bottomwear", "Shoes", "Topwear"],
               "articleType": ["Jeans", "Shirts", "Tops", "Tshirts"]}  # fmt: skip

# label, articleType, subCategory, sender_id: the data set's schema (its README), in the tiny model's vocabulary.
TRAIN_ROWS = [("T-Shirt", "Tshirts", "Topwear", 1), ("Pants", "Jeans", "Bottomwear", 1),
              ("Shirt", "Shirts", "Topwear", 2)]  # fmt: skip
VALIDATION_ROWS = [("Shirt", "Shirts", "Topwear", 7), ("Longsleeve", "Tshirts", "Topwear", 8)]


def write_user_photos(folder, split, rows, images=None):
    """A tiny copy of the clothing-user-photos layout: data/<split>-00000-of-00001.parquet."""
    images = images or [PILImage.new("RGB", (30, 40), (40 * index, 90, 160)) for index in range(len(rows))]
    features = Features({"image": Image(), "label": Value("string"), "articleType": Value("string"),
                         "subCategory": Value("string"), "sender_id": Value("int64")})  # fmt: skip
    columns = dict(zip(("label", "articleType", "subCategory", "sender_id"), map(list, zip(*rows))))
    (folder / "data").mkdir(parents=True, exist_ok=True)
    Dataset.from_dict({"image": [{"bytes": encode(image), "path": None} for image in images], **columns},
                      features=features).to_parquet(folder / "data" / f"{split}-00000-of-00001.parquet")  # fmt: skip


@pytest.fixture(autouse=True)
def datasets_cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")


@pytest.fixture(scope="module")
def phone_model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("phone-heads-tagger")
    model = tagging_model(attributes=PHONE_HEADS)
    save_tagger(model, FashionTaggerImageProcessor.from_model_config(model.config), folder)
    return folder


@pytest.fixture
def photos_folder(tmp_path):
    folder = tmp_path / data.CLOTHING_USER_PHOTOS
    write_user_photos(folder, "train", TRAIN_ROWS)
    write_user_photos(folder, "validation", VALIDATION_ROWS)
    return folder


# --- the loader ---------------------------------------------------------------------------------------------------


def test_loader_returns_two_known_attributes_the_others_unknown_and_no_known_tag_sequence(photos_folder):
    validation = data.load_clothing_user_photos(photos_folder)  # validation is the default split
    assert validation.column_names == ["image", "label", "sender_id", *data.PRODUCT_ATTRIBUTES, "tags", "tags_known"]
    assert all(validation.features[name] == Value("string") for name in ["label", *data.PRODUCT_ATTRIBUTES])
    assert validation.features["tags_known"] == Value("bool")
    assert validation["label"] == ["Shirt", "Longsleeve"] and validation["sender_id"] == [7, 8]
    assert validation["articleType"] == ["Shirts", "Tshirts"] and validation["subCategory"] == ["Topwear"] * 2
    for unknown in ("gender", "masterCategory", "baseColour", "season", "usage"):
        assert validation[unknown] == [None, None], unknown
    assert validation["tags"][0] == ["subCategory:Topwear", "articleType:Shirts"]
    assert validation["tags_known"] == [False, False]
    assert isinstance(validation[0]["image"], PILImage.Image)
    train = data.load_clothing_user_photos(photos_folder, split="train")
    assert train["label"] == ["T-Shirt", "Pants", "Shirt"] and train["tags_known"] == [False] * 3


def test_loader_refuses_an_unknown_split_and_says_where_missing_data_was_looked_for(photos_folder, tmp_path,
                                                                                    monkeypatch):  # fmt: skip
    with pytest.raises(ValueError, match=r"splits \['train', 'validation'\], got 'test'"):
        data.load_clothing_user_photos(photos_folder, split="test")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.load_clothing_user_photos(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"has no data/validation-\*\.parquet"):
        data.load_clothing_user_photos(tmp_path / "empty")
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path / "no-shared-data"))
    with pytest.raises(FileNotFoundError, match="no local copy of clothing-user-photos at .*no-shared-data.*source="):
        data.load_clothing_user_photos()


def test_loader_finds_the_photos_in_the_data_folder_of_the_environment(photos_folder, monkeypatch):
    # FASHION_DATA_DIR names the data folder, as ../shared/data: the phone photos are its clothing-user-photos/.
    monkeypatch.setenv(data.DATA_DIR_ENV, str(photos_folder.parent))
    assert len(data.load_clothing_user_photos(split="train")) == len(TRAIN_ROWS)


def test_split_is_described_for_cards_and_metrics():
    assert data.describe_split(data.CLOTHING_USER_PHOTOS, "validation") == (
        "the photographer-disjoint validation split of clothing-user-photos (CC0 phone photos)"
    )
    assert data.CLOTHING_USER_PHOTOS in data.BUILT_IN_DATASETS


# --- evaluate.py --------------------------------------------------------------------------------------------------

# Seven photos: label, articleType, subCategory; what the stub model answers is set per photo below.
PHONE_ROWS = [
    ("T-Shirt", "Tshirts", "Topwear"),
    ("T-Shirt", "Tshirts", "Topwear"),
    ("T-Shirt", "Tshirts", "Topwear"),
    ("Longsleeve", "Tshirts", "Topwear"),
    ("Pants", "Jeans", "Bottomwear"),
    ("Pants", "Jeans", "Bottomwear"),
    ("Dress", "Kurtas", "Dress"),  # labels outside the tiny model's vocabulary: counted, not scored
]
ANSWERS = [  # (articleType, subCategory) the model gives each photo
    ("Tshirts", "Topwear"), ("Tshirts", "Topwear"), ("Shirts", "Topwear"),  # T-Shirt: 2/3 and 3/3 right
    ("Shirts", "Bottomwear"),  # Longsleeve: 0/1, 0/1
    ("Jeans", "Bottomwear"), ("Tops", "Topwear"),  # Pants: 1/2, 1/2
    ("Tops", "Topwear"),  # Dress: articleType label Kurtas is not in the vocabulary either
]


def write_phone_photos(folder):
    """PHONE_ROWS as a clothing-user-photos folder; photo i's red channel is i * STEP (PerfectModel reads it back)."""
    write_user_photos(folder, "validation", [(*row, 1) for row in PHONE_ROWS], coloured_images(len(PHONE_ROWS)))


def test_known_heads_only_and_a_hand_computable_per_label_table(phone_model_dir, tmp_path):
    config = tiny_config(attributes=PHONE_HEADS)
    write_phone_photos(tmp_path / "photos")
    answers = [{"articleType": article, "subCategory": sub} for article, sub in ANSWERS]
    model = PerfectModel(config, answers)  # answers each photo (read back from its colour) with ANSWERS
    processor = AutoImageProcessor.from_pretrained(phone_model_dir)
    photos = data.load_clothing_user_photos(tmp_path / "photos")
    predictions = predict(model, processor, photos, batch_size=3, progress=False)
    assert set(predictions.labels) == {"subCategory", "articleType"}  # the None columns are no labelled heads
    assert not predictions.tags_known
    breakdown = label_breakdown(predictions, photos["label"], config.attributes, "label")
    assert breakdown["column"] == "label" and breakdown["heads"] == ["subCategory", "articleType"]
    assert list(breakdown["labels"]) == ["T-Shirt", "Pants", "Dress", "Longsleeve"]  # most photos first, then by name
    assert {label: entry["count"] for label, entry in breakdown["labels"].items()} == {
        "T-Shirt": 3, "Pants": 2, "Dress": 1, "Longsleeve": 1}  # fmt: skip
    top1 = {label: entry["top1"] for label, entry in breakdown["labels"].items()}
    assert top1["T-Shirt"] == {"subCategory": 1.0, "articleType": pytest.approx(2 / 3)}
    assert top1["Pants"] == {"subCategory": 0.5, "articleType": 0.5}
    assert top1["Longsleeve"] == {"subCategory": 0.0, "articleType": 0.0}
    assert top1["Dress"] == {"subCategory": None, "articleType": None}  # no label the model knows: not scored
    assert breakdown["labels"]["Pants"]["labelled_as"] == {"subCategory": "Bottomwear", "articleType": "Jeans"}
    assert breakdown["labels"]["T-Shirt"]["most_predicted"] == {"subCategory": "Topwear", "articleType": "Tshirts"}


def test_cli_on_phone_photos_scores_two_heads_no_tags_and_draws_a_confusion_matrix_each(phone_model_dir, tmp_path):
    write_phone_photos(tmp_path / "photos")
    output = tmp_path / "eval"
    metrics = main([str(phone_model_dir), "--dataset", data.CLOTHING_USER_PHOTOS, "--data-source",
                    str(tmp_path / "photos"), "--split", "validation", "--output", str(output), "--batch-size", "4",
                    "--no-progress"])  # fmt: skip
    assert set(metrics["attributes"]) == {"subCategory", "articleType"}
    assert metrics["attributes"]["subCategory"]["support"] == 6 and metrics["attributes"]["articleType"]["support"] == 6
    assert metrics["attributes"]["subCategory"]["out_of_vocabulary"] == 1
    assert metrics["heads_without_labels"] == ["gender"]  # a head of the model the photos do not label
    assert metrics["tags"] is None and "tags_known" in metrics["tags_note"]
    assert set(scalars(metrics)) == {f"val/{head}_{key}" for head in ("subCategory", "articleType")
                                     for key in ("top1", "top5", "macro_f1")} | {"val/mean_top1"}  # fmt: skip
    assert metrics["split_definition"].startswith("the photographer-disjoint validation split")
    assert list(metrics["per_label"]["labels"]) == ["T-Shirt", "Pants", "Dress", "Longsleeve"]
    assert metrics["confusion_matrix_attributes"] == ["subCategory", "articleType"]
    files = ["metrics.json", "confusion_matrix_subCategory.png", "confusion_matrix_articleType.png",
             "attribute_accuracy.png", "reliability.png"]  # fmt: skip
    assert metrics["files"] == files and all((output / file).is_file() for file in files)
    assert json.loads((output / "metrics.json").read_text()) == metrics
    json.dumps(metrics, allow_nan=False)


# --- the public pipeline on real phone photos ---------------------------------------------------------------------


def real_phone_photos(count: int) -> tuple[list[bytes], list[dict]]:
    files = sorted((USER_PHOTOS / "data").glob("validation-*.parquet"))
    if not files:
        pytest.skip(f"no validation split of clothing-user-photos in {USER_PHOTOS}")
    rows = pq.read_table(files[0]).slice(0, count).to_pylist()
    return [row.pop("image")["bytes"] for row in rows], rows


def test_predict_gives_the_pipelines_top_labels_on_real_phone_photos():
    # evaluate.py's figures stand for what the public pipeline answers (the targets are "through the pipeline").
    photos, _ = real_phone_photos(12)
    model_folder = REPO / "models" / "fashion-tagger"
    model = AutoModel.from_pretrained(model_folder)
    processor = AutoImageProcessor.from_pretrained(model_folder)
    dataset = Dataset.from_dict({"image": [{"bytes": photo, "path": None} for photo in photos]},
                                features=Features({"image": Image()}))  # fmt: skip
    predictions = predict(model, processor, dataset, batch_size=5, progress=False)  # batches unlike the pipeline's
    results = pipeline("fashion-tagging", model=str(model_folder))(
        [PILImage.open(io.BytesIO(photo)) for photo in photos], batch_size=4, top_k=1
    )
    for head in ("subCategory", "articleType"):
        ours = [model.config.attributes[head][index] for index in predictions.probs[head].argmax(axis=1)]
        assert ours == [result["attributes"][head][0]["label"] for result in results], head
        scores = predictions.probs[head].max(axis=1)
        assert np.allclose(scores, [result["attributes"][head][0]["score"] for result in results], atol=1e-5), head
