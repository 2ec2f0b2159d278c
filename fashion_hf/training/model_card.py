"""Write the model card (README.md) of a trained fashion tagger from its evaluation metrics and training recipe.

    fashion-hf model-card models/fashion-tagger --metrics outputs/eval/metrics.json --recipe recipe.json \
        [--repo-id user/fashion-tagger] [--dataset-id ashraq/fashion-product-images-small] [--base-model ID] \
        [--shifted-metrics metrics-phone.json] [--user-photo-metrics metrics-user-photos.json]

Everything is rendered offline: the card is never validated against, nor pushed to, the Hub here (upload the model
folder, README.md included, with `HfApi.upload_folder`).

`metrics` is what `train/evaluate.py` writes to metrics.json. `recipe` is the training run's recipe.json
(`recipe.py` describes its keys): `{"command": "accelerate launch train/train.py ...", "wall_time_seconds": 5400.0,
"hardware": "1 x cuda (x86_64, 16 threads)", "arguments": {"epochs": 10, ...}, "train_split": "train",
"train_images": 33315, "dataset_id": ..., "base_model": ...}`. Only `command` is required; the older spellings
`wall_time_s`, `train_examples` and `hyperparameters` are read too. A model trained in stages (`train.py
--init-from` an earlier run) has `previous_stages`: the earlier runs' `{"command", "wall_time_seconds",
"hardware"}`, first stage first. Any other key is listed with the hyperparameters. A model that learned from the
app's corrections has `feedback`: `{"source", "revision", "records_used", "attributes": {attribute: {"changed",
"confirmed", "untouched"}}, "init_from"}`, shown in a "Community corrections" section.

Real phone photos (`train/evaluate.py --dataset clothing-user-photos`, saved as `metrics-user-photos.json` in the
model folder, where the command reads it by default) get a column of their own beside the product figures, and a
table per photographer's label; the synthetic phone-style shift (`--shifted-metrics`) stays a secondary section.
"""

import argparse
import json
import shutil
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .recipe import ARGUMENTS, CONTINUE_WITH, OLD_SPELLINGS, TRAIN_IMAGES, WALL_TIME, read_key, spellings

TEMPLATE = Path(__file__).with_name("model_card_template.md")
TASK_TYPE = "image-classification"
TAGS = ["fashion", "image-classification", "multi-label-classification", "image-tagging", "timm", "custom_code"]
PLOTS = (
    ("attribute_accuracy.png", "Attribute accuracy"),
    ("confusion_matrix.png", "Confusion matrix"),
    ("training_curves.png", "Training curves"),
)
DATASET_NAMES = {
    "fashion-product-images": "Fashion Product Images (Small)",
    "ashraq/fashion-product-images-small": "Fashion Product Images (Small)",
    "fashion-mnist": "Fashion-MNIST",
    "zalando-datasets/fashion_mnist": "Fashion-MNIST",
}
HUB_DATASET_IDS = {  # evaluate.py's dataset names -> their Hub ids
    "fashion-product-images": "ashraq/fashion-product-images-small",
    "fashion-mnist": "zalando-datasets/fashion_mnist",
}
SETTINGS_KEYS = (*OLD_SPELLINGS[ARGUMENTS], ARGUMENTS)  # dicts of settings, listed one by one; today's key wins
RECIPE_KEYS = {"command", "wall_time", "wall_time_note", "hardware", "train_split", "dataset_id", "base_model", "previous_stages", "members",
               "dataset_name", "splits", "selected_on", "test_note", "feedback", *spellings(WALL_TIME),
               *spellings(TRAIN_IMAGES), *SETTINGS_KEYS}  # fmt: skip
USER_PHOTO_METRICS_FILE = "metrics-user-photos.json"  # evaluate.py --dataset clothing-user-photos, in the model folder
CALIBRATION_FILE = "calibration.json"  # fashion-hf calibrate's report, in the model folder
RETRIEVAL_FILE = "retrieval.json"  # benchmarks/bench_similar.py evaluate --json: similar items, measured
CALIBRATION_PLOTS = (
    ("reliability_product.png", "Reliability diagrams, product photos (held-out half)"),
    ("reliability_phone.png", "Reliability diagrams, phone photos (held-out half)"),
    ("coverage_product.png", "Coverage against accuracy, product photos"),
    ("coverage_phone.png", "Coverage against accuracy, phone photos"),
    ("ood_scores.png", "Out-of-distribution scores"),
)
NOT_SCORED = "n/a"  # a head the real phone photos have no label for
DETAIL_GROUP = "detail"
# Splits the Hub copy of a data set has itself; any other split is this project's own (a hash of ids or bytes).
HUB_SPLITS = {"ashraq/fashion-product-images-small": {"train"}, "zalando-datasets/fashion_mnist": {"train", "test"}}
HUB_SPLIT_NAMES = {("zalando-datasets/fashion_mnist", "train+validation"): "train"}  # our name -> the Hub's
PROJECT_SPLIT_PREFIX = "fashion-hf-"


def _score(value) -> str:
    return "–" if value is None else f"{value:.3f}"


def _round(value: float) -> float:
    return round(float(value), 4)


def format_duration(seconds: float) -> str:
    """`5432.1` -> `"1 h 30 min (5432 s)"`."""
    seconds = float(seconds)
    hours, rest = divmod(round(seconds), 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        readable = f"{hours} h {minutes:02d} min"
    elif minutes:
        readable = f"{minutes} min {secs:02d} s"
    else:
        return f"{seconds:.1f} s"
    return f"{readable} ({round(seconds)} s)"


def _is_hub_id(name: str) -> bool:
    return name.count("/") == 1 and not name.startswith((".", "/", "~")) and not Path(name).exists()


def _read_config(model_folder: Path) -> dict:
    path = model_folder / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: pass the folder the model was saved to with save_pretrained")
    return json.loads(path.read_text())


def _check_metrics(metrics: dict) -> None:
    missing = [key for key in ("attributes", "tags", "n_images") if key not in metrics]
    if missing:
        raise ValueError(f"metrics lack {missing}: pass the metrics.json that train/evaluate.py writes")
    if metrics["tags"] is None:
        raise ValueError("these metrics score no tags (a data set without known tag sequences, such as real phone "
                         "photos): the card's main figures need them; pass phone-photo figures as "
                         f"{USER_PHOTO_METRICS_FILE} (--user-photo-metrics)")  # fmt: skip


def _user_photo_rows(metrics: dict, user_photos: dict | None) -> dict[str, str]:
    """The real phone photos' top-1 per attribute of the card's table; "n/a" for heads the photos have no label for."""
    if not user_photos:
        return {}
    scored = {name: values for name, values in user_photos["attributes"].items() if values.get("support")}
    return {name: _score(scored[name]["top1"]) if name in scored else NOT_SCORED for name in metrics["attributes"]}


def _user_photos_section(user_photos: dict | None) -> dict | None:
    """What the card says about the real phone photos: where they come from, and top-1 per photographer's label."""
    if not user_photos:
        return None
    if "attributes" not in user_photos or "n_images" not in user_photos:
        raise ValueError("the phone-photo metrics lack attributes or n_images: pass the metrics.json that "
                         "train/evaluate.py --dataset clothing-user-photos writes")  # fmt: skip
    breakdown = user_photos.get("per_label") or {"heads": [], "labels": {}}
    heads = breakdown["heads"]
    rows = [
        {"label": label, "count": entry["count"], "scores": [_score(entry["top1"][head]) for head in heads],
         "labelled_as": " / ".join(str(entry["labelled_as"][head]) for head in heads),
         "predicted": " / ".join(str(entry["most_predicted"][head]) for head in heads)}
        for label, entry in breakdown["labels"].items()
    ]  # fmt: skip
    return {
        "n_images": user_photos["n_images"],
        "dataset": user_photos.get("dataset", "clothing-user-photos"),
        "split": user_photos.get("split", "?"),
        "definition": user_photos.get("split_definition"),
        "date": user_photos.get("date"),
        "heads": [name for name, values in user_photos["attributes"].items() if values.get("support")],
        "breakdown_heads": heads,
        "rows": rows,
    }


OOD_SET_NAMES = {
    "product": "held-out product photos",
    "phone": "held-out phone photos",
    "photos": "real photos of other things",
    "generated": "generated images (flat colours, noise, tiny images, text)",
}


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def _calibration_section(report: dict | None, model_folder: Path) -> dict | None:
    """The card's calibration section from `fashion-hf calibrate`'s report, or None for an uncalibrated model."""
    if not report:
        return None
    heads, sources = report["heads"], list(report["heads"])
    rows, phone_rows = [], []
    for name in heads.get("product", {}):
        temperatures = [values[name] for values in report["attribute_temperatures"].values() if name in values]
        entries = [heads[source].get(name) for source in sources]
        threshold = heads["product"][name].get("threshold")
        rows.append({
            "name": name,
            "temperatures": " / ".join(f"{value:.2f}" for value in temperatures),
            "ece": " / ".join(f"{e['before']['ece']:.3f} → {e['after']['ece']:.3f}" if e else "n/a" for e in entries),
            "threshold": f"{threshold['value']:.2f}" if threshold else "none",
            "coverage": _percent(threshold["coverage"]) if threshold else "100%",
            "accuracy": _percent(threshold["accuracy_answered"]) if threshold else "n/a",
        })
    for name, entry in heads.get("phone", {}).items():
        if entry.get("threshold"):
            phone_rows.append({"name": name, "coverage": _percent(entry["threshold"]["coverage"]),
                               "accuracy": _percent(entry["threshold"]["accuracy_answered"])})  # fmt: skip
    ood = report["ood"]
    rotated = report.get("rotated", {}).get("sources", {})
    return {
        "date": report["date"][:10],
        "fitted_on": ", ".join(f"{n} {k}" for k, n in report["fitted_on"].items()),
        "measured_on": ", ".join(f"{n} {k}" for k, n in report["measured_on"].items()),
        "sources": sources,
        "domains": list(report["attribute_temperatures"]),
        "rows": rows,
        "phone_rows": phone_rows,
        "hierarchy": ", ".join(f"{name} from {finer}" for name, finer in report.get("label_hierarchy", {}).items()),
        "tags_before": f"{report['tags']['overall']['ece_before']:.3f}",
        "tags_after": f"{report['tags']['overall']['ece_after']:.3f}",
        "uncertainty_heads": ", ".join(report.get("ood_uncertainty_heads") or []) or "every head",
        "fitting_budget": _percent(ood.get("fitting_budget")).replace(".0%", "%"),
        "flagged": _ood_figures(ood["flagged"], _percent),
        "auroc": _ood_figures(ood["auroc"], lambda value: f"{value:.3f}"),
        "searched_flagged": _ood_figures(ood.get("through_search", {}).get("flagged", {}), _percent),
        "searched_auroc": _ood_figures(ood.get("through_search", {}).get("auroc", {}), lambda value: f"{value:.3f}"),
        "rotated": "; ".join(
            f"{source} " + ", ".join(f"{degrees}° {_percent(entry['handled'])}" for degrees, entry in turns.items() if degrees != "0")
            for source, turns in rotated.items()
        ),
        "upright_turned": ", ".join(f"{source} {_percent(turns['0']['turned'])}" for source, turns in rotated.items() if "0" in turns),
        "upright_flagged": ", ".join(f"{source} {_percent(turns['0']['flagged'])}" for source, turns in rotated.items() if "flagged" in turns.get("0", {})),
        "flag_margin": (report.get("upright_search") or {}).get("flag_margin"),
        "plots": [{"file": file, "title": title} for file, title in CALIBRATION_PLOTS if (model_folder / file).is_file()],
    }


def _ood_figures(figures: dict[str, float], show) -> str:
    """`{set: figure}` -> "held-out product photos 0.5%, ...", the sets named for a reader."""
    return ", ".join(f"{OOD_SET_NAMES.get(name, name)} {show(value)}" for name, value in figures.items())


def _retrieval_section(report: dict | None) -> dict | None:
    """The card's "Similar items" section from `bench_similar.py evaluate --json`'s report, or None."""
    if not report:
        return None
    phone = {row["embedding"]: row for row in report["phone"]}
    rows = [
        {"name": row["embedding"], "recall_1": _score(row["Recall@1"]), "recall_10": _score(row["Recall@10"]),
         "map_10": _score(row["mAP@10"]),
         "phone_recall_10": _score(phone[row["embedding"]]["recall@10 subCategory"]) if row["embedding"] in phone else "n/a"}
        for row in report["product"]
        if row["queries"].startswith("without a byte copy")
    ]  # fmt: skip
    ceiling = report.get("label_ceiling")
    return {"date": report["date"][:10], "catalogue": f"{report['catalogue_items']:,}", "rows": rows,
            "queries": f"{report['product_queries']:,}", "phone_queries": f"{report['phone_queries']:,}",
            "ceiling": {f"top_{k}": _score(ceiling[f"own kind in the top {k}"]) for k in (1, 10)} if ceiling else None}  # fmt: skip


def _public_name(source: str) -> str:
    """A Hub id or relative path as it is; an absolute or home path by its last part (a card never shows where
    things lie on the machine that wrote it)."""
    return Path(source).name if source.startswith(("/", "~")) else source


def _reference(source: str, hub_url: str, local: str) -> str:
    """A link to a Hub repo (`hub_url` + id), else the local path's public name in backticks followed by `local`."""
    return f"[{source}]({hub_url}{source})" if _is_hub_id(source) else f"`{_public_name(source)}`{local}"


def _community_section(recipe: dict) -> dict | None:
    """recipe.json's `feedback` (a model that learned from the app's corrections) for the card, else None."""
    feedback = recipe.get("feedback")
    if not feedback:
        return None
    init_from = feedback.get("init_from")
    return {
        "source": _reference(str(feedback.get("source", "")), "https://huggingface.co/datasets/", " (a local folder)"),
        "revision": feedback.get("revision"),
        "records_used": feedback.get("records_used", 0),
        "init_from": _reference(str(init_from), "https://huggingface.co/", "") if init_from else None,
        "attributes": [
            {"name": name, **{key: counts.get(key, 0) for key in ("changed", "confirmed", "untouched")}}
            for name, counts in (feedback.get("attributes") or {}).items()
        ],
    }


def split_definition(metrics: dict) -> str | None:
    """What the evaluated split holds: metrics.json's `split_definition`, else derived for a built-in data set."""
    from ..data import describe_split

    if metrics.get("split_definition"):
        return metrics["split_definition"]
    if metrics.get("dataset") in HUB_DATASET_IDS and metrics.get("split"):
        return describe_split(metrics["dataset"], metrics["split"])
    return None


def hub_split_name(dataset_id: str, split: str | None) -> str | None:
    """The model-index name of a split: the Hub's own name where the Hub copy has that split, else the split marked
    as this project's (`fashion-hf-validation`): the Hub copy of the product images has only `train`."""
    if split is None or not _is_hub_id(dataset_id):
        return split
    split = HUB_SPLIT_NAMES.get((dataset_id, split), split)
    return split if split in HUB_SPLITS.get(dataset_id, {split}) else f"{PROJECT_SPLIT_PREFIX}{split}"


def eval_results(metrics: dict, dataset_id: str) -> list[EvalResult]:
    """One result per attribute for top-1 accuracy and macro-F1, and one for the generated tags' micro-F1; the same
    again for the split without its images byte-identical to training images when metrics.json has them."""
    split = hub_split_name(dataset_id, metrics.get("split"))
    definition = split_definition(metrics)
    results = _eval_results(metrics, dataset_id, split, {"definition": definition} if definition else None)
    deduplicated = metrics.get("without_duplicates")
    if deduplicated:
        args = {"definition": f"{definition or split}, without the {deduplicated['n_excluded']} images whose bytes "
                              f"equal those of an image of {deduplicated['of_split']}"}  # fmt: skip
        results += _eval_results(deduplicated, dataset_id, f"{split}-without-{deduplicated['of_split']}-duplicates", args)
    return results


def _eval_results(metrics: dict, dataset_id: str, split: str | None, dataset_args: dict | None) -> list[EvalResult]:
    common = dict(
        task_type=TASK_TYPE,
        task_name="Fashion attribute classification and tagging",
        dataset_type=dataset_id,
        dataset_name=DATASET_NAMES.get(dataset_id, dataset_id),
        dataset_split=split,
        dataset_args=dataset_args,
    )
    results = []
    for name, values in metrics["attributes"].items():
        if values.get("support"):
            results.append(EvalResult(**common, metric_type="accuracy", metric_value=_round(values["top1"]),
                                      metric_name=f"{name} top-1 accuracy", metric_config=name))  # fmt: skip
            results.append(EvalResult(**common, metric_type="f1", metric_value=_round(values["macro_f1"]),
                                      metric_name=f"{name} macro-F1", metric_config=name,
                                      metric_args={"average": "macro"}))  # fmt: skip
    tag_f1 = metrics["tags"]["generated"]["overall"]["f1"]
    results.append(EvalResult(**common, metric_type="f1", metric_value=_round(tag_f1), metric_name="tag F1 (micro)",
                              metric_config="tags", metric_args={"average": "micro"}))  # fmt: skip
    return results


def _stage(stage: dict, heading: str | None) -> dict:
    seconds = read_key(stage, WALL_TIME)
    return {
        "heading": heading,
        "command": stage["command"],
        "wall_time": format_duration(seconds) if seconds is not None else stage.get("wall_time", "not recorded"),
        "hardware": stage.get("hardware", "not recorded"),
        "note": stage.get("wall_time_note"),
        "seconds": seconds,
    }


def _lineage(runs: list[dict], member: str | None = None) -> list[dict]:
    """One model's training runs, first first; each headed with its place in the sequence (and the ensemble member
    it trained) unless a single model was trained in one run."""
    if len(runs) == 1 and member is None:
        return [_stage(runs[0], None)]
    stages = []
    for number, run in enumerate(runs, 1):
        place = f"stage {number} of {len(runs)}"
        heading = f"{member}, {place}" if member else place.capitalize()
        if number > 1:
            heading += f", starting from the model of {'its' if member else ''} stage {number - 1}".replace("  ", " ")
        stages.append(_stage(run, heading + ":"))
    return stages


def _stages(recipe: dict, member_encoders: list[str] | None = None) -> tuple[list[dict], str | None]:
    """Each training run's heading, command, wall time and hardware, in order, and their total time (None with one
    run, or when a run's time is not recorded). An ensemble's recipe has `members`, each with its `stages`: every
    member's runs come first, then the run that combined them."""
    members = recipe.get("members") or []
    if members:
        encoders = member_encoders or [None] * len(members)
        stages = []
        for number, (member, encoder) in enumerate(zip(members, encoders), 1):
            about = [f"`{encoder}`" if encoder else None, member.get("domain") and f"{member['domain']} member"]
            name = f"Member {number} of {len(members)}" + (f" ({', '.join(filter(None, about))})" if any(about) else "")
            stages += _lineage(member.get("stages", []), name)
        stages.append(_stage(recipe, "The members combined into the ensemble:"))
    else:
        stages = _lineage([*(recipe.get("previous_stages") or []), recipe])
    times = [stage.pop("seconds") for stage in stages]
    total = None if len(stages) < 2 or None in times else format_duration(sum(float(t) for t in times))
    return stages, total


def _hyperparameters(recipe: dict) -> list[dict]:
    """Every setting of the recipe but the ones the card shows elsewhere; None values left out."""
    items = {}
    for key in SETTINGS_KEYS:
        items.update(recipe.get(key) or {})
    items.update({key: value for key, value in recipe.items() if key not in RECIPE_KEYS})
    return [
        {"name": name, "value": f"`{json.dumps(value, default=str)}`" if isinstance(value, (dict, list)) else value}
        for name, value in items.items()
        if value is not None
    ]


def _tag_rows(tags: dict, deduplicated: dict | None = None) -> list[dict]:
    """Tag scores per group; `f1_deduplicated` beside F1 when the split was also scored without duplicates."""
    def row(name, values, other):
        scores = {key: _score(values[key]) for key in ("precision", "recall", "f1")}
        extra = {"f1_deduplicated": _score(other["f1"]) if other else "–"} if deduplicated else {}
        return {"name": name, **scores, **extra, "support": values["support"]}

    other = deduplicated["generated"] if deduplicated else {"overall": None, "per_group": {}}
    rows = [row("**all**", tags["generated"]["overall"], other["overall"])]
    rows += [row(group, values, other["per_group"].get(group)) for group, values in tags["generated"]["per_group"].items()]
    return rows


def _head_comparison(tags: dict, deduplicated: dict | None = None) -> list[dict]:
    comparison = tags.get("attribute_tags")
    if not comparison or not comparison.get("groups"):
        return []
    other = (deduplicated or {}).get("attribute_tags") or {}
    rows = []
    for name, source in (("generated by the decoder", "generated"), ("top label of each head", "heads")):
        row = {"name": name, **{key: _score(comparison[source]["overall"][key]) for key in ("precision", "recall", "f1")}}
        if deduplicated:
            row["f1_deduplicated"] = _score(other[source]["overall"]["f1"]) if other.get(source) else "–"
        rows.append(row)
    return rows


def _robustness_rows(metrics: dict, shifted: dict | None) -> list[dict]:
    """Top-1 per attribute, clean next to shifted (`evaluate.py --shift`), and the attribute-tag F1 both ways."""
    if not shifted:
        return []
    rows = [
        {"name": name, "clean": _score(values["top1"]), "shifted": _score(shifted["attributes"][name]["top1"])}
        for name, values in metrics["attributes"].items()
        if values.get("support") and shifted["attributes"].get(name, {}).get("support")
    ]
    clean_tags, shifted_tags = metrics["tags"].get("attribute_tags"), shifted["tags"].get("attribute_tags")
    if clean_tags and shifted_tags and clean_tags.get("groups"):
        rows.append({
            "name": "attribute-tag F1 (decoder)",
            "clean": _score(clean_tags["generated"]["overall"]["f1"]),
            "shifted": _score(shifted_tags["generated"]["overall"]["f1"]),
        })  # fmt: skip
    return rows


def build_model_card(
    model_folder: str | Path,
    metrics: dict,
    recipe: dict,
    dataset_id: str,
    base_model: str,
    repo_id: str | None = None,
    *,
    shifted_metrics: dict | None = None,
    user_photo_metrics: dict | None = None,
    calibration: dict | None = None,
    retrieval: dict | None = None,
    license: str = "other",
    template_path: str | Path = TEMPLATE,
    title: str | None = None,
) -> ModelCard:
    """The model card of the model saved in `model_folder`, filled from `metrics` (evaluate.py's metrics.json) and
    `recipe` (the training command, wall time, hardware, hyperparameters), with a model-index of the measured scores.

    `shifted_metrics`: the same evaluation with `--shift` (e.g. phone-style photos), shown next to the clean scores.
    `user_photo_metrics`: evaluate.py's metrics.json on real phone photos (`--dataset clothing-user-photos`): their
    top-1 becomes a column beside the product figures ("n/a" for heads they have no label for), with a table of
    top-1 per photographer's label. A recipe with `feedback` gets a "Community corrections" section.
    `calibration`: `fashion-hf calibrate`'s report (calibration.json), shown in a section of its own; `retrieval`:
    `benchmarks/bench_similar.py evaluate --json`'s (retrieval.json), in a "Similar items" section.
    Plots (`attribute_accuracy.png`, `confusion_matrix.png`, `training_curves.png`) are embedded when they are in
    `model_folder`. `title`: the card's heading and model-index name (default: the repo's name, else the folder's).
    `dataset_id` is a Hub id, or a local catalogue's name (never its absolute path). Nothing here touches the
    network; save the card with `card.save(path)`.
    """
    model_folder = Path(model_folder)
    config = _read_config(model_folder)
    _check_metrics(metrics)
    if not recipe.get("command"):
        raise ValueError("recipe needs 'command': the exact command line the model was trained with")

    model_name = title or (repo_id.split("/")[-1] if repo_id else model_folder.resolve().name)
    dataset_name = DATASET_NAMES.get(dataset_id, dataset_id)
    card_data = ModelCardData(
        model_name=model_name,
        base_model=base_model,
        datasets=[dataset_id] if _is_hub_id(dataset_id) else None,
        library_name="transformers",
        pipeline_tag=TASK_TYPE,
        license=license,
        license_name="unknown" if license == "other" else None,
        tags=[*TAGS, config.get("model_type", "fashion-tagger")],
        metrics=["accuracy", "f1"],
        eval_results=eval_results(metrics, dataset_id),
    )

    attributes = config.get("attributes", {})
    tags = config.get("tags", [])
    members = config.get("members") if config.get("model_type") == "fashion-tagger-ensemble" else None
    if members:  # each at its own input size; a member added with its encoder frozen says so (recipe.CONTINUE_WITH)
        lineage = recipe.get("members") or []
        lineage = lineage if len(lineage) == len(members) else [{}] * len(members)
        members = [
            {"image_size": config.get("image_size"), **member,
             "frozen_encoder": (line.get(CONTINUE_WITH) or {}).get("frozen_stages") == "all"}
            for member, line in zip(members, lineage)
        ]  # fmt: skip
    stages, total_wall_time = _stages(recipe, [member["encoder_name"] for member in members or []])
    confusion_head = metrics.get("confusion_matrix_attribute")
    titles = dict(PLOTS)
    if confusion_head:
        titles["confusion_matrix.png"] = f"Confusion matrix of {confusion_head}"
    plots = [{"file": file, "title": titles[file]} for file, _ in PLOTS if (model_folder / file).is_file()]
    if _is_hub_id(dataset_id):
        dataset_link = f"[{dataset_name}](https://huggingface.co/datasets/{dataset_id}) (`{dataset_id}`)"
    elif dataset_id in DATASET_NAMES:
        dataset_link = f"{dataset_name} (`{dataset_id}`)"
    else:
        dataset_link = f"the catalogue `{dataset_id}` (a local data set, not on the Hub)"
    deduplicated = metrics.get("without_duplicates")
    selected_on = recipe.get("selected_on") or {}
    height, width = config.get("image_size", [None, None])
    num_beams = metrics.get("num_beams", 1)
    user_photos = _user_photos_section(user_photo_metrics)
    user_photo_top1 = _user_photo_rows(metrics, user_photo_metrics)
    return ModelCard.from_template(
        card_data,
        template_path=str(template_path),
        model_name=model_name,
        repo_id=repo_id or str(model_folder),
        base_model=base_model,
        license_text=f"{license} (the licence of the training data is unconfirmed: see Limitations)",
        attribute_names=list(attributes),
        heads=[{"name": name, "num_labels": len(labels)} for name, labels in attributes.items()],
        encoder_name=config.get("encoder_name"),
        members=members,
        mirror_views=config.get("mirror_views", False),
        domains=config.get("domains") or [],
        member_domains=config.get("member_domains") or [],
        expert_min_weight=config.get("expert_min_weight"),
        weights_dtype=(recipe.get("arguments") or {}).get("weights_dtype"),
        image_height=height,
        image_width=width,
        decoder_type=config.get("decoder_type", "gru"),
        decoder_hidden_size=config.get("decoder_hidden_size"),
        max_tag_length=config.get("max_tag_length"),
        num_tags=len(tags),
        num_detail_tags=sum(1 for _, group in tags if group == DETAIL_GROUP),
        dataset_id=dataset_id,
        dataset_link=dataset_link,
        is_product_images=dataset_name == DATASET_NAMES["fashion-product-images"],
        train_split=recipe.get("train_split"),
        train_examples=read_key(recipe, TRAIN_IMAGES),
        stages=stages,
        total_wall_time=total_wall_time,
        hyperparameters=_hyperparameters(recipe),
        n_images=metrics["n_images"],
        eval_dataset=metrics.get("dataset", dataset_id),
        eval_split=metrics.get("split", "?"),
        eval_split_name=hub_split_name(dataset_id, metrics.get("split")),
        eval_split_definition=split_definition(metrics),
        selection_choices=selected_on.get("choices") if selected_on.get("split") == metrics.get("split") else None,
        test_note=recipe.get("test_note"),
        deduplicated=deduplicated,
        eval_date=metrics.get("date"),
        decoding="greedy decoding" if num_beams == 1 else f"beam search with {num_beams} beams",
        attribute_rows=[
            {"name": name, **{key: _score(values[key]) for key in ("top1", "top5", "macro_f1")},
             "support": values["support"], "out_of_vocabulary": values.get("out_of_vocabulary", 0),
             "ece": _score(values.get("ece")),
             **({"top1_deduplicated": _score(deduplicated["attributes"][name]["top1"]),
                 "macro_f1_deduplicated": _score(deduplicated["attributes"][name]["macro_f1"])}
                if deduplicated else {}),
             "top1_user_photos": user_photo_top1.get(name)}
            for name, values in metrics["attributes"].items()
        ],  # fmt: skip
        mean_top1=_score(metrics["mean_top1"]) if metrics.get("mean_top1") is not None else None,
        mean_macro_f1=_score(metrics.get("mean_macro_f1")),
        mean_top1_deduplicated=_score(deduplicated.get("mean_top1")) if deduplicated else None,
        mean_macro_f1_deduplicated=_score(deduplicated.get("mean_macro_f1")) if deduplicated else None,
        tag_rows=_tag_rows(metrics["tags"], deduplicated["tags"] if deduplicated else None),
        head_comparison=_head_comparison(metrics["tags"], deduplicated["tags"] if deduplicated else None),
        plots=plots,
        shift=(shifted_metrics or {}).get("shift"),
        robustness_rows=_robustness_rows(metrics, shifted_metrics),
        user_photos=user_photos,
        community=_community_section(recipe),
        calibration=_calibration_section(calibration, model_folder),
        retrieval=_retrieval_section(retrieval),
    )


def copy_plots(source: Path, model_folder: Path) -> list[str]:
    """Copy the plots next to metrics.json into the model folder, where the card links to them."""
    copied = []
    if source.resolve() != model_folder.resolve():
        for file, _ in PLOTS:
            if (source / file).is_file():
                shutil.copy2(source / file, model_folder / file)
                copied.append(file)
    return copied


def read_report(named: Path | None, beside_model: Path) -> dict | None:
    """A report the card shows: the file named on the command line (which must exist), else the one beside the model
    when there is one."""
    path = named or beside_model
    return json.loads(path.read_text()) if named is not None or path.is_file() else None


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_folder", type=Path, help="the folder the model was saved to")
    parser.add_argument("--metrics", type=Path, required=True, help="metrics.json written by train/evaluate.py")
    parser.add_argument("--recipe", type=Path, required=True, help="recipe.json of the training run (needs 'command')")
    parser.add_argument("--repo-id", default=None, help="the Hub repository the model goes to (for the usage snippet)")
    parser.add_argument("--dataset-id", default=None, help="training data (default: the recipe's, else the metrics')")
    parser.add_argument("--base-model", default=None, help="pretrained encoder, e.g. timm/tf_efficientnet_lite0.in1k")
    parser.add_argument("--shifted-metrics", type=Path, default=None, help="metrics.json of evaluate.py --shift phone")
    parser.add_argument("--user-photo-metrics", type=Path, default=None,
                        help="metrics.json of evaluate.py --dataset clothing-user-photos (default: the model folder's "
                        f"{USER_PHOTO_METRICS_FILE} when it has one)")  # fmt: skip
    parser.add_argument("--calibration", type=Path, default=None,
                        help=f"fashion-hf calibrate's report (default: the model folder's {CALIBRATION_FILE} if any)")
    parser.add_argument("--retrieval", type=Path, default=None,
                        help=f"bench_similar.py evaluate --json's report (default: the model folder's {RETRIEVAL_FILE} if any)")
    parser.add_argument("--license", default="other")
    parser.add_argument("--output", type=Path, default=None, help="the card's path (default MODEL_FOLDER/README.md)")
    parser.add_argument("--no-copy-plots", action="store_true", help="do not copy the plots next to metrics.json")
    args = parser.parse_args(argv)

    metrics = json.loads(args.metrics.read_text())
    recipe = json.loads(args.recipe.read_text())
    dataset = metrics.get("dataset", "")
    dataset_id = args.dataset_id or recipe.get("dataset_id") or HUB_DATASET_IDS.get(dataset, dataset)
    base_model = args.base_model or recipe.get("base_model")
    if not dataset_id:
        parser.error("no data set id: pass --dataset-id or put 'dataset_id' in the recipe")
    if not base_model:
        parser.error("no base model: pass --base-model (e.g. timm/tf_efficientnet_lite0.in1k) or put it in the recipe")
    if not args.no_copy_plots:
        for file in copy_plots(args.metrics.parent, args.model_folder):
            print(f"copied {file} into {args.model_folder}")
    shifted = json.loads(args.shifted_metrics.read_text()) if args.shifted_metrics else None
    user_photos = read_report(args.user_photo_metrics, args.model_folder / USER_PHOTO_METRICS_FILE)
    calibration = read_report(args.calibration, args.model_folder / CALIBRATION_FILE)
    retrieval = read_report(args.retrieval, args.model_folder / RETRIEVAL_FILE)
    card = build_model_card(
        args.model_folder, metrics, recipe, dataset_id, base_model, args.repo_id, shifted_metrics=shifted,
        user_photo_metrics=user_photos, calibration=calibration, retrieval=retrieval, license=args.license,
    )
    output = args.output or args.model_folder / "README.md"
    card.save(output)
    print(f"wrote {output}")
    return output


if __name__ == "__main__":
    main()
