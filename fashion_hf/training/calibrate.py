"""Calibrate a saved fashion tagger on held-out photos, and measure what it changed.

    fashion-hf calibrate models/fashion-tagger --output outputs/calibration [--save-to DIR | --in-place] \
        [--ood-photos /work/ood-photos/images] [--train-photos 4000] [--rotated-photos 200]

Fits, on one half of the held-out photos, and measures on the other half:
- per head and per domain of photos, a temperature (`attribute_temperatures`): the catalogue domain's on product
  validation photos (without the byte-identical copies of training photos), the user-photo domain's on the real
  phone photos of `clothing-user-photos` validation, halved by photographer. Heads the phone photos do not label
  (colour, gender, season, usage) take the catalogue temperature there;
- the label hierarchy (`label_hierarchy`): subCategory answered from articleType, counted on the training labels;
- per tag group, Platt scaling of the decoder's tag scores (`tag_score_scaling`), on product photos;
- per head, the "not sure" threshold (`confidence_thresholds`): the lowest score whose answers were right at least
  95% of the time, on each labelled source; the stricter of the two;
- the out-of-distribution detector (`ood_thresholds` and its statistics): see `fit_ood`.

Writes `calibration.json` (every figure: ECE and reliability diagrams before and after, coverage against accuracy,
the detector's AUROC and flag rates on real non-fashion photos, generated images and rotated photos) and its plots to
`--output`; with `--save-to` or `--in-place`, the calibrated model folder (stored weights unchanged) with that report
beside it, where `fashion-hf model-card` reads it.
"""

import argparse
import hashlib
from collections import Counter
from dataclasses import dataclass
import json
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset, Image as ImageFeature
from PIL import Image, ImageDraw, ImageFont
from safetensors.torch import load_file
from transformers import AutoModel

from .. import data
from ..calibration import (
    FeatureDensity,
    HeldOutScores,
    binary_auroc,
    collect,
    coverage_curve,
    fit_feature_density,
    fit_orientation_probe,
    fit_tag_score_scaling,
    fit_temperature,
    fit_turned_probe,
    joint_limits,
    precision_threshold,
    scale_tag_scores,
    turned_probability,
)
from ..configuration_fashion_tagger import DEFAULT_DOMAIN, QUARTER_TURNS, USER_PHOTOS_DOMAIN
from ..image_decoding import accepted_suffixes
from ..image_processing_fashion_tagger import FashionTaggerImageProcessor
from ..metrics import IGNORE_INDEX, calibration_error, expected_calibration_error, reliability_bins
from ..modeling_fashion_tagger import follow_label_hierarchy, summed_entropy
from ..pipeline_fashion_tagging import save_tagger
from ..evaluation import encode_upright
from .evaluate import duplicate_rows
from .plots import plot_coverage, plot_ood_scores, plot_reliability

CALIBRATION_FILE = "calibration.json"
WEIGHTS_FILE = "model.safetensors"
IN_DISTRIBUTION_FLAGGED = 0.03  # the detector flags at most this share of each kind of fitting photo
# Chosen on the shipped model (probe fitted on 600 + 600 training photos; BENCHMARKS.md, "Turned photos"): a margin
# of 0.3 handled 94-97.5% of turned photos but turned 2.7% of upright product photos and cost up to 1.6 points of
# product accuracy; 0.7 turned 0.5% of them and cost 0.36 points of articleType, which took it under issue 3's 0.90.
# 0.9 turns 0.02% of them (articleType -0.02 points) and still handles 81-84% of turned photos (70-81% without the
# search). A photo tried and left as given is flagged as turned where a turn still looked more upright by over
# `flag_margin` 0.4: the doubtful ones, which 0.9 leaves alone (BENCHMARKS.md, "Turned photos: flagged when a turn
# looks more upright"). Trying turns below 0.3 rather than 0.1 gives that flag more of them to catch.
UPRIGHT_SEARCH = {"below": 0.3, "margin": 0.9, "flag_margin": 0.4}
# Coarse head -> the finer head whose labels it groups (`config.label_hierarchy`). Only subCategory: phone photos'
# articleType head knew dresses its subCategory head called Topwear (+2.4 points of phone subCategory, measured);
# masterCategory is right 99% of the time on its own.
LABEL_HIERARCHY = {"subCategory": "articleType"}
# The heads whose summed entropy is the detector's `uncertainty` signal: those that say what the garment is. A real
# garment's colour, gender, season or usage is often ambiguous, so those heads spread their belief on phone photos
# as much as on a landscape. With one user-photo expert instead of three, all seven heads' entropy caught 32% of the
# real non-product photos and the detector flagged 4.5% of phone photos; these three caught 59%, flagging 2.5%
# (BENCHMARKS.md, "The detector's uncertainty signal").
UNCERTAINTY_HEADS = ("masterCategory", "subCategory", "articleType")
# A photo is reduced to this before it is turned: the model sees at most 160 pixels, and a phone photo's full
# resolution turned three times would cost more than the model's work on it.
TURNED_PHOTO_SIZE = 640


def halves(keys) -> tuple[np.ndarray, np.ndarray]:
    """Rows split in two by a hash of their key (an image digest, a photographer): `(fit, held out)`, stable across
    runs and machines, and one photographer's photos all on one side."""
    side = np.asarray([int(hashlib.sha256(str(key).encode()).hexdigest(), 16) % 2 for key in keys])
    return np.flatnonzero(side == 0), np.flatnonzero(side == 1)


def generated_non_photos(seed: int = 0) -> list[tuple[str, Image.Image]]:
    """Images no one would call a product photo, `(kind, image)`: flat colours, noise, gradients, 8x8 images and
    screenshots of text, the cases a tagger should not answer with confidence."""
    rng = np.random.default_rng(seed)
    images = [("flat colour", Image.new("RGB", (300, 400), tuple(int(v) for v in rng.integers(0, 256, 3)))) for _ in range(16)]
    images += [("uniform noise", Image.fromarray(rng.integers(0, 256, (400, 300, 3), dtype=np.uint8))) for _ in range(8)]
    for _ in range(8):
        coarse = np.clip(rng.normal(128, 60, (40, 30, 3)), 0, 255).astype(np.uint8)
        images.append(("smooth noise", Image.fromarray(coarse).resize((300, 400), Image.BICUBIC)))
    images += [("tiny image", Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))) for _ in range(8)]
    ramp = np.linspace(0, 1, 400)[:, None, None] * np.ones((400, 300, 1))
    for _ in range(8):
        start, end = rng.integers(0, 256, (2, 3))
        images.append(("gradient", Image.fromarray((start + (end - start) * ramp).astype(np.uint8))))
    words = "order shipping account password checkout basket invoice settings help privacy terms return".split()
    font = ImageFont.load_default(size=18)
    for _ in range(12):
        screen = Image.new("RGB", (360, 640), "white")
        draw = ImageDraw.Draw(screen)
        for line in range(24):
            draw.text((12, 10 + 26 * line), " ".join(rng.choice(words, 4)), fill=(30, 30, 30), font=font)
        images.append(("text screenshot", screen))
    return images


def image_dataset(images: list[Image.Image]) -> Dataset:
    return Dataset.from_dict({"image": images}).cast_column("image", ImageFeature())


def photos_in(folder: Path) -> list[Image.Image]:
    suffixes = accepted_suffixes()
    return [Image.open(path).convert("RGB") for path in sorted(folder.iterdir()) if path.suffix.lower() in suffixes]


def rotated(dataset, degrees: int) -> Dataset:
    """The photos turned counter-clockwise by `degrees`, as a user's turned upload (reduced first, see above)."""
    images = []
    for image in dataset.with_format(None)["image"]:
        image = image.convert("RGB")
        image.thumbnail((TURNED_PHOTO_SIZE, TURNED_PHOTO_SIZE))
        images.append(image.rotate(degrees, expand=True))
    return image_dataset(images)


# -- fitting ---------------------------------------------------------------------------------------------------------


def fit_temperatures(model, sources: dict[str, HeldOutScores]) -> dict[str, dict[str, float]]:
    """Per domain of the model, per head: fitted on that domain's own source where it labels the head (the
    catalogue domain on product photos, user-photos on phone photos), else the catalogue domain's value."""
    domains = model.config.photo_domains()
    source_of = {DEFAULT_DOMAIN: "product", USER_PHOTOS_DOMAIN: "phone"}
    temperatures = {}
    for index, domain in enumerate(domains):
        scores = sources.get(source_of.get(domain, ""))
        temperatures[domain] = {}
        for name in model.config.attributes:
            if scores is not None and name in scores.labels and (scores.labels[name] != IGNORE_INDEX).any():
                temperatures[domain][name] = fit_temperature(scores.domain_log_probs[name][index], scores.labels[name])
            elif domain != domains[0] and name in temperatures[domains[0]]:
                temperatures[domain][name] = temperatures[domains[0]][name]
    return temperatures


def fit_label_hierarchy(config, dataset) -> dict[str, dict]:
    """subCategory from articleType: per articleType of the training labels, how often each subCategory goes with it
    (pairs outside the model's vocabularies are not counted)."""
    hierarchy = {}
    for name, finer in LABEL_HIERARCHY.items():
        if name not in config.attributes or finer not in config.attributes:
            continue
        known_labels, known_groups = set(config.attributes[finer]), set(config.attributes[name])
        pairs = Counter(
            pair for pair in zip(list(dataset[finer]), list(dataset[name]))
            if pair[0] in known_labels and pair[1] in known_groups
        )
        totals = Counter()
        for (label, _), count in pairs.items():
            totals[label] += count
        parents = {}
        for (label, group), count in sorted(pairs.items()):
            parents.setdefault(label, {})[group] = count / totals[label]
        hierarchy[name] = {"from": finer, "parents": parents}
    return hierarchy


def served_probabilities(config, scores: HeldOutScores, name: str, calibrated: bool = True) -> np.ndarray:
    """`(n, C)`: head `name`'s probabilities as the model serves them with `config`'s calibration (temperatures, then
    the label hierarchy), or before any (`calibrated=False`)."""
    if not calibrated:
        return scores.probabilities(name)
    if name not in config.label_hierarchy:
        return scores.probabilities(name, config.temperatures(name))
    log_probs = {
        head: torch.as_tensor(np.log(np.clip(scores.probabilities(head, config.temperatures(head)), 1e-12, None)))
        for head in scores.domain_log_probs
    }
    return follow_label_hierarchy(log_probs, config)[name].exp().numpy()


def answers(config, scores: HeldOutScores, name: str, calibrated: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Top-label confidence and correctness of head `name` on its labelled rows."""
    probabilities = served_probabilities(config, scores, name, calibrated)
    labelled = scores.labels[name] != IGNORE_INDEX
    probabilities, labels = probabilities[labelled], scores.labels[name][labelled]
    return probabilities.max(1), probabilities.argmax(1) == labels


def fit_thresholds(config, sources: dict[str, HeldOutScores]) -> dict[str, float]:
    """Per head, the stricter of the thresholds each labelled source asks for, on the scores as `config`'s
    calibration serves them."""
    thresholds = {}
    for name in config.attributes:
        per_source = [
            precision_threshold(*answers(config, scores, name))
            for scores in sources.values()
            if name in scores.labels and (scores.labels[name] != IGNORE_INDEX).sum() >= 20
        ]
        if per_source:
            thresholds[name] = max(per_source)
    return thresholds


def fit_tag_scaling(scores: HeldOutScores) -> dict[str, list[float]]:
    return {
        str(group): fit_tag_score_scaling(scores.tag_scores[scores.tag_groups == group], scores.tag_correct[scores.tag_groups == group])
        for group in np.unique(scores.tag_groups)
    }


# -- measuring -------------------------------------------------------------------------------------------------------


def head_report(config, scores: HeldOutScores, thresholds) -> dict:
    """Per labelled head of a held-out set: ECE and reliability bins before and after calibration (`config`'s
    temperatures and label hierarchy), and what the threshold does."""
    report = {}
    for name, labels in scores.labels.items():
        if not (labels != IGNORE_INDEX).any():
            continue
        entry = {"n": int((labels != IGNORE_INDEX).sum())}
        for when, calibrated in (("before", False), ("after", True)):
            confidence, correct = answers(config, scores, name, calibrated)
            entry[when] = {
                "ece": calibration_error(labels, served_probabilities(config, scores, name, calibrated)),
                "accuracy": float(correct.mean()),
                "mean_confidence": float(confidence.mean()),
                "reliability": reliability_bins(confidence, correct),
            }
        confidence, correct = answers(config, scores, name)
        if name in thresholds:
            answered = confidence >= thresholds[name]
            entry["threshold"] = {
                "value": thresholds[name],
                "coverage": float(answered.mean()),
                "accuracy_answered": float(correct[answered].mean()) if answered.any() else None,
            }
        entry["coverage_curve"] = coverage_curve(confidence, correct)
        report[name] = entry
    return report


def tag_report(scores: HeldOutScores, scaling: dict[str, list[float]]) -> dict:
    """ECE of the generated tags' scores against whether each tag was right, per group and overall."""
    scaled = np.empty_like(scores.tag_scores)
    groups = {}
    for group in np.unique(scores.tag_groups):
        rows = scores.tag_groups == group
        scaled[rows] = scale_tag_scores(scores.tag_scores[rows], scaling.get(str(group)))
        groups[str(group)] = {
            "n": int(rows.sum()),
            "precision": float(scores.tag_correct[rows].mean()),
            "ece_before": expected_calibration_error(scores.tag_scores[rows], scores.tag_correct[rows]),
            "ece_after": expected_calibration_error(scaled[rows], scores.tag_correct[rows]),
        }
    overall = {
        "n": len(scaled),
        "ece_before": expected_calibration_error(scores.tag_scores, scores.tag_correct),
        "ece_after": expected_calibration_error(scaled, scores.tag_correct),
    }
    return {"overall": overall, "per_group": groups}


# -- the out-of-distribution detector --------------------------------------------------------------------------------


def uncertainty_heads(config) -> list[str] | None:
    """`UNCERTAINTY_HEADS` that the model has; None (every head) for a model with none of them."""
    return [name for name in UNCERTAINTY_HEADS if name in config.attributes] or None


def uncertainty_of(scores: HeldOutScores, config) -> np.ndarray:
    """Per photo, the summed entropy of `config.ood_uncertainty_heads` (every head when None) as `config`'s
    calibration serves them: the model's own `summed_entropy`, on the log of the probabilities it would serve."""
    log_probs = {
        name: torch.as_tensor(np.log(np.clip(served_probabilities(config, scores, name), 1e-12, None)))
        for name in config.ood_uncertainty_heads or config.attributes
    }
    return summed_entropy(log_probs).numpy()


@dataclass
class Detector:
    density: FeatureDensity  # Gaussians of the training photos' normalised embeddings, one per domain
    turned_probe: np.ndarray  # (width + 1,): a linear probe for photos on their side or upside down
    orientation_probe: np.ndarray  # (1 + turns, width + 1): which way up a photo is, for `turn_upright`


def fit_ood(config, training: list[np.ndarray], turned: "TurnedFeatures", fitting: list[HeldOutScores]) -> tuple:
    """The detector and its limits. `training`: the training photos' normalised embeddings, one array per domain of
    the model (catalogue photos, then phone photos); `turned`: some of them upright and turned by each quarter turn.
    Three signals, because each misses what another sees: a flat colour sits far from every photo but can look
    certain, a landscape can sit near some product photos but leaves every head unsure, and a shirt on its side is
    near the shirts and can look certain, but its layout is wrong. Their limits share `IN_DISTRIBUTION_FLAGGED`
    of each kind of held-out fitting photo (`joint_limits`)."""
    detector = Detector(
        fit_feature_density(training),
        fit_turned_probe(np.concatenate(training), np.concatenate(turned.turned)),
        fit_orientation_probe(turned.upright, turned.turned),
    )
    signals = [raw_signals(scores, config, detector) for scores in fitting]
    return detector, joint_limits(signals, IN_DISTRIBUTION_FLAGGED)


def raw_signals(scores: HeldOutScores, config, detector: Detector) -> dict[str, np.ndarray]:
    """Per photo, each signal before its limit (what `modeling.ood_signals` computes)."""
    return {
        "distance": detector.density.scores(scores.ood_features),
        "uncertainty": uncertainty_of(scores, config),
        "turned": turned_probability(scores.ood_features, detector.turned_probe),
    }


def over_limits(signals: dict[str, np.ndarray], limits: dict[str, float]) -> np.ndarray:
    """Per photo, the largest signal divided by its limit: `modeling.ood_scores` (above 1: flagged)."""
    return np.max([signals[name] / limits[name] for name in signals], axis=0)


# -- the command -----------------------------------------------------------------------------------------------------


def validation_sources(
    data_source=None, user_photos_source=None, user_photos: bool = True, limit: int | None = None
) -> dict[str, tuple[Dataset, list]]:
    """`(photos, keys to halve them by)` per source: product validation photos without the copies of training photos,
    keyed by image digest, and (with `user_photos`) the phone photos, keyed by photographer; the first `limit` of
    each when given."""
    product = data.load_fashion_product_images(data_source, split="validation")
    copies = set(duplicate_rows(product, data.load_fashion_product_images(data_source, split="train")))
    product = product.select([row for row in range(len(product)) if row not in copies])
    sources = {"product": (product, data.image_sha256s(product))}
    if user_photos:
        phone = data.load_clothing_user_photos(user_photos_source, split="validation")
        sources["phone"] = (phone, phone.with_format(None)["sender_id"])
    if limit:
        sources = {name: (dataset.select(range(min(limit, len(dataset)))), keys[:limit])
                   for name, (dataset, keys) in sources.items()}  # fmt: skip
    return sources


def sources_of(args) -> dict[str, tuple[Dataset, list]]:
    """`validation_sources` as the command's arguments name them."""
    return validation_sources(args.data_source, args.user_photos_source, args.user_photos, args.limit)


def held_out_half(dataset: Dataset, keys: list) -> Dataset:
    """The half of `dataset` calibration measures on (`halves`' second)."""
    return dataset.select(halves(keys)[1])


def held_out_sources(model, processor, args, sources: dict) -> tuple[dict, dict]:
    """`(fitting, held out)` scores per source of `validation_sources`, halved by their keys."""
    fitting, held_out = {}, {}
    for name, (dataset, keys) in sources.items():
        scores = collect(model, processor, dataset, args.batch_size, with_tags=name == "product", progress=not args.no_progress)
        fit_rows, held_out_rows = halves(keys)
        fitting[name], held_out[name] = scores.rows(fit_rows), scores.rows(held_out_rows)
    return fitting, held_out


def outside_images(args) -> dict[str, Dataset]:
    """What is not a product photo: generated images, and the real photos of `--ood-photos` when given."""
    images = {"generated": image_dataset([image for _, image in generated_non_photos()])}
    if args.ood_photos:
        images["photos"] = image_dataset(photos_in(args.ood_photos))
    return images


@dataclass
class TurnedFeatures:
    """Normalised embeddings of the same training photos upright and turned by each of `QUARTER_TURNS`."""

    upright: np.ndarray
    turned: list[np.ndarray]


def training_labels(args) -> Dataset:
    """The product train split's label columns (no images): what `fit_label_hierarchy` counts."""
    product = data.load_fashion_product_images(args.data_source, split="train")
    return product.select_columns([column for column in product.column_names if column != "image"])


def training_sets(args) -> list:
    """The training photos the detector fits on, one set per kind: a seeded sample of the product train split, and
    the phone train split when phone photos are used."""
    product = data.load_fashion_product_images(args.data_source, split="train")
    rows = np.random.default_rng(0).choice(len(product), min(args.train_photos, len(product)), replace=False)
    sets = [product.select(sorted(rows))]
    if args.user_photos:
        phone = data.load_clothing_user_photos(args.user_photos_source, split="train")
        sets.append(phone.select(range(min(args.limit, len(phone)))) if args.limit else phone)
    return sets


def turned_features(model, processor, args, sets) -> TurnedFeatures:
    """The first `--turned-photos` of each training set, upright (reduced as the turned ones are) and turned."""
    def embeddings(dataset):
        return collect(model, processor, dataset, args.batch_size, with_tags=False, progress=not args.no_progress).ood_features

    firsts = [dataset.select(range(min(args.turned_photos, len(dataset)))) for dataset in sets]
    by_turn = [np.concatenate([embeddings(rotated(dataset, degrees)) for dataset in firsts]) for degrees in (0, *QUARTER_TURNS)]
    return TurnedFeatures(upright=by_turn[0], turned=by_turn[1:])


def training_features(model, processor, args) -> tuple[list[np.ndarray], TurnedFeatures]:
    """Normalised embeddings of the training photos per domain of the model (all pooled into one for a single
    model), and `turned_features`."""
    sets = training_sets(args)
    features = [
        collect(model, processor, dataset, args.batch_size, with_tags=False, progress=not args.no_progress).ood_features
        for dataset in sets
    ]
    turned = turned_features(model, processor, args, sets)
    if len(model.config.photo_domains()) == 1:
        return [np.concatenate(features)], turned
    return features, turned


def set_calibration(model, tag_scaling, thresholds, detector: Detector, limits, upright_search: dict) -> None:
    """The rest of the calibration beside the temperatures (set as soon as they are fitted): into the config and
    the detector's buffers."""
    config = model.config
    config.tag_score_scaling, config.confidence_thresholds, config.ood_thresholds = tag_scaling, thresholds, limits
    if not hasattr(model, "ood_means"):
        model._add_ood_detector(detector.density.means.shape[1])
    model.ood_means.copy_(torch.as_tensor(detector.density.means))
    model.ood_precision.copy_(torch.as_tensor(detector.density.precision))
    model.ood_turned.copy_(torch.as_tensor(detector.turned_probe))
    set_upright_search(model, detector.orientation_probe, upright_search)


def set_upright_search(model, orientation_probe: np.ndarray, upright_search: dict) -> None:
    """The four-way orientation probe into its buffer (`ood_orientation`), and when to use it into the config."""
    model.config.upright_search = dict(upright_search)
    model.register_buffer("ood_orientation", torch.as_tensor(orientation_probe, dtype=torch.float32))


DETECTOR_BUFFERS = ("ood_means", "ood_precision", "ood_turned", "ood_orientation")


def save_calibrated(model, source_folder: Path, output_folder: Path) -> None:
    """The folder with the calibrated config and detector, its other weights exactly as stored (float16 stays)."""
    stored = {key: value for key, value in load_file(source_folder / WEIGHTS_FILE).items() if not key.startswith("ood_")}
    detector = {name: getattr(model, name).float().contiguous() for name in DETECTOR_BUFFERS}
    processor = FashionTaggerImageProcessor.from_pretrained(source_folder)
    save_tagger(model, processor, output_folder, state_dict={**stored, **detector})


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path, help="model folder saved by train.py or train/ensemble.py")
    parser.add_argument("--output", required=True, type=Path, help="folder for calibration.json and the plots")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--save-to", type=Path, default=None, help="write the calibrated model folder here")
    where.add_argument("--in-place", action="store_true", help="write the calibration into the model folder itself")
    parser.add_argument("--data-source", default=None, help="local folder or Hub id of the product photos")
    parser.add_argument("--user-photos-source", default=None, help="local folder of clothing-user-photos")
    parser.add_argument("--no-user-photos", dest="user_photos", action="store_false",
                        help="product photos only (no phone photos: the user-photo domain keeps catalogue values)")
    parser.add_argument("--ood-photos", type=Path, default=None,
                        help="a folder of real photos that are not clothing (benchmarks/ood_photos.py builds one)")
    parser.add_argument("--train-photos", type=int, default=4000, help="product training photos the detector fits on")
    parser.add_argument("--turned-photos", type=int, default=800,
                        help="training photos per kind turned by 90, 180 and 270 degrees, for the turned-photo probe "
                             "(with --only-upright-search, 0 keeps the model's orientation probe)")
    parser.add_argument("--rotated-photos", type=int, default=200, help="held-out photos per source to rotate")
    parser.add_argument("--upright-below", type=float, default=UPRIGHT_SEARCH["below"],
                        help="upright probability under which a photo's quarter turns are tried (config.upright_search)")
    parser.add_argument("--upright-margin", type=float, default=UPRIGHT_SEARCH["margin"],
                        help="how much more upright a turn must look to be tagged instead")
    parser.add_argument("--upright-flag-margin", type=float, default=UPRIGHT_SEARCH["flag_margin"],
                        help="how much more upright a turn of a photo left as given may look before it is flagged "
                             "as turned (0: never flagged so)")
    parser.add_argument("--only-upright-search", action="store_true",
                        help="a calibrated model: fit only its orientation probe (and measure rotated photos)")
    parser.add_argument("--limit", type=int, default=None, help="at most N photos per split (a quick run)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def tagged_upright(model, processor, dataset, batch_size: int, heads: list[str]) -> dict[str, np.ndarray]:
    """Per photo, what the pipeline answers: each of `heads`' top label index (after `turn_upright`), its
    out-of-distribution score and whether that flags it, and the degrees it was turned for it."""
    images = [image.convert("RGB") for image in dataset.with_format(None)["image"]]
    answers = {head: [] for head in heads} | {"ood_score": [], "flagged": [], "turned_by": [], "searched": []}
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size]
            pixel_values = processor(batch, return_tensors="pt")["pixel_values"]
            image_embeds, turned_by, turn_gain = encode_upright(model, processor, batch, pixel_values)
            logits = model(image_embeds=image_embeds).attribute_logits
            for head in heads:
                answers[head].append(logits[head].argmax(-1).numpy())
            ood_scores = model.ood_scores(image_embeds, logits, turn_gain)
            answers["ood_score"].append(ood_scores.numpy())
            answers["flagged"].append((ood_scores > 1).numpy())
            answers["turned_by"].append(turned_by.numpy())
            # A photo left as given kept its own embedding: under `below`, its turns were encoded and tried.
            below = model.config.upright_search["below"] if model.config.upright_search else 0.0
            answers["searched"].append(((turned_by != 0) | (model.upright_probability(image_embeds) < below)).numpy())
    return {name: np.concatenate(values) for name, values in answers.items()}


def searched_ood_report(model, processor, args, sources: dict, outside: dict[str, Dataset]) -> dict:
    """The detector as the pipeline applies it: the held-out halves and `outside` tagged through the upright search,
    which may turn a photo or flag it for a turn that looks more upright (the detector's own figures score photos
    as given): `flag_report` of the held-out halves of `sources` against `outside`."""
    def scores(dataset):
        return tagged_upright(model, processor, dataset, args.batch_size, [])["ood_score"]

    inside = {name: scores(held_out_half(dataset, keys)) for name, (dataset, keys) in sources.items()}
    return flag_report(inside, {name: scores(dataset) for name, dataset in outside.items()})


def flag_report(inside: dict[str, np.ndarray], outside: dict[str, np.ndarray]) -> dict:
    """Out-of-distribution scores per set -> the share of each set flagged (above 1), and the AUROC of each
    `outside` set against all the `inside` ones together."""
    pooled = np.concatenate(list(inside.values()))
    return {
        "flagged": {name: float((values > 1).mean()) for name, values in {**inside, **outside}.items()},
        "auroc": {name: binary_auroc(pooled, values) for name, values in outside.items()},
    }


def rotation_report(model, processor, args) -> dict:
    """Held-out photos upright and turned by each quarter turn, tagged as the pipeline tags them (the calibrated
    model, quarter turns tried where a photo looks turned): how often a turned photo is tagged like its upright twin
    on the category heads, flagged, or either (handled); how often it was turned back upright; and how often an
    upright photo was turned (its answers then change)."""
    report = {}
    sources = {"product": data.load_fashion_product_images(args.data_source, split="validation")}
    if args.user_photos:
        sources["phone"] = data.load_clothing_user_photos(args.user_photos_source, split="validation")
    heads = [name for name in ("subCategory", "articleType") if name in model.config.attributes]
    for name, dataset in sources.items():
        # A seeded sample, not the first photos: those chose UPRIGHT_SEARCH.
        rows = np.random.default_rng(1).choice(len(dataset), min(args.rotated_photos, len(dataset)), replace=False)
        dataset = dataset.select(sorted(rows))
        upright = tagged_upright(model, processor, rotated(dataset, 0), args.batch_size, heads)
        report[name] = {"0": {"n": len(upright["flagged"]), "turned": float((upright["turned_by"] != 0).mean()),
                              "searched": float(upright["searched"].mean()), "flagged": float(upright["flagged"].mean())}}  # fmt: skip
        for degrees in QUARTER_TURNS:
            turned = tagged_upright(model, processor, rotated(dataset, degrees), args.batch_size, heads)
            same = np.all([turned[head] == upright[head] for head in heads], axis=0)
            report[name][str(degrees)] = {
                "n": len(same),
                "turned_upright": float(((turned["turned_by"] + degrees) % 360 == 0).mean()),
                "same_as_upright": float(same.mean()),
                "flagged": float(turned["flagged"].mean()),
                "handled": float((same | turned["flagged"]).mean()),
            }
    return {"heads": heads, "upright_search": model.config.upright_search, "sources": report}


def fit_upright_search(args) -> dict:
    """`--only-upright-search`: fit the orientation probe of an already calibrated model, and measure it."""
    model = AutoModel.from_pretrained(args.model, dtype=torch.float32).eval()
    processor = FashionTaggerImageProcessor.from_pretrained(args.model)
    if model.config.ood_thresholds is None:
        raise SystemExit(f"{args.model} has no out-of-distribution detector: calibrate it fully first")
    if args.turned_photos:
        turned = turned_features(model, processor, args, training_sets(args))
        probe = fit_orientation_probe(turned.upright, turned.turned)
    elif hasattr(model, "ood_orientation"):  # new limits for the probe it has: only the measuring is run again
        probe = model.ood_orientation.numpy()
    else:
        raise SystemExit(f"{args.model} has no orientation probe to keep: pass --turned-photos N to fit one")
    set_upright_search(model, probe, upright_search_of(args))
    previous = args.model / CALIBRATION_FILE
    report = json.loads(previous.read_text()) if previous.is_file() else {"files": [CALIBRATION_FILE]}
    report["upright_search"] = model.config.upright_search
    if "ood" in report:
        outside = outside_images(args)
        report["ood"]["through_search"] = searched_ood_report(model, processor, args, sources_of(args), outside)
    report["rotated"] = rotation_report(model, processor, args)
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / CALIBRATION_FILE).write_text(json.dumps(report, indent=2) + "\n")
    destination = args.model if args.in_place else args.save_to
    if destination is not None:
        save_calibrated(model, args.model, destination)
        shutil.copy2(args.output / CALIBRATION_FILE, Path(destination) / CALIBRATION_FILE)
    print(rotation_summary(report["rotated"]))
    return report


def upright_search_of(args) -> dict:
    search = {"below": args.upright_below, "margin": args.upright_margin}
    return search | ({"flag_margin": args.upright_flag_margin} if args.upright_flag_margin else {})


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.only_upright_search:
        return fit_upright_search(args)
    started = time.perf_counter()
    model = AutoModel.from_pretrained(args.model, dtype=torch.float32).eval()
    processor = FashionTaggerImageProcessor.from_pretrained(args.model)
    model.config.without_calibration()  # fitted on the model's own scores, never on an earlier calibration's
    sources = sources_of(args)  # read once: finding validation's copies of training photos hashes the train split
    fitting, held_out = held_out_sources(model, processor, args, sources)
    config = model.config
    # The temperatures go into the config at once: what is fitted after them (thresholds, the heads' uncertainty)
    # reads the scores as the calibrated model will serve them. The model's own outputs here stay uncalibrated:
    # `collect` reads the domains' log-probabilities before any temperature.
    config.attribute_temperatures = temperatures = fit_temperatures(model, fitting)
    config.label_hierarchy = fit_label_hierarchy(config, training_labels(args))
    thresholds = fit_thresholds(config, fitting)
    tag_scaling = fit_tag_scaling(fitting["product"])
    training, turned = training_features(model, processor, args)
    config.ood_uncertainty_heads = uncertainty_heads(config)
    detector, limits = fit_ood(config, training, turned, list(fitting.values()))
    # Into the model now: the rotated photos below are tagged as the calibrated model will tag them.
    set_calibration(model, tag_scaling, thresholds, detector, limits, upright_search_of(args))

    report = {
        "model": str(args.model),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "fitted_on": {name: len(scores.domain_weights) for name, scores in fitting.items()},
        "measured_on": {name: len(scores.domain_weights) for name, scores in held_out.items()},
        "attribute_temperatures": temperatures,
        "label_hierarchy": {name: link["from"] for name, link in config.label_hierarchy.items()},
        "confidence_thresholds": thresholds,
        "tag_score_scaling": tag_scaling,
        "ood_thresholds": limits,
        "ood_uncertainty_heads": config.ood_uncertainty_heads,
        "upright_search": config.upright_search,
        "heads": {name: head_report(config, scores, thresholds) for name, scores in held_out.items()},
        "tags": tag_report(held_out["product"], tag_scaling),
    }
    images = outside_images(args)
    outside_scores = {name: collect(model, processor, found, args.batch_size, with_tags=False, progress=False)
                      for name, found in images.items()}  # fmt: skip
    signals = {name: raw_signals(scores, config, detector) for name, scores in {**held_out, **outside_scores}.items()}
    scored = {name: over_limits(values, limits) for name, values in signals.items()}
    inside = {name: scored[name] for name in held_out}
    measured = flag_report(inside, {name: scored[name] for name in outside_scores})
    report["ood"] = {
        "fitting_budget": IN_DISTRIBUTION_FLAGGED,
        "flagged": measured["flagged"],
        "flagged_by": {name: {s: float((v / limits[s] > 1).mean()) for s, v in values.items()} for name, values in signals.items()},
        "auroc": measured["auroc"],
        "auroc_all": binary_auroc(np.concatenate(list(inside.values())), np.concatenate([scored[name] for name in outside_scores])),
        "generated_kinds": sorted({kind for kind, _ in generated_non_photos()}),
    }
    if config.upright_search is not None:
        report["ood"]["through_search"] = searched_ood_report(model, processor, args, sources, images)
    if args.rotated_photos:
        report["rotated"] = rotation_report(model, processor, args)

    args.output.mkdir(parents=True, exist_ok=True)
    report["files"] = [CALIBRATION_FILE]
    for name, heads in report["heads"].items():
        for plot, draw in ((f"reliability_{name}.png", plot_reliability), (f"coverage_{name}.png", plot_coverage)):
            draw(heads, args.output / plot, title=f"{name} photos, held-out half")
            report["files"].append(plot)
    plot_ood_scores(scored, args.output / "ood_scores.png")
    report["files"].append("ood_scores.png")
    report["seconds"] = round(time.perf_counter() - started, 1)
    (args.output / CALIBRATION_FILE).write_text(json.dumps(report, indent=2) + "\n")

    destination = args.model if args.in_place else args.save_to
    if destination is not None:
        save_calibrated(model, args.model, destination)
        for file in report["files"]:  # beside the model, where its card (`fashion-hf model-card`) reads them
            shutil.copy2(args.output / file, Path(destination) / file)
    print(summary(report))
    return report


def rotation_summary(rotated: dict) -> str:
    return "\n".join(
        f"turned {source:7s} " + ", ".join(
            f"{degrees}°: upright turned {entry['turned']:.1%} (turns tried for {entry.get('searched', 0):.1%})" if degrees == "0"
            else f"{degrees}°: like upright {entry['same_as_upright']:.1%}, handled {entry['handled']:.1%}"
            for degrees, entry in turns.items()
        )
        for source, turns in rotated["sources"].items()
    )  # fmt: skip


def summary(report: dict) -> str:
    lines = []
    for source, heads in report["heads"].items():
        for name, entry in heads.items():
            threshold = entry.get("threshold", {})
            right = threshold.get("accuracy_answered")  # None when the threshold answers none of these photos
            lines.append(
                f"{source:8s} {name:15s} ECE {entry['before']['ece']:.3f} -> {entry['after']['ece']:.3f}"
                + (f"  not sure below {threshold['value']:.2f}: answers {threshold['coverage']:.0%}, right "
                   + (f"{right:.1%}" if right is not None else "-") if threshold else "")  # fmt: skip
            )
    tags = report["tags"]["overall"]
    lines.append(f"tag scores ECE {tags['ece_before']:.3f} -> {tags['ece_after']:.3f}")
    ood = report["ood"]
    lines.append("out of distribution: AUROC " + ", ".join(f"{k} {v:.3f}" for k, v in ood["auroc"].items())
                 + "; flagged " + ", ".join(f"{k} {v:.1%}" for k, v in ood["flagged"].items()))  # fmt: skip
    if "rotated" in report:
        lines.append(rotation_summary(report["rotated"]))
    return "\n".join(lines)
