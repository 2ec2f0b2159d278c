"""What a correction says, read from what its sender sent: free tags, JSON objects, and per attribute whether the
person changed, confirmed or left untouched what the form showed. The store checks labels against the vocabulary."""

import json

from fashion_hf import feedback
from fashion_hf.feedback import (
    CHANGED, CONFIRMED, UNTOUCHED, DuplicateAttributeError, FeedbackValidationError, unique_keys,
)  # fmt: skip

from .errors import FeedbackError, shown

MAX_TAG_CHARS = 50
MAX_TAGS = 20
MAX_TAGS_TEXT_CHARS = MAX_TAGS * (MAX_TAG_CHARS + 2)  # the length of the page's tags box
MAX_ATTRIBUTES_JSON_CHARS = 4096
JSON_EXAMPLE = '{"articleType": "Tshirts"}'
STATUS_EXAMPLE = '{"articleType": "changed"}'


def parse_tags(values) -> list[str]:
    """Free and detail tags from a comma-separated string or a list: short phrases, no markup. The check is the
    store's own (`fashion_hf.feedback.parse_tags`), within the app's limits."""
    try:
        return feedback.parse_tags(values, max_len=MAX_TAG_CHARS, max_tags=MAX_TAGS, phrases_only=True)
    except FeedbackValidationError as error:
        raise FeedbackError(shown(error, 300)) from None


def parse_attributes(text) -> dict:
    """The /feedback endpoint's corrected attributes: a JSON object as text (the store checks the vocabulary)."""
    return json_object(text, "corrected attributes", JSON_EXAMPLE) or {}


def parse_attribute_status(text) -> dict | None:
    """The /feedback endpoint's attribute statuses: a JSON object as text, or None when empty (all confirmed)."""
    return json_object(text, "attribute status", STATUS_EXAMPLE)


def json_object(text, what: str, example: str) -> dict | None:
    """A JSON object sent as text to an endpoint, or None for empty text; anything else is a clear user error."""
    if text is None or (isinstance(text, str) and not text.strip()):
        return None
    expected = f"{what} must be a JSON object like {example}"
    if not isinstance(text, str):
        raise FeedbackError(f"{expected}, sent as text.")
    if len(text) > MAX_ATTRIBUTES_JSON_CHARS:
        raise FeedbackError(f"{what}: {len(text)} characters is over the limit of {MAX_ATTRIBUTES_JSON_CHARS}.")
    try:
        value = json.loads(text, object_pairs_hook=unique_keys)
    except DuplicateAttributeError as error:
        raise FeedbackError(f"{what}: {shown(error.key)} is named twice; give each attribute once.") from None
    except ValueError as error:
        raise FeedbackError(f"{expected} ({shown(error)}).") from None
    if not isinstance(value, dict):
        raise FeedbackError(f"{expected}, not {type(value).__name__}.")
    return value


def attribute_statuses(labels: dict, shown_labels: dict, confirmed) -> dict:
    """What the user did with each labelled attribute of the prefilled form: a value other than the one shown is
    "changed", one shown and ticked as right "confirmed", one left as shown "untouched" (the model's guess)."""
    return {
        name: CHANGED if label != shown_labels.get(name) else CONFIRMED if name in confirmed else UNTOUCHED
        for name, label in labels.items()
    }
