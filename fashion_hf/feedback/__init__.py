"""Feedback store: the tag corrections users make in the app, kept as a loadable and Hub-synced dataset.

`schema` says what a record is, `validation` checks a submission, `files` writes durably, `index` reads the records
back, `store` keeps them in a local folder (layout and durability: its docstring) and `hub` pushes that folder to a
Hub dataset. Each imports only those before it. `dataset` reads the store back as training examples with the data
loaders of `fashion_hf.data`; the store needs none of them, so this package does not import it: `from
fashion_hf.feedback import dataset`.
"""

from .hub import FeedbackCommitScheduler, FeedbackStore, HubPushState, PushSnapshot, Redactor, state_file_name
from .schema import (
    ANONYMOUS, ATTRIBUTE_STATUSES, CHANGED, CONFIRMED, DATA_DIR, FEATURE_SPEC, IMAGE_SUFFIX, METADATA_NAME,
    RECORD_FIELDS, STATE_DIR, UNTOUCHED, dataset_card, is_record_id, record_attribute_status,
)  # fmt: skip
from .store import FeedbackStoreError, LocalFeedbackStore
from .validation import DuplicateAttributeError, FeedbackValidationError, parse_tags, unique_keys

__all__ = [
    "ANONYMOUS", "ATTRIBUTE_STATUSES", "CHANGED", "CONFIRMED", "DATA_DIR", "FEATURE_SPEC", "IMAGE_SUFFIX",
    "METADATA_NAME", "RECORD_FIELDS", "STATE_DIR", "UNTOUCHED", "DuplicateAttributeError", "FeedbackCommitScheduler",
    "FeedbackStore", "FeedbackStoreError", "FeedbackValidationError", "HubPushState", "LocalFeedbackStore",
    "PushSnapshot", "Redactor", "dataset_card", "is_record_id", "parse_tags", "record_attribute_status",
    "state_file_name", "unique_keys",
]  # fmt: skip
