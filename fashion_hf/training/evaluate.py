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

From Python: `fashion_hf.evaluation.evaluate(model, processor, dataset, batch_size)` returns the figures (log them
with `scalars`), and `write_evaluation(model, processor, dataset, output_dir, logs_dir=...)` here also writes
metrics.json and the plots (`fashion_hf.training.plots`).
"""

import argparse
import json
import sys
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from transformers import AutoImageProcessor, AutoModel

from .. import data
from ..evaluation import Predictions, label_breakdown, model_device_and_dtype, predict, score, select_predictions
from ..metrics import IGNORE_INDEX, calibration_error, reliability_bins
from .augment import phone_photo_shift
from .plots import plot_attribute_accuracy, plot_confusion_matrix, plot_reliability, plot_training_curves

CONFUSION_PREDICTED_COLUMNS = 8  # per-head plots: columns for the classes photos are most often mistaken for
CONFUSION_HEAD_FILE = "confusion_matrix_{head}.png"
BREAKDOWN_COLUMN = "label"  # the phone photos' own label, finer than articleType (Longsleeve and Polo are Tshirts)
METRICS_FILE, CONFUSION_FILE, ACCURACY_FILE, CURVES_FILE, RELIABILITY_FILE = (
    "metrics.json", "confusion_matrix.png", "attribute_accuracy.png", "training_curves.png", "reliability.png",
)  # fmt: skip


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
        "device": str(model_device_and_dtype(model)[0]),
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
    metrics["reliability"] = reliability(predictions)
    if metrics["reliability"]:
        plot_reliability(metrics["reliability"], output_dir / RELIABILITY_FILE, title=f"{dataset_name} {split}")
        files.append(RELIABILITY_FILE)
    if logs_dir is not None:
        if plot_training_curves(logs_dir, output_dir / CURVES_FILE):
            files.append(CURVES_FILE)
        else:
            print(f"warning: no TensorBoard scalars under {logs_dir}; {CURVES_FILE} not written", file=sys.stderr)
    metrics["files"] = [METRICS_FILE, *files]
    (output_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def reliability(predictions: Predictions) -> dict:
    """Per labelled head, the reliability diagram's bins and ECE of the scores as served ("after") and, for a
    calibrated model, before its calibration ("before")."""
    heads = {}
    for name, labels in predictions.labels.items():
        present = labels != IGNORE_INDEX
        if not present.any():
            continue
        heads[name] = {}
        for when, probs in (("before", predictions.uncalibrated_probs), ("after", predictions.probs)):
            if probs is not None:
                head_probs = probs[name][present]
                correct = head_probs.argmax(1) == labels[present]
                heads[name][when] = {"ece": calibration_error(labels, probs[name]),
                                     "reliability": reliability_bins(head_probs.max(1), correct)}  # fmt: skip
    return heads


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
            before = f" (uncalibrated {values['ece_uncalibrated']:.3f})" if "ece_uncalibrated" in values else ""
            lines.append(f"  {name:<16} top-1 {values['top1']:.3f}  top-5 {values['top5']:.3f}  "
                         f"macro-F1 {values['macro_f1']:.3f}  ECE {values['ece']:.3f}{before}  (n={values['support']})")  # fmt: skip
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
