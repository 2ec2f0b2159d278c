"""fashion-hf app: tag product photos, see why, and help us label (a Gradio 6 Space, or `python app.py` locally).

The app is thin: the "fashion-tagging" pipeline predicts, `fashion_hf.explain` draws the Grad-CAM heatmap and ranks
images by uncertainty, `fashion_hf.feedback.FeedbackStore` stores corrections, and `fashion_hf.serving` (settings,
safe upload decoding, `TaggerService`) is what the handlers call. This file is the page and its event wiring.

Configuration is read from the environment (see `Settings`); Gradio's own `GRADIO_SERVER_NAME` and
`GRADIO_SERVER_PORT` are honoured by `launch()`. Tests build the app with `build_app(model=..., feedback_dir=...)`.

Named API endpoints (gradio_client):
    client.predict(handle_file("photo.jpg"), api_name="/tag")         -> {"attributes": {...}, "tags": [...]}
    client.predict([handle_file(...), ...], api_name="/tag_many")      -> (table, CSV file, JSON file)
    client.predict(handle_file("photo.jpg"), '{"articleType": "Tshirts"}', "check, slim fit", True,
                   api_name="/feedback")                               -> {"id": "<record id>", "status": "saved"}
    client.predict(handle_file("photo.jpg"), '{"articleType": "Tshirts", "gender": "Men"}', "", True,
                   '{"articleType": "changed", "gender": "untouched"}', api_name="/feedback")
        the optional 5th input, attribute_status, says per attribute whether it was "changed", "confirmed" or left
        "untouched" as prefilled (only changed and confirmed ones are trained on); left out, all are "confirmed".
    client.predict("<record id>", api_name="/delete_feedback")         -> {"id": "<record id>", "status": "deleted"}
Bad input raises `gr.Error` (`AppError` in gradio_client) with a message naming the input and what would be valid.
"""

import base64
import html
import logging
import os
import re
from dataclasses import replace
from pathlib import Path

import gradio as gr

from fashion_hf.configuration_fashion_tagger import DETAIL_GROUP
from fashion_hf.explain import explained_attribute
from fashion_hf.feedback import CHANGED, CONFIRMED, UNTOUCHED, FeedbackStore
from fashion_hf.runtime import keep_freed_memory, limit_malloc_arenas
from fashion_hf.serving import (
    MAX_TAGS,
    MAX_TAGS_TEXT_CHARS,
    RECENT_UPLOADS,
    TOP_K,
    Redactor,
    Settings,
    TaggerService,
    Upload,
    annotator_name,
    load_tagger,
    oauth_enabled,
    payload_parts,
    submitter,
    user_error,
)

logger = logging.getLogger("fashion_hf.app")

CARD_IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp"}
MAX_CARD_IMAGE_BYTES = 2 * 1024 * 1024  # each plot travels inside the page's config

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
/* Seven label panels share a row, each at least 160 px wide: the longest label ("Moisturisers 100%") must fit
   whole, not be clipped by the panel ("Accessories 86%" showed "86"). */
#labels .output-class { padding: var(--size-6) var(--size-1) var(--size-4); font-size: var(--text-lg);
                        text-align: center; overflow-wrap: anywhere; }
#labels .confidence-set { font-size: var(--text-sm); }
#labels .confidence-set .line { padding: 0; min-width: var(--size-2); }
#labels .confidence-set .text { min-width: 0; overflow-wrap: anywhere; }
"""


def launch_options(settings: Settings) -> dict:
    """Keyword arguments for `demo.launch()`: upload limit, theme and CSS (Gradio 6 takes them at launch)."""
    examples = Path(settings.examples_dir).resolve() if settings.examples_dir else None
    return {
        "max_file_size": settings.max_upload_bytes,
        "theme": gr.themes.Soft(),
        "css": CSS,
        "allowed_paths": [str(examples)] if examples and examples.is_dir() else [],
        "show_error": True,
    }


# ---------------------------------------------------------------------------------------------------------------------
# Rendering (pure functions of the pipeline output)
# ---------------------------------------------------------------------------------------------------------------------


def label_values(prediction: dict, attributes) -> list[dict]:
    """One `gr.Label` value (`{label: confidence}`) per attribute."""
    return [{item["label"]: item["score"] for item in prediction["attributes"][name]} for name in attributes]


def tag_chips(prediction: dict) -> str:
    """The generated tags as chips. The decoder and the heads predict apart: where an attribute tag differs from its
    head's top label (a season in ~7% of validation photos), the chip shows the head's label too, so the page never
    contradicts itself without saying so."""
    if not prediction["tags"]:
        return "<p>No tags generated.</p>"
    heads = prediction.get("attributes", {})
    chips = []
    for tag in prediction["tags"]:
        top = heads[tag["group"]][0] if heads.get(tag["group"]) else None
        differs = top is not None and top["label"] != tag["tag"]
        head = f'<span class="head">head: {html.escape(top["label"])} {top["score"]:.0%}</span>' if differs else ""
        chips.append(
            f'<span class="chip">{html.escape(tag["tag"])}<span class="group">{html.escape(tag["group"])}</span>'
            f'<span class="score">{tag["score"]:.0%}</span>{head}</span>'
        )
    return f'<div class="chips">{"".join(chips)}</div>'


def timing_text(predict_seconds: float, cam_seconds: float, batch: int, attribute: str) -> str:
    batched = f" (a batch of {batch})" if batch > 1 else ""
    heatmap = f"heatmap of the top {attribute} {cam_seconds * 1000:.0f} ms"
    return f"Prediction took **{predict_seconds * 1000:.0f} ms**{batched}; {heatmap}."


def table_row(name: str, prediction: dict | None, error: str | None, attributes) -> list:
    if prediction is None:
        return [name, *([""] * len(attributes)), "", error]
    top = [f"{p[0]['label']} ({p[0]['score']:.0%})" for p in (prediction["attributes"][a] for a in attributes)]
    return [name, *top, ", ".join(tag["tag"] for tag in prediction["tags"]), ""]


def attribute_statuses(labels: dict, shown: dict, confirmed) -> dict:
    """What the user did with each labelled attribute of the prefilled form: a value other than the one shown is
    "changed", one shown and ticked as right "confirmed", one left as shown "untouched" (the model's guess)."""
    return {
        name: CHANGED if label != shown.get(name) else CONFIRMED if name in confirmed else UNTOUCHED
        for name, label in labels.items()
    }


def gallery_value(queue: list[dict]) -> list[tuple[str, str]]:
    return [(item["path"], item["caption"]) for item in queue]


def model_card_markdown(service: TaggerService) -> str:
    """The served model's id and revision, its vocabulary sizes, then its model card (README.md) if it has one."""
    config = service.config
    heads = ", ".join(f"{html.escape(name)} ({len(labels)})" for name, labels in config.attributes.items())
    card = read_model_card(service.settings)
    local = Path(service.model_id).is_dir()  # a Hub id as it is; of a local folder, its name only, not where it is
    model = f"{Path(service.model_id).resolve().name}` (a local folder)" if local else f"{service.model_id}`"
    return "\n".join(
        [
            f"**Model:** `{html.escape(model)}  ",
            f"**Revision:** `{html.escape(service.revision)}`  ",
            f"**Encoder:** `{html.escape(config.encoder_description)}` at {config.image_size[0]}x{config.image_size[1]} px  ",
            f"**Heads:** {heads}  ",
            f"**Tag vocabulary:** {len(config.tags)} tags ({len(service.detail_tags)} detail tags)",
            "",
            card or "_This model has no model card (README.md) yet._",
        ]
    )


def read_model_card(settings: Settings) -> str | None:
    """The model card's text, its relative image links (plots) inlined (a local folder) or pointed at the Hub."""
    folder = Path(settings.model)
    try:
        if folder.is_dir():
            readme, base = folder / "README.md", folder.resolve()
            if not readme.is_file():
                return None

            def image_url(target: str) -> str | None:
                """The plot as a data URI: a served file's URL would show visitors where the model lies on disk."""
                path = (base / target).resolve()
                kind = CARD_IMAGE_TYPES.get(path.suffix.lower())
                if kind is None or not path.is_relative_to(base) or not path.is_file():
                    return None
                if path.stat().st_size > MAX_CARD_IMAGE_BYTES:
                    logger.warning("Model card image %s is over %d bytes: not shown.", target, MAX_CARD_IMAGE_BYTES)
                    return None
                return f"data:{kind};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"

        else:
            from huggingface_hub import hf_hub_download

            readme = hf_hub_download(settings.model, "README.md", revision=settings.model_revision)
            revision = settings.model_revision or "main"

            def image_url(target: str) -> str | None:
                return f"https://huggingface.co/{settings.model}/resolve/{revision}/{target}"

        text = Path(readme).read_text(encoding="utf-8")
    except Exception as error:  # noqa: BLE001 - the card is informative; the app serves without it
        logger.warning("No model card for %s: %s", settings.model, error)
        return None

    def link(match):
        target = match.group(2)
        url = None if re.match(r"^[a-z]+:|^/|^#", target) else image_url(target)
        return f"{match.group(1)}({url})" if url else match.group(0)

    if text.startswith("---"):
        text = text.split("---", 2)[-1]  # the YAML front matter is for the Hub, not for readers
    return re.sub(r"(!\[[^\]]*\])\(([^)\s]+)\)", link, text)


# ---------------------------------------------------------------------------------------------------------------------
# The Blocks
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


def build_app(settings: Settings | None = None, *, tagger=None, store: FeedbackStore | None = None, **overrides):
    """Build the app (a `gr.Blocks`, queue configured, not launched).

    `settings` default to the environment; keyword overrides (`model=...`, `feedback_dir=...`) win. `tagger` and
    `store` inject a ready pipeline or feedback store; otherwise both are created here, once.
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
    attributes = list(service.config.attributes)
    # The feedback form: image, a dropdown per attribute, details, text, confirmed, consent, note, what was shown.
    form_size = len(attributes) + 7
    panels = len(attributes) + 4  # the Tag tab: a label per attribute, tag chips, heatmap, timing, raw prediction
    explained = explained_attribute(service.config)
    on_model = {"concurrency_limit": settings.concurrency, "concurrency_id": "model"}
    on_store = {"concurrency_limit": settings.feedback_concurrency, "concurrency_id": "feedback"}

    # -- event handlers ----------------------------------------------------------------------------------------------

    def tag_api(image):
        """/tag: the pipeline's JSON contract for one upload, run in one model batch with concurrent requests'."""
        return service.tag(service.read_upload(image))

    def tag_results(images):
        """The Tag tab, batched: per request the values of its panels (labels, tag chips, heatmap, timing, raw
        prediction), or the reason its upload was refused. One bad upload fails neither the others in its batch nor
        the panels: `show_tagged` shows the values, `refuse_tagged` the refusal."""
        results = [{"values": [None] * panels} for _ in images]  # no image: empty panels
        uploads = {}
        for index, payload in enumerate(images):
            if payload:
                try:
                    uploads[index] = service.read_upload(payload)
                except gr.Error as error:
                    results[index] = {"error": error.message}
        if uploads:
            predictions, predict_seconds = service.predict(list(uploads.values()))
            overlays, attribute, cam_seconds = service.heatmaps(list(uploads.values()), predictions)
            timing = timing_text(predict_seconds, cam_seconds, len(uploads), attribute)
            for index, prediction, overlay in zip(uploads, predictions, overlays):
                values = [*label_values(prediction, attributes), tag_chips(prediction), overlay, timing, prediction]
                results[index] = {"values": values}
        return (results,)

    def show_tagged(result):
        return result["values"] if "values" in result else [None] * panels  # a refused upload: nothing stale

    def refuse_tagged(result):
        if "error" in result:
            raise user_error(result["error"])

    def tag_image_api(images):
        """/tag_image (undocumented), batched: the panels' values, as the Tag tab shows them."""
        results = tag_results(images)[0]
        for result in results:
            refuse_tagged(result)
        return tuple(map(list, zip(*(result["values"] for result in results))))

    def check_many(images):
        payloads = [payload for payload in images or [] if payload]
        if not payloads:
            raise user_error("No images: choose one or more image files first.")
        limit = settings.max_images_per_request
        if len(payloads) > limit:
            raise user_error(f"{len(payloads)} images is over the limit of {limit} per request.")
        return payloads

    def tag_many(images):
        """Several images: a table (an unreadable file gets an error in its row), as CSV and JSON files."""
        payloads = check_many(images)
        uploads, errors = {}, {}
        for index, payload in enumerate(payloads):
            try:
                uploads[index] = service.read_upload(payload)
            except gr.Error as error:
                errors[index] = (payload_parts(payload)[2], html.unescape(error.message))
        results = dict(zip(uploads, service.predict(list(uploads.values()))[0])) if uploads else {}
        headers = ["file", *attributes, "tags", "error"]
        table, rows = [], []
        for index in range(len(payloads)):
            name, error = (uploads[index].name, None) if index in uploads else errors[index]
            table.append(table_row(name, results.get(index), error, attributes))
            rows.append({"file": name, **({"result": results[index]} if index in results else {"error": error})})
        csv_path, json_path = service.export(rows, table, headers)
        return {"headers": headers, "data": table}, csv_path, json_path

    def prefill(upload: Upload, prediction: dict) -> list:
        """The feedback form for an image: its top label per attribute and its detail tags, nothing confirmed,
        consent unticked; and the labels shown, which tell a changed label from one left as predicted."""
        top = [prediction["attributes"][name][0]["label"] for name in attributes]
        details = [tag["tag"] for tag in prediction["tags"] if tag["group"] == DETAIL_GROUP]
        shown = {"sha256": upload.sha256, "labels": dict(zip(attributes, top)), "details": details}
        return [upload.path, *top, details, "", [], False, "", shown]

    def prefill_after_tagging(image, recent, labelled):
        """The tagged photo goes to the feedback form and to the front of this session's queue."""
        if not image:
            return [*[gr.skip()] * form_size, recent, gr.skip(), gr.skip()]
        upload = service.read_upload(image)
        prediction = service.prediction_for(upload)  # the server's copy, cached by tagging
        item = service.queue_item(upload, prediction, "your upload")
        recent = [item, *[old for old in recent or [] if old["sha256"] != item["sha256"]]][:RECENT_UPLOADS]
        queue = service.annotation_queue(recent, labelled)
        return [*prefill(upload, prediction), recent, gallery_value(queue), queue]

    def prefill_upload(image):
        if not image:
            return [gr.skip()] * form_size
        upload = service.read_upload(image)
        return prefill(upload, service.prediction_for(upload))

    def pick_from_queue(queue, evt: gr.SelectData):
        if not queue or evt.index is None or not 0 <= evt.index < len(queue):
            return [gr.skip()] * form_size
        upload = service.read_upload(queue[evt.index]["path"])
        return prefill(upload, service.prediction_for(upload))

    def refresh_queue(recent, labelled):
        queue = service.annotation_queue(recent, labelled)
        return gallery_value(queue), queue

    def submit_ui(profile: gr.OAuthProfile | None, request: gr.Request, image, *values):
        """Store the form's correction: the record id and the image's hash, for `show_saved`."""
        # Gradio injects `profile` and `request` by position: before the variable number of attribute dropdowns.
        *labels, details, free_text, confirmed, consent, shown = values
        corrected = {name: label for name, label in zip(attributes, labels) if label}
        upload = service.read_upload(image)
        if not shown or shown["sha256"] != upload.sha256:  # the image's prediction has not reached the form yet
            raise user_error("The form is not filled in for this image yet: wait for its labels, then submit.")
        # Detail tags left exactly as predicted are the model's guess, like an untouched label: not sent.
        reviewed = [] if set(details or []) == set(shown.get("details", [])) else list(details or [])
        tags = service.parse_tags([*reviewed, *(free_text or "").split(",")])
        status = attribute_statuses(corrected, shown["labels"], confirmed or [])
        annotator = annotator_name(profile)
        record_id, _ = service.save_feedback(upload, corrected, tags, consent, annotator, submitter(request), status)
        return {"id": record_id, "sha256": upload.sha256}

    def show_saved(saved, labelled, recent):
        labelled = [*(labelled or []), saved["sha256"]]
        queue = service.annotation_queue(recent, labelled)
        note = f"### Thank you! Saved as record `{saved['id']}`\nKeep this id to withdraw your submission (below)."
        return note, saved["id"], service.store_status(), labelled, gallery_value(queue), queue

    def feedback_api(
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
        corrected = service.parse_attributes(corrected_attributes)
        status = service.parse_attribute_status(attribute_status)
        tags = service.parse_tags(tags)
        annotator = annotator_name(profile)
        record_id, _ = service.save_feedback(image, corrected, tags, consent, annotator, submitter(request), status)
        return {"id": record_id, "status": "saved"}

    def delete_api(record_id):
        """/delete_feedback: withdraw a stored submission by its record id."""
        return service.delete_feedback(record_id)

    def delete_ui(record_id):
        result = service.delete_feedback(record_id)
        return f"Record `{result['id']}` was withdrawn: its image and labels are deleted.", service.store_status()

    def on_load():
        return service.store_status(), *refresh_queue([], [])

    # -- layout ------------------------------------------------------------------------------------------------------

    with Blocks(title="fashion-hf: fashion product tagger", delete_cache=(3600, 3600)) as demo:
        gr.Markdown(
            "# fashion-hf\nTag fashion product photos: category, colour, gender, season, usage and descriptive tags. "
            "Help us improve the model in the *Help us label* tab."
        )
        with gr.Tabs():
            with gr.Tab("Tag", id="tag"):
                with gr.Row():
                    with gr.Column():
                        image_in = gr.Image(
                            type="filepath",
                            sources=["upload", "clipboard", "webcam"],
                            label="Product photo",
                            height=360,
                            elem_id="tag-image",
                        )
                        if service.examples:
                            examples = [[item["path"]] for item in service.examples]
                            gr.Examples(examples, inputs=[image_in], examples_per_page=16)
                        timing = gr.Markdown(elem_id="timing")
                    with gr.Column():
                        heatmap = gr.Image(
                            label=f"Heatmap: what drove the top {explained}",
                            type="pil",
                            format="png",
                            interactive=False,
                            height=360,
                            elem_id="heatmap",
                        )
                        chips = gr.HTML(label="Generated tags", elem_id="tag-chips")
                with gr.Row(elem_id="labels"):
                    labels_out = [
                        gr.Label(num_top_classes=TOP_K, label=name, elem_id=f"label-{name}") for name in attributes
                    ]
                with gr.Accordion("Raw prediction (the /tag API output)", open=False):
                    prediction_out = gr.JSON(label="Prediction", elem_id="prediction-json")
                with gr.Accordion("Several images at once: a table, as CSV and JSON", open=False):
                    with gr.Row():
                        many_in = gr.File(file_count="multiple", file_types=["image"], label="Images", height=160)
                        with gr.Column():
                            many_button = gr.Button("Tag all", variant="primary")
                            with gr.Row():
                                csv_out = gr.File(label="CSV", interactive=False, height=80)
                                json_file_out = gr.File(label="JSON", interactive=False, height=80)
                    table_out = gr.Dataframe(
                        headers=["file", *attributes, "tags", "error"], label="Results", interactive=False, wrap=True
                    )

            with gr.Tab("Help us label", id="feedback"):
                gr.Markdown(
                    "Correct what the model got wrong, and tick the labels you checked and found right. Pick an image "
                    "from the queue (the model is least sure about those first) or tag your own photo first. "
                    "**Nothing is stored unless you tick the consent box.**"
                )
                if oauth_enabled():
                    gr.LoginButton()
                with gr.Row():
                    with gr.Column(scale=1):
                        feedback_image = gr.Image(
                            type="filepath",
                            sources=["upload", "clipboard"],
                            label="Image to label",
                            height=320,
                            elem_id="feedback-image",
                        )
                    with gr.Column(scale=2):
                        with gr.Row():
                            dropdowns = [
                                gr.Dropdown(
                                    choices=labels, value=None, label=name, interactive=True, elem_id=f"fix-{name}"
                                )
                                for name, labels in service.config.attributes.items()
                            ]
                        confirmed = gr.CheckboxGroup(
                            choices=attributes,
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
                gr.Markdown("### Needs labels (least certain first)")
                queue_gallery = gr.Gallery(
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

            with gr.Tab("Model", id="model"):
                gr.Markdown(model_card_markdown(service), elem_id="model-card")

        # The API-only endpoints read hidden components, so that their signatures are exactly the documented ones.
        with gr.Row(visible=False):
            api_image = gr.Image(type="filepath", label="image")
            api_attributes = gr.Textbox(label="corrected_attributes")
            api_tags = gr.Textbox(label="tags")
            api_consent = gr.Checkbox(label="consent")
            api_status = gr.Textbox(value="", label="attribute_status")  # optional: today's 4-input calls still work
            api_record_id = gr.Textbox(label="record_id")
            api_result = gr.JSON(label="result")
            api_trigger = gr.Button()

        recent_state, labelled_state, queue_state = gr.State([]), gr.State([]), gr.State([])
        shown_state = gr.State()  # the labels prefilled for the form's image: "changed" is relative to them
        form = [feedback_image, *dropdowns, details, free_text, confirmed, consent, confirmation, shown_state]
        private = {"api_visibility": "private"}

        # -- events --------------------------------------------------------------------------------------------------
        # Image inputs skip Gradio's preprocessing (preprocess=False): the handlers decode the raw upload themselves,
        # so that anything hostile becomes a clear gr.Error instead of a crash inside a component.
        batching = {"batch": True, "max_batch_size": settings.max_batch_size, "preprocess": False, **on_model}
        # /tag batches in the service (TaggerService.tag), not with Gradio's batch=True, so that a broken upload
        # fails only its own request; enough requests run at once to fill a batch while the model slots are busy.
        on_tag_api = {"concurrency_limit": settings.max_batch_size, "concurrency_id": "tag-api", "preprocess": False}
        api_trigger.click(tag_api, api_image, api_result, api_name="tag", **on_tag_api)
        api_trigger.click(
            feedback_api,
            [api_image, api_attributes, api_tags, api_consent, api_status],
            api_result,
            api_name="feedback",
            preprocess=False,
            **on_store,
        )
        demo.optional_inputs["feedback"] = 1  # attribute_status: plain HTTP calls with today's 4 values still work
        api_trigger.click(delete_api, api_record_id, api_result, api_name="delete_feedback", **on_store)

        # A handler that raises marks every output of its event "Error" (a gallery so marked takes no clicks until it
        # is refreshed). So a step that can refuse the user's input writes only to a State (or to nothing): its
        # gr.Error shows once, as a toast, and the step that shows the result runs only after it succeeded.
        def held(listener, fn, inputs, outputs, **options):
            result = gr.State()
            return listener(fn, inputs, result, **options).success(lambda values: values, result, outputs, **private)

        tag_outputs = [*labels_out, chips, heatmap, timing, prediction_out]
        api_trigger.click(
            tag_image_api, api_image, tag_outputs, api_name="tag_image", api_visibility="undocumented", **batching
        )
        tagged_state = gr.State()
        tagged = image_in.change(
            tag_results, image_in, tagged_state, show_progress_on=[*labels_out, heatmap], **batching, **private
        )
        tagged = tagged.success(show_tagged, tagged_state, tag_outputs, **private)
        tagged = tagged.success(refuse_tagged, tagged_state, None, **private)
        tagged.success(
            prefill_after_tagging,
            [image_in, recent_state, labelled_state],
            [*form, recent_state, queue_gallery, queue_state],
            preprocess=False,
            **private,
        )
        many_outputs = [table_out, csv_out, json_file_out]
        many_button.click(check_many, many_in, None, preprocess=False, **private).success(
            tag_many, many_in, many_outputs, api_name="tag_many", preprocess=False, **on_model
        )
        held(feedback_image.input, prefill_upload, feedback_image, form, preprocess=False, **private, **on_model)
        held(queue_gallery.select, pick_from_queue, queue_state, form, **private, **on_model)
        refresh.click(refresh_queue, [recent_state, labelled_state], [queue_gallery, queue_state], **private)
        saved_state = gr.State()
        submit.click(
            submit_ui,
            [feedback_image, *dropdowns, details, free_text, confirmed, consent, shown_state],
            saved_state,
            preprocess=False,
            **private,
            **on_store,
        ).success(
            show_saved,
            [saved_state, labelled_state, recent_state],
            [confirmation, withdraw_id, store_status, labelled_state, queue_gallery, queue_state],
            **private,
        )
        held(withdraw.click, delete_ui, withdraw_id, [withdraw_result, store_status], **private, **on_store)
        demo.load(on_load, None, [store_status, queue_gallery, queue_state], **private)

    demo.queue(default_concurrency_limit=settings.concurrency, max_size=settings.queue_size)
    demo.service = service  # the pipeline, the store and the settings in use (tests, debugging)
    return demo


def main() -> None:
    logging.basicConfig(level=logging.INFO)
    # Before Gradio's worker threads exist: under load this kept app.py at ~1.5 GiB instead of ~2.4 GiB, with
    # slightly more answers/s (BENCHMARKS.md, "App under load").
    limit_malloc_arenas()
    keep_freed_memory()
    settings = Settings.from_env()
    build_app(settings).launch(**launch_options(settings))


if __name__ == "__main__":
    main()
