"""train/evaluate.py: scores in the promised schema, perfect predictions score 1.0 end to end, the CLI writes its
files, and labels outside the model's vocabulary are counted, not scored."""

import hashlib
import json
from types import SimpleNamespace

import datasets
import numpy as np
import pytest
import torch
from datasets import Dataset, Features, Image, List, Value, load_dataset
from helpers import PRODUCT_IMAGES, product_photo, tiny_config
from PIL import Image as PILImage
from transformers import AutoImageProcessor, AutoModel

from fashion_hf.evaluation import Predictions, evaluate, predict, scalars
from fashion_hf.training.evaluate import main, write_evaluation
from fashion_hf.training.plots import most_frequent_classes, plot_confusion_matrix

ATTRIBUTE_KEYS = {"top1", "top5", "macro_f1", "ece", "support", "num_labels", "out_of_vocabulary"}
TAG_SCORE_KEYS = {"precision", "recall", "f1", "support", "predicted"}
COLUMNS = ("gender", "articleType", "usage")  # a subset of the tiny model's heads, as a real catalogue might have
ROWS = [
    {"gender": "Men", "articleType": "Shirts", "usage": "Casual", "details": ["check"]},
    {"gender": "Women", "articleType": "Tops", "usage": None, "details": []},
    {"gender": "Men", "articleType": "Jeans", "usage": "Casual", "details": ["denim", "slim fit"]},
    {"gender": "Women", "articleType": "Handbags", "usage": "Formal", "details": []},
    {"gender": "Unisex", "articleType": "Watches", "usage": "Sports", "details": ["running"]},
]


def tag_keys(row):
    """The row's target tag sequence, as the data contract builds it: attribute values in head order, then details."""
    keys = [f"{name}:{row[name]}" for name in COLUMNS if row.get(name)]
    return keys + [f"detail:{tag}" for tag in row.get("details", [])]


def make_dataset(rows, images=None) -> Dataset:
    """A `datasets.Dataset` with the loader column contract: image, attribute strings (None = missing), tags."""
    images = images or [product_photo(colour=(40 * i % 256, 90, 200 - 30 * i)) for i in range(len(rows))]
    labels = {name: Value("string") for name in COLUMNS}
    features = Features({"image": Image(), **labels, "tags": List(Value("string"))})
    columns = {"image": images, **{name: [row.get(name) for row in rows] for name in COLUMNS}}
    return Dataset.from_dict({**columns, "tags": [tag_keys(row) for row in rows]}, features=features)


@pytest.fixture(scope="module")
def model_and_processor(tiny_model_dir):
    return AutoModel.from_pretrained(tiny_model_dir), AutoImageProcessor.from_pretrained(tiny_model_dir)


@pytest.fixture(autouse=True)
def datasets_cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")


# --- a model that is always right ---------------------------------------------------------------------------------

STEP = 40  # item i is a solid image whose red channel is i * STEP: the stub reads the item back from the pixels


class PerfectModel(torch.nn.Module):
    """Answers every item with its true labels and tags, read back from the image colour."""

    def __init__(self, config, rows):
        super().__init__()
        self.config = config
        self.rows = rows
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # a device and a dtype, as a real model has

    def encode_images(self, pixel_values):
        red = pixel_values[:, 0].mean(dim=(1, 2)) * 0.5 + 0.5  # undo the (x - 0.5) / 0.5 normalisation
        return torch.round(red * 255 / STEP)[:, None]

    def turn_upright(self, image_embeds, encode_turns):  # every photo is upright
        return image_embeds, torch.zeros(len(image_embeds), dtype=torch.long), torch.zeros(len(image_embeds))

    def forward(self, image_embeds):
        items = image_embeds[:, 0].long().tolist()
        logits = {}
        for name, labels in self.config.attributes.items():
            logits[name] = torch.zeros(len(items), len(labels))
            for row, item in enumerate(items):
                if self.rows[item].get(name) in labels:
                    logits[name][row, labels.index(self.rows[item][name])] = 10.0
        return SimpleNamespace(attribute_logits=logits)

    def generate_tags(self, image_embeds, num_beams=1):
        results = []
        for item in image_embeds[:, 0].long().tolist():
            tags = [dict(zip(("group", "tag"), key.split(":", 1)), score=1.0) for key in tag_keys(self.rows[item])]
            results.append([{"tags": tags, "tag_ids": [], "score": 0.0}])
        return results


def coloured_images(count, size=(48, 64)):  # the tiny model's 64x48 input: no padding, no resampling
    return [PILImage.new("RGB", size, (i * STEP, 128, 128)) for i in range(count)]


# --- evaluate() ---------------------------------------------------------------------------------------------------


def test_perfect_predictor_scores_one_on_every_metric(tiny_model_dir):
    processor = AutoImageProcessor.from_pretrained(tiny_model_dir)
    rows = [{**row, "usage": row["usage"] or "Casual"} for row in ROWS]  # fully labelled: heads always answer
    model = PerfectModel(tiny_config(), rows)
    metrics = evaluate(model, processor, make_dataset(rows, coloured_images(len(rows))), batch_size=2, progress=False)
    for name in COLUMNS:
        values = metrics["attributes"][name]
        assert (values["top1"], values["top5"], values["macro_f1"]) == (1.0, 1.0, 1.0), name
        assert values["support"] == len(rows)
    tags = metrics["tags"]
    assert tags["generated"]["overall"]["f1"] == 1.0
    assert all(scores["f1"] == 1.0 for scores in tags["generated"]["per_group"].values())
    assert tags["attribute_tags"]["generated"]["overall"]["f1"] == 1.0
    assert tags["attribute_tags"]["heads"]["overall"]["f1"] == 1.0
    assert metrics["mean_top1"] == 1.0


def test_evaluate_returns_the_documented_schema(model_and_processor):
    model, processor = model_and_processor
    metrics = evaluate(model, processor, make_dataset(ROWS), batch_size=2, progress=False)
    assert metrics["n_images"] == len(ROWS)
    assert set(metrics["attributes"]) == set(COLUMNS)
    for values in metrics["attributes"].values():
        assert set(values) == ATTRIBUTE_KEYS
        assert all(0.0 <= values[key] <= 1.0 for key in ("top1", "top5", "macro_f1", "ece"))
    assert metrics["heads_without_labels"] == [name for name in model.config.attributes if name not in COLUMNS]
    tags = metrics["tags"]
    assert set(tags) == {"groups", "out_of_vocabulary", "generated", "attribute_tags"}
    assert set(tags["generated"]) == {"overall", "per_group"}
    assert set(tags["generated"]["overall"]) == TAG_SCORE_KEYS
    assert set(tags["attribute_tags"]) == {"groups", "generated", "heads"}
    assert set(tags["attribute_tags"]["groups"]) == set(COLUMNS)
    json.dumps(metrics, allow_nan=False)  # JSON-ready, no NaN


def test_missing_labels_are_excluded_from_support(model_and_processor):
    model, processor = model_and_processor
    metrics = evaluate(model, processor, make_dataset(ROWS), batch_size=8, progress=False)
    assert metrics["attributes"]["usage"]["support"] == sum(row["usage"] is not None for row in ROWS)
    assert metrics["attributes"]["gender"]["support"] == len(ROWS)


def test_label_outside_the_models_vocabulary_is_counted_and_not_scored(model_and_processor):
    model, processor = model_and_processor
    rows = [*ROWS, {"gender": "Men", "articleType": "Kurtas", "usage": "Ethnic", "details": ["lace", "check"]}]
    metrics = evaluate(model, processor, make_dataset(rows), batch_size=8, progress=False)
    assert "Kurtas" not in model.config.attributes["articleType"]
    article_type = metrics["attributes"]["articleType"]
    assert article_type["out_of_vocabulary"] == 1
    assert article_type["support"] == len(ROWS)
    assert metrics["tags"]["out_of_vocabulary"] == {"articleType": 1, "detail": 1}  # "lace" is no tiny-model tag


def test_tags_of_groups_the_data_does_not_label_are_not_scored(model_and_processor):
    model, processor = model_and_processor
    metrics = evaluate(model, processor, make_dataset(ROWS), batch_size=8, progress=False)
    assert metrics["tags"]["groups"] == sorted([*COLUMNS, "detail"])
    assert set(metrics["tags"]["generated"]["per_group"]) <= set(metrics["tags"]["groups"])


def test_predict_restores_training_mode(tiny_model_dir):
    model = AutoModel.from_pretrained(tiny_model_dir).train()
    processor = AutoImageProcessor.from_pretrained(tiny_model_dir)
    predictions = predict(model, processor, make_dataset(ROWS[:2]), batch_size=1, progress=False)
    assert model.training
    assert len(predictions.generated) == 2


def test_dataset_without_an_image_column_is_refused(model_and_processor):
    model, processor = model_and_processor
    with pytest.raises(ValueError, match="no 'image' column"):
        evaluate(model, processor, Dataset.from_dict({"gender": ["Men"]}), progress=False)


def test_scalars_flatten_the_headline_figures(model_and_processor):
    model, processor = model_and_processor
    flat = scalars(evaluate(model, processor, make_dataset(ROWS), progress=False), prefix="val")
    assert {"val/gender_top1", "val/articleType_macro_f1", "val/tag_f1", "val/attribute_tag_f1_heads"} <= set(flat)
    assert all(isinstance(value, float) for value in flat.values())


def test_write_evaluation_writes_what_the_training_script_needs(model_and_processor, tmp_path):
    model, processor = model_and_processor
    write_event_file(tmp_path / "logs")
    metrics = write_evaluation(model, processor, make_dataset(ROWS), tmp_path / "model", logs_dir=tmp_path / "logs",
                               dataset_name="catalogue", split="test", progress=False)  # fmt: skip
    assert json.loads((tmp_path / "model" / "metrics.json").read_text()) == metrics
    assert (metrics["dataset"], metrics["split"], metrics["n_images"]) == ("catalogue", "test", len(ROWS))
    assert all((tmp_path / "model" / file).is_file() for file in metrics["files"])
    assert "training_curves.png" in metrics["files"]


# --- plots --------------------------------------------------------------------------------------------------------


def test_confusion_matrix_keeps_the_most_frequent_classes():
    y_true = np.array([3] * 5 + [1] * 3 + [7] * 3 + [0])
    assert most_frequent_classes(y_true, num_classes=9, limit=3) == [3, 1, 7]
    assert most_frequent_classes(y_true, num_classes=9, limit=30) == [3, 1, 7, 0]


def test_confusion_matrix_is_drawn_for_the_head_with_most_labels(tmp_path, rng):
    attributes = {"gender": ["Men", "Women"], "articleType": [f"type {i}" for i in range(40)]}
    labels = {"gender": rng.integers(0, 2, 200), "articleType": rng.integers(0, 40, 200)}
    probs = {name: rng.random((200, len(values))) for name, values in attributes.items()}
    predictions = Predictions(probs, labels, {}, [set()] * 200, [set()] * 200, {}, [])
    assert plot_confusion_matrix(predictions, attributes, tmp_path / "cm.png") == "articleType"
    assert (tmp_path / "cm.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- command line -------------------------------------------------------------------------------------------------


def write_event_file(log_dir):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(log_dir))
    for step in range(3):
        writer.add_scalar("train/loss", 2.0 - step * 0.5, step)
        writer.add_scalar("val/articleType_top1", 0.2 * step, step)
    writer.close()


def test_cli_on_a_parquet_file_writes_metrics_and_plots(tiny_model_dir, tmp_path):
    parquet = tmp_path / "catalogue.parquet"
    make_dataset(ROWS).to_parquet(str(parquet))
    write_event_file(tmp_path / "runs" / "run-1")
    output = tmp_path / "eval"
    main([str(tiny_model_dir), "--dataset", str(parquet), "--output", str(output), "--batch-size", "2",
          "--limit", "4", "--logs", str(tmp_path / "runs"), "--no-progress"])  # fmt: skip
    metrics = json.loads((output / "metrics.json").read_text())
    files = ["metrics.json", "confusion_matrix.png", "attribute_accuracy.png", "reliability.png", "training_curves.png"]
    assert metrics["files"] == files
    assert all((output / file).is_file() for file in files)
    assert metrics["n_images"] == 4 and metrics["limit"] == 4
    assert {"model", "dataset", "split", "date", "attributes", "tags"} <= set(metrics)
    assert metrics["dataset"] == str(parquet) and metrics["model"] == str(tiny_model_dir)
    assert set(metrics["attributes"]) == set(COLUMNS)


def test_cli_without_logs_skips_the_training_curves(tiny_model_dir, tmp_path):
    parquet = tmp_path / "catalogue.parquet"
    make_dataset(ROWS[:2]).to_parquet(str(parquet))
    output = tmp_path / "eval"
    metrics = main([str(tiny_model_dir), "--dataset", str(parquet), "--output", str(output), "--no-progress"])
    assert "training_curves.png" not in metrics["files"]
    assert not (output / "training_curves.png").exists()


def test_cli_names_the_valid_datasets_for_an_unknown_one(tiny_model_dir, tmp_path):
    names = "fashion-product-images, fashion-mnist, clothing-user-photos or an existing path"
    with pytest.raises(FileNotFoundError, match=names):
        main([str(tiny_model_dir), "--dataset", "no-such-data", "--output", str(tmp_path), "--no-progress"])


@pytest.mark.skipif(not PRODUCT_IMAGES.is_dir(), reason="shared fashion-product-images data not present")
def test_cli_on_the_shared_product_images(tiny_model_dir, tmp_path):
    metrics = main([str(tiny_model_dir), "--dataset", "fashion-product-images", "--split", "validation",
                    "--limit", "16", "--output", str(tmp_path / "eval"), "--no-progress"])  # fmt: skip
    assert metrics["n_images"] == 16
    assert set(metrics["attributes"]) == set(tiny_config().attributes)
    assert metrics["heads_without_labels"] == []


def test_cli_on_a_csv_catalogue_of_image_files(tiny_model_dir, tmp_path):
    lines = ["image,gender,articleType"]
    for index, row in enumerate(ROWS[:3]):
        product_photo(colour=(50 * index, 80, 160)).save(tmp_path / f"item-{index}.png")
        lines.append(f"item-{index}.png,{row['gender']},{row['articleType']}")
    (tmp_path / "catalogue.csv").write_text("\n".join(lines) + "\n")
    catalogue, output = tmp_path / "catalogue.csv", tmp_path / "eval"
    metrics = main([str(tiny_model_dir), "--dataset", str(catalogue), "--split", "all", "--output", str(output),
                    "--no-progress"])  # fmt: skip
    assert metrics["n_images"] == 3
    assert set(metrics["attributes"]) == {"gender", "articleType"}
    assert metrics["attributes"]["gender"]["support"] == 3


def distinct_photos(count, offset=0):
    return [product_photo(colour=((offset + index) % 256, (5 * index) % 256, 120)) for index in range(count)]


def test_cli_scores_only_the_images_training_held_out_of_a_catalogue(tiny_model_dir, tmp_path):
    # A catalogue trained on with train.py: --split validation is the part training held out (by image hash), not the
    # whole catalogue the model learned from.
    lines = ["image,gender,articleType"]
    for index, photo in enumerate(distinct_photos(40)):
        photo.save(tmp_path / f"item-{index}.png")
        lines.append(f"item-{index}.png,Men,Shirts")
    (tmp_path / "catalogue.csv").write_text("\n".join(lines) + "\n")
    held_out = [
        index for index in range(40)
        if int(hashlib.sha256((tmp_path / f"item-{index}.png").read_bytes()).hexdigest(), 16) % 100 < 10
    ]  # fmt: skip
    assert held_out  # this fixture's images put some on each side
    run = [str(tiny_model_dir), "--dataset", str(tmp_path / "catalogue.csv"), "--no-progress"]
    metrics = main([*run, "--split", "validation", "--output", str(tmp_path / "validation")])
    assert metrics["n_images"] == len(held_out) and metrics["split"] == "validation"
    assert "sha256(image bytes)" in metrics["split_definition"] and str(tmp_path) not in metrics["split_definition"]
    assert main([*run, "--split", "train", "--output", str(tmp_path / "train")])["n_images"] == 40 - len(held_out)


def write_split(folder, split, images, articles):
    (folder / "data").mkdir(parents=True, exist_ok=True)
    features = Features({"image": Image(), "articleType": Value("string")})
    Dataset.from_dict({"image": images, "articleType": articles}, features=features).to_parquet(
        folder / "data" / f"{split}-00000-of-00001.parquet"
    )


def test_exclude_duplicates_of_train_also_scores_the_split_without_byte_identical_images(tiny_model_dir, tmp_path):
    train_photos, other_photos = distinct_photos(6), distinct_photos(4, offset=100)
    write_split(tmp_path, "train", train_photos, ["Shirts"] * 6)
    # Validation: two photos that are also in train (saved from the same bytes), four of its own.
    write_split(tmp_path, "validation", [train_photos[1], *other_photos[:2], train_photos[4], *other_photos[2:]],
                ["Shirts", "Jeans", "Tops", "Shirts", "Jeans", "Tops"])  # fmt: skip
    metrics = main([str(tiny_model_dir), "--dataset", str(tmp_path), "--split", "validation", "--exclude-duplicates-of",
                    "train", "--output", str(tmp_path / "eval"), "--no-progress"])  # fmt: skip
    assert metrics["n_images"] == 6 and metrics["attributes"]["articleType"]["support"] == 6
    deduplicated = metrics["without_duplicates"]
    assert (deduplicated["of_split"], deduplicated["n_excluded"], deduplicated["n_images"]) == ("train", 2, 4)
    assert deduplicated["attributes"]["articleType"]["support"] == 4
    written = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert written["without_duplicates"] == deduplicated
    # The same figures as evaluating the four other photos on their own.
    write_split(tmp_path / "own", "validation", other_photos, ["Jeans", "Tops", "Jeans", "Tops"])
    alone = main([str(tiny_model_dir), "--dataset", str(tmp_path / "own"), "--split", "validation",
                  "--output", str(tmp_path / "alone"), "--no-progress"])  # fmt: skip
    for key in ("attributes", "mean_top1", "tags"):
        assert deduplicated[key] == alone[key], key


@pytest.mark.skipif(not PRODUCT_IMAGES.is_dir(), reason="shared fashion-product-images data not present")
def test_shared_validation_holds_119_byte_identical_copies_of_training_photos():
    from fashion_hf.training.evaluate import duplicate_rows

    def split(name):
        return load_dataset(str(PRODUCT_IMAGES), split=name).select_columns(["image"])

    assert len(duplicate_rows(split("validation"), split("train"))) == 119  # the data README's count
