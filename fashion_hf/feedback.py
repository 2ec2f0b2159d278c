"""Feedback store: the tag corrections users make in the app, kept as a loadable and Hub-synced dataset.

`FeedbackStore` appends one record per submission (schema: see the shared contract) to a local folder that is at
the same time a `datasets` dataset, `datasets.load_dataset(folder)` gives an `image` column plus every record
field, and, when a `repo_id` is given, a private Hub dataset kept up to date by a `huggingface_hub.CommitScheduler`.

On-disk layout (the folder, and the Hub repo it is pushed to)::

    <folder>/
      README.md                        dataset card; its `configs:` block names the data files and the features
      data/<shard>/metadata.jsonl      one JSON record per line, append-only; `file_name` -> the image
      data/<shard>/<id>.jpg            the image: upright sRGB pixels re-encoded as JPEG (no EXIF/GPS/ICC/comments)
      .feedback/                       local bookkeeping: never uploaded, ignored by `datasets`
        lock                           `fcntl.flock` lock shared by every thread and process using the folder
        epoch                          bumped whenever a metadata file is rewritten (delete, repair)
        pending-deletes.jsonl          repo paths to remove from the Hub at the next push (withdrawals)
        submissions.jsonl              hash of (submitter, image, corrections) -> record id: retries get their id
        hub-<key>.json                 what was pushed to a repo: path -> [size, mtime_ns]
        tmp/                           images being written (temp file + fsync + os.replace)
        quarantine/                    torn or corrupt lines taken out by repair

`<shard>` is `<host>-<pid>-<random>`: every writer process appends to its own shard (a new one every
`max_records_per_shard` records), so processes, machines and Space restarts never write, or upload, the same file.
Each shard holds one `metadata.jsonl` next to its images, the layout `imagefolder` reads; the README pins the
features so that a shard whose records all have empty `corrected_tags` cannot change the column types.

Durability: the image is written to a temp file and fsynced outside the lock; then, under the inter-process lock,
it is moved into place (`os.replace`) and the record line is appended with one `os.write` + fsync. A record is
acknowledged (its id returned) only after that; a failed or short write is truncated away. Readers skip an
unterminated last line; writers (and opening the store) repair it.

`image_sha256` is the SHA-256 of the uploaded file's bytes for bytes and path inputs; for a PIL image or an array
it is the SHA-256 of `b"RGB <w>x<h>\\n"` followed by the upright RGB pixel bytes. Every submission is its own record
with its own id: a record id is a withdrawal key, so identical corrections from two people are never merged (the
training loader drops exact duplicates). Only the same submitter's retry (`add(submitter=...)`) gets its earlier id
back, through `.feedback/submissions.jsonl` (submission key -> id).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import json
import logging
import math
import os
import re
import socket
import threading
import time
import unicodedata
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from PIL import Image, ImageCms, ImageOps

from fashion_hf.feedback_hub import FeedbackCommitScheduler, state_file_name
from fashion_hf.image_decoding import InvalidImageError, check_image_size, decode_image

logger = logging.getLogger(__name__)

__all__ = ["FeedbackStore", "FeedbackStoreError", "FeedbackValidationError"]

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

_ID_RE = re.compile(r"^[0-9a-f]{32}$")
_FILE_NAME_RE = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]*$")  # a plain file name inside the shard folder
_TOKEN_RE = re.compile(r"hf_[A-Za-z0-9]{8,}")
_BEARER_RE = re.compile(r"(?i)(bearer\s+)[^\s'\")]+")
_JPEG_QUALITY = 95
_STALE_TMP_SECONDS = 3600
ANONYMOUS = "anonymous"  # the annotator of a record sent without signing in


class FeedbackStoreError(RuntimeError):
    """The store could not save or change data (read-only folder, disk full, ...); nothing half-written is left."""


class FeedbackValidationError(ValueError):
    """A submission was rejected before anything was stored; the message names the input and what is valid."""


# --------------------------------------------------------------------------------------------------------------------
# Small file-system helpers
# --------------------------------------------------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:  # some file systems cannot fsync a directory
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _write_temp(tmp_dir: Path, data: bytes, prefix: str) -> Path:
    """Write `data` to a new temp file in `tmp_dir` and fsync it; the caller moves it into place."""
    path = tmp_dir / f"{prefix}-{uuid.uuid4().hex}.tmp"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            if written <= 0:
                raise OSError(errno.ENOSPC, "short write")
            view = view[written:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    os.close(fd)
    return path


def _atomic_write(path: Path, data: bytes, tmp_dir: Path) -> None:
    tmp = _write_temp(tmp_dir, data, path.name)
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


class _AppendFailed(OSError):
    """An append failed; `rolled_back` says whether the file was truncated back to its previous size."""

    def __init__(self, cause: BaseException, rolled_back: bool):
        if isinstance(cause, OSError) and cause.errno is not None:
            super().__init__(cause.errno, cause.strerror)
        else:
            super().__init__(errno.EIO, str(cause))
        self.cause = cause
        self.rolled_back = rolled_back


def _append_line(path: Path, line: bytes) -> int:
    """Append one complete line with a single `os.write` + fsync; return its byte offset.

    Call under the exclusive lock. On any failure the file is truncated back to its previous size, so no partial
    line is left behind (`_AppendFailed.rolled_back` says whether that worked).
    """
    created = not path.exists()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    start = 0
    try:
        start = os.fstat(fd).st_size
        written = os.write(fd, line)
        if written != len(line):
            raise OSError(errno.ENOSPC, f"short write ({written} of {len(line)} bytes)")
        os.fsync(fd)
    except Exception as exc:
        rolled_back = True
        try:
            os.ftruncate(fd, start)
            os.fsync(fd)
        except OSError:
            rolled_back = False
        os.close(fd)
        if rolled_back and created and start == 0:
            with contextlib.suppress(OSError):
                os.unlink(path)
        raise _AppendFailed(exc, rolled_back) from exc
    os.close(fd)
    if created:
        _fsync_dir(path.parent)
    return start


def _read_json_lines(path: Path) -> list[dict]:
    """Complete, parsable lines of a small JSONL bookkeeping file (a torn or corrupt line is skipped)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return []
    out = []
    for line in raw.split(b"\n")[:-1]:
        with contextlib.suppress(ValueError):
            item = json.loads(line)
            if isinstance(item, dict):
                out.append(item)
    return out


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _safe_host() -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname() or "host")[:40] or "host"


# --------------------------------------------------------------------------------------------------------------------
# Validation of the submitted data (text is kept as data: parsed with json.loads at most, never evaluated)
# --------------------------------------------------------------------------------------------------------------------


def _show(value: str, limit: int = 60) -> str:
    return repr(value if len(value) <= limit else value[:limit] + "...")


def _clean_text(value: Any, what: str, max_len: int, *, allow_empty: bool = False) -> str:
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


def _parse_attributes(
    value: Any,
    *,
    max_len: int,
    max_attributes: int,
    allowed: Mapping[str, Sequence[str]] | None,
) -> dict[str, str]:
    max_chars = max_attributes * (2 * max_len + 16) + 64
    value = _attribute_object(value, "corrected_attributes", "label", '{"gender": "Men"}', max_chars)
    out: dict[str, str] = {}
    for raw_key, raw_label in value.items():
        key = _clean_text(raw_key, "corrected_attributes key", max_len)
        if key in out:
            raise FeedbackValidationError(f"corrected_attributes names the attribute {key!r} twice.")
        if raw_label is None or (isinstance(raw_label, str) and not raw_label.strip()):
            continue  # no correction given for this attribute
        out[key] = _clean_text(raw_label, f"corrected_attributes[{key!r}]", max_len)
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


def _parse_attribute_status(value: Any, attributes: Mapping[str, str], *, max_len: int) -> dict[str, str]:
    """One status per corrected attribute, in their order; None or "" means every attribute is "confirmed" (what
    callers that predate the field send: the labels they give are theirs)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return {key: CONFIRMED for key in attributes}
    max_chars = len(attributes) * (max_len + 16) + 64
    value = _attribute_object(value, "attribute_status", "status", '{"gender": "changed"}', max_chars)
    out: dict[str, str] = {}
    for raw_key, status in value.items():
        key = _clean_text(raw_key, "attribute_status key", max_len)
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


def _parse_tags(value: Any, *, max_len: int, max_tags: int) -> list[str]:
    if value is None:
        items: list[Any] = []
    elif isinstance(value, str):
        if len(value) > max_tags * (max_len + 2) + 64:
            raise FeedbackValidationError(
                f"corrected_tags is too long; at most {max_tags} tags of {max_len} characters each."
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
        tag = _clean_text(item, f"corrected_tags[{position}]", max_len, allow_empty=True)
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


def _parse_predicted(value: Any, max_chars: int) -> str:
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


def _submission_key(
    submitter: str,
    image_sha256: str,
    attributes: Mapping[str, str],
    tags: Sequence[str],
    statuses: Mapping[str, str],
) -> str:
    """What makes a repeated `add` the same submission: the same submitter sending the same image and corrections
    (labels, their statuses and tags).

    Only the submitter's own retry maps to its record: two submitters sending identical corrections get two records
    (and two ids), so that no one is ever handed, and can withdraw, another's record."""
    corrections = [sorted(attributes.items()), sorted(tags), sorted(statuses.items())]
    canonical = json.dumps([submitter, image_sha256, *corrections], ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------------------------------


def _check_pixels(size: tuple[int, int], max_pixels: int) -> None:
    """The decoder's size check (pixel limit, aspect ratio), as the store's validation error."""
    try:
        check_image_size(*size, "image", max_pixels)
    except InvalidImageError as exc:
        raise FeedbackValidationError(f"{exc}.") from None


def _read_image_input(image: Any, max_bytes: int, max_pixels: int) -> tuple[Image.Image, str | None]:
    """Return the decoded image and, for bytes/path inputs, the SHA-256 of the original bytes."""
    if isinstance(image, Image.Image):
        _check_pixels(image.size, max_pixels)
        return image, None
    if hasattr(image, "__array_interface__") and not isinstance(image, (bytes, bytearray, memoryview)):
        shape = tuple(image.__array_interface__["shape"])
        if len(shape) >= 2:
            _check_pixels((shape[1], shape[0]), max_pixels)
        try:
            pil = Image.fromarray(image)
        except (TypeError, ValueError) as exc:
            raise FeedbackValidationError(f"image array cannot be read as an image ({exc}).") from None
        _check_pixels(pil.size, max_pixels)
        return pil, None
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
    elif isinstance(image, (str, os.PathLike)):
        path = Path(image)
        try:
            if not path.is_file():
                raise FeedbackValidationError(f"image path {_show(str(path))} is not an existing file.")
            size = path.stat().st_size
            if size > max_bytes:
                raise FeedbackValidationError(f"image file is {size} bytes; at most {max_bytes} are allowed.")
            data = path.read_bytes()
        except OSError as exc:
            raise FeedbackValidationError(f"image file {_show(str(path))} cannot be read ({exc.strerror}).") from None
    else:
        raise FeedbackValidationError(
            f"image must be a PIL image, a numpy array, encoded bytes or a file path, got {type(image).__name__}."
        )
    if not data:
        raise FeedbackValidationError("image is empty (0 bytes).")
    if len(data) > max_bytes:
        raise FeedbackValidationError(f"image is {len(data)} bytes; at most {max_bytes} are allowed.")
    # The one safe decoder: accepted formats only, sizes checked before decoding. A path is named by its file name
    # only: the app passes the server's copy of an upload, whose folders must not reach the user.
    name = f"image {Path(image).name!r}" if isinstance(image, (str, os.PathLike)) else "image"
    try:
        pil = decode_image(data, name, max_pixels)
    except InvalidImageError as exc:
        raise FeedbackValidationError(f"{exc}.") from None
    return pil, hashlib.sha256(data).hexdigest()


def _to_srgb(image: Image.Image, icc_profile: bytes | None) -> Image.Image:
    """Convert pixels from their embedded colour profile to sRGB (the profile itself is not kept)."""
    if not icc_profile or image.mode not in ("RGB", "CMYK", "L"):
        return image
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(icc_profile))
        return ImageCms.profileToProfile(image, source, ImageCms.createProfile("sRGB"), outputMode="RGB")
    except (ImageCms.PyCMSError, OSError, ValueError):
        return image  # unreadable profile: keep the raw values


def _upright_rgb(image: Image.Image) -> Image.Image:
    """A fresh sRGB image built from the upright pixel data: no EXIF, GPS, ICC profile, comments or other info."""
    try:
        image.load()
        icc_profile = image.info.get("icc_profile")
        image = _to_srgb(ImageOps.exif_transpose(image), icc_profile)
        if image.mode == "P":
            image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
            rgba = image.convert("RGBA")
            image = Image.new("RGB", rgba.size, (255, 255, 255))
            image.paste(rgba, mask=rgba.getchannel("A"))
        elif image.mode.startswith("I;16"):
            image = image.convert("I").point(lambda v: v / 256).convert("RGB")
        elif image.mode != "RGB":
            image = image.convert("RGB")
        return Image.frombytes("RGB", image.size, image.tobytes())
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise FeedbackValidationError(f"image could not be decoded ({exc}).") from None


def _pixel_sha256(rgb: Image.Image) -> str:
    digest = hashlib.sha256(f"RGB {rgb.width}x{rgb.height}\n".encode("ascii"))
    digest.update(rgb.tobytes())
    return digest.hexdigest()


def _encode_jpeg(rgb: Image.Image) -> bytes:
    buffer = io.BytesIO()
    rgb.save(buffer, format="JPEG", quality=_JPEG_QUALITY)
    return buffer.getvalue()


# --------------------------------------------------------------------------------------------------------------------
# The dataset card
# --------------------------------------------------------------------------------------------------------------------


def _features_yaml() -> str:
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
{_features_yaml()}
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


# --------------------------------------------------------------------------------------------------------------------
# Hub sync state (the scheduler that pushes is in feedback_hub.py)
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class HubPushState:
    """How the Hub pushes are going, for `FeedbackStore.status()`; written by the scheduler."""

    last_push_time: str | None = None
    last_check_time: str | None = None
    last_error: str | None = None
    last_error_time: str | None = None
    consecutive_failures: int = 0
    next_retry_at: float | None = None  # time.time()
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def failed(self, message: str, retry_in: float | None) -> int:
        with self.lock:
            self.consecutive_failures += 1
            self.last_error = message
            self.last_error_time = _utc_now()
            self.next_retry_at = None if retry_in is None else time.time() + retry_in
            return self.consecutive_failures

    def succeeded(self, committed: bool) -> None:
        with self.lock:
            now = _utc_now()
            self.last_check_time = now
            if committed:
                self.last_push_time = now
            self.consecutive_failures = 0
            self.next_retry_at = None


@dataclass
class PushSnapshot:
    """What one Hub commit carries: changed files with their content, and withdrawn paths to delete."""

    adds: list[tuple[str, bytes, list[int]]]  # (path in folder, content, [size, mtime_ns])
    deletes: list[str]
    truncated: bool

    @property
    def records(self) -> int:
        """Records in the metadata files this push updates (for the commit message)."""
        return sum(content.count(b"\n") for path, content, _ in self.adds if path.endswith(METADATA_NAME))


# --------------------------------------------------------------------------------------------------------------------
# The store
# --------------------------------------------------------------------------------------------------------------------


class FeedbackStore:
    """Durable, append-only store of tag corrections; a `datasets` dataset folder, optionally synced to the Hub.

    Safe to use from many threads and processes at once (an `fcntl.flock` lock on `<folder>/.feedback/lock`).

    Args:
        folder: the local folder (created if missing).
        repo_id: Hub dataset repo to push to (private by default); None keeps everything local.
        hf_api: `HfApi` client to push with (injected in tests); default `HfApi(token=token)`.
        token: Hub token used when `hf_api` is not given; never logged nor shown in errors or `status()`.
        every_minutes: minutes between scheduled pushes (at least 5: the Hub rate-limits commits).
        max_image_pixels: largest accepted image (width * height), checked before decoding.
        max_image_bytes: largest accepted encoded image.
        max_text_length: longest attribute name, label, tag, model id/revision and annotator (characters).
        max_tags: most corrected tags per record.
        max_attributes: most corrected attributes per record.
        max_predicted_chars: longest `predicted` JSON.
        allowed_attributes: attribute -> labels (the model config's heads); when given, unknown attributes and
            labels outside the vocabulary are rejected. Free tags are always allowed.
        private: create the Hub repo private (ignored if it exists).
        revision: Hub branch to push to (default `main`).
        max_records_per_shard: records per `data/<shard>/` folder before a writer starts a new one.
        retry_initial_delay / retry_max_delay: back-off of failed pushes (see `FeedbackCommitScheduler`).

    Example:
        >>> store = FeedbackStore("feedback", repo_id="me/fashion-feedback")
        >>> rid = store.add("shirt.jpg", predicted, {"baseColour": "Blue"}, ["slim fit"], consent=True,
        ...                 model_id="me/fashion-tagger", model_revision="abc123")
        >>> store.status()
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        repo_id: str | None = None,
        hf_api: Any = None,
        token: str | None = None,
        every_minutes: float = 5,
        *,
        max_image_pixels: int = 40_000_000,
        max_image_bytes: int = 20 * 1024 * 1024,
        max_text_length: int = 200,
        max_tags: int = 50,
        max_attributes: int = 32,
        max_predicted_chars: int = 100_000,
        allowed_attributes: Mapping[str, Sequence[str]] | None = None,
        private: bool = True,
        revision: str | None = None,
        max_records_per_shard: int = 1000,
        retry_initial_delay: float = 10.0,
        retry_max_delay: float | None = None,
    ) -> None:
        self.folder = Path(folder).expanduser().resolve()
        self.repo_id = repo_id
        self.every_minutes = max(5.0, float(every_minutes))
        if every_minutes < 5:
            logger.info("every_minutes=%s raised to 5: the Hub rate-limits commits.", every_minutes)
        self.max_image_pixels = int(max_image_pixels)
        self.max_image_bytes = int(max_image_bytes)
        self.max_text_length = int(max_text_length)
        self.max_tags = int(max_tags)
        self.max_attributes = int(max_attributes)
        self.max_predicted_chars = int(max_predicted_chars)
        self.allowed_attributes = (
            {str(k): [str(label) for label in v] for k, v in allowed_attributes.items()} if allowed_attributes else None
        )
        self.private = private
        self.revision = revision
        self.max_records_per_shard = int(max_records_per_shard)
        self.retry_initial_delay = float(retry_initial_delay)
        self.retry_max_delay = retry_max_delay
        self._hf_api = hf_api
        self._token = token

        self._data = self.folder / DATA_DIR
        self._state = self.folder / STATE_DIR
        self._tmp = self._state / "tmp"
        self._lock_path = self._state / "lock"
        self._epoch_path = self._state / "epoch"
        self._pending_deletes_path = self._state / "pending-deletes.jsonl"
        self._submissions_path = self._state / "submissions.jsonl"

        self._lock = threading.RLock()
        self._reset_index()
        # submission key -> record id, for retries (`add(submitter=...)`); every process reads it at start, and the
        # same submitter (a Gradio session) always reaches the same process.
        self._by_submission = {
            str(item.get("key")): str(item.get("id")) for item in _read_json_lines(self._submissions_path)
        }
        self._shard: str | None = None
        self._shard_pid: int | None = None

        self.push_state = HubPushState()
        self._scheduler: FeedbackCommitScheduler | None = None
        self._sched_init_lock = threading.Lock()
        self._sched_flag_lock = threading.Lock()
        self._creating = False
        self._create_failures = 0
        self._next_create_attempt = 0.0
        self._create_timer: threading.Timer | None = None
        self._closed = False

        if self.folder.exists() and not self.folder.is_dir():
            raise FeedbackStoreError(f"feedback folder {self.folder} is a file, not a folder.")
        try:
            for path in (self.folder, self._data, self._state, self._tmp):
                path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            if not self.folder.is_dir():
                raise self._io_error("create the feedback folder", exc) from exc
            logger.warning("Feedback folder %s is not writable (%s): read-only use.", self.folder, exc.strerror)
            with self._lock, self._flock(exclusive=False):
                self._refresh()
            return
        try:
            with self._lock, self._flock(exclusive=True):
                readme = self.folder / "README.md"
                # A card without today's features (an older store) would make `load_dataset` drop new columns.
                if not readme.exists() or _features_yaml() not in readme.read_text(encoding="utf-8", errors="replace"):
                    _atomic_write(readme, dataset_card().encode("utf-8"), self._tmp)
                self._refresh(repair=True)
                self._sweep_orphans()
        except OSError as exc:
            logger.warning("Could not prepare feedback folder %s (%s): read-only use.", self.folder, exc.strerror)
            with self._lock, self._flock(exclusive=False):
                self._refresh()

    # -- public API -------------------------------------------------------------------------------------------------

    def add(
        self,
        image: Any,
        predicted: Mapping[str, Any] | str | None,
        corrected_attributes: Mapping[str, str] | str | None,
        corrected_tags: Sequence[str] | str | None,
        consent: bool,
        model_id: str,
        model_revision: str,
        annotator: str | None = ANONYMOUS,
        *,
        submitter: str | None = None,
        attribute_status: Mapping[str, str] | str | None = None,
    ) -> str:
        """Store one submission and return its record id, a new one for every submission.

        `attribute_status` says, for every attribute in `corrected_attributes`, what the contributor did with it on a
        form prefilled with the prediction: "changed" it, "confirmed" it as right, or left it "untouched" (then the
        value is the model's guess, which training does not learn from). A dict or its JSON text; None means every
        given attribute is "confirmed".

        `submitter` makes retries safe: an opaque value only this submitter knows (the app passes its Gradio
        session); the same submitter sending the same image and corrections again (a retry, a double click) gets
        the id it was given before, also after a restart. Without it, every call stores a new record. Identical
        corrections from different submitters are separate records; training drops the exact duplicates
        (`fashion_hf.data.load_feedback`).

        Raises `FeedbackValidationError` (a `ValueError`) for missing consent, a correction with neither a changed
        or confirmed attribute nor a tag, or invalid input, and `FeedbackStoreError` when the folder cannot be
        written; in every case nothing is stored.
        """
        if consent is not True:
            raise FeedbackValidationError(
                "consent is required: pass consent=True only after the user agreed to share the image and the "
                "corrections; nothing was stored."
            )
        if self._closed:
            raise FeedbackStoreError("this FeedbackStore was closed; open a new one to add feedback.")
        limit = self.max_text_length
        attributes = _parse_attributes(
            corrected_attributes, max_len=limit, max_attributes=self.max_attributes, allowed=self.allowed_attributes
        )
        tags = _parse_tags(corrected_tags, max_len=limit, max_tags=self.max_tags)
        statuses = _parse_attribute_status(attribute_status, attributes, max_len=limit)
        if not tags and all(status == UNTOUCHED for status in statuses.values()):
            untouched = " (every attribute given is untouched: the prediction as shown)" if attributes else ""
            raise FeedbackValidationError(
                f"the correction is empty{untouched}: give at least one changed or confirmed attribute or one tag; "
                "nothing was stored."
            )
        predicted_json = _parse_predicted(predicted, self.max_predicted_chars)
        model_id = _clean_text(model_id, "model_id", limit)
        model_revision = _clean_text(model_revision, "model_revision", limit, allow_empty=True)
        annotator = _clean_text(annotator or ANONYMOUS, "annotator", limit, allow_empty=True) or ANONYMOUS

        decoded, image_sha256 = _read_image_input(image, self.max_image_bytes, self.max_image_pixels)
        rgb = _upright_rgb(decoded)
        if image_sha256 is None:
            image_sha256 = _pixel_sha256(rgb)
        key = None if submitter is None else _submission_key(str(submitter), image_sha256, attributes, tags, statuses)
        with self._lock, self._flock(exclusive=False):
            self._refresh()
            existing = self._submitted(key)
        if existing is not None:
            return existing

        record_id = uuid.uuid4().hex
        jpeg = _encode_jpeg(rgb)
        self._ensure_scheduler()
        try:
            tmp: Path | None = _write_temp(self._tmp, jpeg, record_id)
        except OSError as exc:
            raise self._io_error("write the image", exc) from exc
        try:
            with self._lock, self._scheduler_lock(), self._flock(exclusive=True):
                self._refresh(repair=True)
                existing = self._submitted(key)
                if existing is not None:
                    return existing
                if key is not None:  # first: a record is never stored without the key that finds it again
                    line = json.dumps({"key": key, "id": record_id}).encode() + b"\n"
                    _append_line(self._submissions_path, line)
                    self._by_submission[key] = record_id
                record = {
                    "file_name": record_id + IMAGE_SUFFIX,
                    "id": record_id,
                    "timestamp": _utc_now(),
                    "image_sha256": image_sha256,
                    "model_id": model_id,
                    "model_revision": model_revision,
                    "predicted": predicted_json,
                    "corrected_attributes": json.dumps(attributes, ensure_ascii=False, separators=(",", ":")),
                    "attribute_status": json.dumps(statuses, separators=(",", ":")),
                    "corrected_tags": tags,
                    "annotator": annotator,
                    "consent": True,
                }
                self._commit_record(tmp, record)
                tmp = None
                return record_id
        except OSError as exc:
            raise self._io_error("save the feedback", exc) from exc
        finally:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)

    def get(self, record_id: str) -> dict | None:
        """The record (schema fields, `file_name`, and `image_path`: absolute path of the stored JPEG), or None."""
        if not isinstance(record_id, str) or not _ID_RE.match(record_id):
            return None
        with self._lock, self._flock(exclusive=False):
            self._refresh()
            record = self._records.get(record_id)
            shard = self._where[record_id][0] if record is not None else None
        return None if record is None else self._public(record, shard)

    def open_image(self, record_id: str) -> Image.Image:
        """The stored image of a record (loaded into memory). KeyError if unknown."""
        record = self.get(record_id)
        if record is None:
            raise KeyError(f"no feedback record with id {record_id!r}")
        with Image.open(record["image_path"]) as image:
            image.load()
            return image.copy()

    def records(self) -> Iterator[dict]:
        """Every record (as from `get`), oldest first; a snapshot taken when iteration starts."""
        with self._lock, self._flock(exclusive=False):
            self._refresh()
            snapshot = sorted(
                ((record, self._where[rid][0]) for rid, record in self._records.items()),
                key=lambda item: (str(item[0].get("timestamp")), item[0]["id"]),
            )
        for record, shard in snapshot:
            yield self._public(record, shard)

    def __len__(self) -> int:
        with self._lock, self._flock(exclusive=False):
            self._refresh()
            return len(self._records)

    def __contains__(self, record_id: object) -> bool:
        return isinstance(record_id, str) and self.get(record_id) is not None

    def delete(self, record_id: str) -> bool:
        """Withdraw a submission: remove its record and its image here, and from the Hub at the next push.

        Returns False when no such record exists. Durable and safe under concurrency: the Hub removal is
        recorded before the local files change, the metadata file is rewritten atomically, then the image unlinked;
        a push is triggered at once when Hub sync is running.
        """
        if not isinstance(record_id, str) or not _ID_RE.match(record_id):
            raise FeedbackValidationError(f"record id must be 32 lowercase hex characters, got {record_id!r}.")
        try:
            with self._lock, self._scheduler_lock(), self._flock(exclusive=True):
                self._refresh(repair=True)
                if record_id not in self._records:
                    return self._delete_stray_image(record_id)
                shard = self._where[record_id][0]
                file_name = self._records[record_id]["file_name"]
                image_rel = f"{DATA_DIR}/{shard}/{file_name}"
                meta_rel = f"{DATA_DIR}/{shard}/{METADATA_NAME}"
                meta_path = self.folder / meta_rel
                lines = meta_path.read_bytes().split(b"\n")[:-1]
                keep = [line + b"\n" for line in lines if self._line_id(line) != record_id]
                self._add_pending_deletes([image_rel] if keep else [image_rel, meta_rel])
                if keep:
                    _atomic_write(meta_path, b"".join(keep), self._tmp)
                else:
                    os.unlink(meta_path)
                    _fsync_dir(meta_path.parent)
                self._bump_epoch()
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.folder / image_rel)
                _fsync_dir((self.folder / image_rel).parent)
                self._refresh()
        except OSError as exc:
            raise self._io_error("withdraw the record", exc) from exc
        if self._scheduler is not None:
            self._scheduler.trigger()  # withdrawals reach the Hub now, not at the next scheduled push
        return True

    def status(self) -> str:
        """One line for the app: records stored, what awaits a push, last push time and last error (no token)."""
        info = self.hub_status()
        if not info["enabled"]:
            return f"{info['records']} feedback record(s) saved locally; Hub sync is off."
        waiting = []
        if info["pending_records"]:
            waiting.append(f"{info['pending_records']} record(s) waiting to be pushed")
        if info["pending_deletions"]:
            waiting.append(f"{info['pending_deletions']} withdrawal(s) waiting to be pushed")
        parts = [
            f"Hub sync to {info['repo_id']}: " + (", ".join(waiting) if waiting else "everything pushed"),
            f"last push: {info['last_push_time'] or 'never'}",
        ]
        if info["consecutive_failures"]:
            error = f"last error ({info['last_error_time']}): {info['last_error']}"
            if info["retry_in_seconds"] is not None:
                error += f"; retrying in {info['retry_in_seconds']:.0f}s"
            parts.append(error)
        return self.redact("; ".join(parts) + ".")

    def hub_status(self) -> dict[str, Any]:
        """`status()` as data: records, enabled, repo_id, pending_records, pending_deletions, last_push_time,
        last_error, last_error_time, consecutive_failures, retry_in_seconds."""
        with self._lock, self._flock(exclusive=False):
            self._refresh()
            count = len(self._records)
            pending_records, pending_deletions = self._pending_counts() if self.repo_id else (0, 0)
        hub = self.push_state
        with hub.lock:
            retry_in = None if hub.next_retry_at is None else max(0.0, hub.next_retry_at - time.time())
            return {
                "records": count,
                "enabled": self.repo_id is not None,
                "repo_id": self.repo_id,
                "pending_records": pending_records,
                "pending_deletions": pending_deletions,
                "last_push_time": hub.last_push_time,
                "last_error": self.redact(hub.last_error) if hub.last_error else None,
                "last_error_time": hub.last_error_time,
                "consecutive_failures": hub.consecutive_failures,
                "retry_in_seconds": retry_in,
            }

    def push_now(self) -> bool:
        """Push pending changes now, in this thread; True on success (or nothing to push). Needs `repo_id`."""
        if self.repo_id is None:
            raise FeedbackStoreError("push_now() needs a repo_id: this store keeps feedback locally only.")
        scheduler = self._ensure_scheduler(wait=True)
        if scheduler is None:
            return False
        scheduler.push_to_hub()
        return scheduler.last_push_ok

    @property
    def scheduler(self) -> FeedbackCommitScheduler | None:
        """The Hub scheduler, once created (lazily, at the first `add`)."""
        return self._scheduler

    def close(self, push: bool = True) -> None:
        """Stop Hub sync (after a last push when `push`); local data stays. Further `add` calls fail."""
        self._closed = True
        with self._sched_flag_lock:
            if self._create_timer is not None:
                self._create_timer.cancel()
        scheduler = self._scheduler
        if scheduler is not None:
            if push:
                scheduler.push_to_hub()
            scheduler.shutdown()

    def __enter__(self) -> FeedbackStore:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"FeedbackStore(folder={str(self.folder)!r}, repo_id={self.repo_id!r})"

    @staticmethod
    def features():  # noqa: ANN205 (datasets.Features; imported lazily)
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

    # -- locking ----------------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _flock(self, exclusive: bool) -> Iterator[None]:
        try:
            fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError:
            try:
                fd = os.open(self._lock_path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                if exclusive:
                    raise
                yield  # read-only folder without a lock file: nobody can write there
                return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)  # releases the lock

    @contextlib.contextmanager
    def _scheduler_lock(self) -> Iterator[None]:
        scheduler = self._scheduler
        if scheduler is None:
            yield
        else:
            with scheduler.lock:
                yield

    # -- index (rebuilt from the files, under the lock) -------------------------------------------------------------

    def _reset_index(self) -> None:
        self._records: dict[str, dict] = {}
        self._where: dict[str, tuple[str, int]] = {}  # id -> (shard, byte offset of its line)
        self._shard_counts: dict[str, int] = {}
        self._files: dict[str, tuple[int, int, int]] = {}  # shard -> (st_dev, st_ino, bytes consumed)
        self._epoch: int | None = None
        self.corrupt_lines = 0

    def _read_epoch(self) -> int:
        try:
            return int(self._epoch_path.read_text() or 0)
        except (FileNotFoundError, ValueError):
            return 0

    def _bump_epoch(self) -> None:
        epoch = self._read_epoch() + 1
        _atomic_write(self._epoch_path, str(epoch).encode(), self._tmp)

    @staticmethod
    def _line_id(line: bytes) -> str | None:
        try:
            item = json.loads(line)
        except ValueError:
            return None
        return item.get("id") if isinstance(item, dict) else None

    def _parse_record(self, line: bytes) -> dict | None:
        try:
            record = json.loads(line)
        except ValueError:
            return None
        if (
            not isinstance(record, dict)
            or not isinstance(record.get("id"), str)
            or not _ID_RE.match(record["id"])
            or not isinstance(record.get("file_name"), str)
            or not _FILE_NAME_RE.match(record["file_name"])
        ):
            return None
        return record

    def _drop_shard(self, shard: str) -> None:
        for rid in [rid for rid, (s, _) in self._where.items() if s == shard]:
            del self._records[rid]
            del self._where[rid]
        self._shard_counts.pop(shard, None)
        self._files.pop(shard, None)

    def _submitted(self, key: str | None) -> str | None:
        """The record this submission key was given, while that record exists (call under the lock, refreshed)."""
        record_id = self._by_submission.get(key) if key is not None else None
        return record_id if record_id in self._records else None

    def _index(self, shard: str, offset: int, record: dict) -> None:
        rid = record["id"]
        if rid in self._records:  # should not happen (uuid4); keep the first
            return
        self._records[rid] = record
        self._where[rid] = (shard, offset)
        self._shard_counts[shard] = self._shard_counts.get(shard, 0) + 1

    def _refresh(self, repair: bool = False) -> None:
        """Bring the in-memory index up to date with the files (call under the lock).

        Only new bytes are read, unless a metadata file was rewritten (the epoch changed). An unterminated last
        line (a writer crashed mid-append: under the lock no write is in progress) and unparsable lines are
        skipped; with `repair` (exclusive lock) they are moved to `.feedback/quarantine/` and removed from the file.
        """
        epoch = self._read_epoch()
        if epoch != self._epoch:
            self._reset_index()
            self._epoch = epoch
        seen = set()
        to_repair: list[str] = []
        for meta in sorted(self._data.glob(f"*/{METADATA_NAME}")):
            shard = meta.parent.name
            try:
                st = meta.stat()
            except FileNotFoundError:
                continue
            seen.add(shard)
            state = self._files.get(shard)
            start = state[2] if state and state[:2] == (st.st_dev, st.st_ino) and st.st_size >= state[2] else 0
            if start == 0 and state is not None:
                self._drop_shard(shard)
            consumed = start
            if st.st_size > start:
                with open(meta, "rb") as handle:
                    handle.seek(start)
                    chunk = handle.read(st.st_size - start)
                end = chunk.rfind(b"\n") + 1
                offset = start
                for line in chunk[:end].split(b"\n")[:-1]:
                    record = self._parse_record(line)
                    if record is None:
                        self.corrupt_lines += 1
                        to_repair.append(shard)
                        logger.warning("Skipping a corrupt line at byte %d of %s.", offset, meta)
                    else:
                        self._index(shard, offset, record)
                    offset += len(line) + 1
                consumed = start + end
                if end < len(chunk):
                    to_repair.append(shard)
            self._files[shard] = (st.st_dev, st.st_ino, consumed)
        for shard in [s for s in self._files if s not in seen]:
            self._drop_shard(shard)
        if repair and to_repair:
            for shard in dict.fromkeys(to_repair):
                self._repair_shard(shard)
            self._refresh()

    def _repair_shard(self, shard: str) -> None:
        meta = self._data / shard / METADATA_NAME
        raw = meta.read_bytes()
        end = raw.rfind(b"\n") + 1
        good, bad = [], []
        for line in raw[:end].split(b"\n")[:-1]:
            (good if self._parse_record(line) is not None else bad).append(line + b"\n")
        if end < len(raw):
            bad.append(raw[end:] + b"\n")
        quarantine = self._state / "quarantine"
        quarantine.mkdir(exist_ok=True)
        _append_line(quarantine / f"{shard}.txt", b"".join(bad))
        logger.warning("Repaired %s: moved %d torn or corrupt line(s) to %s.", meta, len(bad), quarantine)
        if good:
            _atomic_write(meta, b"".join(good), self._tmp)
        else:
            os.unlink(meta)
            _fsync_dir(meta.parent)
        self._bump_epoch()

    def _sweep_orphans(self) -> None:
        """Remove images no record points to (a crash between the image and its record) and stale temp files."""
        referenced = {(self._where[rid][0], record["file_name"]) for rid, record in self._records.items()}
        orphans = [
            path for path in self._data.glob(f"*/*{IMAGE_SUFFIX}") if (path.parent.name, path.name) not in referenced
        ]
        if orphans:
            self._add_pending_deletes([f"{DATA_DIR}/{p.parent.name}/{p.name}" for p in orphans])
            for path in orphans:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
            logger.warning("Removed %d image(s) without a record from %s.", len(orphans), self._data)
        now = time.time()
        for path in self._tmp.glob("*.tmp"):
            with contextlib.suppress(OSError):
                if now - path.stat().st_mtime > _STALE_TMP_SECONDS:
                    path.unlink()

    def _delete_stray_image(self, record_id: str) -> bool:
        strays = list(self._data.glob(f"*/{record_id}{IMAGE_SUFFIX}"))
        if strays:
            self._add_pending_deletes([f"{DATA_DIR}/{p.parent.name}/{p.name}" for p in strays])
            for path in strays:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
        return bool(strays)

    # -- writing ----------------------------------------------------------------------------------------------------

    def _current_shard(self) -> str:
        pid = os.getpid()
        if (
            self._shard is None
            or self._shard_pid != pid
            or self._shard_counts.get(self._shard, 0) >= self.max_records_per_shard
        ):
            self._shard = f"{_safe_host()}-{pid}-{uuid.uuid4().hex[:8]}"
            self._shard_pid = pid
        shard_dir = self._data / self._shard
        if not shard_dir.is_dir():
            shard_dir.mkdir(parents=True, exist_ok=True)
            _fsync_dir(self._data)
        return self._shard

    def _commit_record(self, tmp: Path, record: dict) -> None:
        """Move the image into place, then append the record (under the exclusive lock)."""
        line = json.dumps(record, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8") + b"\n"
        image_path: Path | None = None
        try:
            shard = self._current_shard()
            image_path = self._data / shard / record["file_name"]
            os.replace(tmp, image_path)
            _fsync_dir(image_path.parent)
            offset = _append_line(self._data / shard / METADATA_NAME, line)
        except _AppendFailed as failure:
            if failure.rolled_back and image_path is not None:
                with contextlib.suppress(OSError):
                    os.unlink(image_path)
            if not isinstance(failure.cause, OSError):
                raise failure.cause from None
            raise self._io_error("save the record", failure.cause) from failure.cause
        except OSError as exc:
            if image_path is not None and image_path.exists():
                with contextlib.suppress(OSError):
                    os.unlink(image_path)
            raise self._io_error("save the image", exc) from exc
        self._index(shard, offset, record)
        st = (self._data / shard / METADATA_NAME).stat()
        self._files[shard] = (st.st_dev, st.st_ino, offset + len(line))

    def _add_pending_deletes(self, paths: list[str]) -> None:
        now = _utc_now()
        _append_line(
            self._pending_deletes_path,
            b"".join(json.dumps({"path": p, "time": now}).encode() + b"\n" for p in paths),
        )

    def _io_error(self, action: str, exc: OSError) -> FeedbackStoreError:
        reason = exc.strerror or str(exc)
        if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            advice = "the folder is read-only or not writable; check its permissions or mount"
        elif exc.errno in (errno.ENOSPC, errno.EDQUOT):
            advice = "the disk is full; free some space and try again"
        else:
            advice = "check the folder and try again"
        return FeedbackStoreError(
            f"Could not {action} in the feedback folder {self.folder} ({reason}): {advice}. Nothing was half-written."
        )

    # -- Hub: what FeedbackCommitScheduler uses (push_snapshot, mark_pushed, push_state, redact) ---------------------

    def redact(self, text: str) -> str:
        """`text` with the Hub token, and anything shaped like one, masked: for errors, logs and the page."""
        if self._token:
            text = text.replace(self._token, "***")
        text = _TOKEN_RE.sub("hf_***", text)
        return _BEARER_RE.sub(r"\1***", text)

    def _ensure_scheduler(self, wait: bool = False) -> FeedbackCommitScheduler | None:
        """Create the Hub scheduler lazily (its constructor calls `create_repo`): in the background, or now."""
        if self.repo_id is None or self._scheduler is not None or self._closed:
            return self._scheduler
        if wait:
            self._create_scheduler()
            return self._scheduler
        with self._sched_flag_lock:
            if self._creating or time.monotonic() < self._next_create_attempt:
                return None
            self._creating = True
        threading.Thread(target=self._create_scheduler, name="feedback-hub-init", daemon=True).start()
        return None

    def _retry_create(self) -> None:
        with self._sched_flag_lock:
            if self._creating or self._scheduler is not None or self._closed:
                return
            self._creating = True
        self._create_scheduler()

    def _create_scheduler(self) -> None:
        try:
            with self._sched_init_lock:
                if self._scheduler is not None or self._closed:
                    return
                try:
                    self._scheduler = FeedbackCommitScheduler(
                        store=self,
                        repo_id=self.repo_id,
                        repo_type="dataset",
                        folder_path=self.folder,
                        every=self.every_minutes,
                        private=self.private,
                        revision=self.revision,
                        token=self._token,
                        hf_api=self._hf_api,
                        retry_initial_delay=self.retry_initial_delay,
                        retry_max_delay=self.retry_max_delay,
                    )
                except Exception as exc:  # noqa: BLE001 - reported in status(), retried with back-off
                    self._create_failures += 1
                    delay = min(self.retry_initial_delay * 2 ** (self._create_failures - 1), self.every_minutes * 60)
                    message = self.redact(f"{type(exc).__name__}: {exc}")[:500]
                    self.push_state.failed(f"could not create or reach the Hub repo: {message}", delay)
                    logger.warning("Creating Hub repo %s failed: %s; retrying in %.3gs", self.repo_id, message, delay)
                    with self._sched_flag_lock:
                        self._next_create_attempt = time.monotonic() + delay
                        if self._create_timer is not None:
                            self._create_timer.cancel()
                        if not self._closed:
                            self._create_timer = threading.Timer(delay, self._retry_create)
                            self._create_timer.daemon = True
                            with contextlib.suppress(RuntimeError):  # interpreter shutting down
                                self._create_timer.start()
                    return
                self._create_failures = 0
        finally:
            with self._sched_flag_lock:
                self._creating = False

    def _hub_state(self, name: str) -> dict[str, list[int]]:
        try:
            state = json.loads((self._state / name).read_text())
            files = state.get("files", {}) if isinstance(state, dict) else {}
            return files if isinstance(files, dict) else {}
        except (FileNotFoundError, ValueError):
            return {}

    def _local_files(self) -> list[tuple[str, Path]]:
        """Files that belong in the repo: README, images, then metadata (so records follow their images)."""
        files = [("README.md", self.folder / "README.md")]
        files += [(f"{DATA_DIR}/{p.parent.name}/{p.name}", p) for p in sorted(self._data.glob(f"*/*{IMAGE_SUFFIX}"))]
        files += [(f"{DATA_DIR}/{p.parent.name}/{p.name}", p) for p in sorted(self._data.glob(f"*/{METADATA_NAME}"))]
        return files

    def push_snapshot(self, state_name: str, max_files: int, max_bytes: int) -> PushSnapshot:
        """What to push, read under the shared lock: changed files with their content, withdrawn paths."""
        with self._flock(exclusive=False):
            pushed = self._hub_state(state_name)
            adds: list[tuple[str, bytes, list[int]]] = []
            total, truncated = 0, False
            for rel, path in self._local_files():
                try:
                    st = path.stat()
                except FileNotFoundError:
                    continue
                key = [st.st_size, st.st_mtime_ns]
                if pushed.get(rel) == key:
                    continue
                if adds and (len(adds) >= max_files or total + st.st_size > max_bytes):
                    truncated = True
                    break
                adds.append((rel, path.read_bytes(), key))
                total += st.st_size
            deletes = []
            if not truncated:
                pending = [item.get("path") for item in _read_json_lines(self._pending_deletes_path)]
                deletes = [p for p in dict.fromkeys(pending) if isinstance(p, str) and not (self.folder / p).exists()]
            return PushSnapshot(adds, deletes, truncated)

    def mark_pushed(self, state_name: str, snapshot: PushSnapshot) -> None:
        """Record a successful commit (under the exclusive lock, merged with what other processes pushed)."""
        with self._flock(exclusive=True):
            pushed = self._hub_state(state_name)
            for rel, _, key in snapshot.adds:
                pushed[rel] = key
            for rel in snapshot.deletes:
                pushed.pop(rel, None)
            for rel in [rel for rel in pushed if not (self.folder / rel).exists()]:
                pushed.pop(rel)
            state = {"repo_id": self.repo_id, "files": pushed}
            _atomic_write(self._state / state_name, json.dumps(state).encode(), self._tmp)
            if snapshot.deletes:
                done = set(snapshot.deletes)
                pending = _read_json_lines(self._pending_deletes_path)
                remaining = [item for item in pending if item.get("path") not in done]
                data = b"".join(json.dumps(item).encode() + b"\n" for item in remaining)
                _atomic_write(self._pending_deletes_path, data, self._tmp)

    def _pending_counts(self) -> tuple[int, int]:
        """(records not yet pushed, withdrawals not yet pushed); call under the lock after `_refresh`."""
        scheduler = self._scheduler
        state_name = scheduler._state_name if scheduler is not None else state_file_name(self.repo_id, self.revision)
        pushed = self._hub_state(state_name)
        pending = 0
        for rid, (shard, offset) in self._where.items():
            rel = f"{DATA_DIR}/{shard}/{METADATA_NAME}"
            key = pushed.get(rel)
            if key is None:
                pending += 1
                continue
            try:
                st = (self.folder / rel).stat()
            except FileNotFoundError:
                continue
            if [st.st_size, st.st_mtime_ns] != key and offset >= key[0]:
                pending += 1
        deletions = {
            item.get("path")
            for item in _read_json_lines(self._pending_deletes_path)
            if isinstance(item.get("path"), str) and not (self.folder / item["path"]).exists()
        }
        return pending, len(deletions)

    # -- helpers ----------------------------------------------------------------------------------------------------

    def _public(self, record: dict, shard: str) -> dict:
        out = {name: record.get(name) for name in RECORD_FIELDS}
        out["corrected_tags"] = list(out["corrected_tags"] or [])
        if out["attribute_status"] is None:  # a record from before the field
            with contextlib.suppress(ValueError):
                statuses = record_attribute_status(out["corrected_attributes"], None)
                out["attribute_status"] = json.dumps(statuses, separators=(",", ":"))
        out["file_name"] = record["file_name"]
        out["image_path"] = str(self._data / shard / record["file_name"])
        return out
