"""What the page shows, as plain values: pure functions of the pipeline's output and the service's results.

Each returns the value one component takes (a `gr.Label`'s `{label: confidence}`, HTML, Markdown, rows), so `app.py`
only wires them; any text from the model is HTML-escaped here.

Two answers of the pipeline change how a prediction is shown: `not_sure[attribute]` (the head's top score is under
its calibrated threshold, so its label is a guess: shown as "not sure" with its candidates) and
`out_of_distribution["flagged"]` (the photo does not look like a clothing or accessory photo: a notice, and the best
guess shown muted).
"""

import html

from fashion_hf.configuration_fashion_tagger import DETAIL_GROUP

from .uploads import Upload


NOT_SURE = "not sure"
OOD_NOTICE = "This does not look like a clothing or accessory photo"
TURNED_NOTICE = "This photo looks turned on its side or upside down; turn it upright for labels you can trust"
TURNED_UPRIGHT_NOTE = "This photo looked turned, so it was tagged turned by {degrees}° the right way up"
NOT_SURE_CANDIDATES = 2  # a not-sure chip names the head's top labels: "Shirts or Tshirts?"


def is_unsure(prediction: dict, attribute: str) -> bool:
    """Whether the pipeline marked `attribute` "not sure" (a model folder whose pipeline predates `not_sure`:
    never)."""
    return bool((prediction.get("not_sure") or {}).get(attribute))


def is_flagged(prediction: dict) -> bool:
    """Whether the photo was flagged as not a clothing or accessory photo (a model without a detector: never)."""
    return bool((prediction.get("out_of_distribution") or {}).get("flagged"))


def unsure_attributes(prediction: dict) -> list[str]:
    return [name for name, unsure in (prediction.get("not_sure") or {}).items() if unsure]


def needs_a_second_look(prediction: dict) -> bool:
    """Any head not sure, or the photo flagged: a person's labels would teach the model most about this one."""
    return is_flagged(prediction) or bool(unsure_attributes(prediction))


def label_values(prediction: dict, attributes) -> list[dict]:
    """One `gr.Label` value (`{label: confidence}`) per attribute."""
    return [{item["label"]: item["score"] for item in prediction["attributes"][name]} for name in attributes]


def label_panels(prediction: dict | None, attributes) -> list[dict]:
    """Per attribute, the `gr.Label` arguments `value`, `label` (its caption) and `elem_classes`.

    A not-sure head is captioned "<attribute>: not sure", its candidates still listed with their scores; a flagged
    photo's panels are muted. None (no photo): empty panels captioned by name. Every field is always given, so that
    a sure photo after an unsure one puts the captions and classes back."""
    if prediction is None:
        return [{"value": None, "label": name, "elem_classes": []} for name in attributes]
    muted = ["muted"] if is_flagged(prediction) else []
    return [
        {
            "value": value,
            "label": f"{name}: {NOT_SURE}" if is_unsure(prediction, name) else name,
            "elem_classes": [*muted, *(["not-sure"] if is_unsure(prediction, name) else [])],
        }
        for name, value in zip(attributes, label_values(prediction, attributes))
    ]


def flag_notice(prediction: dict) -> str:
    """What a flagged photo is told: turn it upright, or it does not look like clothing."""
    return TURNED_NOTICE if prediction["out_of_distribution"].get("reason") == "turned" else OOD_NOTICE


def ood_notice(prediction: dict | None) -> str:
    """The notice above the labels when the photo was flagged as out of distribution, or was tagged turned the right
    way up (`turned_by`); empty otherwise."""
    if prediction is None:
        return ""
    if is_flagged(prediction):
        return f'<p class="ood-notice">{flag_notice(prediction)}: the labels below are the model\'s best guess.</p>'
    if prediction.get("turned_by"):
        return f'<p class="turned-note">{TURNED_UPRIGHT_NOTE.format(degrees=prediction["turned_by"])}</p>'
    return ""


def candidates(ranked: list[dict]) -> str:
    """The head's top labels as a question: "Shirts or Tshirts?" (escaped)."""
    return " or ".join(html.escape(item["label"]) for item in ranked[:NOT_SURE_CANDIDATES]) + "?"


def tag_chips(prediction: dict) -> str:
    """The generated tags as chips. The decoder and the heads predict apart: where an attribute tag differs from its
    head's top label (a season in ~7% of validation photos), the chip shows the head's label too, so the page never
    contradicts itself without saying so. A tag of a not-sure head becomes a muted "not sure" chip asking between the
    head's top labels, and a flagged photo's chips are muted: neither is shown as a confident answer."""
    if not prediction["tags"]:
        return "<p>No tags generated.</p>"
    heads = prediction.get("attributes", {})
    chips = []
    for tag in prediction["tags"]:
        group = html.escape(tag["group"])
        if heads.get(tag["group"]) and is_unsure(prediction, tag["group"]):
            chips.append(
                f'<span class="chip not-sure">{candidates(heads[tag["group"]])}<span class="group">{group}</span>'
                f'<span class="score">{NOT_SURE}</span></span>'
            )
            continue
        top = heads[tag["group"]][0] if heads.get(tag["group"]) else None
        differs = top is not None and top["label"] != tag["tag"]
        head = f'<span class="head">head: {html.escape(top["label"])} {top["score"]:.0%}</span>' if differs else ""
        chips.append(
            f'<span class="chip">{html.escape(tag["tag"])}<span class="group">{group}</span>'
            f'<span class="score">{tag["score"]:.0%}</span>{head}</span>'
        )
    muted = " muted" if is_flagged(prediction) else ""
    return f'<div class="chips{muted}">{"".join(chips)}</div>'


def timing_text(predict_seconds: float, cam_seconds: float, batch: int, attribute: str) -> str:
    batched = f" (a batch of {batch})" if batch > 1 else ""
    heatmap = f"heatmap of the top {attribute} {cam_seconds * 1000:.0f} ms"
    return f"Prediction took **{predict_seconds * 1000:.0f} ms**{batched}; {heatmap}."


def table_headers(attributes) -> list[str]:
    """The several-images table's columns: `note` says when a photo does not look like a clothing photo."""
    return ["file", *attributes, "tags", "note", "error"]


def table_row(name: str, prediction: dict | None, error: str | None, attributes) -> list:
    """One row of the several-images table, in `table_headers` order; a not-sure head's cell says so."""
    if prediction is None:
        return [name, *([""] * len(attributes)), "", "", error]
    top = []
    for attribute in attributes:
        best = prediction["attributes"][attribute][0]
        sure = f", {NOT_SURE}" if is_unsure(prediction, attribute) else ""
        top.append(f"{best['label']} ({best['score']:.0%}{sure})")
    note = f"{flag_notice(prediction)}: best guess" if is_flagged(prediction) else ""
    if not note and prediction.get("turned_by"):
        note = f"tagged turned by {prediction['turned_by']}°"
    return [name, *top, ", ".join(tag["tag"] for tag in prediction["tags"]), note, ""]


def queue_caption(source: str, prediction: dict, attribute: str) -> str:
    """A queue thumbnail's caption: where it came from and the model's guess, "not sure" where it needs a look."""
    top = prediction["attributes"][attribute][0]
    guess = f"{top['label']}? ({top['score']:.0%})"
    if is_flagged(prediction):
        return f"{source}, {NOT_SURE} it is clothing: {guess}"
    if unsure_attributes(prediction):
        return f"{source}, {NOT_SURE} of {', '.join(unsure_attributes(prediction))}: {guess}"
    return f"{source}: {guess}"


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
