"""fashion-hf app: tag product photos, see why, and help us label (a Gradio 6 Space, or `python app.py` locally).

The app is thin: the "fashion-tagging" pipeline predicts, `fashion_hf.explain` draws the Grad-CAM heatmap and ranks
images by uncertainty, `fashion_hf.feedback.FeedbackStore` stores corrections, and the `serving` package (settings,
safe upload decoding, `TaggerService`, the views) is what the handlers call. This file is the page (`lay_out`), its
event wiring (`wire_events`, `Handlers`), and the one place where the service's refusals become `gr.Error`.

Configuration is read from the environment (see `serving.settings.Settings`); Gradio's own `GRADIO_SERVER_NAME` and
`GRADIO_SERVER_PORT` are honoured by `launch()`. Tests build the app with `build_app(model=..., feedback_dir=...)`.

Named API endpoints (gradio_client):
    client.predict(handle_file("photo.jpg"), api_name="/tag")         -> {"attributes": {...}, "tags": [...],
                                                                          "not_sure": {...}, "out_of_distribution": ...}
    client.predict([handle_file(...), ...], api_name="/tag_many")      -> (table, CSV file, JSON file)
    client.predict(handle_file("photo.jpg"), '{"articleType": "Tshirts"}', "check, slim fit", True,
                   api_name="/feedback")                               -> {"id": "<record id>", "status": "saved"}
    client.predict(handle_file("photo.jpg"), '{"articleType": "Tshirts", "gender": "Men"}', "", True,
                   '{"articleType": "changed", "gender": "untouched"}', api_name="/feedback")
        the optional 5th input, attribute_status, says per attribute whether it was "changed", "confirmed" or left
        "untouched" as prefilled (only changed and confirmed ones are trained on); left out, all are "confirmed".
    client.predict("<record id>", api_name="/delete_feedback")         -> {"id": "<record id>", "status": "deleted"}
    client.predict(handle_file("photo.jpg"), 8, '{"gender": "Women"}', api_name="/similar")
        -> {"items": [{"id": ..., "image_path": ..., "score": ..., "articleType": ..., ...}, ...]}
        the catalogue items most like the photo, best first, with their attributes; k (default 8) and the filters
        (JSON: attribute -> label or list of labels) are optional.
The "Similar items" gallery and /similar search the index folder in $FASHION_SIMILAR_INDEX (`fashion-hf index`), else
the example photos, indexed at start.
Bad input raises `gr.Error` (`AppError` in gradio_client) with a message naming the input and what would be valid.

Plain HTTP, one request a photo (`serving.rest`; the same answer as /tag, a JSON `{"error": ...}` refusal otherwise):
    curl --data-binary @photo.jpg "http://127.0.0.1:7860/v1/tag?name=photo.jpg"
"""

import functools
import html
import importlib.util
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path

import gradio as gr

from fashion_hf.explain import explained_attribute
from fashion_hf.feedback import ANONYMOUS, FeedbackStore, Redactor
from fashion_hf.image_decoding import accepted_suffixes, load_rgb_image
from fashion_hf.runtime import keep_freed_memory, limit_malloc_arenas
from fashion_hf.similar import INDEX_ENV, SimilarItems
from serving.corrections import (
    MAX_TAGS,
    MAX_TAGS_TEXT_CHARS,
    attribute_statuses,
    json_object,
    parse_attribute_status,
    parse_attributes,
    parse_tags,
)
from serving.errors import FeedbackError, RequestError, UploadError, shown
from serving.model_card import model_card_markdown
from serving.rest import rest_routes
from serving.service import TOP_K, TaggerService
from serving.settings import Settings
from serving.tagger import load_tagger
from serving.uploads import payload_parts
from serving.views import (
    feedback_form,
    gallery_value,
    label_panels,
    ood_notice,
    saved_note,
    table_headers,
    table_row,
    tag_chips,
    timing_text,
    withdrawn_note,
)

logger = logging.getLogger("fashion_hf.app")

# Gradio's queue rebuilds a pandas summary of its last 10,000 events after every event (for its monitoring page);
# under load that was most of the server's Python time and cut /tag throughput 6x while /feedback ran beside it.
# Once every 1,000 events keeps the page useful. Read when a Blocks' queue is created; an explicit setting wins.
os.environ.setdefault("GRADIO_ANALYTICS_CACHE_FREQUENCY", "1000")


CSS = """
.chips { display: flex; flex-wrap: wrap; gap: 6px; }
.chip { border-radius: 999px; padding: 3px 10px; font-size: 0.9em;
        background: var(--color-accent-soft); border: 1px solid var(--border-color-accent); }
.chip .group { opacity: 0.65; font-size: 0.85em; margin-left: 4px; }
.chip .score { font-weight: 600; margin-left: 4px; }
.chip .head { font-style: italic; opacity: 0.75; margin-left: 6px; }
/* A guess is not shown as an answer: a not-sure chip or label panel, and a flagged photo's chips and panels, are
   muted. */
.chip.not-sure { background: none; border-style: dashed; opacity: 0.75; }
.chips.muted, #labels .muted, #labels .not-sure { opacity: 0.6; }
.ood-notice { margin: 0; padding: var(--size-2) var(--size-3); border-radius: var(--radius-md); font-weight: 600;
              background: var(--color-yellow-50, #fefce8); border: 1px solid var(--color-yellow-500, #eab308); }
.turned-note { margin: 0; padding: var(--size-1) var(--size-3); font-style: italic; }
/* Seven label panels share a row, each at least 160 px wide: the longest label ("Moisturisers 100%") must fit
   whole, not be clipped by the panel ("Accessories 86%" showed "86"). */
#labels .output-class { padding: var(--size-6) var(--size-1) var(--size-4); font-size: var(--text-lg);
                        text-align: center; overflow-wrap: anywhere; }
#labels .confidence-set { font-size: var(--text-sm); }
#labels .confidence-set .line { padding: 0; min-width: var(--size-2); }
#labels .confidence-set .text { min-width: 0; overflow-wrap: anywhere; }
"""
PRIVATE = {"api_visibility": "private"}
SIMILAR_K = 8  # the gallery's items, and /similar's default
MAX_SIMILAR_K = 50
THUMBNAIL_SIZE = (256, 256)
FILTERS_EXAMPLE = '{"gender": "Women", "articleType": ["Tops", "Tshirts"]}'


def launch_options(settings: Settings, service: TaggerService | None = None) -> dict:
    """Keyword arguments for `demo.launch()`: upload limit, theme and CSS (Gradio 6 takes them at launch), and with
    the app's `service` its plain HTTP route, `POST /v1/tag` (`serving.rest`)."""
    examples = Path(settings.examples_dir).resolve() if settings.examples_dir else None
    return {
        **({"app_kwargs": {"routes": rest_routes(service)}} if service is not None else {}),
        "max_file_size": settings.max_upload_bytes,
        "theme": gr.themes.Soft(),
        "css": CSS,
        "allowed_paths": [str(examples)] if examples and examples.is_dir() else [],
        "show_error": True,
    }


# ---------------------------------------------------------------------------------------------------------------------
# What Gradio hands a handler: the annotator, the session, the refusals shown
# ---------------------------------------------------------------------------------------------------------------------


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


def parse_filters(text) -> dict | None:
    """/similar's filters: a JSON object as text, attribute -> a label or a list of labels; empty text: none."""
    return json_object(text, "filters", FILTERS_EXAMPLE)


def shows_refusals(handler):
    """`handler` with the service's refusals shown to their sender alone: a `gr.Error` with the same message (a modal
    in the page, `AppError` in gradio_client), without a server traceback."""

    @functools.wraps(handler)
    def refusing(*args, **kwargs):
        try:
            return handler(*args, **kwargs)
        except RequestError as error:
            raise gr.Error(str(error), print_exception=False) from None

    return refusing


# ---------------------------------------------------------------------------------------------------------------------
# The event handlers
# ---------------------------------------------------------------------------------------------------------------------


class Handlers:
    """Each handler turns one event's component values into calls of the service, and its results into values of
    components. Gradio fills the parameters annotated `gr.Request`, `gr.OAuthProfile` or `gr.SelectData` itself."""

    def __init__(self, service: TaggerService, similar_items: SimilarItems | None = None):
        self.service = service
        self.similar_items = similar_items
        self.attributes = list(service.config.attributes)
        # The Tag tab: a label per attribute, chips, heatmap, timing, the out-of-distribution notice, raw prediction.
        self.panels = len(self.attributes) + 5
        # The feedback form: image, a dropdown per attribute, details, text, confirmed, consent, note, what was shown.
        self.form_size = len(self.attributes) + 7

    # -- the API ------------------------------------------------------------------------------------------------------

    @shows_refusals
    def tag_api(self, image):
        """/tag: the pipeline's JSON contract for one upload, run in one model batch with concurrent requests'."""
        return self.service.tag(self.service.read_upload(image))

    @shows_refusals
    def feedback_api(
        self,
        image,
        corrected_attributes,
        tags,
        consent,
        attribute_status="",
        profile: gr.OAuthProfile | None = None,
        request: gr.Request = None,
    ):
        """/feedback: store a correction (consent required); returns the record id. `attribute_status` (optional,
        JSON) says which attributes were changed, confirmed or left untouched; without it all are confirmed."""
        corrected = parse_attributes(corrected_attributes)
        status = parse_attribute_status(attribute_status)
        tags = parse_tags(tags)
        annotator, retry_key = annotator_name(profile), submitter(request)
        record_id, _ = self.service.save_feedback(image, corrected, tags, consent, annotator, retry_key, status)
        return {"id": record_id, "status": "saved"}

    @shows_refusals
    def delete_api(self, record_id):
        """/delete_feedback: withdraw a stored submission by its record id."""
        return self.service.delete_feedback(record_id)

    @shows_refusals
    def similar_api(self, image, k=SIMILAR_K, filters=""):
        """/similar: the catalogue items most like the upload, best first (id, image_path, score and attributes)."""
        found = self.find_similar(self.service.read_upload(image), k, parse_filters(filters))
        # A dict with a "path" reads as a file to gradio_client, which would try to download it.
        return {"items": [{("image_path" if key == "path" else key): value for key, value in item.items()}
                          for item in found]}  # fmt: skip

    def find_similar(self, upload, k, filters: dict | None) -> list[dict]:
        if self.similar_items is None:
            raise RequestError(f"There is no catalogue to search: set {INDEX_ENV} to an index folder "
                               "(`fashion-hf index`) or EXAMPLES_DIR to a folder of photos.")  # fmt: skip
        if isinstance(k, bool) or not isinstance(k, (int, float)) or k != int(k) or not 1 <= k <= MAX_SIMILAR_K:
            raise RequestError(f"k must be a whole number from 1 to {MAX_SIMILAR_K}, got {shown(k)}.")
        try:
            return self.similar_items(upload.image, int(k), filters)
        except ValueError as error:  # a filter naming an attribute the catalogue lacks
            raise RequestError(shown(error, 600)) from None

    # -- the Tag tab --------------------------------------------------------------------------------------------------

    def tag_results(self, images):
        """The Tag tab, batched: per request the values of its panels (`label_panels`, tag chips, heatmap, timing,
        out-of-distribution notice, raw prediction), or the reason its upload was refused. One bad upload fails
        neither the others in its batch nor the panels: `show_tagged` shows the values, `refuse_tagged` the
        refusal."""
        results = [{"values": self.empty_panels()} for _ in images]  # no image: empty panels
        uploads = {}
        for index, payload in enumerate(images):
            if payload:
                try:
                    uploads[index] = self.service.read_upload(payload)
                except UploadError as error:
                    results[index] = {"error": str(error)}
        if uploads:
            predictions, predict_seconds = self.service.predict(list(uploads.values()))
            overlays, attribute, cam_seconds = self.service.heatmaps(list(uploads.values()), predictions)
            timing = timing_text(predict_seconds, cam_seconds, len(uploads), attribute)
            for index, prediction, overlay in zip(uploads, predictions, overlays):
                labels = label_panels(prediction, self.attributes)
                notice = ood_notice(prediction)
                results[index] = {"values": [*labels, tag_chips(prediction), overlay, timing, notice, prediction]}
        return (results,)

    def similar_gallery(self, image):
        """The Tag tab's "Similar items": thumbnails of the catalogue items most like the photo, captioned."""
        if not image:
            return []
        found = self.find_similar(self.service.read_upload(image), SIMILAR_K, None)
        limits = self.service.tagger.image_processor.image_limits
        gallery = []
        for item in found:
            thumbnail = load_rgb_image(self.similar_items.image_input(item), limits)
            thumbnail.thumbnail(THUMBNAIL_SIZE)
            labels = [str(item[name]) for name in ("articleType", "baseColour", "gender") if item.get(name)]
            gallery.append((thumbnail, f"{' · '.join(labels)} ({item['score']:.2f})"))
        return gallery

    def empty_panels(self) -> list:
        return [*label_panels(None, self.attributes), None, None, None, "", None]

    def panel_updates(self, values: list) -> list:
        """`tag_results`' values as the panels take them: each label panel a `gr.Label` update, since a "not sure"
        caption and a muted look are its props, not its value."""
        count = len(self.attributes)
        return [*(gr.Label(**panel) for panel in values[:count]), *values[count:]]

    def show_tagged(self, result):
        values = result["values"] if "values" in result else self.empty_panels()  # a refused upload: nothing stale
        return self.panel_updates(values)

    @shows_refusals
    def refuse_tagged(self, result):
        if "error" in result:
            raise UploadError(result["error"])

    @shows_refusals
    def tag_image_api(self, images):
        """/tag_image (undocumented), batched: the panels' values, as the Tag tab shows them."""
        results = self.tag_results(images)[0]
        for result in results:
            self.refuse_tagged(result)
        return tuple(map(list, zip(*(self.panel_updates(result["values"]) for result in results))))

    @shows_refusals
    def check_many(self, images):
        return self.service.many_payloads(images)

    @shows_refusals
    def tag_many(self, images):
        """Several images: a table (an unreadable file gets an error in its row), as CSV and JSON files."""
        payloads = self.service.many_payloads(images)
        uploads, errors = {}, {}
        for index, payload in enumerate(payloads):
            try:
                uploads[index] = self.service.read_upload(payload)
            except UploadError as error:
                errors[index] = (payload_parts(payload)[2], html.unescape(str(error)))
        results = dict(zip(uploads, self.service.predict(list(uploads.values()))[0])) if uploads else {}
        headers = table_headers(self.attributes)
        table, rows = [], []
        for index in range(len(payloads)):
            name, error = (uploads[index].name, None) if index in uploads else errors[index]
            table.append(table_row(name, results.get(index), error, self.attributes))
            rows.append({"file": name, **({"result": results[index]} if index in results else {"error": error})})
        csv_path, json_path = self.service.export(rows, table, headers)
        return {"headers": headers, "data": table}, csv_path, json_path

    # -- the Help us label tab ----------------------------------------------------------------------------------------

    @shows_refusals
    def prefill_after_tagging(self, image, recent, labelled):
        """The tagged photo goes to the feedback form and to the front of this session's queue."""
        if not image:
            return [*[gr.skip()] * self.form_size, recent, gr.skip(), gr.skip()]
        upload = self.service.read_upload(image)
        prediction = self.service.prediction_for(upload)  # the server's copy, cached by tagging
        recent = self.service.with_recent(recent, upload, prediction)
        queue = self.service.annotation_queue(recent, labelled)
        return [*feedback_form(upload, prediction, self.attributes), recent, gallery_value(queue), queue]

    @shows_refusals
    def prefill_upload(self, image):
        if not image:
            return [gr.skip()] * self.form_size
        return self.prefilled(image)

    @shows_refusals
    def pick_from_queue(self, queue, evt: gr.SelectData):
        if not queue or evt.index is None or not 0 <= evt.index < len(queue):
            return [gr.skip()] * self.form_size
        return self.prefilled(queue[evt.index]["path"])

    def prefilled(self, image) -> list:
        upload = self.service.read_upload(image)
        return feedback_form(upload, self.service.prediction_for(upload), self.attributes)

    def refresh_queue(self, recent, labelled):
        queue = self.service.annotation_queue(recent, labelled)
        return gallery_value(queue), queue

    @shows_refusals
    def submit_ui(self, profile: gr.OAuthProfile | None, request: gr.Request, image, *values):
        """Store the form's correction: the record id and the image's hash, for `show_saved`."""
        # Gradio injects `profile` and `request` by position: before the variable number of attribute dropdowns.
        *labels, details, free_text, confirmed, consent, shown = values
        corrected = {name: label for name, label in zip(self.attributes, labels) if label}
        upload = self.service.read_upload(image)
        if not shown or shown["sha256"] != upload.sha256:  # the image's prediction has not reached the form yet
            raise FeedbackError("The form is not filled in for this image yet: wait for its labels, then submit.")
        # Detail tags left exactly as predicted are the model's guess, like an untouched label: not sent.
        reviewed = [] if set(details or []) == set(shown.get("details", [])) else list(details or [])
        tags = parse_tags([*reviewed, *(free_text or "").split(",")])
        status = attribute_statuses(corrected, shown["labels"], confirmed or [])
        annotator, retry_key = annotator_name(profile), submitter(request)
        record_id, _ = self.service.save_feedback(upload, corrected, tags, consent, annotator, retry_key, status)
        return {"id": record_id, "sha256": upload.sha256}

    def show_saved(self, saved, labelled, recent):
        labelled = [*(labelled or []), saved["sha256"]]
        queue = self.service.annotation_queue(recent, labelled)
        return saved_note(saved["id"]), saved["id"], self.service.store_status(), labelled, gallery_value(queue), queue

    @shows_refusals
    def delete_ui(self, record_id):
        result = self.service.delete_feedback(record_id)
        return withdrawn_note(result["id"]), self.service.store_status()

    def on_load(self):
        return self.service.store_status(), *self.refresh_queue([], [])


# ---------------------------------------------------------------------------------------------------------------------
# The page
# ---------------------------------------------------------------------------------------------------------------------


class Blocks(gr.Blocks):
    """`gr.Blocks` whose API events can gain trailing inputs without breaking the callers that predate them.

    gradio_client fills a left-out input with its default, but Gradio refuses a plain HTTP call (`POST
    /gradio_api/call/<api>`) that sends fewer values than the event has inputs. `optional_inputs[api_name]` is how many
    trailing inputs a call may leave out; they get their component's value.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.optional_inputs: dict[str, int] = {}

    def validate_inputs(self, block_fn, inputs):
        missing = len(block_fn.inputs) - len(inputs)
        if 0 < missing <= self.optional_inputs.get(block_fn.api_name, 0):
            inputs.extend(block.value for block in block_fn.inputs[-missing:])
        super().validate_inputs(block_fn, inputs)


@dataclass
class TagTab:
    image: gr.Image
    labels: list[gr.Label]
    chips: gr.HTML
    heatmap: gr.Image
    timing: gr.Markdown
    notice: gr.HTML
    prediction: gr.JSON
    many_images: gr.File
    many_button: gr.Button
    table: gr.Dataframe
    csv_file: gr.File
    json_file: gr.File
    similar: gr.Gallery | None  # None without a catalogue to search

    @property
    def panels(self) -> list:
        """What one tagged image shows, in the order of `Handlers.tag_results`' values."""
        return [*self.labels, self.chips, self.heatmap, self.timing, self.notice, self.prediction]


@dataclass
class FeedbackTab:
    image: gr.Image
    dropdowns: list[gr.Dropdown]
    confirmed: gr.CheckboxGroup
    details: gr.Dropdown
    free_text: gr.Textbox
    consent: gr.Checkbox
    submit: gr.Button
    confirmation: gr.Markdown
    queue: gr.Gallery
    refresh: gr.Button
    withdraw_id: gr.Textbox
    withdraw: gr.Button
    withdraw_result: gr.Markdown
    store_status: gr.Markdown

    def form(self, shown: gr.State) -> list:
        """The form's components, in the order of `serving.views.feedback_form`'s values."""
        return [self.image, *self.dropdowns, self.details, self.free_text, self.confirmed, self.consent,
                self.confirmation, shown]  # fmt: skip


@dataclass
class ApiInputs:
    """Hidden components read by the API-only endpoints, so that their signatures are exactly the documented ones."""

    image: gr.Image
    attributes: gr.Textbox
    tags: gr.Textbox
    consent: gr.Checkbox
    status: gr.Textbox
    record_id: gr.Textbox
    similar_k: gr.Number
    similar_filters: gr.Textbox
    result: gr.JSON
    trigger: gr.Button


@dataclass
class Page:
    tag: TagTab
    feedback: FeedbackTab
    api: ApiInputs


def lay_out(service: TaggerService, similar_items: SimilarItems | None = None) -> Page:
    """The page's components, created inside the current `Blocks`: the three tabs and the API's hidden inputs."""
    gr.Markdown(
        "# fashion-hf\nTag fashion product photos: category, colour, gender, season, usage and descriptive tags. "
        "Help us improve the model in the *Help us label* tab."
    )
    with gr.Tabs():
        with gr.Tab("Tag", id="tag"):
            tag = tag_tab(service, similar_items)
        with gr.Tab("Help us label", id="feedback"):
            feedback = feedback_tab(service)
        with gr.Tab("Model", id="model"):
            gr.Markdown(model_card_markdown(service), elem_id="model-card")
    with gr.Row(visible=False):
        api = api_inputs()
    return Page(tag, feedback, api)


def tag_tab(service: TaggerService, similar_items: SimilarItems | None = None) -> TagTab:
    attributes = list(service.config.attributes)
    with gr.Row():
        with gr.Column():
            image = gr.Image(
                type="filepath",
                sources=["upload", "clipboard", "webcam"],
                label="Product photo",
                height=360,
                elem_id="tag-image",
            )
            if service.examples:
                gr.Examples([[item["path"]] for item in service.examples], inputs=[image], examples_per_page=16)
            timing = gr.Markdown(elem_id="timing")
        with gr.Column():
            heatmap = gr.Image(
                label=f"Heatmap: what drove the top {explained_attribute(service.config)}",
                type="pil",
                format="png",
                interactive=False,
                height=360,
                elem_id="heatmap",
            )
            chips = gr.HTML(label="Generated tags", elem_id="tag-chips")
    notice = gr.HTML(elem_id="ood-notice")  # empty unless the photo does not look like a clothing photo
    with gr.Row(elem_id="labels"):
        labels = [gr.Label(num_top_classes=TOP_K, label=name, elem_id=f"label-{name}") for name in attributes]
    similar = None
    if similar_items is not None:
        similar = gr.Gallery(
            label=f"Similar items ({len(similar_items.index):,} in the catalogue)",
            columns=SIMILAR_K,
            height=240,
            object_fit="contain",
            interactive=False,
            elem_id="similar-items",
        )
    with gr.Accordion("Raw prediction (the /tag API output)", open=False):
        prediction = gr.JSON(label="Prediction", elem_id="prediction-json")
    with gr.Accordion("Several images at once: a table, as CSV and JSON", open=False):
        with gr.Row():
            many_images = gr.File(file_count="multiple", file_types=["image"], label="Images", height=160)
            with gr.Column():
                many_button = gr.Button("Tag all", variant="primary")
                with gr.Row():
                    csv_file = gr.File(label="CSV", interactive=False, height=80)
                    json_file = gr.File(label="JSON", interactive=False, height=80)
        table = gr.Dataframe(headers=table_headers(attributes), label="Results", interactive=False, wrap=True)
    return TagTab(
        image, labels, chips, heatmap, timing, notice, prediction, many_images, many_button, table, csv_file, json_file,
        similar,
    )  # fmt: skip


def feedback_tab(service: TaggerService) -> FeedbackTab:
    gr.Markdown(
        "Correct what the model got wrong, and tick the labels you checked and found right. Pick an image "
        "from the queue (those the model is not sure about come first) or tag your own photo first. "
        "**Nothing is stored unless you tick the consent box.**"
    )
    if oauth_enabled():
        gr.LoginButton()
    with gr.Row():
        with gr.Column(scale=1):
            image = gr.Image(
                type="filepath",
                sources=["upload", "clipboard"],
                label="Image to label",
                height=320,
                elem_id="feedback-image",
            )
        with gr.Column(scale=2):
            with gr.Row():
                dropdowns = [
                    gr.Dropdown(choices=labels, value=None, label=name, interactive=True, elem_id=f"fix-{name}")
                    for name, labels in service.config.attributes.items()
                ]
            confirmed = gr.CheckboxGroup(
                choices=list(service.config.attributes),
                value=[],
                label="Labels I checked and found right as shown",
                info="A label you change counts as your correction. Tick those you checked and kept; "
                "the others stay the model's guess, and the model does not learn from them.",
                elem_id="fix-confirmed",
            )
            details = gr.Dropdown(
                choices=service.detail_tags,
                multiselect=True,
                allow_custom_value=True,
                label="Detail tags",
                elem_id="fix-details",
            )
            free_text = gr.Textbox(
                label="Other tags (comma-separated), for what the vocabulary lacks",
                max_length=MAX_TAGS_TEXT_CHARS,
                elem_id="fix-free-text",
            )
            consent = gr.Checkbox(
                value=False,
                label="I consent to this image and my corrections being stored and shared as a dataset "
                "to improve the model.",
                elem_id="consent",
            )
            submit = gr.Button("Submit correction", variant="primary", elem_id="submit-feedback")
            confirmation = gr.Markdown(elem_id="confirmation")
    gr.Markdown('### Needs labels ("not sure" first, then least certain)')
    queue = gr.Gallery(
        label="Annotation queue",
        columns=8,
        height=220,
        allow_preview=False,
        fit_columns=False,
        object_fit="contain",
        interactive=False,
        elem_id="queue",
    )
    refresh = gr.Button("Refresh queue", size="sm")
    with gr.Accordion("Withdraw my submission", open=False):
        with gr.Row():
            withdraw_id = gr.Textbox(label="Record id", max_length=64, elem_id="withdraw-id")
            withdraw = gr.Button("Withdraw", variant="stop")
        withdraw_result = gr.Markdown()
    store_status = gr.Markdown(elem_id="store-status")
    return FeedbackTab(
        image, dropdowns, confirmed, details, free_text, consent, submit, confirmation, queue, refresh, withdraw_id,
        withdraw, withdraw_result, store_status,
    )  # fmt: skip


def api_inputs() -> ApiInputs:
    return ApiInputs(
        image=gr.Image(type="filepath", label="image"),
        attributes=gr.Textbox(label="corrected_attributes"),
        tags=gr.Textbox(label="tags"),
        consent=gr.Checkbox(label="consent"),
        status=gr.Textbox(value="", label="attribute_status"),  # optional: today's 4-input calls still work
        record_id=gr.Textbox(label="record_id"),
        similar_k=gr.Number(value=SIMILAR_K, precision=0, label="k"),
        similar_filters=gr.Textbox(value="", label="filters"),
        result=gr.JSON(label="result"),
        trigger=gr.Button(),
    )


# ---------------------------------------------------------------------------------------------------------------------
# The events
# ---------------------------------------------------------------------------------------------------------------------
# Image inputs skip Gradio's preprocessing (preprocess=False): the handlers decode the raw upload themselves, so that
# anything hostile becomes a clear gr.Error instead of a crash inside a component.


@dataclass
class Session:
    """What one browser session keeps between events."""

    recent: gr.State  # its own uploads, for its annotation queue only
    labelled: gr.State  # the images' hashes it labelled, left out of its queue
    queue: gr.State  # the queue as its gallery shows it
    shown: gr.State  # the labels prefilled for the form's image: "changed" is relative to them


def on_model(settings: Settings) -> dict:
    return {"concurrency_limit": settings.concurrency, "concurrency_id": "model"}


def on_store(settings: Settings) -> dict:
    return {"concurrency_limit": settings.feedback_concurrency, "concurrency_id": "feedback"}


def batched(settings: Settings) -> dict:
    return {"batch": True, "max_batch_size": settings.max_batch_size, "preprocess": False, **on_model(settings)}


def held(listener, fn, inputs, outputs, **options):
    """A handler that raises marks every output of its event "Error" (a gallery so marked takes no clicks until it is
    refreshed). So a step that can refuse the user's input writes only to a State: its gr.Error shows once, as a
    toast, and the step that shows the result runs only after it succeeded."""
    result = gr.State()
    return listener(fn, inputs, result, **options).success(lambda values: values, result, outputs, **PRIVATE)


def wire_events(demo: Blocks, page: Page, handlers: Handlers, settings: Settings) -> None:
    """Connect the page's events to the handlers, inside `demo`'s context."""
    session = Session(recent=gr.State([]), labelled=gr.State([]), queue=gr.State([]), shown=gr.State())
    wire_api(demo, page.api, handlers, settings)
    wire_tagging(page, session, handlers, settings)
    wire_feedback(page.feedback, session, handlers, settings)
    demo.load(handlers.on_load, None, [page.feedback.store_status, page.feedback.queue, session.queue], **PRIVATE)


def wire_api(demo: Blocks, api: ApiInputs, handlers: Handlers, settings: Settings) -> None:
    """The documented endpoints: /tag, /feedback, /delete_feedback and /similar."""
    # /tag batches in the service (TaggerService.tag), not with Gradio's batch=True, so that a broken upload fails
    # only its own request; enough requests run at once to fill a batch while the model slots are busy.
    on_tag_api = {"concurrency_limit": settings.max_batch_size, "concurrency_id": "tag-api", "preprocess": False}
    api.trigger.click(handlers.tag_api, api.image, api.result, api_name="tag", **on_tag_api)
    api.trigger.click(
        handlers.feedback_api,
        [api.image, api.attributes, api.tags, api.consent, api.status],
        api.result,
        api_name="feedback",
        preprocess=False,
        **on_store(settings),
    )
    demo.optional_inputs["feedback"] = 1  # attribute_status: plain HTTP calls with today's 4 values still work
    api.trigger.click(handlers.delete_api, api.record_id, api.result, api_name="delete_feedback", **on_store(settings))
    api.trigger.click(
        handlers.similar_api,
        [api.image, api.similar_k, api.similar_filters],
        api.result,
        api_name="similar",
        preprocess=False,
        **on_model(settings),
    )
    demo.optional_inputs["similar"] = 2  # k and filters


def wire_tagging(page: Page, session: Session, handlers: Handlers, settings: Settings) -> None:
    """The Tag tab: a photo's panels (also /tag_image), then the feedback form prefilled; several images (/tag_many)."""
    tag, feedback = page.tag, page.feedback
    page.api.trigger.click(
        handlers.tag_image_api, page.api.image, tag.panels, api_name="tag_image", api_visibility="undocumented",
        **batched(settings),
    )  # fmt: skip
    tagged_state = gr.State()
    tagged = tag.image.change(
        handlers.tag_results, tag.image, tagged_state, show_progress_on=[*tag.labels, tag.heatmap],
        **batched(settings), **PRIVATE,
    )  # fmt: skip
    tagged = tagged.success(handlers.show_tagged, tagged_state, tag.panels, **PRIVATE)
    tagged = tagged.success(handlers.refuse_tagged, tagged_state, None, **PRIVATE)
    if tag.similar is not None:
        similar_options = {"preprocess": False, **PRIVATE, **on_model(settings)}
        tagged.success(handlers.similar_gallery, tag.image, tag.similar, **similar_options)
    tagged.success(
        handlers.prefill_after_tagging,
        [tag.image, session.recent, session.labelled],
        [*feedback.form(session.shown), session.recent, feedback.queue, session.queue],
        preprocess=False,
        **PRIVATE,
    )
    tag.many_button.click(handlers.check_many, tag.many_images, None, preprocess=False, **PRIVATE).success(
        handlers.tag_many,
        tag.many_images,
        [tag.table, tag.csv_file, tag.json_file],
        api_name="tag_many",
        preprocess=False,
        **on_model(settings),
    )


def wire_feedback(feedback: FeedbackTab, session: Session, handlers: Handlers, settings: Settings) -> None:
    """The Help us label tab: the form prefilled from an upload or the queue, submitted, withdrawn."""
    form = feedback.form(session.shown)
    model, store = on_model(settings), on_store(settings)
    held(feedback.image.input, handlers.prefill_upload, feedback.image, form, preprocess=False, **PRIVATE, **model)
    held(feedback.queue.select, handlers.pick_from_queue, session.queue, form, **PRIVATE, **model)
    feedback.refresh.click(
        handlers.refresh_queue, [session.recent, session.labelled], [feedback.queue, session.queue], **PRIVATE
    )
    saved_state = gr.State()
    submit_inputs = [feedback.image, *feedback.dropdowns, feedback.details, feedback.free_text, feedback.confirmed,
                     feedback.consent, session.shown]  # fmt: skip
    feedback.submit.click(
        handlers.submit_ui, submit_inputs, saved_state, preprocess=False, **PRIVATE, **store
    ).success(
        handlers.show_saved,
        [saved_state, session.labelled, session.recent],
        [feedback.confirmation, feedback.withdraw_id, feedback.store_status, session.labelled, feedback.queue,
         session.queue],
        **PRIVATE,
    )  # fmt: skip
    withdrawn = [feedback.withdraw_result, feedback.store_status]
    held(feedback.withdraw.click, handlers.delete_ui, feedback.withdraw_id, withdrawn, **PRIVATE, **store)


# ---------------------------------------------------------------------------------------------------------------------
# The app
# ---------------------------------------------------------------------------------------------------------------------


def load_similar_items(settings: Settings, tagger) -> SimilarItems | None:
    """What "Similar items" searches: the index in $FASHION_SIMILAR_INDEX, else the example photos indexed now (a
    few seconds for a few dozen), else nothing. Queries run on the tagger's own model and runtime (`tagger.encoder`)."""
    folder = os.environ.get(INDEX_ENV, "").strip()
    if folder:
        return SimilarItems.load(folder, tagger.encoder, tagger.image_processor)
    examples = Path(settings.examples_dir) if settings.examples_dir else None
    if examples is None or not any(path.suffix.lower() in accepted_suffixes() for path in examples.glob("*")):
        return None
    return SimilarItems.of_catalogue(examples, tagger.encoder, tagger.image_processor, settings.model)


def build_app(
    settings: Settings | None = None,
    *,
    tagger=None,
    store: FeedbackStore | None = None,
    similar_items: SimilarItems | None = None,
    **overrides,
):
    """Build the app (a `gr.Blocks`, queue configured, not launched).

    `settings` default to the environment; keyword overrides (`model=...`, `feedback_dir=...`) win. `tagger`,
    `store` and `similar_items` inject a ready pipeline, feedback store or catalogue index; otherwise they are
    created here, once.
    """
    settings = replace(settings or Settings.from_env(), **overrides).validated()
    tagger = tagger if tagger is not None else load_tagger(settings)
    token = os.environ.get("HF_TOKEN")
    if store is None:
        store = FeedbackStore(
            settings.feedback_dir,
            repo_id=settings.feedback_repo,
            token=token,
            every_minutes=settings.feedback_every_minutes,
            max_image_pixels=settings.max_image_pixels,
            max_image_bytes=settings.max_upload_bytes,
            max_tags=MAX_TAGS,
            allowed_attributes=tagger.model.config.attributes,
        )
    service = TaggerService(settings, tagger, store, Redactor([token]))
    similar_items = similar_items if similar_items is not None else load_similar_items(settings, tagger)
    with Blocks(title="fashion-hf: fashion product tagger", delete_cache=(3600, 3600)) as demo:
        wire_events(demo, lay_out(service, similar_items), Handlers(service, similar_items), settings)
    demo.queue(default_concurrency_limit=settings.concurrency, max_size=settings.queue_size)
    demo.service = service  # the pipeline, the store and the settings in use (tests, debugging)
    demo.similar_items = similar_items
    return demo


def main() -> None:
    logging.basicConfig(level=logging.INFO)
    # Before Gradio's worker threads exist: under load this kept app.py at ~1.5 GiB instead of ~2.4 GiB, with
    # slightly more answers/s (BENCHMARKS.md, "App under load").
    limit_malloc_arenas()
    keep_freed_memory()
    settings = Settings.from_env()
    demo = build_app(settings)
    demo.launch(**launch_options(settings, demo.service))


if __name__ == "__main__":
    main()
