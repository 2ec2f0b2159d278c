"""Score a fashion tagger on a labelled dataset: what it predicts for every image, and the figures of metrics.json.

    predictions = predict(model, processor, dataset)          # head probabilities and generated tags per image
    metrics = score(predictions, model.config.attributes)     # top-1, top-5, macro-F1 per head; tag-set scores

`evaluate(model, processor, dataset)` does both. Everything here is computation: the `fashion-hf evaluate` command
(`fashion_hf.training.evaluate`) loads data sets, writes metrics.json and draws the plots around it.
"""

from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from . import data
from .configuration_fashion_tagger import DETAIL_GROUP, tag_key
from .metrics import (
    IGNORE_INDEX,
    attribute_metrics,
    calibration_error,
    head_tag_sets,
    restrict_to_groups,
    tag_group,
    tag_set_metrics,
)

NAME_COLUMN = "productDisplayName"
TAGS_COLUMN = "tags"
TAGS_NOT_SCORED = ("not scored: the data set does not know every item's tag sequence (tags_known is False), so "
                   "every tag it does not label would count as wrong")  # fmt: skip


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
    # A calibrated model (`config.attribute_temperatures`): the probabilities before calibration, for "before" figures.
    uncalibrated_probs: dict[str, np.ndarray] | None = None


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


def model_device_and_dtype(model) -> tuple[torch.device, torch.dtype]:
    """Where the model's weights are and their dtype: what its inputs are moved to."""
    parameter = next(model.parameters())
    return parameter.device, parameter.dtype


def encode_upright(model, processor, images: list, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """`model.encode_images(pixel_values)` of `images` (decoded), with the photos that look turned encoded the right way
    up where the model's `upright_search` finds a turn that is (`turn_upright`): the embeddings the pipeline tags,
    the degrees each photo was turned for them, and each photo's `turn_gain` (for `ood_scores`)."""
    image_embeds = model.encode_images(pixel_values)

    def encode_turns(rows: torch.Tensor) -> torch.Tensor:
        turns = np.stack([processor.quarter_turns(processor.load_image(images[row])) for row in rows.tolist()])
        turned_pixels = processor.turned_pixel_values(torch.from_numpy(turns))
        embeds = model.encode_images(turned_pixels.to(pixel_values.device, pixel_values.dtype))
        return embeds.unflatten(0, (turns.shape[1], turns.shape[0]))

    return model.turn_upright(image_embeds, encode_turns)


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

    device, dtype = model_device_and_dtype(model)
    probs = {name: [] for name in config.attributes}
    uncalibrated = {name: [] for name in config.attributes} if config.attribute_temperatures else None
    generated = []
    domains = getattr(config, "domains", None) or []
    reached = {domain: [] for domain in domains} if len(domains) > 1 else None
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), tqdm(total=len(dataset), unit="img", desc="evaluate", disable=not progress) as bar:
            for batch in dataset.select_columns(["image"]).iter(batch_size=batch_size):
                pixel_values = processor(batch["image"], return_tensors="pt")["pixel_values"].to(device, dtype)
                image_embeds, _, _ = encode_upright(model, processor, batch["image"], pixel_values)
                outputs = model(image_embeds=image_embeds)
                for name in config.attributes:
                    probs[name].append(outputs.attribute_logits[name].float().softmax(-1).cpu().numpy())
                if uncalibrated is not None:
                    for name, logits in model(image_embeds=image_embeds, calibrated=False).attribute_logits.items():
                        uncalibrated[name].append(logits.float().softmax(-1).cpu().numpy())
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
        uncalibrated_probs=uncalibrated and {name: np.concatenate(chunks) for name, chunks in uncalibrated.items() if chunks},
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
            "ece": calibration_error(label_ids, predictions.probs[name]),
            **({"ece_uncalibrated": calibration_error(label_ids, predictions.uncalibrated_probs[name])}
               if predictions.uncalibrated_probs else {}),  # fmt: skip
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

    Returns `{"n_images", "attributes": {attr: {"top1", "top5", "macro_f1", "ece", "support", "num_labels",
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
        uncalibrated_probs=predictions.uncalibrated_probs and {n: p[index] for n, p in predictions.uncalibrated_probs.items()},
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

