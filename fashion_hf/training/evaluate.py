"""Evaluate a saved fashion tagger on a labelled dataset: per-attribute scores, tag-set scores and plots.

    python train/evaluate.py models/fashion-tagger --dataset fashion-product-images --split validation \
        --output outputs/eval [--batch-size 64] [--limit N] [--logs runs/my-run] [--exclude-duplicates-of train]

`--dataset` is `fashion-product-images`, `fashion-mnist`, `clothing-user-photos` (real phone photos, below), or a
local path: a folder of parquet files in the Hub layout, a parquet file with an image column (a
`Dataset.to_parquet` export), or a catalogue that `fashion_hf.data.load_catalogue` reads (an image folder, or a
CSV/TSV/JSONL/parquet file of image paths and labels).
A catalogue's `--split` is the one training used: its own `split` column, else the hash hold-out (`validation`: the
images training held out, `train`: the rest, `all`: every image).

`--exclude-duplicates-of train` also scores the split without its images that are byte-identical (SHA-256 of the
stored image bytes) to an image of the train split: metrics.json then holds those figures under
`without_duplicates`, beside the figures of the whole split.

`--dataset clothing-user-photos --split validation` scores real phone photos (photographers never seen in its train
split). They are labelled with subCategory and articleType only, so only those two heads are scored (the others are
listed in `heads_without_labels`), tag figures are not (`tags` is null: no photo's tag sequence is known), and
metrics.json adds `per_label`: top-1 of each head per photographer's label (Dress, Hat, Shoes, ...). The plots are
then `confusion_matrix_subCategory.png` and `confusion_matrix_articleType.png`. Top-1 here is the pipeline's
top-1 label (`pipeline("fashion-tagging")` runs the same processor and model).

Writes to `--output`: `metrics.json`, `confusion_matrix.png` (the head with the most labels), `attribute_accuracy.png`
and, with `--logs`, `training_curves.png` from the TensorBoard event files of a training run.

From Python: `evaluate(model, processor, dataset, batch_size)` returns the figures (log them with `scalars`), and
`write_evaluation(model, processor, dataset, output_dir, logs_dir=...)` also writes metrics.json and the plots.
"""

import argparse
import json
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import matplotlib
import numpy as np
import torch
from sklearn.metrics import confusion_matrix
from tqdm.auto import tqdm
from transformers import AutoImageProcessor, AutoModel

from .. import data
from ..configuration_fashion_tagger import DETAIL_GROUP, tag_key
from ..metrics import (
    IGNORE_INDEX,
    attribute_metrics,
    head_tag_sets,
    restrict_to_groups,
    tag_group,
    tag_set_metrics,
)
from .augment import phone_photo_shift

matplotlib.use("Agg")  # plots are files: no display needed, and none on a training server
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

NAME_COLUMN = "productDisplayName"
TAGS_COLUMN = "tags"
CONFUSION_MAX_CLASSES = 30
CONFUSION_PREDICTED_COLUMNS = 8  # per-head plots: columns for the classes photos are most often mistaken for
CONFUSION_HEAD_FILE = "confusion_matrix_{head}.png"
TAGS_NOT_SCORED = ("not scored: the data set does not know every item's tag sequence (tags_known is False), so "
                   "every tag it does not label would count as wrong")  # fmt: skip
BREAKDOWN_COLUMN = "label"  # the phone photos' own label, finer than articleType (Longsleeve and Polo are Tshirts)
METRICS_FILE, CONFUSION_FILE, ACCURACY_FILE, CURVES_FILE = (
    "metrics.json", "confusion_matrix.png", "attribute_accuracy.png", "training_curves.png",
)  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------------
# Inference and scoring.
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class Predictions:
    """What the model said about a dataset, next to what the dataset says, both in the model's vocabulary."""

    probs: dict[str, np.ndarray]  # every head: attribute -> (n, C) probabilities
    labels: dict[str, np.ndarray]  # heads the dataset has a column for: attribute -> (n,) label index, -100 missing
    out_of_vocabulary: dict[str, int]  # attribute -> labels the head does not know (scored as missing)
    generated: list[set[str]]  # the decoder's tag keys per item
    reference: list[set[str]]  # the dataset's tag keys per item that the model's tag vocabulary holds
    out_of_vocabulary_tags: dict[str, int]  # group -> reference tags outside the model's tag vocabulary (dropped)
    tag_groups: list[str]  # the tag groups the dataset labels: only these are scored
    # False when some row's reference tag sequence is unknown (its `tags_known` column is False, as for phone photos
    # labelled with two attributes only): tag figures would count every unlabelled tag as a false positive.
    tags_known: bool = True
    # An ensemble with experts: per photo, the domains whose members it reached (`domain_weights` above zero).
    domains_reached: dict[str, np.ndarray] | None = None


def _read_labels(dataset, attributes: dict[str, list[str]], keep_unlabelled: bool = False) -> tuple[dict, dict, list]:
    """Label indices per labelled head, out-of-vocabulary counts, and each row's present labels as tag keys.

    A head is labelled when the dataset has a column for it holding at least one label: a column of None only (the
    phone photos' colour, gender, season and usage) says nothing, and its head is not scored. `keep_unlabelled`
    keeps such columns too (a subset of rows must score the same heads as the whole split).
    """
    names = [name for name in attributes if name in dataset.column_names]
    columns = dataset.select_columns(names)[:] if names else {}
    labels, out_of_vocabulary = {}, {}
    keys = [[] for _ in range(len(dataset))]
    for name in names:
        values = columns[name]
        feature = dataset.features[name]
        if hasattr(feature, "int2str"):  # a ClassLabel column: its names are the labels
            values = [None if value is None or value < 0 else feature.int2str(value) for value in values]
        index = {label: position for position, label in enumerate(attributes[name])}
        ids, unknown, present = [], 0, 0
        for row, value in enumerate(values):
            value = None if value is None or value == "" else str(value)
            if value is not None:
                keys[row].append(tag_key(name, value))
                unknown += value not in index
                present += 1
            ids.append(index.get(value, IGNORE_INDEX))
        if not present and not keep_unlabelled:
            continue
        labels[name] = np.asarray(ids, dtype=np.int64)
        out_of_vocabulary[name] = unknown
    return labels, out_of_vocabulary, keys


def _reference_tags(dataset, attribute_keys: list[list[str]], vocabulary: set[str]) -> tuple[list[set[str]], Counter]:
    """The `tags` column (or, lacking one, the attribute labels) kept to the model's tag vocabulary."""
    sequences = dataset.select_columns([TAGS_COLUMN])[:][TAGS_COLUMN] if TAGS_COLUMN in dataset.column_names else None
    sequences = attribute_keys if sequences is None else [sequence or [] for sequence in sequences]
    reference, dropped = [], Counter()
    for sequence in sequences:
        reference.append({key for key in sequence if key in vocabulary})
        dropped.update(tag_group(key) for key in sequence if key not in vocabulary)
    return reference, dropped


def _labelled_groups(dataset, labelled_heads, reference: list[set[str]]) -> list[str]:
    """Tag groups the dataset labels: its labelled heads, groups its tags show, details if it has names.

    A tag of any other group (a brand head on Fashion-MNIST) has nothing to be checked against and is not scored.
    """
    groups = set(labelled_heads)
    groups.update(tag_group(key) for tags in reference for key in tags)
    if NAME_COLUMN in dataset.column_names:  # detail tags are mined from product names: no detail tag is a claim too
        groups.add(DETAIL_GROUP)
    return sorted(groups)


def _model_device_and_dtype(model) -> tuple[torch.device, torch.dtype]:
    parameter = next(model.parameters())
    return parameter.device, parameter.dtype


def predict(model, processor, dataset, batch_size: int = 64, num_beams: int = 1, progress: bool = True) -> Predictions:
    """Run the model over `dataset` (an `image` column and label columns) in batches, in eval mode.

    Vocabularies come from `model.config`: a label the model does not know counts as missing. `model` is the bare
    model (`accelerator.unwrap_model(model)` in training); its train/eval mode is restored afterwards.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if "image" not in dataset.column_names:
        raise ValueError(f"the dataset has no 'image' column; its columns: {dataset.column_names}")
    config = model.config
    dataset = dataset.with_format(None)  # no transform of the caller's: raw images and labels
    labels, out_of_vocabulary, attribute_keys = _read_labels(dataset, config.attributes)
    reference, dropped_tags = _reference_tags(dataset, attribute_keys, set(config.tag_to_id()))

    device, dtype = _model_device_and_dtype(model)
    probs = {name: [] for name in config.attributes}
    generated = []
    domains = getattr(config, "domains", None) or []
    reached = {domain: [] for domain in domains} if len(domains) > 1 else None
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), tqdm(total=len(dataset), unit="img", desc="evaluate", disable=not progress) as bar:
            for batch in dataset.select_columns(["image"]).iter(batch_size=batch_size):
                pixel_values = processor(batch["image"], return_tensors="pt")["pixel_values"].to(device, dtype)
                image_embeds = model.encode_images(pixel_values)
                outputs = model(image_embeds=image_embeds)
                for name in config.attributes:
                    probs[name].append(outputs.attribute_logits[name].float().softmax(-1).cpu().numpy())
                if reached is not None:
                    weights = model.domain_weights(image_embeds).cpu().numpy()
                    for index, domain in enumerate(domains):
                        reached[domain].append(weights[:, index] > 0)
                hypotheses = model.generate_tags(image_embeds=image_embeds, num_beams=num_beams)
                for image_hypotheses in hypotheses:
                    best = image_hypotheses[0]["tags"] if image_hypotheses else []
                    generated.append({tag_key(tag["group"], tag["tag"]) for tag in best})
                bar.update(len(pixel_values))
    finally:
        model.train(was_training)

    empty = {name: np.zeros((0, len(labels_)), dtype=np.float32) for name, labels_ in config.attributes.items()}
    return Predictions(
        probs={name: np.concatenate(chunks) if chunks else empty[name] for name, chunks in probs.items()},
        labels=labels,
        out_of_vocabulary=out_of_vocabulary,
        generated=generated,
        reference=reference,
        out_of_vocabulary_tags=dict(sorted(dropped_tags.items())),
        tag_groups=_labelled_groups(dataset, labels, reference),
        tags_known=_tags_known(dataset),
        domains_reached=reached and {domain: np.concatenate(rows) for domain, rows in reached.items()},
    )


def _tags_known(dataset) -> bool:
    """Whether every row's reference tag sequence is known (rows without a `tags_known` column are)."""
    if data.TAGS_KNOWN_COLUMN not in dataset.column_names:
        return True
    return all(dataset.select_columns([data.TAGS_KNOWN_COLUMN])[:][data.TAGS_KNOWN_COLUMN])


def _mean(values) -> float | None:
    values = [value for value in values if value is not None]
    return float(np.mean(values)) if values else None


def score(predictions: Predictions, attributes: dict[str, list[str]]) -> dict:
    """Every figure of `metrics.json` but the run's metadata (see `evaluate`)."""
    per_attribute = {}
    for name, label_ids in predictions.labels.items():
        per_attribute[name] = {
            **attribute_metrics(label_ids, predictions.probs[name], attributes[name]),
            "num_labels": len(attributes[name]),
            "out_of_vocabulary": predictions.out_of_vocabulary[name],
        }
    heads = [name for name in attributes if name in predictions.labels]
    figures = {
        "n_images": len(predictions.generated),
        "attributes": per_attribute,
        "mean_top1": _mean(values["top1"] for values in per_attribute.values()),
        "mean_macro_f1": _mean(values["macro_f1"] for values in per_attribute.values()),
        "heads_without_labels": [name for name in attributes if name not in predictions.labels],
    }
    if predictions.domains_reached:  # how often each domain's members were run: the experts' share of the photos
        figures["domains_reached"] = {domain: float(rows.mean()) for domain, rows in predictions.domains_reached.items()}
    if not predictions.tags_known:
        return {**figures, "tags": None, "tags_note": TAGS_NOT_SCORED}
    reference = restrict_to_groups(predictions.reference, predictions.tag_groups)
    head_reference = restrict_to_groups(predictions.reference, heads)
    return {
        **figures,
        "tags": {
            "groups": predictions.tag_groups,
            "out_of_vocabulary": predictions.out_of_vocabulary_tags,
            "generated": tag_set_metrics(restrict_to_groups(predictions.generated, predictions.tag_groups), reference),
            # The same attribute tags two ways: the decoder's, and one per head from the heads' argmax.
            "attribute_tags": {
                "groups": heads,
                "generated": tag_set_metrics(restrict_to_groups(predictions.generated, heads), head_reference),
                "heads": tag_set_metrics(
                    head_tag_sets({name: predictions.probs[name] for name in heads}, attributes), head_reference
                ),
            },
        },
    }


def evaluate(model, processor, dataset, batch_size: int = 64, num_beams: int = 1, progress: bool = True) -> dict:
    """Score `model` on `dataset` (an `image` column, attribute string columns with None for missing, `tags`).

    Returns `{"n_images", "attributes": {attr: {"top1", "top5", "macro_f1", "support", "num_labels",
    "out_of_vocabulary"}}, "mean_top1", "mean_macro_f1", "heads_without_labels", "tags": {"groups",
    "out_of_vocabulary", "generated": {"overall", "per_group"}, "attribute_tags": {"groups", "generated", "heads"}}}`,
    JSON-ready (scores are None where nothing was labelled). Only heads with at least one label are scored; the others
    are in `heads_without_labels`. Where a row's tag sequence is unknown (a `tags_known` column with False), `tags` is
    None and `tags_note` says why.
    """
    predictions = predict(model, processor, dataset, batch_size=batch_size, num_beams=num_beams, progress=progress)
    return score(predictions, model.config.attributes)


def scalars(metrics: dict, prefix: str = "val") -> dict[str, float]:
    """The headline figures of `evaluate`'s result as flat `{"val/articleType_top1": 0.91, ...}` for a logger."""
    flat = {}
    for name, values in metrics["attributes"].items():
        for key in ("top1", "top5", "macro_f1"):
            if values[key] is not None:
                flat[f"{prefix}/{name}_{key}"] = values[key]
    tags = metrics["tags"] or {}  # None: not scored (the data set's tag sequences are unknown)
    for key in ("precision", "recall", "f1") if tags else ():
        flat[f"{prefix}/tag_{key}"] = tags["generated"]["overall"][key]
    if tags and tags["attribute_tags"]["groups"]:
        flat[f"{prefix}/attribute_tag_f1_generated"] = tags["attribute_tags"]["generated"]["overall"]["f1"]
        flat[f"{prefix}/attribute_tag_f1_heads"] = tags["attribute_tags"]["heads"]["overall"]["f1"]
    if metrics["mean_top1"] is not None:
        flat[f"{prefix}/mean_top1"] = metrics["mean_top1"]
    return flat


# ---------------------------------------------------------------------------------------------------------------------
# Plots.
# ---------------------------------------------------------------------------------------------------------------------


def most_frequent_classes(y_true: np.ndarray, num_classes: int, limit: int) -> list[int]:
    """The `limit` classes with the most items, most frequent first (ties: vocabulary order); absent ones left out."""
    counts = np.bincount(y_true, minlength=num_classes)
    return [int(index) for index in np.argsort(-counts, kind="stable") if counts[index] > 0][:limit]


def plot_confusion_matrix(
    predictions: Predictions,
    attributes: dict[str, list[str]],
    path: Path,
    name: str | None = None,
    predicted_columns: int = 0,
) -> str | None:
    """Row-normalised confusion matrix of head `name` (default: the labelled head with the most labels); its 30 most
    frequent classes at most. `predicted_columns`: that many classes the data never shows but the model predicts most
    often for them get columns of their own (on out-of-studio photos, what the model mistakes them for).

    Returns the head's name, or None when no head (or not `name`) has a label to plot.
    """
    labelled = [head for head, ids in predictions.labels.items() if (ids != IGNORE_INDEX).any()]
    if name is None and labelled:
        name = max(labelled, key=lambda head: len(attributes[head]))
    if name not in labelled:
        return None
    names = attributes[name]
    present = predictions.labels[name] != IGNORE_INDEX
    y_true = predictions.labels[name][present]
    y_pred = predictions.probs[name][present].argmax(axis=1)
    counts = np.bincount(y_true, minlength=len(names))
    shown = most_frequent_classes(y_true, len(names), CONFUSION_MAX_CLASSES)
    # Predictions outside the shown classes (and the extra predicted ones) go to one last column, so every row still
    # sums to its support.
    other = len(names)
    keep = np.isin(y_true, shown)
    outside = y_pred[keep][~np.isin(y_pred[keep], shown)]
    listed = [*shown, *most_frequent_classes(outside, len(names), predicted_columns)]
    y_pred_shown = np.where(np.isin(y_pred, listed), y_pred, other)
    columns = [*listed, other] if (y_pred_shown[keep] == other).any() else listed
    matrix = confusion_matrix(y_true[keep], y_pred_shown[keep], labels=columns)[: len(shown)]
    normalised = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)

    size = 0.32 * max(len(columns), 6) + 3
    figure, axes = plt.subplots(figsize=(size + 1, size))
    image = axes.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
    column_names = [names[index] if index != other else "(other)" for index in columns]
    axes.set_xticks(range(len(columns)), column_names, rotation=90, fontsize=7)
    axes.set_yticks(range(len(shown)), [f"{names[index]} ({counts[index]})" for index in shown], fontsize=7)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true (items)")
    if len(columns) <= 12:
        for row, column in np.ndindex(normalised.shape):
            colour = "white" if normalised[row, column] > 0.5 else "black"
            axes.text(column, row, f"{normalised[row, column]:.2f}", ha="center", va="center", fontsize=7, color=colour)
    present_classes = int((counts > 0).sum())
    scope = f", {len(shown)} most frequent of {present_classes} classes" if len(shown) < present_classes else ""
    axes.set_title(f"{name}: confusion matrix (rows sum to 1{scope})", fontsize=9)
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return name


def plot_attribute_accuracy(metrics: dict, path: Path) -> bool:
    """Grouped bars of top-1 and top-5 accuracy per attribute; False when no attribute has a label."""
    scored = {name: values for name, values in metrics["attributes"].items() if values["support"]}
    if not scored:
        return False
    positions = np.arange(len(scored))
    figure, axes = plt.subplots(figsize=(max(6, 1.3 * len(scored) + 2), 4.5))
    for offset, key, label in ((-0.2, "top1", "top-1"), (0.2, "top5", "top-5")):
        values = [scored[name][key] for name in scored]
        bars = axes.bar(positions + offset, values, width=0.4, label=label)
        axes.bar_label(bars, labels=[f"{value:.2f}" for value in values], fontsize=7, padding=2)
    names = [f"{name}\n({values['num_labels']} labels)" for name, values in scored.items()]
    axes.set_xticks(positions, names, fontsize=8)
    axes.set_ylim(0, 1.08)
    axes.set_ylabel("accuracy")
    axes.set_title(f"Attribute accuracy on {metrics.get('dataset', 'the dataset')} ({metrics['n_images']} images)")
    axes.legend(loc="lower right")
    axes.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def read_scalars(log_dir: str | Path) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """Every scalar of every TensorBoard run under `log_dir`: `{run: {tag: [(step, value), ...]}}`."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    log_dir = Path(log_dir)
    runs = sorted({path.parent for path in log_dir.rglob("events.out.tfevents.*")})
    result = {}
    for run in runs:
        accumulator = EventAccumulator(str(run), size_guidance={SCALARS: 0})  # 0: keep every point
        accumulator.Reload()
        tags = accumulator.Tags()["scalars"]
        if tags:
            name = str(run.relative_to(log_dir)) if run != log_dir else run.name
            result[name] = {tag: [(event.step, event.value) for event in accumulator.Scalars(tag)] for tag in tags}
    return result


def plot_training_curves(log_dir: str | Path, path: Path) -> bool:
    """One panel per scalar tag (train/loss, val/<attr>_top1, ...), one line per run; False when there is none."""
    runs = read_scalars(log_dir)
    tags = sorted({tag for run in runs.values() for tag in run})
    if not tags:
        return False
    columns = min(3, len(tags))
    rows = -(-len(tags) // columns)
    figure, grid = plt.subplots(rows, columns, figsize=(4.2 * columns, 2.8 * rows), squeeze=False)
    for axes, tag in zip(grid.flat, tags):
        for run, run_tags in runs.items():
            if tag in run_tags:
                steps, values = zip(*run_tags[tag])
                axes.plot(steps, values, label=run, linewidth=1.2, marker="." if len(steps) < 30 else None)
        axes.set_title(tag, fontsize=9)
        axes.set_xlabel("step", fontsize=8)
        axes.tick_params(labelsize=7)
        axes.grid(alpha=0.3)
        if len(runs) > 1:
            axes.legend(fontsize=6)
    for axes in list(grid.flat)[len(tags) :]:
        axes.axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


# ---------------------------------------------------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------------------------------------------------


def load_local_dataset(path: Path, split: str):
    """A parquet export or a Hub-layout folder of parquet files; anything else is a catalogue for `load_catalogue`."""
    from datasets import Image, load_dataset

    if path.is_file() and path.suffix.lower() == ".parquet":
        dataset = load_dataset("parquet", data_files=str(path), split="train")
        if "image" in dataset.column_names and not isinstance(dataset.features["image"], Image):
            return data.load_catalogue(path, split=split)  # an image column of file paths
        return dataset
    if path.is_dir() and any(path.rglob("*.parquet")):
        return load_dataset(str(path), split=split)
    return data.load_catalogue(path, split=split)


def load_eval_dataset(name: str, split: str, attributes: dict[str, list[str]], source=None):
    """The dataset `--dataset` names, through the loaders of `fashion_hf.data` (`source`: their local folder or Hub
    id, for the built-in data sets)."""
    if name == "fashion-product-images":
        return data.load_fashion_product_images(source, split=split, with_brand=data.BRAND in attributes)
    if name == "fashion-mnist":
        return data.load_fashion_mnist(source, split=split)
    if name == data.CLOTHING_USER_PHOTOS:
        return data.load_clothing_user_photos(source, split=split)
    path = Path(name).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"--dataset {name!r}: expected one of {', '.join(data.BUILT_IN_DATASETS)} or an existing path")
    return load_local_dataset(path, split)


def duplicate_rows(dataset, others) -> list[int]:
    """Rows of `dataset` whose image bytes equal those of an image in `others` (SHA-256 of the stored bytes)."""
    seen = set(data.image_sha256s(others))
    return [row for row, digest in enumerate(data.image_sha256s(dataset)) if digest in seen]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="model folder (or Hub id) saved with save_pretrained, with its image processor")
    parser.add_argument("--dataset", default="fashion-product-images", help=f"{' | '.join(data.BUILT_IN_DATASETS)} | PATH")
    parser.add_argument("--split", default="validation",
                        help="split to evaluate (Fashion-MNIST: train, validation or test; a catalogue: its own split "
                        "column's values, else train or validation of the hash hold-out, or all)")  # fmt: skip
    parser.add_argument("--data-source", default=None,
                        help="local folder or Hub id of a built-in data set (default: the loader's, as train.py)")
    parser.add_argument("--exclude-duplicates-of", default=None, metavar="SPLIT",
                        help="also score the split without its images byte-identical to one of SPLIT (e.g. train)")
    parser.add_argument("--output", required=True, type=Path, help="folder for metrics.json and the plots")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N items only")
    parser.add_argument("--logs", type=Path, default=None, help="TensorBoard run folder to plot training curves from")
    parser.add_argument("--num-beams", type=int, default=1, help="beam width of the tag decoder (1: greedy)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--shift", default="none", choices=["none", "phone"],
                        help="phone: the same images on busy backdrops, zoomed out, cropped and tilted (robustness)")
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit must be at least 1, got {args.limit}")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be at least 1, got {args.batch_size}")
    return args


def write_evaluation(
    model,
    processor,
    dataset,
    output_dir: str | Path,
    logs_dir: str | Path | None = None,
    dataset_name: str = "dataset",
    split: str = "validation",
    batch_size: int = 64,
    num_beams: int = 1,
    model_id: str | None = None,
    progress: bool = True,
    extra: dict | None = None,
    duplicates: tuple[str, list[int]] | None = None,
    breakdown_column: str | None = None,
    confusion_heads: Sequence[str] | None = None,
) -> dict:
    """Evaluate, then write `metrics.json` and the plots to `output_dir`; returns the metrics as written.

    `logs_dir`: a TensorBoard run folder to draw `training_curves.png` from. `model_id` defaults to the model's
    `name_or_path`. `extra`: more run details to record in metrics.json. `duplicates`: `(split, rows)`, the rows of
    `dataset` whose images are byte-identical to one of that split; metrics.json then also has `without_duplicates`,
    the same figures over the other rows (the same predictions, no second model run). `breakdown_column`: a column
    of `dataset` (the phone photos' `label`) to break top-1 down by, into `per_label` (`label_breakdown`).
    `confusion_heads`: draw `confusion_matrix_<head>.png` for each of these heads instead of `confusion_matrix.png`
    for the head with the most labels.
    """
    output_dir = Path(output_dir)
    started = time.perf_counter()
    predictions = predict(model, processor, dataset, batch_size, num_beams, progress=progress)
    deduplicated = None
    if duplicates is not None:
        of_split, rows = duplicates
        excluded = set(rows)
        kept = [row for row in range(len(dataset)) if row not in excluded]
        deduplicated = {
            "of_split": of_split,
            "method": "SHA-256 of the stored image bytes (byte-identical files)",
            "n_excluded": len(excluded),
            **score(select_predictions(predictions, dataset, kept, model.config), model.config.attributes),
        }
    metrics = {
        "model": model_id or str(getattr(model, "name_or_path", "") or "model"),
        "dataset": dataset_name,
        "split": split,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **score(predictions, model.config.attributes),
        "num_beams": num_beams,
        "batch_size": batch_size,
        "device": str(_model_device_and_dtype(model)[0]),
        "eval_seconds": round(time.perf_counter() - started, 2),
        **(extra or {}),
        **({"without_duplicates": deduplicated} if deduplicated else {}),
    }

    if breakdown_column is not None:
        values = dataset.with_format(None).select_columns([breakdown_column])[:][breakdown_column]
        metrics["per_label"] = label_breakdown(predictions, values, model.config.attributes, breakdown_column)

    output_dir.mkdir(parents=True, exist_ok=True)
    files = []
    if confusion_heads is None:
        confusion_head = plot_confusion_matrix(predictions, model.config.attributes, output_dir / CONFUSION_FILE)
        if confusion_head is not None:
            files.append(CONFUSION_FILE)
        metrics["confusion_matrix_attribute"] = confusion_head
    else:
        drawn = []
        for head in confusion_heads:
            file = CONFUSION_HEAD_FILE.format(head=head)
            if plot_confusion_matrix(predictions, model.config.attributes, output_dir / file, head,
                                     predicted_columns=CONFUSION_PREDICTED_COLUMNS) is not None:  # fmt: skip
                files.append(file)
                drawn.append(head)
        metrics["confusion_matrix_attributes"] = drawn
    if plot_attribute_accuracy(metrics, output_dir / ACCURACY_FILE):
        files.append(ACCURACY_FILE)
    if logs_dir is not None:
        if plot_training_curves(logs_dir, output_dir / CURVES_FILE):
            files.append(CURVES_FILE)
        else:
            print(f"warning: no TensorBoard scalars under {logs_dir}; {CURVES_FILE} not written", file=sys.stderr)
    metrics["files"] = [METRICS_FILE, *files]
    (output_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def select_predictions(predictions: Predictions, dataset, rows: list[int], config) -> Predictions:
    """The predictions and references of some rows of `dataset` only (labels re-read, so that counts match)."""
    subset = dataset.with_format(None).select(rows)
    heads = {name: config.attributes[name] for name in predictions.labels}  # the whole split's labelled heads
    labels, out_of_vocabulary, attribute_keys = _read_labels(subset, heads, keep_unlabelled=True)
    reference, dropped_tags = _reference_tags(subset, attribute_keys, set(config.tag_to_id()))
    index = np.asarray(rows, dtype=np.int64)
    return Predictions(
        probs={name: probs[index] for name, probs in predictions.probs.items()},
        labels=labels,
        out_of_vocabulary=out_of_vocabulary,
        generated=[predictions.generated[row] for row in rows],
        reference=reference,
        out_of_vocabulary_tags=dict(sorted(dropped_tags.items())),
        tag_groups=predictions.tag_groups,  # the groups of the whole split: both sets of figures score the same ones
        tags_known=predictions.tags_known,
        domains_reached=predictions.domains_reached and {d: r[index] for d, r in predictions.domains_reached.items()},
    )


def label_breakdown(predictions: Predictions, values: list, attributes: dict[str, list[str]], column: str) -> dict:
    """Top-1 of each labelled head over the items of each value of `values` (one per item: the phone photos' own
    `label`, finer than any head: Longsleeve, Polo and T-Shirt are all Tshirts), most frequent value first.

    Returns `{"column", "heads", "labels": {value: {"count", "top1": {head: accuracy}, "labelled_as": {head: the
    value's most frequent label}, "most_predicted": {head: the most frequent prediction}}}}`; an accuracy is None where
    no item of the value has a label (in the head's vocabulary) for the head. Items whose value is None are left out.
    """
    heads = list(predictions.labels)
    counts = Counter(value for value in values if value is not None)
    ordered = sorted(counts, key=lambda value: (-counts[value], str(value)))
    rows_of = {value: np.flatnonzero([item == value for item in values]) for value in ordered}

    def most_common(indices, names):
        return names[Counter(indices.tolist()).most_common(1)[0][0]] if len(indices) else None

    table = {}
    for value in ordered:
        rows = rows_of[value]
        entry = {"count": counts[value], "top1": {}, "labelled_as": {}, "most_predicted": {}}
        for head in heads:
            truth, predicted = predictions.labels[head][rows], predictions.probs[head][rows].argmax(axis=1)
            present = truth != IGNORE_INDEX
            entry["top1"][head] = float((predicted[present] == truth[present]).mean()) if present.any() else None
            entry["labelled_as"][head] = most_common(truth[present], attributes[head])
            entry["most_predicted"][head] = most_common(predicted, attributes[head])
        table[str(value)] = entry
    return {"column": column, "heads": heads, "labels": table}


def shift_like_phone_photos(dataset, processor):
    """Each image moved off the studio look the model was trained on; seeded by position, so runs repeat."""
    def shift(row, index):
        return {"image": phone_photo_shift(processor.load_image(row["image"]), np.random.default_rng([0, index]))}

    return dataset.map(shift, with_indices=True, desc="phone-photo shift")


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = AutoModel.from_pretrained(args.model).to(device)
    processor = AutoImageProcessor.from_pretrained(args.model)
    dataset = load_eval_dataset(args.dataset, args.split, model.config.attributes, args.data_source)
    if args.limit is not None:
        dataset = dataset.select(range(min(args.limit, len(dataset))))
    duplicates = None
    if args.exclude_duplicates_of:  # hashed before any --shift: the stored bytes, as the two splits hold them
        others = load_eval_dataset(args.dataset, args.exclude_duplicates_of, model.config.attributes, args.data_source)
        duplicates = (args.exclude_duplicates_of, duplicate_rows(dataset, others))
    definition = data.describe_split(args.dataset, args.split, dataset)
    if args.shift == "phone":
        dataset = shift_like_phone_photos(dataset, processor)
    # Real phone photos know two heads only: a confusion matrix for each, and top-1 per photographer's label.
    user_photos = args.dataset == data.CLOTHING_USER_PHOTOS
    metrics = write_evaluation(
        model, processor, dataset, args.output,
        logs_dir=args.logs, dataset_name=str(args.dataset), split=args.split, batch_size=args.batch_size,
        num_beams=args.num_beams, model_id=str(args.model), progress=not args.no_progress,
        extra={"limit": args.limit, "shift": args.shift, "split_definition": definition}, duplicates=duplicates,
        breakdown_column=BREAKDOWN_COLUMN if user_photos else None,
        confusion_heads=data.CLOTHING_USER_PHOTOS_ATTRIBUTES if user_photos else None,
    )  # fmt: skip
    print(summary(metrics))
    print(f"wrote {', '.join(metrics['files'])} to {args.output}")
    return metrics


def summary(metrics: dict) -> str:
    """A few readable lines: top-1 per attribute, then tag F1, and top-1 per label where broken down by label."""
    lines = [f"{metrics['n_images']} images of {metrics['dataset']} ({metrics['split']})"]
    for name, values in metrics["attributes"].items():
        if values["support"]:
            lines.append(f"  {name:<16} top-1 {values['top1']:.3f}  top-5 {values['top5']:.3f}  "
                         f"macro-F1 {values['macro_f1']:.3f}  (n={values['support']})")  # fmt: skip
    if metrics.get("heads_without_labels"):
        lines.append(f"  not scored (no label in the data): {', '.join(metrics['heads_without_labels'])}")
    if metrics.get("per_label"):
        lines.append(_breakdown_lines(metrics["per_label"]))
    tags = metrics["tags"]
    if tags is None:
        lines.append(f"  tags             {metrics.get('tags_note', 'not scored')}")
        return "\n".join(lines)
    overall = tags["generated"]["overall"]
    lines.append(f"  tags             P {overall['precision']:.3f}  R {overall['recall']:.3f}  F1 {overall['f1']:.3f}")
    if tags["attribute_tags"]["groups"]:
        generated, heads = tags["attribute_tags"]["generated"]["overall"], tags["attribute_tags"]["heads"]["overall"]
        lines.append(f"  attribute tags   F1 decoder {generated['f1']:.3f}  F1 heads {heads['f1']:.3f}")
    return "\n".join(lines)


def _breakdown_lines(breakdown: dict) -> str:
    """`label_breakdown`'s table as text: one row per label, top-1 per head, and what the model says most often."""
    heads = breakdown["heads"]
    header = f"  {breakdown['column']:<12} {'items':>6}" + "".join(f" {head:>12}" for head in heads)
    lines = [header + "  most often predicted"]
    for value, entry in breakdown["labels"].items():
        scores = "".join(f" {'–' if entry['top1'][head] is None else format(entry['top1'][head], '.2f'):>12}"
                         for head in heads)  # fmt: skip
        predicted = " / ".join(str(entry["most_predicted"][head]) for head in heads)
        lines.append(f"  {value:<12} {entry['count']:>6}{scores}  {predicted}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
