"""The app's service layer: settings, safe decoding of uploads, the pipeline and the feedback store.

The Gradio layout and event wiring live in `app.py`; what they call lives here, so each reads on its own.
"""

import base64
import binascii
import csv
import errno
import hashlib
import html
import importlib.util
import json
import logging
import os
import re
import tempfile
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass, field, fields
from pathlib import Path

import gradio as gr
import torch
from transformers import pipeline

from fashion_hf import TASK, InvalidImageError
from fashion_hf.configuration_fashion_tagger import DETAIL_GROUP
from fashion_hf.explain import explained_attribute, grad_cam, overlay_heatmap, uncertainty
from fashion_hf.feedback import (
    ANONYMOUS,
    DuplicateAttributeError,
    FeedbackStore,
    FeedbackStoreError,
    FeedbackValidationError,
    UNTOUCHED,
    unique_keys,
)
from fashion_hf.image_decoding import accepted_suffixes

logger = logging.getLogger("fashion_hf.app")

TOP_K = 5
# A free tag is a short phrase: letters, digits, spaces and a little punctuation ("slim fit", "t-shirt", "3/4 sleeve").
TAG_PATTERN = re.compile(r"^[^\W_][\w \-'&/.+]*$")
MAX_TAG_CHARS = 50
MAX_TAGS = 20
MAX_TAGS_TEXT_CHARS = MAX_TAGS * (MAX_TAG_CHARS + 2)
MAX_ATTRIBUTES_JSON_CHARS = 4096
MAX_EXAMPLES = 64
QUEUE_SIZE = 24
RECENT_UPLOADS = 12
JSON_EXAMPLE = '{"articleType": "Tshirts"}'
STATUS_EXAMPLE = '{"articleType": "changed"}'


# ---------------------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """The app's configuration; `Settings.from_env()` reads each field from the variable named in its metadata."""

    model: str = field(default="models/fashion-tagger", metadata={"env": "FASHION_MODEL"})
    model_revision: str | None = field(default=None, metadata={"env": "FASHION_MODEL_REVISION"})
    feedback_dir: str = field(default="feedback", metadata={"env": "FEEDBACK_DIR"})
    feedback_repo: str | None = field(default=None, metadata={"env": "FEEDBACK_REPO"})
    feedback_every_minutes: float = field(default=5.0, metadata={"env": "FEEDBACK_EVERY_MINUTES"})
    examples_dir: str | None = field(default="examples", metadata={"env": "EXAMPLES_DIR"})
    max_upload_mb: float = field(default=10.0, metadata={"env": "MAX_UPLOAD_MB"})
    max_image_pixels: int = field(default=40_000_000, metadata={"env": "MAX_IMAGE_PIXELS"})
    max_images_per_request: int = field(default=32, metadata={"env": "MAX_IMAGES_PER_REQUEST"})
    concurrency: int = field(default=2, metadata={"env": "TAG_CONCURRENCY"})
    feedback_concurrency: int = field(default=1, metadata={"env": "FEEDBACK_CONCURRENCY"})
    max_batch_size: int = field(default=16, metadata={"env": "TAG_MAX_BATCH_SIZE"})
    queue_size: int = field(default=64, metadata={"env": "QUEUE_MAX_SIZE"})

    @classmethod
    def from_env(cls, environ=None) -> "Settings":
        environ = os.environ if environ is None else environ
        values = {}
        for setting in fields(cls):
            raw = environ.get(setting.metadata["env"], "").strip()
            if not raw:
                continue
            kind = type(setting.default) if setting.default is not None else str
            try:
                values[setting.name] = kind(raw)
            except ValueError:
                raise ValueError(f"{setting.metadata['env']}={raw!r} is not a valid {kind.__name__}") from None
        return cls(**values).validated()

    def validated(self) -> "Settings":
        positive = (
            "max_upload_mb", "max_image_pixels", "max_images_per_request", "concurrency", "feedback_concurrency",
            "max_batch_size",
        )  # fmt: skip
        for setting in fields(self):
            if setting.name in positive and getattr(self, setting.name) <= 0:
                raise ValueError(f"{setting.metadata['env']} must be positive, got {getattr(self, setting.name)}")
        return self

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)


# ---------------------------------------------------------------------------------------------------------------------
# Inputs, errors and secrets
# ---------------------------------------------------------------------------------------------------------------------


def user_error(message: str) -> gr.Error:
    """A clear error for the user (a modal in the page, `AppError` in gradio_client), without a server traceback."""
    return gr.Error(message, print_exception=False)


def shown(text, limit: int = 80) -> str:
    """Text made safe to put in a message: Gradio renders error messages as HTML."""
    text = str(text)
    return html.escape(text if len(text) <= limit else text[:limit] + "…", quote=False)


def storage_problem(error: FeedbackStoreError) -> str:
    """What the store's failure was, in words for the user: the cause's errno, never the server's paths."""
    code = getattr(error.__cause__, "errno", None)
    if code in (errno.ENOSPC, errno.EDQUOT):
        return "the server's disk is full"
    if code in (errno.EROFS, errno.EACCES, errno.EPERM):
        return "the server's feedback storage is read-only"
    return "the server's storage failed"


class Redactor:
    """Removes secrets (the Hub token) from anything shown: errors and status lines."""

    def __init__(self, secrets):
        self.secrets = [secret for secret in secrets if secret]

    def __call__(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, "***")
        return text


@dataclass
class Upload:
    name: str  # the user's file name, for messages (never the server path)
    path: str | None  # where Gradio keeps the file (None for a pasted data URL)
    sha256: str  # of the uploaded bytes
    image: object  # upright RGB PIL image


def payload_parts(payload) -> tuple[str | None, str | None, str]:
    """(path, data URL, name) of a file payload: a Gradio FileData dict (events run with preprocess=False) or a path."""
    if isinstance(payload, dict):
        path, url = payload.get("path"), payload.get("url")
        name = payload.get("orig_name") or (Path(path).name if path else "image")
        if not path and str(url or "").startswith("data:"):
            return None, url, name
        return path, None, name
    if isinstance(payload, (str, os.PathLike)):
        return os.fspath(payload), None, Path(payload).name
    raise user_error("Expected an image file.")


def annotator_name(profile) -> str:
    """The Space OAuth username, or "anonymous"."""
    if profile is None:
        return ANONYMOUS
    return str(profile.get("preferred_username") or profile.get("name") or ANONYMOUS)


def submitter(request) -> str | None:
    """Who submits, for retries only: the Gradio session (random, known to its own client alone), or None."""
    session = getattr(request, "session_hash", None)
    return f"session:{session}" if session else None


def oauth_enabled() -> bool:
    """Space OAuth (README `hf_oauth: true`) sets these; elsewhere Gradio's mock login would need the network."""
    if not (os.environ.get("SPACE_ID") and os.environ.get("OAUTH_CLIENT_ID")):
        return False
    if importlib.util.find_spec("authlib") is None:
        logger.warning("Space OAuth is configured but gradio[oauth] is not installed: annotators stay anonymous.")
        return False
    return True


# ---------------------------------------------------------------------------------------------------------------------
# The model, loaded once
# ---------------------------------------------------------------------------------------------------------------------


def load_tagger(settings: Settings):
    """The pipeline, loaded once at start-up, with the app's upload limits applied to its image processor."""
    device = 0 if torch.cuda.is_available() else -1
    try:
        tagger = pipeline(TASK, model=settings.model, revision=settings.model_revision, device=device)
    except (OSError, ValueError) as error:
        raise RuntimeError(
            f"Could not load the model {settings.model!r} ({error}). Train one (see the README) or set FASHION_MODEL "
            "to a local model folder or a Hub model id."
        ) from error
    tagger.image_processor.max_file_bytes = settings.max_upload_bytes
    tagger.image_processor.max_image_pixels = settings.max_image_pixels
    return tagger


def served_revision(tagger, settings: Settings) -> str:
    """The Hub commit of the served model, or for a local folder a digest of its weights."""
    commit = getattr(tagger.model.config, "_commit_hash", None)
    if commit:
        return commit
    folder = Path(settings.model)
    weights = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not weights:
        return settings.model_revision or "unknown"
    digest = hashlib.sha256()
    for path in weights:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return "local-" + digest.hexdigest()[:12]


class RequestBatcher:
    """Runs concurrent requests' items through one batched call, each caller waiting for its own result.

    Inputs are checked by their own request before they join (a broken upload fails only its sender, which Gradio's
    `batch=True` cannot do: one exception fails every request of the batch). `slots` bounds the batches running at
    once; a caller that gets a slot takes every item waiting (up to `max_batch_size`), so items that arrive while a
    batch runs are batched together.
    """

    def __init__(self, run_batch, max_batch_size: int, slots: threading.Semaphore):
        self._run_batch, self._max_batch_size, self._slots = run_batch, max_batch_size, slots
        self._waiting: list[tuple[object, Future]] = []
        self._lock = threading.Lock()

    def __call__(self, item):
        future = Future()
        with self._lock:
            self._waiting.append((item, future))
        # Until a batch takes this item (its future then runs): take a slot and run what waits, this item included
        # unless more than a batch waits before it. Once taken, only wait: a caller that kept taking slots to find
        # nothing waiting would spin.
        while not (future.running() or future.done()):
            with self._slots:
                with self._lock:
                    batch = self._waiting[: self._max_batch_size]
                    del self._waiting[: self._max_batch_size]
                    for _, taken in batch:
                        taken.set_running_or_notify_cancel()
                if batch:
                    self._run(batch)
        return future.result()

    def _run(self, batch: list[tuple[object, Future]]) -> None:
        try:
            results = self._run_batch([item for item, _ in batch])
        except Exception as error:  # noqa: BLE001 - handed to every caller of the batch, raised in its own thread
            for _, future in batch:
                future.set_exception(error)
        else:
            for (_, future), result in zip(batch, results):
                future.set_result(result)


class PredictionCache:
    """Recent predictions by image SHA-256 (a thread-safe LRU): feedback records the prediction the user saw."""

    def __init__(self, size: int = 512):
        self.size, self._items, self._lock = size, OrderedDict(), threading.Lock()

    def get(self, key):
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        return None

    def put(self, key, value) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)


# ---------------------------------------------------------------------------------------------------------------------
# The service behind the page and the API
# ---------------------------------------------------------------------------------------------------------------------


class TaggerService:
    """What the event handlers call: safe decoding, the pipeline, heatmaps, the annotation queue, the store."""

    def __init__(self, settings: Settings, tagger, store: FeedbackStore, redact: Redactor):
        self.settings, self.tagger, self.store, self.redact = settings, tagger, store, redact
        self.config = tagger.model.config
        self.model_id = settings.model
        self.revision = served_revision(tagger, settings)
        self.predictions = PredictionCache()
        # Model runs at once, whichever event asks (the page's batched tagging, /tag, /tag_many, heatmaps).
        self.model_slots = threading.Semaphore(settings.concurrency)
        self._tag_batcher = RequestBatcher(
            lambda uploads: self._run_pipeline(uploads)[0], settings.max_batch_size, self.model_slots
        )
        self.detail_tags = [text for text, group in self.config.tags if group == DETAIL_GROUP]
        self.examples = self._load_examples()
        self._export_dir = Path(tempfile.mkdtemp(prefix="fashion-hf-exports-"))

    # -- images ---------------------------------------------------------------------------------------------------

    def read_upload(self, payload) -> Upload:
        """Decode one uploaded image safely, or raise gr.Error naming the file and what would be valid."""
        if not payload:
            raise user_error("No image: upload, paste or take a photo first.")
        path, data_url, name = payload_parts(payload)
        limit, limit_mb = self.settings.max_upload_bytes, f"{self.settings.max_upload_mb:g} MB"
        if data_url is not None:
            encoded = data_url.partition(",")[2]
            if len(encoded) * 3 // 4 > limit:
                raise user_error(f"{shown(name)}: the pasted image is over the {limit_mb} upload limit.")
            try:
                data = base64.b64decode(encoded)
            except (ValueError, binascii.Error):
                raise user_error(f"{shown(name)}: the pasted image could not be read.") from None
        else:
            if not path or not Path(path).is_file():
                raise user_error(f"{shown(name)}: the upload did not arrive; please upload it again.")
            size = Path(path).stat().st_size
            if size > limit:
                raise user_error(f"{shown(name)}: {size / 2**20:.1f} MB is over the {limit_mb} upload limit.")
            data = Path(path).read_bytes()
        try:
            image = self.tagger.image_processor.load_image(data)
        except InvalidImageError as error:
            raise user_error(f"{shown(name)}: {shown(error, 400)}") from None
        return Upload(name=name, path=path, sha256=hashlib.sha256(data).hexdigest(), image=image)

    def predict(self, uploads: list[Upload]) -> tuple[list[dict], float]:
        """Pipeline outputs for decoded uploads (one batch), remembered by image hash; and the seconds it took."""
        with self.model_slots:
            return self._run_pipeline(uploads)

    def tag(self, upload: Upload) -> dict:
        """The pipeline output for one request's upload, run in one batch with other requests' uploads."""
        return self._tag_batcher(upload)

    def _run_pipeline(self, uploads: list[Upload]) -> tuple[list[dict], float]:
        start = time.perf_counter()
        results = self.tagger([upload.image for upload in uploads], batch_size=len(uploads), top_k=TOP_K)
        elapsed = time.perf_counter() - start
        for upload, result in zip(uploads, results):
            self.predictions.put(upload.sha256, result)
        return results, elapsed

    def prediction_for(self, upload: Upload) -> dict:
        cached = self.predictions.get(upload.sha256)
        return cached if cached is not None else self.predict([upload])[0][0]

    def heatmaps(self, uploads: list[Upload], predictions: list[dict]) -> tuple[list, str, float]:
        """Grad-CAM overlays of the predicted top category, the attribute explained, and the seconds it took.

        `predictions` (the pipeline's, for these uploads) give the label to explain, so the model is not run again
        to find it (an ensemble would run all its encoder passes for that)."""
        start = time.perf_counter()
        processor = self.tagger.image_processor
        pixel_values = processor([upload.image for upload in uploads], return_tensors="pt")["pixel_values"]
        attribute = explained_attribute(self.config)
        labels = self.config.attributes[attribute]
        label_ids = [labels.index(prediction["attributes"][attribute][0]["label"]) for prediction in predictions]
        with self.model_slots:
            cam = grad_cam(self.tagger.model, pixel_values, attribute, label_ids)
        size = (processor.size["height"], processor.size["width"])
        overlays = [overlay_heatmap(upload.image, heatmap, size) for upload, heatmap in zip(uploads, cam.maps)]
        return overlays, cam.attribute, time.perf_counter() - start

    # -- the example catalogue and the annotation queue ------------------------------------------------------------

    def _load_examples(self) -> list[dict]:
        """The example catalogue with its predictions and uncertainty (computed once, at start-up)."""
        folder = Path(self.settings.examples_dir) if self.settings.examples_dir else None
        if folder is None or not folder.is_dir():
            return []
        uploads = []
        suffixes = accepted_suffixes()
        for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in suffixes)[:MAX_EXAMPLES]:
            try:
                uploads.append(self.read_upload(str(path)))
            except gr.Error as error:
                logger.warning("Skipping example %s: %s", path, error)
        items = []
        for start in range(0, len(uploads), self.settings.max_batch_size):
            chunk = uploads[start : start + self.settings.max_batch_size]
            results = self.predict(chunk)[0]
            items += [self.queue_item(upload, result, "example") for upload, result in zip(chunk, results)]
        return items

    def queue_item(self, upload: Upload, prediction: dict, source: str) -> dict:
        top = prediction["attributes"][explained_attribute(self.config)][0]
        return {
            "path": str(Path(upload.path).resolve()) if upload.path else None,
            "sha256": upload.sha256,
            "uncertainty": uncertainty(prediction),
            "caption": f"{source}: {top['label']}? ({top['score']:.0%})",
        }

    def annotation_queue(self, recent: list[dict], labelled: list[str]) -> list[dict]:
        """The examples and this session's own uploads, least certain first, less what this session labelled.

        Uploads stay private to their session: one user's photos never reach another user's queue.
        """
        done = set(labelled or [])
        items = [*(recent or []), *self.examples]
        # Uploads leave Gradio's cache after an hour (delete_cache): such entries leave the queue too.
        items = [item for item in items if item["sha256"] not in done and item["path"] and Path(item["path"]).is_file()]
        unique = {item["sha256"]: item for item in reversed(items)}  # an upload of an example counts once
        return sorted(unique.values(), key=lambda item: item["uncertainty"], reverse=True)[:QUEUE_SIZE]

    # -- feedback -------------------------------------------------------------------------------------------------

    def parse_attributes(self, text) -> dict:
        """The /feedback endpoint's corrected attributes: a JSON object as text (the store checks the vocabulary)."""
        return json_object(text, "corrected attributes", JSON_EXAMPLE) or {}

    def parse_attribute_status(self, text) -> dict | None:
        """The /feedback endpoint's attribute statuses: a JSON object as text, or None when empty (all confirmed)."""
        return json_object(text, "attribute status", STATUS_EXAMPLE)

    def parse_tags(self, values) -> list[str]:
        """Free and detail tags from a comma-separated string or a list: short phrases, no markup."""
        if values is None:
            return []
        if isinstance(values, str):
            if len(values) > MAX_TAGS_TEXT_CHARS:
                raise user_error(f"tags: {len(values)} characters is over the limit of {MAX_TAGS_TEXT_CHARS}.")
            values = values.split(",")
        tags = []
        for value in values:
            tag = " ".join(str(value).split())
            if not tag:
                continue
            if len(tag) > MAX_TAG_CHARS:
                raise user_error(f"tag {shown(tag, 40)} is over {MAX_TAG_CHARS} characters.")
            if not TAG_PATTERN.match(tag):
                allowed = "letters, digits, spaces and - ' &amp; / . +"
                raise user_error(f"tag {shown(tag, 40)} may only hold {allowed} (no markup).")
            if tag.lower() not in {t.lower() for t in tags}:
                tags.append(tag)
        if len(tags) > MAX_TAGS:
            raise user_error(f"{len(tags)} tags is over the limit of {MAX_TAGS}.")
        return tags

    def save_feedback(
        self,
        payload,
        corrected: dict,
        tags: list[str],
        consent,
        annotator: str,
        submitter: str | None = None,
        status: dict | None = None,
    ) -> tuple[str, Upload]:
        """Store a correction with the prediction the user was shown; returns the record id and the decoded upload.

        `payload` is an upload (or one already read). `status` is attribute -> "changed" | "confirmed" |
        "untouched" (None: all confirmed). `submitter` (the Gradio session) lets a retry of the same submission get
        its own id back, never another's.
        """
        if consent is not True:
            raise user_error("Tick the consent box first: without consent nothing is stored.")
        upload = payload if isinstance(payload, Upload) else self.read_upload(payload)
        labelled = [name for name, label in corrected.items() if label and (status or {}).get(name) != UNTOUCHED]
        if not labelled and not tags:
            hint = (
                "Every label is still the model's prediction and none is confirmed: change or confirm at least one"
                if any(corrected.values())
                else "Choose at least one label"
            )
            raise user_error(f"Nothing to save: the correction is empty. {hint}, or add a tag, then submit.")
        try:
            record_id = self.store.add(
                upload.path or upload.image,
                self.prediction_for(upload),
                corrected,
                tags,
                consent=True,
                model_id=self.model_id,
                model_revision=self.revision,
                annotator=annotator,
                submitter=submitter,
                attribute_status=status,
            )
        except FeedbackValidationError as error:
            raise user_error(shown(self.redact(str(error)), 600)) from None
        except FeedbackStoreError as error:
            logger.error("Feedback could not be stored: %s", self.redact(str(error)))
            problem = storage_problem(error)
            message = f"Your feedback could not be stored: {problem}. Nothing was saved; try again later."
            raise user_error(message) from None
        return record_id, upload

    def delete_feedback(self, record_id) -> dict:
        record_id = str(record_id or "").strip().lower()
        if not re.fullmatch(r"[0-9a-f]{32}", record_id):
            raise user_error("A record id is the 32-character code shown when you submitted (digits and letters a-f).")
        try:
            deleted = self.store.delete(record_id)
        except FeedbackStoreError as error:
            logger.error("Feedback could not be withdrawn: %s", self.redact(str(error)))
            problem = storage_problem(error)
            message = f"The record could not be withdrawn: {problem}. It is unchanged; try again later."
            raise user_error(message) from None
        if not deleted:
            raise user_error(f"No feedback record with id {record_id}: it was never stored or is already withdrawn.")
        return {"id": record_id, "status": "deleted"}

    def store_status(self) -> str:
        """The page's status line, the same for every visitor: where corrections go, and whether that works.

        No record count (it would tell a visitor when others submit) and no error text (the Hub's replies are the
        server's business: the store logs each failure, redacted)."""
        info = self.store.hub_status()
        if not info["enabled"]:
            return "Corrections are kept on this server."
        if info["consecutive_failures"]:
            return "Corrections are kept on this server; sending them to the dataset is delayed and will be retried."
        every = f"{self.store.every_minutes:g}"
        return f"Corrections are kept on this server and sent to the dataset every {every} minutes."

    # -- downloads ------------------------------------------------------------------------------------------------

    def export(self, rows: list[dict], table: list[list], headers: list[str]) -> tuple[str, str]:
        """Write the multi-image results as CSV and JSON files for download (exports older than an hour go)."""
        cutoff = time.time() - 3600
        for old in self._export_dir.glob("*"):
            if old.stat().st_mtime < cutoff:
                old.unlink(missing_ok=True)
        stem = self._export_dir / f"fashion-tags-{time.strftime('%Y%m%d-%H%M%S')}-{os.urandom(3).hex()}"
        with open(f"{stem}.csv", "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(headers)
            writer.writerows([[csv_cell(value) for value in row] for row in table])
        Path(f"{stem}.json").write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")
        return f"{stem}.csv", f"{stem}.json"


def json_object(text, what: str, example: str) -> dict | None:
    """A JSON object sent as text to an endpoint, or None for empty text; anything else is a clear user error."""
    if text is None or (isinstance(text, str) and not text.strip()):
        return None
    expected = f"{what} must be a JSON object like {example}"
    if not isinstance(text, str):
        raise user_error(f"{expected}, sent as text.")
    if len(text) > MAX_ATTRIBUTES_JSON_CHARS:
        raise user_error(f"{what}: {len(text)} characters is over the limit of {MAX_ATTRIBUTES_JSON_CHARS}.")
    try:
        value = json.loads(text, object_pairs_hook=unique_keys)
    except DuplicateAttributeError as error:
        raise user_error(f"{what}: {shown(error.key)} is named twice; give each attribute once.") from None
    except ValueError as error:
        raise user_error(f"{expected} ({shown(error)}).") from None
    if not isinstance(value, dict):
        raise user_error(f"{expected}, not {type(value).__name__}.")
    return value


def csv_cell(value):
    """Spreadsheets run cells that start with = + - @ as formulas: user file names must not."""
    return "'" + value if isinstance(value, str) and value[:1] in ("=", "+", "-", "@") else value
