"""What train/train.py trains and chooses on: a catalogue's fixed held-out part (what evaluate.py then scores), the
catalogue's name on the card, detail tags on small catalogues, and typed feedback tags enough people agree on."""

import hashlib
import json
import sys
from collections import Counter

import datasets
import pytest
from helpers import COLOURS, TINY_FLAGS, product_photo, run_training

from fashion_hf.training.evaluate import main as evaluate
from fashion_hf.training.examples import (
    append_examples,
    default_min_tag_count,
    feedback_repeats,
    feedback_tags_to_keep,
    replay_sample,
)
from fashion_hf.training.train import parse_args

_AT = TINY_FLAGS.index("--min-tag-count")
FLAGS = TINY_FLAGS[:_AT] + TINY_FLAGS[_AT + 2 :]  # the default threshold is under test


def write_shop(folder, count=40):
    """`shop/catalogue.csv`: `count` distinct photos, every fourth named "Checked"; as a user would lay it out."""
    (folder / "photos").mkdir(parents=True)
    lines = ["image,articleType,baseColour,productDisplayName"]
    for index in range(count):
        colour = list(COLOURS)[index % 3]
        photo = product_photo(colour=(index * 6, 255 - index * 6, 90 + index))
        photo.save(folder / "photos" / f"{index}.png")
        article = ("Shirts", "Tshirts")[index % 2]
        lines.append(f"photos/{index}.png,{article},{colour},Acme Men {'Checked ' if index % 4 == 0 else ''}{article}")
    (folder / "catalogue.csv").write_text("\n".join(lines) + "\n")
    return folder / "catalogue.csv"


@pytest.mark.slow
def test_a_catalogue_trains_without_its_fixed_held_out_part_which_evaluate_then_scores(tmp_path):
    table, output = write_shop(tmp_path / "shop"), tmp_path / "run"
    held_out = sum(
        int(hashlib.sha256(path.read_bytes()).hexdigest(), 16) % 100 < 10 for path in (tmp_path / "shop" / "photos").iterdir()
    )  # fmt: skip
    assert 0 < held_out < 40
    run_training(["--dataset", str(table), *FLAGS, "--epochs", "1", "--output-dir", str(output)],
                 launcher=(sys.executable,))  # fmt: skip
    model = output / "model"
    recipe = json.loads((model / "recipe.json").read_text())
    assert (recipe["train_images"], recipe["eval_images"]) == (40 - held_out, held_out)
    assert "sha256(image bytes)" in recipe["splits"]["validation"] and recipe["selected_on"]["split"] == "validation"
    # Scored again by evaluate.py, --split validation is exactly the part training held out.
    metrics = evaluate([str(model), "--dataset", str(table), "--split", "validation", "--output", str(tmp_path / "eval"),
                        "--no-progress"])  # fmt: skip
    assert metrics["n_images"] == held_out
    written = json.loads((model / "metrics.json").read_text())
    assert written["n_images"] == held_out and written["split"] == "validation"
    # A 40-image catalogue keeps the detail tags on 3 training items or more (the built-in threshold, 20, kept none).
    assert recipe["min_tag_count"] == 3
    config = json.loads((model / "config.json").read_text())
    assert ["check", "detail"] in config["tags"]
    # The card's title, data line and evaluation name the catalogue, not where it lies on this machine (the exact
    # training command, quoted in the card, still shows the path it was given).
    card = (model / "README.md").read_text()
    assert "\n# fashion-tagger-shop\n" in card and "name: fashion-tagger-shop" in card
    data_line = card.split("## Training data\n\n")[1].splitlines()[0]
    assert data_line.startswith("the catalogue `shop` (a local data set, not on the Hub)")
    assert "images of `shop`, split `validation`" in card and written["dataset"] == "shop"


def test_a_small_catalogue_gets_a_tag_threshold_scaled_to_its_size():
    catalogue = parse_args(["--dataset", "shop/catalogue.csv"])
    assert [default_min_tag_count(catalogue, size) for size in (40, 200, 5_000, 33_315)] == [3, 3, 5, 20]
    assert default_min_tag_count(parse_args([]), 200) == 20  # the built-in data sets keep their threshold
    assert default_min_tag_count(parse_args(["--dataset", "shop", "--min-tag-count", "7"]), 200) == 7


def test_typed_tags_need_the_configured_number_of_people():
    people = Counter({"tank": 3, "lace-up": 2, "boho": 1})
    assert feedback_tags_to_keep(parse_args(["--feedback", "fb"]), people) == ["tank"]  # the config's default: 3
    assert feedback_tags_to_keep(parse_args(["--feedback", "fb", "--feedback-tag-min-contributors", "2"]), people) == [
        "lace-up", "tank",
    ]  # fmt: skip
    assert feedback_tags_to_keep(parse_args([]), people) == []  # no feedback, no typed tags


def test_sqrt_balance_repeats_rare_kinds_more_and_keeps_the_total():
    kinds = ["Tshirts"] * 64 + ["Caps"] * 4 + [None] * 16  # articleType, else subCategory; None: neither
    records = datasets.Dataset.from_dict({
        "articleType": [kind if kind == "Tshirts" else None for kind in kinds],
        "subCategory": ["Topwear"] * 64 + ["Headwear"] * 4 + [None] * 16,
    })  # fmt: skip
    assert feedback_repeats(parse_args(["--feedback", "fb", "--feedback-repeats", "3"]), records) == 3
    repeats = feedback_repeats(parse_args(["--feedback", "fb", "--feedback-repeats", "3", "--feedback-balance", "sqrt"]), records)
    assert len(repeats) == len(kinds) and min(repeats) >= 1
    assert sum(repeats) == 3 * len(kinds)  # --feedback-repeats copies on average
    by_kind = {kind: sum(r for k, r in zip(kinds, repeats) if k == kind) / kinds.count(kind) for kind in ("Tshirts", "Caps", None)}
    assert by_kind == {"Tshirts": 2.25, "Caps": 9, None: 4.5}  # in proportion to 1/sqrt(64) : 1/sqrt(4) : 1/sqrt(16)

    catalogue = datasets.Dataset.from_dict({"image": ["a.jpg"], "articleType": ["Jeans"], "subCategory": ["Bottomwear"], "tags": [["denim"]]})
    photos = records.add_column("image", [f"{index}.jpg" for index in range(len(kinds))]).add_column("tags", [["casual"]] * len(kinds))
    appended = append_examples(catalogue, photos, ["articleType", "subCategory"], repeats)
    assert len(appended) == 1 + sum(repeats)
    assert Counter(appended["image"][1:]) == {f"{index}.jpg": count for index, count in enumerate(repeats)}


def test_replay_favouring_the_corrected_kinds_spreads_half_of_it_evenly_over_them():
    kinds = ["Tshirts"] * 900 + ["Dresses"] * 40 + ["Caps"] * 10 + ["Watches"] * 50
    catalogue = datasets.Dataset.from_dict({"image": [f"{index}.jpg" for index in range(len(kinds))], "articleType": kinds})
    uniform = replay_sample(catalogue, 200, seed=7)
    assert uniform["image"] == replay_sample(catalogue, 200, seed=7)["image"]  # seeded: every member replays these rows
    favoured = replay_sample(catalogue, 200, seed=7, favoured_kinds={"Tshirts", "Dresses", "Caps"})
    counts = Counter(favoured["articleType"])
    assert len(favoured) == 200 and len(set(favoured["image"])) == 200
    assert counts["Caps"] == 10 and counts["Dresses"] >= 33  # every cap; 33 dresses first, then a uniform share
    assert Counter(uniform["articleType"])["Dresses"] < 20
    assert favoured["image"] == sorted(favoured["image"], key=lambda name: int(name[:-4]))  # in catalogue order


@pytest.mark.slow
def test_a_tag_typed_by_three_people_joins_the_vocabulary(tiny_catalogue, tmp_path):
    from fashion_hf.feedback import FeedbackStore

    with FeedbackStore(tmp_path / "feedback") as store:
        for person, colour in (("ana", "Red"), ("ben", "Blue"), ("cy", "Green")):
            store.add(
                product_photo(COLOURS[colour]), predicted={}, corrected_attributes={"articleType": "Shirts"},
                corrected_tags=["tank", *(["boho"] if person == "ana" else [])], consent=True, model_id="tiny",
                model_revision="0", annotator=person,
            )  # fmt: skip
    output = tmp_path / "run"
    log = run_training(["--data-source", str(tiny_catalogue), *TINY_FLAGS, "--epochs", "1", "--output-dir", str(output),
                        "--feedback", str(tmp_path / "feedback")], launcher=(sys.executable,))  # fmt: skip
    config = json.loads((output / "model" / "config.json").read_text())
    assert ["tank", "detail"] in config["tags"]  # 3 people; 3 items is far below any product-name threshold
    assert ["boho", "detail"] not in config["tags"]  # 1 person: left out until more people type it
    assert config["feedback_tag_min_contributors"] == 3
    assert "typed feedback tags in the vocabulary: ['tank']" in log
