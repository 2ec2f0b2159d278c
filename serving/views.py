"""What the page shows, as plain values: pure functions of the pipeline's output and the service's results.

Each returns the value one component takes (a `gr.Label`'s `{label: confidence}`, HTML, Markdown, rows), so `app.py`
only wires them; any text from the model is HTML-escaped here.
"""

import html

from fashion_hf.configuration_fashion_tagger import DETAIL_GROUP

from .uploads import Upload


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


def gallery_value(queue: list[dict]) -> list[tuple[str, str]]:
    return [(item["path"], item["caption"]) for item in queue]


def feedback_form(upload: Upload, prediction: dict, attributes) -> list:
    """The feedback form for an image: its top label per attribute and its detail tags, nothing confirmed, consent
    unticked; and the labels shown, which tell a changed label from one left as predicted.

    In the order of the form's components: image, a label per attribute, detail tags, free text, confirmed, consent,
    note, what was shown."""
    top = [prediction["attributes"][name][0]["label"] for name in attributes]
    details = [tag["tag"] for tag in prediction["tags"] if tag["group"] == DETAIL_GROUP]
    shown = {"sha256": upload.sha256, "labels": dict(zip(attributes, top)), "details": details}
    return [upload.path, *top, details, "", [], False, "", shown]


def saved_note(record_id: str) -> str:
    return f"### Thank you! Saved as record `{record_id}`\nKeep this id to withdraw your submission (below)."


def withdrawn_note(record_id: str) -> str:
    return f"Record `{record_id}` was withdrawn: its image and labels are deleted."
