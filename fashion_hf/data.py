"""Training data for the fashion tagger: loaders that all return the same shape, tag sequences (with the detail tags
that `tag_mining` finds in product names), and the vocabulary the model config is built from.

Every loader returns a `datasets.Dataset` with
- `image`: an `Image()` column,
- one string column per attribute, `None` where the label is missing (never a fake "unknown" class),
- `tags`: the target tag sequence, a list of `"group:text"` keys: attribute values in head order, then detail tags,
- `productDisplayName` where the source has product names (detail tags and brands are mined from it).

Typical use:

    train = load_fashion_product_images(split="train", with_brand=True)
    attributes, tags = build_vocabulary(train, [*PRODUCT_ATTRIBUTES, BRAND])
    train = apply_vocabulary(train, attributes, tags)
    validation = apply_vocabulary(load_fashion_product_images(split="validation", with_brand=True), attributes, tags)
    config = FashionTaggerConfig(attributes=attributes, tags=tags)

The local copies of the built-in data sets live in one data folder, each in a subfolder named as the data set
(`fashion-product-images/`, `clothing-user-photos/`, `fashion-mnist/`): the folder that the environment variable
`FASHION_DATA_DIR` names, else `shared/data` beside the repository (`data_dir()`). A loader given no `source` reads its
subfolder there, and the Hub copy where there is none.
"""

import gzip
import hashlib
import math
import os
import struct
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
from datasets import Dataset, Features, Image, List, Value, load_dataset
from huggingface_hub import constants as hub_constants

from .configuration_fashion_tagger import DETAIL_GROUP, tag_key
from .tag_mining import brand_key, detail_tag_order, extract_brand, mine_detail_tags

PRODUCT_IMAGES_HUB_ID = "ashraq/fashion-product-images-small"
FASHION_MNIST_HUB_ID = "zalando-datasets/fashion_mnist"
CLOTHING_USER_PHOTOS = "clothing-user-photos"  # real phone photos (CC0): `load_clothing_user_photos`
# `--dataset` names; anything else is a catalogue
BUILT_IN_DATASETS = ("fashion-product-images", "fashion-mnist", CLOTHING_USER_PHOTOS)
DATA_DIR_ENV = "FASHION_DATA_DIR"

PRODUCT_ATTRIBUTES = ("gender", "masterCategory", "subCategory", "articleType", "baseColour", "season", "usage")
BRAND = "brand"
NAME_COLUMN = "productDisplayName"
TAGS_COLUMN = "tags"
TAGS_KNOWN_COLUMN = "tags_known"  # False: the row's tag sequence is unknown (only some attributes labelled)
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")

# Without FASHION_DATA_DIR: the `shared/data` folder beside the repository, where a checkout finds its data sets.
_DEFAULT_DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"
_SYSTEM_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")  # `apt-get install dataset-fashion-mnist`
_FASHION_MNIST_PREFIXES = {"train": "train", "test": "t10k"}
FASHION_MNIST_SPLITS = ("train", "validation", "train+validation", "test")
FASHION_MNIST_HOLDOUT = "int(sha256(the 784 pixel bytes), 16) % 100 < 10"
# Exports of the original styles.csv spell a missing label "NA" or "" (see the shared copy's README): both are missing.
_MISSING_LABELS = frozenset({"", "NA"})
# Deterministic split by product id (the local copy's README): buckets 0-14 test, 15-24 validation, 25-99 train.
_SPLIT_BUCKETS = {"test": range(0, 15), "validation": range(15, 25), "train": range(25, 100)}
# The held-out part of a catalogue without its own `split` column, and of Fashion-MNIST's training images: by the
# SHA-256 of each image's bytes, so that it never changes between runs and byte-identical copies share a side.
_HOLDOUT_BUCKETS = {"validation": range(0, 10), "train": range(10, 100)}
HOLDOUT_DEFINITION = "validation = images whose int(sha256(image bytes), 16) % 100 < 10 (about 10%), train = the rest"
SPLIT_COLUMN = "split"  # a catalogue's own split, when it has one
ALL_ROWS = "all"  # the split name of a whole catalogue
_RESERVED_COLUMNS = ("image", NAME_COLUMN, TAGS_COLUMN, SPLIT_COLUMN)  # never an attribute by default

_STRING = Value("string")
_TAG_LIST = List(Value("string"))

# ---------------------------------------------------------------------------------------------------------------------
# Column plumbing: read columns without decoding images, swap whole columns without rewriting the rest.
# ---------------------------------------------------------------------------------------------------------------------


def _require_columns(dataset: Dataset, columns: Iterable[str], what: str) -> None:
    missing = [column for column in columns if column not in dataset.column_names]
    if missing:
        raise ValueError(f"{what} has no column {', '.join(map(repr, missing))}; its columns: {dataset.column_names}")


def _read_columns(dataset: Dataset, columns: Sequence[str]) -> dict[str, list]:
    """Python lists of the given columns, read through Arrow so that no image is decoded."""
    table = dataset.select_columns(list(columns)).with_format("arrow")[:]
    return {column: table.column(column).to_pylist() for column in columns}


def _replace_columns(dataset: Dataset, columns: Mapping[str, tuple[list, object]]) -> Dataset:
    """Set whole columns (`name -> (values, feature)`), keeping the column order; new columns go last."""
    order = list(dataset.column_names) + [name for name in columns if name not in dataset.column_names]
    dataset = dataset.remove_columns([name for name in columns if name in dataset.column_names])
    for name, (values, feature) in columns.items():
        dataset = dataset.add_column(name, values, feature=feature)
    return dataset.select_columns(order)


def _as_label(value) -> str | None:
    """A label as a string; missing stays None (NaN from pandas, "" and "NA" from CSV exports)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    text = str(value).strip()
    return None if text in _MISSING_LABELS else text


def _set_string_columns(dataset: Dataset, columns: Sequence[str]) -> Dataset:
    """Make attribute columns plain strings with None for missing labels; untouched when they already are."""
    values = _read_columns(dataset, columns)
    changed = {}
    for column in columns:
        labels = [_as_label(value) for value in values[column]]
        if labels != values[column] or dataset.features[column] != _STRING:
            changed[column] = (labels, _STRING)
    return _replace_columns(dataset, changed) if changed else dataset


# ---------------------------------------------------------------------------------------------------------------------
# Tag sequences and the vocabulary.
# ---------------------------------------------------------------------------------------------------------------------


def add_tag_sequences(
    dataset: Dataset, attributes: Sequence[str], detail_tags: Sequence[str] | None = None
) -> Dataset:
    """Set the `tags` column: each present attribute value in head order, then the item's detail tags in order.

    An item's detail tags are those mined from its `productDisplayName` plus the detail tags already in its `tags`
    (feedback carries typed tags and no name). `detail_tags` is the ordered list of detail tags to keep, normally
    the vocabulary's; None keeps them all in lexicon order.
    """
    _require_columns(dataset, attributes, "the dataset")
    sources = [column for column in (NAME_COLUMN, TAGS_COLUMN) if column in dataset.column_names]
    columns = _read_columns(dataset, [*attributes, *sources])
    names = columns.get(NAME_COLUMN, [None] * len(dataset))
    previous = columns.get(TAGS_COLUMN, [[]] * len(dataset))
    if detail_tags is None:
        keep, order = None, detail_tag_order
    else:
        keep, order = set(detail_tags), {tag: rank for rank, tag in enumerate(detail_tags)}.__getitem__
    prefix = tag_key(DETAIL_GROUP, "")
    sequences = []
    for row, name in enumerate(names):
        details = set(mine_detail_tags(name))
        details.update(key[len(prefix) :] for key in previous[row] or () if key.startswith(prefix))
        if keep is not None:
            details &= keep
        labels = [tag_key(attribute, columns[attribute][row]) for attribute in attributes if columns[attribute][row]]
        sequences.append(labels + [tag_key(DETAIL_GROUP, tag) for tag in sorted(details, key=order)])
    return _replace_columns(dataset, {TAGS_COLUMN: (sequences, _TAG_LIST)})


def build_vocabulary(
    dataset: Dataset,
    attributes: Sequence[str],
    min_tag_count: int = 20,
    min_label_count: int = 1,
    min_brand_count: int = 20,
    keep_detail_tags: Iterable[str] = (),
) -> tuple[dict[str, list[str]], list[list[str]]]:
    """The heads and the tag vocabulary of a training set, in the shape `FashionTaggerConfig` takes.

    Returns `(attributes, tags)`: `attributes` maps each attribute (in the given head order) to its sorted labels
    seen at least `min_label_count` times; `tags` is every attribute label as `[label, attribute]`, then the detail
    tags on at least `min_tag_count` items, and those of `keep_detail_tags` seen at least once (typed feedback tags
    enough people agree on: `feedback.dataset.feedback_tag_contributors`), as `[tag, "detail"]`, lexicon order
    first. Brands are an open set (hundreds of names, most seen a handful of times), so the brand head keeps only
    brands seen `min_brand_count` times; `apply_vocabulary` then makes the rest missing rather than a fake class.
    """
    _require_columns(dataset, [*attributes, TAGS_COLUMN], "the dataset")
    columns = _read_columns(dataset, [*attributes, TAGS_COLUMN])
    heads = {}
    for attribute in attributes:
        floor = min_brand_count if attribute == BRAND else min_label_count
        counts = Counter(label for label in columns[attribute] if label is not None)
        labels = sorted(label for label, count in counts.items() if count >= floor)
        if not labels:
            raise ValueError(f"attribute {attribute!r} has no label seen at least {floor} times")
        heads[attribute] = labels
    prefix = tag_key(DETAIL_GROUP, "")
    detail_counts = Counter(
        key[len(prefix) :] for sequence in columns[TAGS_COLUMN] for key in sequence or () if key.startswith(prefix)
    )
    kept = set(keep_detail_tags)
    frequent = (tag for tag, count in detail_counts.items() if count >= min_tag_count or tag in kept)
    details = sorted(frequent, key=detail_tag_order)
    tags = [[label, attribute] for attribute, labels in heads.items() for label in labels]
    return heads, tags + [[tag, DETAIL_GROUP] for tag in details]


def apply_vocabulary(
    dataset: Dataset, attributes: Mapping[str, Sequence[str]], tags: Sequence[Sequence[str]]
) -> Dataset:
    """Fit a dataset to a vocabulary: labels outside it become None, tag sequences keep only vocabulary tags.

    Brands match whatever their spelling: another split may spell a brand "Adidas" where training said "ADIDAS".
    """
    _require_columns(dataset, attributes, "the dataset")
    columns = _read_columns(dataset, list(attributes))
    changed = {}
    for attribute, labels in attributes.items():
        if attribute == BRAND:
            spelling = {brand_key(label): label for label in labels}
            values = [spelling.get(brand_key(label)) if label else None for label in columns[attribute]]
        else:
            known = set(labels)
            values = [label if label in known else None for label in columns[attribute]]
        if values != columns[attribute]:
            changed[attribute] = (values, _STRING)
    if changed:
        dataset = _replace_columns(dataset, changed)
    return add_tag_sequences(dataset, list(attributes), [text for text, group in tags if group == DETAIL_GROUP])


def add_brand_column(dataset: Dataset) -> Dataset:
    """Add a `brand` attribute mined from the product names, one spelling per brand.

    Names spell a brand several ways ("ADIDAS", "Adidas", "U.S.Polo Assn."); each brand takes its most frequent
    spelling so that the head does not split one brand into several classes.
    """
    _require_columns(dataset, [NAME_COLUMN], "the dataset")
    has_gender = "gender" in dataset.column_names
    columns = _read_columns(dataset, [NAME_COLUMN, "gender"] if has_gender else [NAME_COLUMN])
    genders = columns["gender"] if has_gender else [None] * len(dataset)
    brands = [extract_brand(name, gender) for name, gender in zip(columns[NAME_COLUMN], genders)]
    spellings = Counter(brand for brand in brands if brand)
    canonical = {}
    for spelling, count in sorted(spellings.items(), key=lambda item: (-item[1], item[0])):
        canonical.setdefault(brand_key(spelling), spelling)
    values = [canonical[brand_key(brand)] if brand else None for brand in brands]
    return _replace_columns(dataset, {BRAND: (values, _STRING)})


# ---------------------------------------------------------------------------------------------------------------------
# Loaders.
# ---------------------------------------------------------------------------------------------------------------------


def data_dir() -> Path:
    """The data folder: $FASHION_DATA_DIR, else `shared/data` beside the repository; read at each call."""
    return Path(os.environ.get(DATA_DIR_ENV) or _DEFAULT_DATA_DIR).expanduser()


def local_path(source: str | Path) -> Path | None:
    """The local path `source` names, or None for a Hub id; a path-like source that does not exist is an error."""
    path = Path(source).expanduser()
    if path.exists():
        return path
    if isinstance(source, Path) or path.is_absolute() or str(source).startswith((".", "~")):
        raise FileNotFoundError(f"{source} does not exist: pass an existing local path or a Hub dataset id")
    return None


def load_from_hub(repo_id: str, split: str, hint: str) -> Dataset:
    """load_dataset on a Hub id, with an error that says what to do when the Hub is out of reach."""
    try:
        return load_dataset(repo_id, split=split)
    except ConnectionError as err:
        offline = " (HF_HUB_OFFLINE is set)" if hub_constants.HF_HUB_OFFLINE else ""
        raise FileNotFoundError(
            f"{repo_id!r} is not a local path and the Hub cannot be reached{offline}, nor is it cached. {hint}"
        ) from err


def _split_of_digest(hex_digest: str, buckets: Mapping[str, range]) -> str:
    bucket = int(hex_digest, 16) % 100
    return next(split for split, split_buckets in buckets.items() if bucket in split_buckets)


def split_of(product_id) -> str:
    """The split a product id belongs to, by hash, identical to the split of the local copy of the data."""
    return _split_of_digest(hashlib.sha1(str(product_id).encode()).hexdigest(), _SPLIT_BUCKETS)


def holdout_split_of(image_sha256: str) -> str:
    """"validation" or "train": the side of the deterministic hold-out an image with this SHA-256 is on."""
    return _split_of_digest(image_sha256, _HOLDOUT_BUCKETS)


def _cell_bytes(cell) -> bytes:
    """The encoded bytes of one `Image()` cell as Arrow stores it ({"bytes", "path"}) or of an image path."""
    if isinstance(cell, dict):
        if cell.get("bytes") is not None:
            return cell["bytes"]
        cell = cell.get("path")
    if isinstance(cell, (str, os.PathLike)):
        return Path(cell).read_bytes()
    raise ValueError(f"cannot read the bytes of an image cell of type {type(cell).__name__}")


def image_sha256s(dataset: Dataset, column: str = "image") -> list[str]:
    """SHA-256 of each image's stored bytes (the encoded file, never decoded): equal only for byte-identical files."""
    cells = dataset.select_columns([column]).with_format("arrow")[:].column(column).to_pylist()
    return [hashlib.sha256(_cell_bytes(cell)).hexdigest() for cell in cells]


def select_split(dataset: Dataset, split: str, what: str = "the catalogue") -> Dataset:
    """One split of a catalogue: by its own `split` column when it has one, else the hash hold-out
    (`HOLDOUT_DEFINITION`); "all" is every row."""
    if split == ALL_ROWS:
        return dataset
    if SPLIT_COLUMN in dataset.column_names:
        values = _read_columns(dataset, [SPLIT_COLUMN])[SPLIT_COLUMN]
        rows = [row for row, value in enumerate(values) if _as_label(value) == split]
        if not rows:
            names = sorted({label for value in values if (label := _as_label(value)) is not None})
            raise ValueError(f"{what} has no row of split {split!r} in its {SPLIT_COLUMN!r} column (it has {names})")
        return dataset.select(rows)
    if split not in _HOLDOUT_BUCKETS:
        raise ValueError(
            f"{what} has no {SPLIT_COLUMN!r} column: its splits are {list(_HOLDOUT_BUCKETS)} ({HOLDOUT_DEFINITION}) "
            f"or {ALL_ROWS!r}, not {split!r}"
        )
    return dataset.select([row for row, digest in enumerate(image_sha256s(dataset)) if holdout_split_of(digest) == split])


def catalogue_name(path: str | Path) -> str:
    """A catalogue's name for cards and logs: its folder's or file's name, never its absolute path
    (`shop/metadata.csv` and `shop/` are both "shop", `~/data/spring.csv` is "spring")."""
    path = Path(path).expanduser().resolve()
    if not path.suffix:
        return path.name
    return path.parent.name if path.stem.lower() in ("metadata", "catalogue", "catalog", "data", "index") else path.stem


def describe_split(dataset_name: str, split: str, dataset: Dataset | None = None) -> str:
    """What `split` of a data set holds, in words, for recipe.json, metrics.json and the model card.

    `dataset_name` is one of `BUILT_IN_DATASETS` or a catalogue's path; a catalogue's description
    depends on whether it has its own `split` column, so pass it (any split of it) as `dataset`.
    """
    if dataset_name == "fashion-product-images" and split in _SPLIT_BUCKETS:
        buckets = _SPLIT_BUCKETS[split]
        rule = f"the product ids whose int(sha1(str(id)), 16) % 100 is in {buckets.start}-{buckets.stop - 1}"
        return f"this project's {split} split of {PRODUCT_IMAGES_HUB_ID} (one Hub split, train): {rule}"
    if dataset_name == CLOTHING_USER_PHOTOS:
        return {
            "validation": f"the photographer-disjoint validation split of {CLOTHING_USER_PHOTOS} (CC0 phone photos)",
            "train": f"the train split of {CLOTHING_USER_PHOTOS} (CC0 phone photos; no photographer of validation)",
        }.get(split, split)
    if dataset_name == "fashion-mnist":
        return {
            "validation": f"this project's validation split of Fashion-MNIST: the training images with {FASHION_MNIST_HOLDOUT}",
            "train": f"this project's train split of Fashion-MNIST: the other training images (not {FASHION_MNIST_HOLDOUT})",
            "train+validation": "all 60,000 Fashion-MNIST training images",
            "test": "the 10,000 Fashion-MNIST test images (t10k)",
        }.get(split, split)
    if dataset is None or split == ALL_ROWS:
        return f"every image of {catalogue_name(dataset_name)}" if split == ALL_ROWS else split
    if SPLIT_COLUMN in dataset.column_names:
        return f"the rows of {catalogue_name(dataset_name)} whose {SPLIT_COLUMN!r} column is {split!r}"
    return f"{split} of {catalogue_name(dataset_name)} by image hash: {HOLDOUT_DEFINITION}"


def _default_product_images_source() -> str | Path:
    """The copy in the data folder, else the Hub's."""
    folder = data_dir() / "fashion-product-images"
    return folder if folder.is_dir() else PRODUCT_IMAGES_HUB_ID


def load_fashion_product_images(source=None, split: str = "train", with_brand: bool = False) -> Dataset:
    """Myntra's Fashion Product Images (Small): photos with 7 attributes and a product name.

    `source` is a local folder in the Hub parquet layout (`data/<split>-*.parquet`, as in the shared data) or a Hub
    id; None means `fashion-product-images` in the data folder (`data_dir()`), else
    `ashraq/fashion-product-images-small`. That Hub copy has a single split, so a Hub id is split by product id with
    the same hash as the local copy ("train", "validation", "test"): the same product never lands in two splits.
    `with_brand` adds a `brand` attribute mined from the names (see `add_brand_column`).
    """
    source = _default_product_images_source() if source is None else source
    path = local_path(source)
    if path is not None:
        dataset = load_dataset(str(path), split=split)
    else:
        if split not in _SPLIT_BUCKETS:
            raise ValueError(f"split must be one of {list(_SPLIT_BUCKETS)}, got {split!r}")
        hint = (
            f"No local copy in {data_dir()}: set {DATA_DIR_ENV} to a folder that holds "
            f"fashion-product-images/data/{split}-*.parquet, or pass source=<folder>."
        )
        dataset = load_from_hub(source, "train", hint)
        _require_columns(dataset, ["id"], f"the Hub dataset {source}")
        ids = _read_columns(dataset, ["id"])["id"]
        dataset = dataset.select([row for row, product_id in enumerate(ids) if split_of(product_id) == split])
    _require_columns(dataset, ["image", *PRODUCT_ATTRIBUTES], f"the product images at {source}")
    dataset = _set_string_columns(dataset, PRODUCT_ATTRIBUTES)
    attributes = list(PRODUCT_ATTRIBUTES)
    if with_brand:
        dataset = add_brand_column(dataset)
        attributes.append(BRAND)
    return add_tag_sequences(dataset, attributes)


# The only attributes the phone photos are labelled with (their data README maps the photographers' own labels into the
# product vocabulary); colour, gender, season and usage are unknown.
CLOTHING_USER_PHOTOS_ATTRIBUTES = ("subCategory", "articleType")
CLOTHING_USER_PHOTOS_SPLITS = ("train", "validation")


def load_clothing_user_photos(source=None, split: str = "validation") -> Dataset:
    """Real phone photos of clothes (CC0, `alexeygrigorev/clothing-dataset`), split by photographer: "train" (2,610
    photos) and "validation" (464, photographers never seen in train).

    `source` is a local folder in the Hub parquet layout (`data/<split>-*.parquet`) or a Hub id of a copy of it; None
    means `clothing-user-photos` in the data folder (`data_dir()`; no public Hub copy holds this project's mapping of
    the labels, so there is no Hub default).

    Columns: `image`, `label` (the photographer's own, 16 kinds), `sender_id` (the photographer), every product
    attribute with only `subCategory` and `articleType` known (the others all None, so that code expecting
    `PRODUCT_ATTRIBUTES` reads them as unlabelled), `tags` (the known attribute tags) and `tags_known` False on every
    row: the photos' full tag sequences (colour, gender, details, ...) are unknown, so no tag figure can be scored.
    """
    if split not in CLOTHING_USER_PHOTOS_SPLITS:
        raise ValueError(f"{CLOTHING_USER_PHOTOS} has the splits {list(CLOTHING_USER_PHOTOS_SPLITS)}, got {split!r}")
    if source is None:
        source = data_dir() / CLOTHING_USER_PHOTOS
        if not source.is_dir():
            raise FileNotFoundError(
                f"no local copy of {CLOTHING_USER_PHOTOS} at {source}: pass source=<folder with "
                f"data/{split}-*.parquet> (train/evaluate.py: --data-source), or set {DATA_DIR_ENV} to the folder "
                f"that holds {CLOTHING_USER_PHOTOS}/"
            )
    path = local_path(source)
    if path is None:
        dataset = load_from_hub(str(source), split, "Pass source=<local folder with data/<split>-*.parquet>.")
    elif not any(path.glob(f"data/{split}-*.parquet")):
        raise FileNotFoundError(f"{CLOTHING_USER_PHOTOS} at {path} has no data/{split}-*.parquet")
    else:
        dataset = load_dataset(str(path), split=split)
    known = ["label", *CLOTHING_USER_PHOTOS_ATTRIBUTES]
    _require_columns(dataset, ["image", "sender_id", *known], f"{CLOTHING_USER_PHOTOS} at {source}")
    dataset = _set_string_columns(dataset, known)
    unknown = [attribute for attribute in PRODUCT_ATTRIBUTES if attribute not in CLOTHING_USER_PHOTOS_ATTRIBUTES]
    dataset = _replace_columns(dataset, {attribute: ([None] * len(dataset), _STRING) for attribute in unknown})
    dataset = add_tag_sequences(dataset.select_columns(["image", "label", "sender_id", *PRODUCT_ATTRIBUTES]),
                                PRODUCT_ATTRIBUTES)  # fmt: skip
    return _replace_columns(dataset, {TAGS_KNOWN_COLUMN: ([False] * len(dataset), Value("bool"))})


def read_idx(path: str | Path) -> np.ndarray:
    """One gzip-compressed IDX file (the MNIST format) as a uint8 array, its header checked against its size."""
    path = Path(path)
    try:
        with gzip.open(path, "rb") as file:
            data = file.read()
    except (gzip.BadGzipFile, EOFError) as err:
        raise ValueError(f"{path} is not a complete gzip file ({err}); download it again") from err
    # Magic: two zero bytes, the element type (0x08 = unsigned byte), the number of dimensions.
    if len(data) < 4 or data[:3] != b"\x00\x00\x08":
        raise ValueError(f"{path} is not an IDX file of unsigned bytes (magic {data[:4].hex() or 'missing'})")
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = struct.unpack(f">{ndim}I", data[4:header]) if len(data) >= header else None
    if shape is None or len(data) != header + math.prod(shape):
        raise ValueError(f"{path} is truncated or padded: its header announces shape {shape}, not {len(data)} bytes")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def _read_fashion_mnist(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """The images (N, 28, 28) and labels (N,) of one split, checked against each other."""
    prefix = _FASHION_MNIST_PREFIXES[split]
    images_path = folder / f"{prefix}-images-idx3-ubyte.gz"
    labels_path = folder / f"{prefix}-labels-idx1-ubyte.gz"
    for path in (images_path, labels_path):
        if not path.is_file():
            raise FileNotFoundError(f"Fashion-MNIST file {path} not found (split {split!r} needs {prefix}-*.gz)")
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or labels.ndim != 1:
        raise ValueError(f"{images_path} must hold (N, rows, cols) images and {labels_path} (N,) labels")
    if len(images) != len(labels):
        raise ValueError(f"{images_path} and {labels_path} do not match: {len(images)} images, {len(labels)} labels")
    if labels.max(initial=0) >= len(FASHION_MNIST_CLASSES):
        raise ValueError(f"{labels_path} holds label {labels.max()}; Fashion-MNIST has {len(FASHION_MNIST_CLASSES)}")
    return images, labels


def _default_fashion_mnist_source() -> str | Path:
    folders = (data_dir() / "fashion-mnist", _SYSTEM_FASHION_MNIST)
    return next((folder for folder in folders if folder.is_dir()), FASHION_MNIST_HUB_ID)


def _pixel_holdout(images) -> list[str]:
    """The hold-out side ("train" or "validation") of each Fashion-MNIST image, by the SHA-256 of its pixels."""
    return [holdout_split_of(hashlib.sha256(np.asarray(image, dtype=np.uint8).tobytes()).hexdigest()) for image in images]


def load_fashion_mnist(source=None, split: str = "train") -> Dataset:
    """Zalando's Fashion-MNIST (28x28 greyscale, 10 classes) as an `articleType` attribute.

    `source` is a folder with the IDX .gz files or a Hub id; None means `fashion-mnist` in the data folder
    (`data_dir()`), else /usr/share/datasets/fashion-mnist, else `zalando-datasets/fashion_mnist`. Splits: "validation" (about 10% of the
    60,000 training images, those with `FASHION_MNIST_HOLDOUT`: to choose epochs and settings on), "train" (the other
    training images), "train+validation" (all 60,000) and "test" (the 10,000 test images: for final figures only).
    """
    if split not in FASHION_MNIST_SPLITS:
        raise ValueError(f"Fashion-MNIST has the splits {list(FASHION_MNIST_SPLITS)}, got {split!r}")
    source = _default_fashion_mnist_source() if source is None else source
    path = local_path(source)
    file_split = "test" if split == "test" else "train"
    if path is not None:
        images, labels = _read_fashion_mnist(path, file_split)
        if split in _HOLDOUT_BUCKETS:
            keep = np.flatnonzero(np.array(_pixel_holdout(images)) == split)
            images, labels = images[keep], labels[keep]
        # datasets encodes the uint8 arrays as PNG (mode L): a few seconds for the 60,000 training images.
        features = Features(image=Image(), articleType=_STRING)
        names = [FASHION_MNIST_CLASSES[label] for label in labels.tolist()]
        dataset = Dataset.from_dict({"image": list(images), "articleType": names}, features=features)
    else:
        hint = "Pass source=<folder with the Fashion-MNIST .gz files>."
        dataset = load_from_hub(source, file_split, hint)
        if split in _HOLDOUT_BUCKETS:
            sides = _pixel_holdout(dataset.with_format("numpy")["image"])
            dataset = dataset.select([row for row, side in enumerate(sides) if side == split])
        labels = _read_columns(dataset, ["label"])["label"]
        dataset = _replace_columns(
            dataset.remove_columns("label"),
            {"articleType": ([FASHION_MNIST_CLASSES[label] for label in labels], _STRING)},
        )
    return add_tag_sequences(dataset, ["articleType"])


def _load_image_folder(folder: Path, attributes: Sequence[str] | None) -> tuple[Dataset, list[str] | None]:
    """An imagefolder: labels from metadata.csv/jsonl, or sub-folder names as one attribute (default articleType)."""
    dataset = load_dataset("imagefolder", data_dir=str(folder), split="train")
    if "label" in dataset.column_names and isinstance(dataset.features["label"], datasets.ClassLabel):
        if attributes is not None and len(attributes) != 1:
            raise ValueError(f"{folder} labels images by sub-folder: name one attribute for it, got {attributes}")
        attribute = attributes[0] if attributes else "articleType"
        names = dataset.features["label"].int2str(_read_columns(dataset, ["label"])["label"])
        dataset = _replace_columns(dataset.remove_columns("label"), {attribute: (names, _STRING)})
        attributes = [attribute]
    return dataset, attributes


def read_table(path: Path) -> pd.DataFrame:
    """A catalogue table with every column as text (ids and sizes are labels, not numbers)."""
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        return pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",", dtype=str)
    if suffix == ".parquet":
        return pd.read_parquet(path)
    if suffix in (".jsonl", ".json"):
        return pd.read_json(path, lines=suffix == ".jsonl", dtype=False)
    raise ValueError(f"catalogue {path}: expected an image folder or a .csv/.tsv/.parquet/.jsonl file")


def _load_table(path: Path, image_column: str) -> Dataset:
    """A catalogue table whose `image_column` holds image paths relative to the table's folder."""
    frame = read_table(path)
    if image_column not in frame.columns:
        raise ValueError(f"catalogue {path} has no image column {image_column!r}; its columns: {list(frame.columns)}")
    images = [_as_label(value) for value in frame[image_column]]
    if None in images:
        raise ValueError(f"catalogue {path}: row {images.index(None)} has no image path in {image_column!r}")
    images = [str((path.parent / image).resolve()) for image in images]
    missing = [image for image in images if not Path(image).is_file()]
    if missing:
        raise FileNotFoundError(f"catalogue {path}: {len(missing)} image files not found, e.g. {missing[:3]}")
    columns = {name: [_as_label(value) for value in frame[name]] for name in frame.columns if name != image_column}
    features = Features({"image": Image(), **{column: _STRING for column in columns}})
    return Dataset.from_dict({"image": images, **columns}, features=features)


def load_catalogue(
    path: str | Path,
    attributes: Sequence[str] | None = None,
    image_column: str = "image",
    name_column: str | None = None,
    split: str | None = None,
) -> Dataset:
    """A user's own catalogue, to fine-tune on or to evaluate (the layout: README, "Your own catalogue").

    `path` is either an image folder (`load_dataset("imagefolder")` layout: a metadata.csv/jsonl with a `file_name`
    column and label columns, or one sub-folder per class, which becomes the `articleType` attribute unless
    `attributes` names another) or a CSV/TSV/parquet/JSONL file whose `image_column` holds image paths relative to
    the file. `attributes` are the label columns (None: every column but the image, the name and `split`).
    `name_column` holds product names (renamed to `productDisplayName`, the text detail tags are mined from).
    `split`: None or "all" for every row; else one split (`select_split`): the rows of the catalogue's own `split`
    column with that value, or without one "train" or "validation" of the hash hold-out (`HOLDOUT_DEFINITION`).
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"catalogue {path} not found: pass an image folder or a CSV/parquet/JSONL file")
    if path.is_dir():
        dataset, attributes = _load_image_folder(path, attributes)
    else:
        dataset = _load_table(path, image_column)
    if name_column is not None and name_column != NAME_COLUMN:
        _require_columns(dataset, [name_column], f"catalogue {path}")
        dataset = dataset.rename_column(name_column, NAME_COLUMN)
    if attributes is None:
        attributes = [column for column in dataset.column_names if column not in _RESERVED_COLUMNS]
    _require_columns(dataset, attributes, f"catalogue {path}")
    if split is not None:
        dataset = select_split(dataset, split, f"catalogue {path}")
    names = [NAME_COLUMN] if NAME_COLUMN in dataset.column_names else []
    return add_tag_sequences(_set_string_columns(dataset, [*attributes, *names]), attributes)
