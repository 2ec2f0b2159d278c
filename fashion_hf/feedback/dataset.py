"""The feedback store read back as training examples: the records `store.py` writes (by the rules of `schema.py`),
as a `datasets.Dataset` in the shape of every loader of `fashion_hf.data`, with what a run's report says of them.

Imported on its own (`from fashion_hf.feedback import dataset`), not by the package: it builds on the loaders of
`fashion_hf.data`, which the store needs none of.
"""

import atexit
import hashlib
import json
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

from datasets import Dataset, Value, load_dataset

from ..configuration_fashion_tagger import DETAIL_GROUP, tag_key
from ..data import (
    BRAND, PRODUCT_ATTRIBUTES, TAGS_COLUMN, TAGS_KNOWN_COLUMN, _STRING, _TAG_LIST, _as_label, load_from_hub,
    local_path, _read_columns, _replace_columns, _require_columns, add_tag_sequences,
)  # fmt: skip
from ..tag_mining import canonical_detail_tag
from .schema import ANONYMOUS, ATTRIBUTE_STATUSES, CHANGED, CONFIRMED, DATA_DIR, METADATA_NAME, record_attribute_status


def _feedback_labels(record_id, attributes_json, typed_tags, statuses=None) -> tuple[dict[str, str], list[str]]:
    """The labels and canonical detail tags of one feedback record. With `statuses` (`_feedback_statuses`), only
    the attributes the contributor changed or confirmed are labels: an untouched one is the model's prefilled guess."""
    try:
        corrected = json.loads(attributes_json) if attributes_json else {}
    except json.JSONDecodeError as err:
        raise ValueError(f"feedback record {record_id}: corrected_attributes is not JSON ({err})") from err
    if not isinstance(corrected, dict):
        raise ValueError(f"feedback record {record_id}: corrected_attributes must be a JSON object, got {corrected!r}")
    labels = {
        attribute: label
        for attribute, value in corrected.items()
        if (statuses is None or statuses.get(attribute) in (CHANGED, CONFIRMED))
        and (label := _as_label(value)) is not None
    }
    tags = [canonical_detail_tag(tag) for tag in typed_tags or () if tag and tag.strip()]
    return labels, tags


def _feedback_statuses(record_id, attributes_json, status_json) -> dict[str, str]:
    """Attribute -> "changed" | "confirmed" | "untouched" of one record; all "confirmed" in records older than the
    field (`feedback.schema.record_attribute_status`)."""
    try:
        return record_attribute_status(attributes_json, status_json)
    except ValueError as err:
        raise ValueError(f"feedback record {record_id}: {err}") from err


def _load_feedback_records(source: str | Path) -> Dataset:
    """Every record of a feedback store: a local folder (images + JSONL metadata) or a Hub dataset id."""
    path = local_path(source)
    if path is None:
        return load_from_hub(str(source), "train", "Pass the local feedback folder instead.")
    if not path.is_dir():
        raise FileNotFoundError(f"feedback store {path} is not a folder")
    # The store grows and records can be withdrawn between runs: never serve a cached copy of an older state. A
    # cache of this load's own, not a forced rebuild of the shared one: two runs reading one store at once (the
    # members of a sweep) would delete each other's files mid-build.
    cache_dir = tempfile.mkdtemp(prefix="fashion-hf-feedback-")
    atexit.register(shutil.rmtree, cache_dir, ignore_errors=True)
    return load_dataset(str(path), split="train", cache_dir=cache_dir, verification_mode="no_checks")


def load_feedback(source: str | Path, attributes: Sequence[str] | None = None) -> Dataset:
    """Training examples from the corrections users sent through the app (the feedback store folder or Hub dataset).

    Records without consent are skipped, and so are records that correct nothing and exact duplicates (the same
    image with the same corrections: the store keeps each person's submission, so that each can withdraw their own;
    the model learns each correction once). Attributes the contributor changed or confirmed become labels; those left
    untouched (the form's prefilled prediction: `attribute_status`) and those a record does not give stay None, which
    the loss masks. A record left with no label and no tag is skipped. Corrected tags become detail tags.
    `attributes` fixes the attribute columns (None: every labelled attribute, product attributes first in head order).

    `tags_known` (bool) is True where the record labels every one of those attributes: only then is its tag sequence
    whole; elsewhere the decoder must not learn the truncated sequence in `tags`.
    """
    records = _load_feedback_records(source)
    examples = _feedback_examples(records, source)
    if attributes is None:
        attributes = _head_order({attribute for labels, _, _ in examples.values() for attribute in labels})
    new_columns = {
        attribute: ([labels.get(attribute) for labels, _, _ in examples.values()], _STRING) for attribute in attributes
    }
    details = [[tag_key(DETAIL_GROUP, tag) for tag in tags] for _, tags, _ in examples.values()]
    new_columns[TAGS_COLUMN] = (details, _TAG_LIST)
    known = [all(attribute in labels for attribute in attributes) for labels, _, _ in examples.values()]
    new_columns[TAGS_KNOWN_COLUMN] = (known, Value("bool"))
    kept = ["image", *(["id"] if "id" in records.column_names else [])]
    dataset = records.select(list(examples)).select_columns(kept)
    return add_tag_sequences(_replace_columns(dataset, new_columns), attributes)


def _head_order(attributes: Iterable[str]) -> list[str]:
    """Product attributes in head order, then the brand, then any other attribute alphabetically."""
    seen, head_order = set(attributes), [*PRODUCT_ATTRIBUTES, BRAND]
    return [attribute for attribute in head_order if attribute in seen] + sorted(seen.difference(head_order))


def _feedback_examples(records: Dataset, source) -> dict[int, tuple[dict[str, str], list[str], dict[str, str]]]:
    """Row -> (labels, detail tags, attribute statuses) of each record training learns from (`load_feedback`)."""
    label_columns = ["consent", "corrected_attributes", "corrected_tags"]
    _require_columns(records, ["image", *label_columns], f"the feedback store {source}")
    optional = [column for column in ("id", "image_sha256", "attribute_status") if column in records.column_names]
    columns = _read_columns(records, [*label_columns, *optional])
    examples = {}
    stored = set()  # (image hash, labels, tags) of the examples kept
    for row, consent in enumerate(columns["consent"]):
        if consent is not True:
            continue
        record_id = columns["id"][row] if "id" in columns else row
        attributes_json = columns["corrected_attributes"][row]
        status_json = columns["attribute_status"][row] if "attribute_status" in columns else None
        statuses = _feedback_statuses(record_id, attributes_json, status_json)
        labels, tags = _feedback_labels(record_id, attributes_json, columns["corrected_tags"][row], statuses)
        if not labels and not tags:
            continue
        if "image_sha256" in columns:
            correction = (columns["image_sha256"][row], tuple(sorted(labels.items())), tuple(sorted(set(tags))))
            if correction in stored:
                continue
            stored.add(correction)
        examples[row] = labels, tags, statuses
    return examples


def feedback_summary(source: str | Path) -> dict:
    """What a feedback store gives training, for a run's report: the same records as `load_feedback`.

    Returns `{"records": n, "attributes": {attribute: {"changed": n, "confirmed": n, "untouched": n}},
    "revision": r}`: `records` counts the records used (consent, something labelled or tagged, exact duplicates
    once), `attributes` what their contributors did with each attribute (untouched ones are not trained on), and
    `revision` names the store state read: for a local folder the first 12 hex digits of a SHA-256 over its metadata
    files (sorted by path), equal for two runs on the same records; for a Hub dataset the commit it was loaded at
    (from the `datasets` cache, without asking the Hub), or None when that is unknown.
    """
    path = local_path(source)
    revision = _feedback_folder_revision(path) if path is not None and path.is_dir() else None
    records = _load_feedback_records(source)
    if path is None:
        revision = _hub_commit(records)
    examples = _feedback_examples(records, source)
    counts = {
        attribute: dict.fromkeys(ATTRIBUTE_STATUSES, 0)
        for attribute in _head_order(attribute for _, _, statuses in examples.values() for attribute in statuses)
    }
    for _, _, statuses in examples.values():
        for attribute, status in statuses.items():
            if status in ATTRIBUTE_STATUSES:
                counts[attribute][status] += 1
    return {"records": len(examples), "attributes": counts, "revision": revision}


def _feedback_folder_revision(folder: Path) -> str:
    digest = hashlib.sha256()
    for meta in sorted(folder.glob(f"{DATA_DIR}/*/{METADATA_NAME}")):
        content = meta.read_bytes()
        digest.update(f"{meta.relative_to(folder).as_posix()}\0{len(content)}\0".encode())
        digest.update(content)
    return digest.hexdigest()[:12]


def _hub_commit(dataset: Dataset) -> str | None:
    """The Hub commit a dataset was loaded at: `datasets` caches a Hub dataset in a folder named after it."""
    for cache in dataset.cache_files:
        commit = Path(cache["filename"]).parent.name
        if re.fullmatch(r"[0-9a-f]{40}", commit):
            return commit
    return None


def feedback_tag_contributors(source: str | Path) -> Counter:
    """How many people typed each detail tag into the feedback tab: canonical tag -> distinct contributors.

    Only records with consent count. A contributor is a signed-in annotator (their name: one person typing "tank"
    on ten photos counts once). Anonymous records cannot be told apart by person, so each anonymous record counts
    by its photo (`image_sha256`): the same photo tagged "tank" twice without signing in counts once, three
    different photos count three. The training script adds a tag with at least `feedback_tag_min_contributors`
    (FashionTaggerConfig, default 3) to the tag vocabulary, however rare it is among the catalogue's product names.
    """
    records = _load_feedback_records(source)
    _require_columns(records, ["consent", "corrected_tags"], f"the feedback store {source}")
    optional = [column for column in ("id", "annotator", "image_sha256") if column in records.column_names]
    columns = _read_columns(records, ["consent", "corrected_tags", *optional])
    people: dict[str, set] = {}
    for row, consent in enumerate(columns["consent"]):
        if consent is not True:
            continue
        record_id = columns["id"][row] if "id" in columns else row
        _, tags = _feedback_labels(record_id, None, columns["corrected_tags"][row])
        annotator = (columns["annotator"][row] if "annotator" in columns else None) or ANONYMOUS
        if annotator != ANONYMOUS:
            person = ("annotator", annotator)
        else:
            photo = columns["image_sha256"][row] if "image_sha256" in columns else None
            person = ("anonymous photo", photo or f"record {record_id}")
        for tag in tags:
            people.setdefault(tag, set()).add(person)
    return Counter({tag: len(contributors) for tag, contributors in people.items()})
