"""The service behind the page and the API: safe decoding, the pipeline, heatmaps, the annotation queue, the store.

Every refusal is a `RequestError` (`errors.py`) whose message names the input and what would be valid.
"""

import logging
import threading
import time
from pathlib import Path

from fashion_hf.configuration_fashion_tagger import DETAIL_GROUP
from fashion_hf.explain import explained_attribute, grad_cam, overlay_heatmap, uncertainty
from fashion_hf.feedback import (
    UNTOUCHED, FeedbackStore, FeedbackStoreError, FeedbackValidationError, Redactor, is_record_id,
)  # fmt: skip
from fashion_hf.image_decoding import accepted_suffixes

from .batching import PredictionCache, RequestBatcher
from .errors import FeedbackError, StorageError, UploadError, shown, storage_problem
from .exports import Exports
from .settings import Settings
from .tagger import served_revision
from .uploads import Upload, decoded_upload, read_upload
from .views import needs_a_second_look, queue_caption

logger = logging.getLogger("fashion_hf.app")

TOP_K = 5
MAX_EXAMPLES = 64
QUEUE_SIZE = 24
RECENT_UPLOADS = 12


def annotation_priority(item: dict) -> tuple[bool, float]:
    """Queue order, highest first: "not sure" (or flagged) before sure, then the more uncertain."""
    return item["not_sure"], item["uncertainty"]


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
            lambda uploads: self.predict(uploads)[0], settings.max_batch_size, max_running=settings.concurrency
        )
        self.detail_tags = [text for text, group in self.config.tags if group == DETAIL_GROUP]
        self.examples = self._load_examples()
        self._exports = Exports()

    # -- images ---------------------------------------------------------------------------------------------------

    def read_upload(self, payload) -> Upload:
        """Decode one uploaded image safely, or raise `UploadError` naming the file and what would be valid."""
        return read_upload(payload, self.tagger.image_processor.image_limits)

    def read_bytes(self, data: bytes, name: str) -> Upload:
        """Decode an image file's bytes (`POST /v1/tag`'s body) as `read_upload` decodes an upload."""
        return decoded_upload(data, name, None, self.tagger.image_processor.image_limits)

    def many_payloads(self, payloads) -> list:
        """The files of a several-images request, or `UploadError` when there are none or too many."""
        payloads = [payload for payload in payloads or [] if payload]
        if not payloads:
            raise UploadError("No images: choose one or more image files first.")
        limit = self.settings.max_images_per_request
        if len(payloads) > limit:
            raise UploadError(f"{len(payloads)} images is over the limit of {limit} per request.")
        return payloads

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
        framed = [processor.framed(upload.image) for upload in uploads]  # what the model sees, and the overlay shows
        pixel_values = processor(framed, return_tensors="pt")["pixel_values"]
        attribute = explained_attribute(self.config)
        labels = self.config.attributes[attribute]
        label_ids = [labels.index(prediction["attributes"][attribute][0]["label"]) for prediction in predictions]
        with self.model_slots:
            cam = grad_cam(self.tagger.model, pixel_values, attribute, label_ids)
        size = (processor.size["height"], processor.size["width"])
        overlays = [overlay_heatmap(image, heatmap, size) for image, heatmap in zip(framed, cam.maps)]
        return overlays, cam.attribute, time.perf_counter() - start

    def export(self, rows: list[dict], table: list[list], headers: list[str]) -> tuple[str, str]:
        """The several-images results as CSV and JSON files for download (exports older than an hour go)."""
        return self._exports.write(rows, table, headers)

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
            except UploadError as error:
                logger.warning("Skipping example %s: %s", path, error)
        items = []
        for start in range(0, len(uploads), self.settings.max_batch_size):
            chunk = uploads[start : start + self.settings.max_batch_size]
            results = self.predict(chunk)[0]
            items += [self.queue_item(upload, result, "example") for upload, result in zip(chunk, results)]
        return items

    def queue_item(self, upload: Upload, prediction: dict, source: str) -> dict:
        return {
            "path": str(Path(upload.path).resolve()) if upload.path else None,
            "sha256": upload.sha256,
            "not_sure": needs_a_second_look(prediction),
            "uncertainty": uncertainty(prediction),
            "caption": queue_caption(source, prediction, explained_attribute(self.config)),
        }

    def with_recent(self, recent: list[dict], upload: Upload, prediction: dict) -> list[dict]:
        """This session's recent uploads with `upload` first (once), at most `RECENT_UPLOADS` of them."""
        item = self.queue_item(upload, prediction, "your upload")
        return [item, *[old for old in recent or [] if old["sha256"] != item["sha256"]]][:RECENT_UPLOADS]

    def annotation_queue(self, recent: list[dict], labelled: list[str]) -> list[dict]:
        """The examples and this session's own uploads, less what this session labelled: first those with a head
        "not sure" or flagged as not a clothing photo (the calibrated thresholds say these answers are guesses), then
        the rest, each part least certain first.

        Uploads stay private to their session: one user's photos never reach another user's queue.
        """
        done = set(labelled or [])
        items = [*(recent or []), *self.examples]
        # Uploads leave Gradio's cache after an hour (delete_cache): such entries leave the queue too.
        items = [item for item in items if item["sha256"] not in done and item["path"] and Path(item["path"]).is_file()]
        unique = {item["sha256"]: item for item in reversed(items)}  # an upload of an example counts once
        return sorted(unique.values(), key=annotation_priority, reverse=True)[:QUEUE_SIZE]

    # -- feedback -------------------------------------------------------------------------------------------------

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
            raise FeedbackError("Tick the consent box first: without consent nothing is stored.")
        upload = payload if isinstance(payload, Upload) else self.read_upload(payload)
        labelled = [name for name, label in corrected.items() if label and (status or {}).get(name) != UNTOUCHED]
        if not labelled and not tags:
            hint = (
                "Every label is still the model's prediction and none is confirmed: change or confirm at least one"
                if any(corrected.values())
                else "Choose at least one label"
            )
            raise FeedbackError(f"Nothing to save: the correction is empty. {hint}, or add a tag, then submit.")
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
            raise FeedbackError(shown(self.redact(str(error)), 600)) from None
        except FeedbackStoreError as error:
            logger.error("Feedback could not be stored: %s", self.redact(str(error)))
            problem = storage_problem(error)
            message = f"Your feedback could not be stored: {problem}. Nothing was saved; try again later."
            raise StorageError(message) from None
        return record_id, upload

    def delete_feedback(self, record_id) -> dict:
        record_id = str(record_id or "").strip().lower()
        if not is_record_id(record_id):
            expected = "the 32-character code shown when you submitted (digits and letters a-f)"
            raise FeedbackError(f"A record id is {expected}.")
        try:
            deleted = self.store.delete(record_id)
        except FeedbackStoreError as error:
            logger.error("Feedback could not be withdrawn: %s", self.redact(str(error)))
            problem = storage_problem(error)
            message = f"The record could not be withdrawn: {problem}. It is unchanged; try again later."
            raise StorageError(message) from None
        if not deleted:
            raise FeedbackError(f"No feedback record with id {record_id}: it was never stored or is already withdrawn.")
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
