"""The training data of `train.py`: the splits a run reads, corrections and a second data set appended to the train
split, the typed feedback tags that join the vocabulary, and each row turned into model inputs (augmented, seeded,
so that reruns repeat).
"""

import argparse
import math
from collections import Counter

import datasets
import numpy as np
import torch
from torch import nn

from .. import data
from ..configuration_fashion_tagger import BOS_TAG_ID, DEFAULT_FEEDBACK_TAG_MIN_CONTRIBUTORS, PAD_TAG_ID
from ..feedback import dataset as feedback_dataset
from .augment import augmentation


def load_split(args, split: str):
    """Split `split` of `--dataset`, its first `--limit-train` or `--limit-eval` rows where one is given."""
    if args.dataset == "fashion-product-images":
        dataset = data.load_fashion_product_images(args.data_source, split=split, with_brand=args.with_brand)
    elif args.dataset == "fashion-mnist":
        dataset = data.load_fashion_mnist(args.data_source, split=split)
    elif args.dataset == data.CLOTHING_USER_PHOTOS:
        dataset = data.load_clothing_user_photos(args.data_source, split=split)
    else:  # a catalogue: its own split column, else the hash hold-out (data.HOLDOUT_DEFINITION)
        dataset = data.load_catalogue(args.dataset, attributes=args.attributes, split=split)
    limit = args.limit_train if split == args.train_split else args.limit_eval
    return dataset.select(range(min(limit, len(dataset)))) if limit else dataset


def default_min_tag_count(args, train_images: int) -> int:
    """--min-tag-count, else 20 (the built-in data sets), or for a catalogue one per 1,000 training images, 3-20."""
    if args.min_tag_count is not None:
        return args.min_tag_count
    if args.dataset in data.BUILT_IN_DATASETS:
        return 20
    return min(20, max(3, math.ceil(train_images / 1000)))


def replay_sample(dataset, images: int, seed: int, favoured_kinds=()):
    """`images` rows drawn at random with `seed` (the same rows on every run and in every ensemble member). With
    `favoured_kinds` (articleTypes), half of them are spread evenly over those kinds' rows first, so that a kind
    rare in the catalogue (dresses, caps) is replayed as often as a common one."""
    if images >= len(dataset):
        return dataset
    rng = np.random.default_rng(seed)
    if not favoured_kinds:
        return dataset.select(sorted(rng.choice(len(dataset), images, replace=False).tolist()))
    kinds = np.array(dataset["articleType"], dtype=object)
    per_kind = images // 2 // len(favoured_kinds)
    rows = []
    for kind in sorted(favoured_kinds):
        of_kind = np.flatnonzero(kinds == kind)
        rows += rng.choice(of_kind, min(per_kind, len(of_kind)), replace=False).tolist()
    others = np.setdiff1d(np.arange(len(dataset)), rows)
    rows += rng.choice(others, images - len(rows), replace=False).tolist()
    return dataset.select(sorted(rows))


def corrected_kinds(user_photos: list) -> set[str]:
    """The articleTypes the run's user photos (`user_photo_sets`) name: `--replay-kinds corrected` favours them in
    the replay."""
    kinds = set()
    for dataset in user_photos:
        if "articleType" in dataset.column_names:
            kinds.update(kind for kind in dataset["articleType"] if kind)
    return kinds


def balanced_repeats(labels: list, repeats: int) -> list[int]:
    """Copies of each row: `repeats` on average, in proportion to 1 / sqrt(how many rows share its label), and at
    least one. Square-root balancing (Mahajan et al., 2018) lets the few photos of a rare kind (a hat among hundreds
    of T-shirts) count for more without repeating them so often that the model learns those photos by heart. Rows
    without a label (None) count as one more kind."""
    counts = Counter(labels)
    scale = repeats * len(labels) / sum(count**0.5 for count in counts.values())  # copies of a kind: scale * sqrt(count)
    copies, seen = [], Counter()
    for label in labels:  # a kind's copies, rounded once, spread over its rows: the first rows get one more
        total, count = round(scale * counts[label] ** 0.5), counts[label]
        copies.append(max(1, total // count + (seen[label] < total % count)))
        seen[label] += 1
    return copies


def feedback_repeats(args, feedback) -> int | list[int]:
    """Copies of each correction per epoch: --feedback-repeats, or per row under --feedback-balance sqrt, by the
    finest kind the record names (articleType, else subCategory)."""
    if args.feedback_balance == "none":
        return args.feedback_repeats
    columns = [feedback[name] for name in ("articleType", "subCategory") if name in feedback.column_names]
    kinds = [next((kind for kind in row if kind is not None), None) for row in zip(*columns)] if columns else [None] * len(feedback)
    return balanced_repeats(kinds, args.feedback_repeats)


def append_examples(train_set, extra, attributes, repeats: int | list[int] = 1):
    """Append `extra` rows (annotators' corrections, a second data set) `repeats` times (or `repeats[i]` times row
    `i`), each copy augmented differently. Heads `extra` does not label are missing labels, masked in the loss; rows
    that do not label every head have `tags_known` False (`feedback_dataset.load_feedback`), and their tag
    sequences stay out of the decoder's loss.
    """
    columns = ["image", *attributes, data.TAGS_COLUMN, data.TAGS_KNOWN_COLUMN]
    train_set = with_tags_known(train_set)
    for attribute in attributes:
        if attribute not in extra.column_names:
            extra = extra.add_column(attribute, [None] * len(extra), feature=datasets.Value("string"))
    extra = with_tags_known(extra).select_columns(columns).cast(train_set.select_columns(columns).features)
    if isinstance(repeats, int):  # whole copies one after another, as the per-row seeds of earlier runs saw them
        copies = [row for _ in range(repeats) for row in range(len(extra))]
    else:
        copies = [row for row, count in enumerate(repeats) for _ in range(count)]
    return datasets.concatenate_datasets([train_set.select_columns(columns), extra.select(copies)])


def with_tags_known(dataset):
    """The dataset with a `tags_known` column (True where it has none: catalogue rows carry whole tag sequences)."""
    if data.TAGS_KNOWN_COLUMN in dataset.column_names:
        return dataset
    return dataset.add_column(data.TAGS_KNOWN_COLUMN, [True] * len(dataset), feature=datasets.Value("bool"))


def dataset_attributes(args, dataset) -> list[str]:
    if args.attributes:
        return list(args.attributes)
    candidates = list(data.PRODUCT_ATTRIBUTES) + ([data.BRAND] if args.with_brand else [])
    return [column for column in candidates if column in dataset.column_names]


class TaggingExamples(torch.utils.data.Dataset):
    """Rows of a tagging dataset -> model inputs. Augmentation is seeded per (seed, view, index): reruns repeat."""

    def __init__(self, dataset, config, processor, augment="product", augment_strength=0.0, seed=0, view=0, backdrops=()):
        self.dataset, self.config, self.processor = dataset, config, processor
        self.augment, self.augment_strength = augmentation(augment, backdrops), augment_strength
        self.seed, self.view = seed, view
        self.tag_vocabulary = config.tag_to_id()

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        row = self.dataset[index]
        image = self.processor.load_image(row["image"])
        if self.augment_strength > 0:
            rng = np.random.default_rng([self.seed, self.view, index])
            image = self.augment(image, rng, self.augment_strength)
        # An unknown sequence is `<bos> <pad>`: one step for the decoder to run, no target for its loss.
        known = row.get(data.TAGS_KNOWN_COLUMN, True)
        tags = self.config.tag_sequence_ids(row["tags"], self.tag_vocabulary) if known else [BOS_TAG_ID, PAD_TAG_ID]
        return {
            "pixel_values": self.processor.pixel_values_of(image),
            "attribute_labels": torch.tensor(self.config.attribute_label_ids(row)),
            "tag_ids": torch.tensor(tags),
        }


def collate(examples):
    batch = {key: torch.stack([e[key] for e in examples]) for key in examples[0] if key != "tag_ids"}
    batch["tag_ids"] = nn.utils.rnn.pad_sequence([e["tag_ids"] for e in examples], batch_first=True)  # <pad> is 0
    return batch


def feedback_tags_to_keep(args, contributors=None) -> list[str]:
    """Typed feedback tags with at least `--feedback-tag-min-contributors` contributors (the config's default: 3)."""
    if not args.feedback:
        return []
    contributors = feedback_dataset.feedback_tag_contributors(args.feedback) if contributors is None else contributors
    return sorted(tag for tag, people in contributors.items() if people >= feedback_tag_min_contributors(args))


def feedback_tag_min_contributors(args) -> int:
    if args.feedback_tag_min_contributors is not None:
        return args.feedback_tag_min_contributors
    return DEFAULT_FEEDBACK_TAG_MIN_CONTRIBUTORS


def mix_split(args):
    """The train split of `--mix-dataset`, a built-in data set read from its default place."""
    return load_split(argparse.Namespace(**{**vars(args), "dataset": args.mix_dataset, "data_source": None}), "train")


def backdrop_photos(user_photos: list, seed: int, photos: int = 300) -> list:
    """A seeded sample of the run's user photos (`user_photo_sets`) whose corners `--augment phone` puts behind
    studio shots."""
    images = []
    for dataset in user_photos:
        images += replay_sample(dataset, photos, seed)["image"]
    return images


def user_photo_sets(args) -> list:
    """The run's photos that are not the catalogue's: the feedback store's and --mix-dataset's train split."""
    sets = []
    if args.feedback:
        sets.append(feedback_dataset.load_feedback(args.feedback))
    if args.mix_dataset:
        sets.append(mix_split(args))
    return sets
