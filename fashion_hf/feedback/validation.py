"""Checks of a submission's text before anything is stored: every message names the field and what would be valid.

Text is kept as data: parsed with `json.loads` at most, never evaluated.
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from typing import Any, Mapping, Sequence

from .schema import ATTRIBUTE_STATUSES, CONFIRMED

# A tag typed in the app is a short phrase: letters, digits, spaces and a little punctuation ("slim fit", "t-shirt",
# "3/4 sleeve"), never markup (`parse_tags(..., phrases_only=True)`).
PHRASE = re.compile(r"[^\W_][\w \-'&/.+]*")
PHRASE_CHARACTERS = "letters, digits, spaces and - ' & / . +"


class FeedbackValidationError(ValueError):
    """A submission was rejected before anything was stored; the message names the input and what is valid."""


class DuplicateAttributeError(FeedbackValidationError):
    """A JSON object of corrected attributes names one attribute twice (`key`)."""

    def __init__(self, key: str):
        super().__init__(f"corrected_attributes names the attribute {_show(key)} twice; give each attribute once.")
        self.key = key


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """`json.loads(..., object_pairs_hook=unique_keys)`: a repeated key raises `DuplicateAttributeError` instead of
    silently keeping the last value."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise DuplicateAttributeError(key)
        out[key] = value
    return out


def _show(value: str, limit: int = 60) -> str:
    return repr(value if len(value) <= limit else value[:limit] + "...")


def clean_text(value: Any, what: str, max_len: int, *, allow_empty: bool = False) -> str:
    """`value` NFC-normalised and stripped: a string of at most `max_len` characters on one line."""
    if not isinstance(value, str):
        raise FeedbackValidationError(f"{what} must be a string, got {type(value).__name__}.")
    value = unicodedata.normalize("NFC", value).strip()
    if not value and not allow_empty:
        raise FeedbackValidationError(f"{what} must not be empty.")
    if len(value) > max_len:
        raise FeedbackValidationError(f"{what} is {len(value)} characters long; at most {max_len} are allowed.")
    for char in value:
        if unicodedata.category(char) in ("Cc", "Cs"):
            raise FeedbackValidationError(
                f"{what} contains a control character ({char!r}); use plain text on one line: {_show(value)}."
            )
    return value


def _attribute_object(value: Any, what: str, kind: str, example: str, max_chars: int) -> Mapping:
    """`value` as a mapping of attribute -> `kind`: a Mapping as it is, JSON text parsed (None and "" are empty)."""
    if value is None:
        value = {}
    elif isinstance(value, str):
        if len(value) > max_chars:
            raise FeedbackValidationError(f"{what} is too long to be a JSON object of attributes.")
        try:
            value = json.loads(value, object_pairs_hook=unique_keys) if value.strip() else {}
        except DuplicateAttributeError as exc:
            raise FeedbackValidationError(
                f"{what} names the attribute {_show(exc.key)} twice; give each attribute once."
            ) from None
        except ValueError as exc:
            raise FeedbackValidationError(
                f"{what} must be a JSON object like {example}; it could not be parsed ({exc})."
            ) from None
    if not isinstance(value, Mapping):
        raise FeedbackValidationError(
            f"{what} must be a dict of attribute -> {kind} (or a JSON object), got {type(value).__name__}."
        )
    return value


def parse_attributes(
    value: Any,
    *,
    max_len: int,
    max_attributes: int,
    allowed: Mapping[str, Sequence[str]] | None,
) -> dict[str, str]:
    """Attribute -> label; an attribute given no label is left out. With `allowed`, only its attributes and labels."""
    max_chars = max_attributes * (2 * max_len + 16) + 64
    value = _attribute_object(value, "corrected_attributes", "label", '{"gender": "Men"}', max_chars)
    out: dict[str, str] = {}
    for raw_key, raw_label in value.items():
        key = clean_text(raw_key, "corrected_attributes key", max_len)
        if key in out:
            raise FeedbackValidationError(f"corrected_attributes names the attribute {key!r} twice.")
        if raw_label is None or (isinstance(raw_label, str) and not raw_label.strip()):
            continue  # no correction given for this attribute
        out[key] = clean_text(raw_label, f"corrected_attributes[{key!r}]", max_len)
    if len(out) > max_attributes:
        raise FeedbackValidationError(f"corrected_attributes has {len(out)} attributes; at most {max_attributes}.")
    if allowed is not None:
        unknown = [key for key in out if key not in allowed]
        if unknown:
            raise FeedbackValidationError(
                f"corrected_attributes has unknown attribute(s) {unknown}; valid attributes: {list(allowed)}."
            )
        for key, label in out.items():
            labels = list(allowed[key])
            if label not in labels:
                shown = labels if len(labels) <= 30 else labels[:30] + ["..."]
                raise FeedbackValidationError(
                    f"corrected_attributes[{key!r}] = {_show(label)} is not a known {key} label; valid labels: {shown}."
                )
    return out


def parse_attribute_status(value: Any, attributes: Mapping[str, str], *, max_len: int) -> dict[str, str]:
    """One status per corrected attribute, in their order; None or "" means every attribute is "confirmed" (what
    callers that predate the field send: the labels they give are theirs)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return {key: CONFIRMED for key in attributes}
    max_chars = len(attributes) * (max_len + 16) + 64
    value = _attribute_object(value, "attribute_status", "status", '{"gender": "changed"}', max_chars)
    out: dict[str, str] = {}
    for raw_key, status in value.items():
        key = clean_text(raw_key, "attribute_status key", max_len)
        if key not in attributes:
            raise FeedbackValidationError(
                f"attribute_status names {_show(key)}, which corrected_attributes does not label; "
                f"give a status for each of {list(attributes)} only."
            )
        if status not in ATTRIBUTE_STATUSES:
            shown = _show(status) if isinstance(status, str) else type(status).__name__
            raise FeedbackValidationError(
                f"attribute_status[{key!r}] = {shown} is not a status; valid statuses: {list(ATTRIBUTE_STATUSES)}."
            )
        out[key] = status
    missing = [key for key in attributes if key not in out]
    if missing:
        raise FeedbackValidationError(
            f"attribute_status gives no status for {missing}; give one of {list(ATTRIBUTE_STATUSES)} for every "
            "attribute in corrected_attributes."
        )
    return {key: out[key] for key in attributes}


def parse_tags(value: Any, *, max_len: int, max_tags: int, phrases_only: bool = False) -> list[str]:
    """The one check of free tags: a list of strings or one comma-separated string -> the distinct non-empty tags,
    in their order, each NFC-normalised and stripped.

    At most `max_tags` tags of `max_len` characters, on one line each. `phrases_only` also refuses anything but
    short phrases (`PHRASE`: no markup), as the app asks of the tags people type; the store keeps any text as data.
    """
    if value is None:
        items: list[Any] = []
    elif isinstance(value, str):
        max_chars = max_tags * (max_len + 2) + 64
        if len(value) > max_chars:
            raise FeedbackValidationError(
                f"corrected_tags is {len(value)} characters long, over the limit of {max_chars}; at most {max_tags} "
                f"tags of {max_len} characters each."
            )
        items = value.split(",")
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        raise FeedbackValidationError(
            f"corrected_tags must be a list of strings or a comma-separated string, got {type(value).__name__}."
        )
    tags: list[str] = []
    for position, item in enumerate(items):
        tag = clean_text(item, f"corrected_tags[{position}]", max_len, allow_empty=True)
        if tag and phrases_only and not PHRASE.fullmatch(tag):
            raise FeedbackValidationError(
                f"corrected_tags[{position}] = {_show(tag)} may only hold {PHRASE_CHARACTERS} (no markup)."
            )
        if tag and tag not in tags:
            tags.append(tag)
    if len(tags) > max_tags:
        raise FeedbackValidationError(f"corrected_tags has {len(tags)} tags; at most {max_tags} are allowed.")
    return tags


def _jsonable(value: Any, depth: int = 0) -> Any:
    """Plain-JSON copy of a prediction: numpy scalars/arrays become Python values, NaN/inf become None."""
    if depth > 16:
        raise FeedbackValidationError("predicted is nested too deeply.")
    if value is None or isinstance(value, (bool, str, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(key): _jsonable(item, depth + 1) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item, depth + 1) for item in value]
    if hasattr(value, "tolist"):  # numpy / torch scalars and arrays
        return _jsonable(value.tolist(), depth + 1)
    raise FeedbackValidationError(f"predicted contains a {type(value).__name__}, which is not JSON data.")


def parse_predicted(value: Any, max_chars: int) -> str:
    """The prediction shown, as compact JSON text of at most `max_chars` characters."""
    if value is None:
        value = {}
    if isinstance(value, str):
        if len(value) > max_chars:
            raise FeedbackValidationError(f"predicted is {len(value)} characters long; at most {max_chars}.")
        try:
            value = json.loads(value) if value.strip() else {}
        except ValueError as exc:
            raise FeedbackValidationError(f"predicted must be a JSON object; it could not be parsed ({exc}).") from None
    if not isinstance(value, Mapping):
        raise FeedbackValidationError(
            'predicted must be a dict like {"attributes": {...}, "tags": [...]} (or its JSON), '
            f"got {type(value).__name__}."
        )
    text = json.dumps(_jsonable(value), ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    if len(text) > max_chars:
        raise FeedbackValidationError(f"predicted is {len(text)} characters as JSON; at most {max_chars}.")
    return text
