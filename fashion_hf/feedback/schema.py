"""What a feedback record is: its fields, the files that hold it, its id and file names, and the dataset card.

The store writes records by these rules and `dataset.load_feedback` reads them by the same ones.
"""

from __future__ import annotations

import json
import re
import socket
import uuid
from datetime import datetime, timezone

DATA_DIR = "data"
METADATA_NAME = "metadata.jsonl"
STATE_DIR = ".feedback"
IMAGE_SUFFIX = ".jpg"

# Column order of the dataset; `image` is built by `imagefolder` from the record's `file_name`.
FEATURE_SPEC: tuple[tuple[str, str], ...] = (
    ("image", "image"),
    ("id", "string"),
    ("timestamp", "string"),
    ("image_sha256", "string"),
    ("model_id", "string"),
    ("model_revision", "string"),
    ("predicted", "string"),
    ("corrected_attributes", "string"),
    ("attribute_status", "string"),
    ("corrected_tags", "list[string]"),
    ("annotator", "string"),
    ("consent", "bool"),
)
RECORD_FIELDS = tuple(name for name, _ in FEATURE_SPEC if name != "image")
# What the contributor did with each attribute of the form, which came prefilled with the prediction: only "changed"
# and "confirmed" values are labels; "untouched" ones are the model's own guesses, kept for the record only.
CHANGED, CONFIRMED, UNTOUCHED = "changed", "confirmed", "untouched"
ATTRIBUTE_STATUSES = (CHANGED, CONFIRMED, UNTOUCHED)
ANONYMOUS = "anonymous"  # the annotator of a record sent without signing in

RECORD_ID = re.compile(r"[0-9a-f]{32}")  # uuid4().hex: the record's key, also the one that withdraws it
FILE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*")  # a plain file name inside the shard folder


def new_record_id() -> str:
    return uuid.uuid4().hex


def is_record_id(value: object) -> bool:
    """Whether `value` is a record id: 32 lowercase hex characters (what `add` returns and `delete` takes)."""
    return isinstance(value, str) and RECORD_ID.fullmatch(value) is not None


def is_file_name(value: object) -> bool:
    """Whether `value` names a file inside its shard folder, never one elsewhere (no `/`, no leading `.`)."""
    return isinstance(value, str) and FILE_NAME.fullmatch(value) is not None


def image_file_name(record_id: str) -> str:
    return record_id + IMAGE_SUFFIX


def new_shard_name(pid: int) -> str:
    """`<host>-<pid>-<random>`: each writer process appends to shards of its own, on every machine."""
    host = re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname() or "host")[:40] or "host"
    return f"{host}-{pid}-{uuid.uuid4().hex[:8]}"


def utc_timestamp() -> str:
    """Now, as a record's `timestamp` says it: ISO 8601 in UTC, to the millisecond."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def record_attribute_status(corrected_attributes: str | None, attribute_status: str | None) -> dict[str, str]:
    """The status of each attribute of a stored record (both fields as stored: JSON text). A record written before
    the field existed has none: its attributes were all the contributor's own labels, so they are "confirmed".

    Raises ValueError naming the field that is not a JSON object."""
    legacy = attribute_status is None
    name = "corrected_attributes" if legacy else "attribute_status"
    text = (corrected_attributes or "{}") if legacy else attribute_status
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"{name} is not JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a JSON object, got {text!r}")
    return dict.fromkeys(value, CONFIRMED) if legacy else value


def dataset_features():  # noqa: ANN201 (datasets.Features; imported lazily)
    """The dataset's `datasets.Features` (for `load_dataset("imagefolder", data_dir=..., features=...)`)."""
    import datasets

    columns = {}
    for name, dtype in FEATURE_SPEC:
        if dtype == "image":
            columns[name] = datasets.Image()
        elif dtype == "list[string]":
            columns[name] = datasets.List(datasets.Value("string"))
        else:
            columns[name] = datasets.Value(dtype)
    return datasets.Features(columns)


def features_yaml() -> str:
    """The `features:` list of the dataset card: a card without today's is rewritten (`dataset_card`)."""
    lines = []
    for name, dtype in FEATURE_SPEC:
        lines.append(f"  - name: {name}")
        lines.append("    list: string" if dtype == "list[string]" else f"    dtype: {dtype}")
    return "\n".join(lines)


def dataset_card() -> str:
    """README.md written into a new store folder: makes `load_dataset(folder)` read every shard with fixed types."""
    return f"""---
configs:
- config_name: default
  data_files:
  - split: train
    path: {DATA_DIR}/**
  features:
{features_yaml()}
pretty_name: Fashion tag corrections
task_categories:
- image-classification
tags:
- fashion
- human-feedback
---
# Fashion tag corrections

Corrections of predicted fashion product tags, made by users of the fashion-hf app who consented to share them.
One row per submission: the image (re-encoded JPEG, EXIF and GPS removed), the prediction shown (`predicted`, JSON),
the attributes of the form (`corrected_attributes`, JSON object attribute -> label), what the contributor did with
each of them (`attribute_status`, see below), the free tags typed by the user (`corrected_tags`), the model id and
revision, the annotator and the consent flag.

`attribute_status` is a JSON object with one entry per attribute of `corrected_attributes`: `"changed"` (the
contributor picked another label than the prediction), `"confirmed"` (the contributor checked the predicted label and
marked it right) or `"untouched"` (the form came prefilled with the prediction and the contributor left it as it was:
the label is the model's own guess, not a human label). Train only on changed and confirmed labels. Records sent
through the API without statuses count as confirmed; records stored before the field existed have none (null) and
count as confirmed too.

Files: `{DATA_DIR}/<shard>/{METADATA_NAME}` (one JSON record per line, `file_name` -> the image in the same folder).
Load with `datasets.load_dataset("<this repo or folder>", split="train")`. Withdrawn submissions are removed from
both the records and the images.
"""
