"""The local feedback store: one record per submission, appended to a folder that is at the same time a `datasets`
dataset (`datasets.load_dataset(folder)` gives an `image` column plus every record field). Pushing the folder to the
Hub is `hub.py`'s; this module knows nothing of it.

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
        hub-<key>.json                 what was pushed to a repo: path -> [size, mtime_ns] (written by hub.py)
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
import os
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from PIL import Image

from fashion_hf.image_decoding import (
    DEFAULT_MAX_FILE_BYTES,
    DEFAULT_MAX_IMAGE_PIXELS,
    DecodedImage,
    ImageLimits,
    InvalidImageError,
    read_image,
)

from .files import AppendFailed, append_line, atomic_write, fsync_dir, json_line, read_json_lines, write_temp
from .index import ShardIndex, record_id_of
from .schema import (
    ANONYMOUS,
    DATA_DIR,
    IMAGE_SUFFIX,
    METADATA_NAME,
    RECORD_FIELDS,
    STATE_DIR,
    UNTOUCHED,
    dataset_card,
    dataset_features,
    features_yaml,
    image_file_name,
    is_record_id,
    new_record_id,
    new_shard_name,
    record_attribute_status,
    utc_timestamp,
)
from .validation import (
    FeedbackValidationError,
    clean_text,
    parse_attribute_status,
    parse_attributes,
    parse_predicted,
    parse_tags,
)

logger = logging.getLogger(__name__)

_JPEG_QUALITY = 95
_STALE_TMP_SECONDS = 3600


class FeedbackStoreError(RuntimeError):
    """The store could not save or change data (read-only folder, disk full, ...); nothing half-written is left."""


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


def _encode_jpeg(rgb: Image.Image) -> bytes:
    # A new image of the pixels alone: Pillow would carry the upload's JPEG comment over into the file.
    pixels_only = Image.frombytes("RGB", rgb.size, rgb.tobytes())
    buffer = io.BytesIO()
    pixels_only.save(buffer, format="JPEG", quality=_JPEG_QUALITY)
    return buffer.getvalue()


class LocalFeedbackStore:
    """Durable, append-only store of tag corrections in a local folder that is a `datasets` dataset.

    Safe to use from many threads and processes at once (an `fcntl.flock` lock on `<folder>/.feedback/lock`).
    `FeedbackStore` is this store, pushed to a Hub dataset.

    Args:
        folder: the local folder (created if missing).
        max_image_pixels: largest accepted image (width * height), checked before decoding.
        max_image_bytes: largest accepted encoded image.
        max_text_length: longest attribute name, label, tag, model id/revision and annotator (characters).
        max_tags: most corrected tags per record.
        max_attributes: most corrected attributes per record.
        max_predicted_chars: longest `predicted` JSON.
        allowed_attributes: attribute -> labels (the model config's heads); when given, unknown attributes and
            labels outside the vocabulary are rejected. Free tags are always allowed.
        max_records_per_shard: records per `data/<shard>/` folder before a writer starts a new one.
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        *,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        max_image_bytes: int = DEFAULT_MAX_FILE_BYTES,
        max_text_length: int = 200,
        max_tags: int = 50,
        max_attributes: int = 32,
        max_predicted_chars: int = 100_000,
        allowed_attributes: Mapping[str, Sequence[str]] | None = None,
        max_records_per_shard: int = 1000,
    ) -> None:
        self.folder = Path(folder).expanduser().resolve()
        self.image_limits = ImageLimits(max_image_pixels=int(max_image_pixels), max_file_bytes=int(max_image_bytes))
        self.max_text_length = int(max_text_length)
        self.max_tags = int(max_tags)
        self.max_attributes = int(max_attributes)
        self.max_predicted_chars = int(max_predicted_chars)
        self.allowed_attributes = (
            {str(k): [str(label) for label in v] for k, v in allowed_attributes.items()} if allowed_attributes else None
        )
        self.max_records_per_shard = int(max_records_per_shard)

        self._data = self.folder / DATA_DIR
        self._state = self.folder / STATE_DIR
        self._tmp = self._state / "tmp"
        self._lock_path = self._state / "lock"
        self._pending_deletes_path = self._state / "pending-deletes.jsonl"
        self._submissions_path = self._state / "submissions.jsonl"

        self._lock = threading.RLock()
        self._index = ShardIndex(self._data, self._state, self._tmp)
        # submission key -> record id, for retries (`add(submitter=...)`); every process reads it at start, and the
        # same submitter (a Gradio session) always reaches the same process.
        self._by_submission = {
            str(item.get("key")): str(item.get("id")) for item in read_json_lines(self._submissions_path)
        }
        self._shard: str | None = None
        self._shard_pid: int | None = None
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
                self._index.refresh()
            return
        try:
            with self._lock, self._flock(exclusive=True):
                readme = self.folder / "README.md"
                # A card without today's features (an older store) would make `load_dataset` drop new columns.
                if not readme.exists() or features_yaml() not in readme.read_text(encoding="utf-8", errors="replace"):
                    atomic_write(readme, dataset_card().encode("utf-8"), self._tmp)
                self._index.refresh(repair=True)
                self._sweep_orphans()
        except OSError as exc:
            logger.warning("Could not prepare feedback folder %s (%s): read-only use.", self.folder, exc.strerror)
            with self._lock, self._flock(exclusive=False):
                self._index.refresh()

    @property
    def max_image_pixels(self) -> int:
        return self.image_limits.max_image_pixels

    @property
    def max_image_bytes(self) -> int:
        return self.image_limits.max_file_bytes

    @property
    def corrupt_lines(self) -> int:
        """Lines of the metadata files that could not be read as records (each was repaired or skipped)."""
        return self._index.corrupt_lines

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
        (`fashion_hf.feedback.dataset.load_feedback`).

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
            raise FeedbackStoreError("this store was closed; open a new one to add feedback.")
        limit = self.max_text_length
        attributes = parse_attributes(
            corrected_attributes, max_len=limit, max_attributes=self.max_attributes, allowed=self.allowed_attributes
        )
        tags = parse_tags(corrected_tags, max_len=limit, max_tags=self.max_tags)
        statuses = parse_attribute_status(attribute_status, attributes, max_len=limit)
        if not tags and all(status == UNTOUCHED for status in statuses.values()):
            untouched = " (every attribute given is untouched: the prediction as shown)" if attributes else ""
            raise FeedbackValidationError(
                f"the correction is empty{untouched}: give at least one changed or confirmed attribute or one tag; "
                "nothing was stored."
            )
        predicted_json = parse_predicted(predicted, self.max_predicted_chars)
        model_id = clean_text(model_id, "model_id", limit)
        model_revision = clean_text(model_revision, "model_revision", limit, allow_empty=True)
        annotator = clean_text(annotator or ANONYMOUS, "annotator", limit, allow_empty=True) or ANONYMOUS

        decoded = self._read_image(image)
        key = None if submitter is None else _submission_key(str(submitter), decoded.sha256, attributes, tags, statuses)
        with self._lock, self._flock(exclusive=False):
            self._index.refresh()
            existing = self._submitted(key)
        if existing is not None:
            return existing

        record_id = new_record_id()
        try:
            tmp: Path | None = write_temp(self._tmp, _encode_jpeg(decoded.image), record_id)
        except OSError as exc:
            raise self._io_error("write the image", exc) from exc
        try:
            with self._lock, self._flock(exclusive=True):
                self._index.refresh(repair=True)
                existing = self._submitted(key)
                if existing is not None:
                    return existing
                if key is not None:  # first: a record is never stored without the key that finds it again
                    append_line(self._submissions_path, json_line({"key": key, "id": record_id}))
                    self._by_submission[key] = record_id
                record = {
                    "file_name": image_file_name(record_id),
                    "id": record_id,
                    "timestamp": utc_timestamp(),
                    "image_sha256": decoded.sha256,
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
        if not is_record_id(record_id):
            return None
        with self._lock, self._flock(exclusive=False):
            self._index.refresh()
            record = self._index.records.get(record_id)
            shard = self._index.shard_of(record_id) if record is not None else None
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
            self._index.refresh()
            snapshot = sorted(
                ((record, self._index.shard_of(rid)) for rid, record in self._index.records.items()),
                key=lambda item: (str(item[0].get("timestamp")), item[0]["id"]),
            )
        for record, shard in snapshot:
            yield self._public(record, shard)

    def __len__(self) -> int:
        with self._lock, self._flock(exclusive=False):
            self._index.refresh()
            return len(self._index.records)

    def __contains__(self, record_id: object) -> bool:
        return isinstance(record_id, str) and self.get(record_id) is not None

    def delete(self, record_id: str) -> bool:
        """Withdraw a submission: remove its record and its image here, and from the Hub at the next push.

        Returns False when no such record exists. Durable and safe under concurrency: the Hub removal is
        recorded before the local files change, the metadata file is rewritten atomically, then the image unlinked.
        """
        if not is_record_id(record_id):
            raise FeedbackValidationError(f"record id must be 32 lowercase hex characters, got {record_id!r}.")
        try:
            with self._lock, self._flock(exclusive=True):
                self._index.refresh(repair=True)
                if record_id not in self._index.records:
                    return self._delete_stray_image(record_id)
                shard = self._index.shard_of(record_id)
                image_rel = f"{DATA_DIR}/{shard}/{self._index.records[record_id]['file_name']}"
                meta_rel = f"{DATA_DIR}/{shard}/{METADATA_NAME}"
                meta_path = self.folder / meta_rel
                lines = meta_path.read_bytes().split(b"\n")[:-1]
                keep = [line + b"\n" for line in lines if record_id_of(line) != record_id]
                self._add_pending_deletes([image_rel] if keep else [image_rel, meta_rel])
                if keep:
                    atomic_write(meta_path, b"".join(keep), self._tmp)
                else:
                    os.unlink(meta_path)
                    fsync_dir(meta_path.parent)
                self._index.bump_epoch()
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.folder / image_rel)
                fsync_dir((self.folder / image_rel).parent)
                self._index.refresh()
        except OSError as exc:
            raise self._io_error("withdraw the record", exc) from exc
        return True

    def close(self) -> None:
        """Refuse further `add` calls; local data stays."""
        self._closed = True

    def __enter__(self) -> LocalFeedbackStore:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(folder={str(self.folder)!r})"

    @staticmethod
    def features():  # noqa: ANN205 (datasets.Features; imported lazily)
        """The dataset's `datasets.Features` (for `load_dataset("imagefolder", data_dir=..., features=...)`)."""
        return dataset_features()

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

    # -- reading ----------------------------------------------------------------------------------------------------

    def _read_image(self, image: Any) -> DecodedImage:
        """The submitted image as upright sRGB pixels and its `image_sha256`, through the one safe decoder."""
        # A path is named by its file name only: the app passes the server's copy of an upload, whose folders must
        # not reach the user.
        name = f"image {Path(image).name!r}" if isinstance(image, (str, os.PathLike)) else "image"
        try:
            return read_image(image, self.image_limits, name, srgb=True)
        except InvalidImageError as exc:
            raise FeedbackValidationError(f"{exc}.") from None

    def _submitted(self, key: str | None) -> str | None:
        """The record this submission key was given, while that record exists (call under the lock, refreshed)."""
        record_id = self._by_submission.get(key) if key is not None else None
        return record_id if record_id in self._index.records else None

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

    # -- writing ----------------------------------------------------------------------------------------------------

    def _current_shard(self) -> str:
        pid = os.getpid()
        if (
            self._shard is None
            or self._shard_pid != pid
            or self._index.shard_counts.get(self._shard, 0) >= self.max_records_per_shard
        ):
            self._shard = new_shard_name(pid)
            self._shard_pid = pid
        shard_dir = self._data / self._shard
        if not shard_dir.is_dir():
            shard_dir.mkdir(parents=True, exist_ok=True)
            fsync_dir(self._data)
        return self._shard

    def _commit_record(self, tmp: Path, record: dict) -> None:
        """Move the image into place, then append the record (under the exclusive lock)."""
        line = json.dumps(record, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8") + b"\n"
        image_path: Path | None = None
        try:
            shard = self._current_shard()
            image_path = self._data / shard / record["file_name"]
            os.replace(tmp, image_path)
            fsync_dir(image_path.parent)
            offset = append_line(self._data / shard / METADATA_NAME, line)
        except AppendFailed as failure:
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
        self._index.appended(shard, offset, record, len(line))

    def _add_pending_deletes(self, paths: list[str]) -> None:
        """Journal removed files (`pending-deletes.jsonl`): a Hub copy of the folder drops them at its next push."""
        now = utc_timestamp()
        append_line(self._pending_deletes_path, b"".join(json_line({"path": p, "time": now}) for p in paths))

    def _sweep_orphans(self) -> None:
        """Remove images no record points to (a crash between the image and its record) and stale temp files."""
        referenced = {(self._index.shard_of(rid), record["file_name"]) for rid, record in self._index.records.items()}
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
        strays = list(self._data.glob(f"*/{image_file_name(record_id)}"))
        if strays:
            self._add_pending_deletes([f"{DATA_DIR}/{p.parent.name}/{p.name}" for p in strays])
            for path in strays:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
        return bool(strays)

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
