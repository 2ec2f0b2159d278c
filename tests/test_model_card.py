"""The model card: a model-index of the measured scores, the training recipe, the plots, rendered without network."""

import json
import os
import shutil
import socket
import subprocess
import sys

import httpx
import huggingface_hub
import numpy as np
import pytest
from helpers import REPO
from huggingface_hub import ModelCard

from fashion_hf.data import CLOTHING_USER_PHOTOS, describe_split
from fashion_hf.evaluation import Predictions, label_breakdown, score
from fashion_hf.training.model_card import build_model_card

DATASET_ID = "ashraq/fashion-product-images-small"
BASE_MODEL = "timm/tf_efficientnet_lite0.in1k"
RECIPE = {
    "command": "accelerate launch train/train.py --config train/configs/product-images.yaml --output models/tagger",
    "wall_time_s": 3725.0,
    "hardware": "1x NVIDIA H100 80GB",
    "hyperparameters": {"epochs": 8, "learning_rate": 0.001},
    "seed": 1234,
}


@pytest.fixture
def model_folder(tiny_model_dir, tmp_path):
    folder = tmp_path / "tagger"
    folder.mkdir()
    shutil.copy(tiny_model_dir / "config.json", folder / "config.json")
    return folder


@pytest.fixture
def metrics(tiny_model_dir):
    """metrics.json as train/evaluate.py writes it, from known predictions (no model run)."""
    config = json.loads((tiny_model_dir / "config.json").read_text())
    attributes = {name: config["attributes"][name] for name in ("gender", "usage")}
    probs = {
        "gender": np.eye(5)[[0, 1, 2, 3]],  # labels 0, 1, 2, 2: top-1 0.75
        "usage": np.eye(4)[[0, 1, 1, 1]],  # labels 0, 1, 1, missing: top-1 1.0
    }
    labels = {"gender": np.array([0, 1, 2, 2]), "usage": np.array([0, 1, 1, -100])}
    generated = [{"gender:Boys", "detail:check"}, {"gender:Girls"}, {"gender:Men"}, {"gender:Men"}]
    reference = [{"gender:Boys", "detail:check"}, {"gender:Girls"}, {"gender:Men"}, {"gender:Men", "detail:denim"}]
    groups = ["detail", "gender", "usage"]
    predictions = Predictions(probs, labels, {"gender": 0, "usage": 0}, generated, reference, {}, groups)
    metrics = score(predictions, attributes)
    return {"model": "models/tagger", "dataset": "fashion-product-images", "split": "validation",
            "date": "2025-01-01T00:00:00+00:00", **metrics, "num_beams": 1}  # fmt: skip


@pytest.fixture
def user_photo_metrics(tiny_model_dir):
    """metrics.json of evaluate.py --dataset clothing-user-photos: one labelled head (gender), no tags, per label."""
    config = json.loads((tiny_model_dir / "config.json").read_text())
    attributes = {"gender": config["attributes"]["gender"]}  # Boys, Girls, Men, Unisex, Women
    probs = {"gender": np.eye(5)[[2, 2, 4]]}  # Men, Men, Women
    labels = {"gender": np.array([2, 4, 4])}  # right, wrong, right: top-1 2/3
    predictions = Predictions(probs, labels, {"gender": 0}, [set()] * 3, [set()] * 3, {}, [], tags_known=False)
    return {"model": "models/tagger", "dataset": CLOTHING_USER_PHOTOS, "split": "validation",
            "split_definition": describe_split(CLOTHING_USER_PHOTOS, "validation"), "date": "2025-01-02T00:00:00+00:00",
            **score(predictions, attributes),
            "per_label": label_breakdown(predictions, ["Shirt", "Dress", "Dress"], attributes, "label")}  # fmt: skip


class NetworkUsed(AssertionError):
    pass


@pytest.fixture
def no_network(monkeypatch):
    """Any HTTP request or socket connection fails the test, with offline mode off so that it cannot mask one."""

    def refuse(*args, **kwargs):
        raise NetworkUsed("the model card tried to reach the network")

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(httpx.Client, "send", refuse)
    monkeypatch.setattr(httpx.AsyncClient, "send", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_the_network_guard_catches_a_hub_call(no_network):
    with pytest.raises(NetworkUsed):
        ModelCard("---\nlicense: mit\n---\n# A card\n").validate()  # validate posts the YAML to the Hub


def metric_values(card):
    return {(result.metric_type, result.metric_config): result.metric_value for result in card.data.eval_results}


def test_model_index_holds_the_measured_scores(model_folder, metrics, no_network):
    card = build_model_card(model_folder, metrics, RECIPE, DATASET_ID, BASE_MODEL, repo_id="someone/tagger")
    values = metric_values(card)
    assert values[("accuracy", "gender")] == 0.75
    assert values[("accuracy", "usage")] == 1.0
    assert values[("f1", "gender")] == round(metrics["attributes"]["gender"]["macro_f1"], 4)
    assert values[("f1", "gender")] == 0.6667  # classes 0, 1, 2, 3: F1 1, 1, 2/3, 0
    assert values[("f1", "tags")] == 0.9091  # 5 of 5 generated tags right, 5 of 6 found: F1 10/11
    result = card.data.eval_results[0]
    assert (result.task_type, result.dataset_type, result.dataset_split) == (
        "image-classification", DATASET_ID, "fashion-hf-validation",
    )  # fmt: skip


def test_the_projects_hash_split_is_not_called_the_hub_datasets_validation_split(model_folder, metrics, no_network):
    # ashraq/fashion-product-images-small has one split, train: "validation" is this project's part of it, by id hash.
    card = build_model_card(model_folder, metrics, RECIPE, DATASET_ID, BASE_MODEL)
    splits = {(result.dataset_split, result.dataset_args["definition"]) for result in card.data.eval_results}
    assert splits == {("fashion-hf-validation", "this project's validation split of ashraq/fashion-product-images-"
                       "small (one Hub split, train): the product ids whose int(sha1(str(id)), 16) % 100 is in 15-24")}
    assert "split `validation` (`fashion-hf-validation` in the model-index)" in card.text
    assert "int(sha1(str(id)), 16) % 100 is in 15-24" in card.text
    mnist = {**metrics, "dataset": "fashion-mnist", "split": "test"}  # a split the Hub copy has keeps its name
    card = build_model_card(model_folder, mnist, RECIPE, "zalando-datasets/fashion_mnist", BASE_MODEL)
    assert {result.dataset_split for result in card.data.eval_results} == {"test"}


def test_figures_without_duplicates_of_train_sit_beside_the_raw_ones(model_folder, metrics, no_network):
    from card_figures import card_mismatches

    deduplicated = json.loads(json.dumps(metrics))  # as evaluate.py --exclude-duplicates-of train writes it
    deduplicated["attributes"]["gender"].update(top1=0.5, macro_f1=0.4)
    deduplicated.update(of_split="train", n_excluded=1, n_images=3, mean_top1=0.7)
    metrics = {**metrics, "without_duplicates": deduplicated}
    card = build_model_card(model_folder, metrics, RECIPE, DATASET_ID, BASE_MODEL)
    assert "1 of these 4 images are byte-identical" in card.text and "--exclude-duplicates-of train" in card.text
    assert "| gender | 0.750 | 0.500 |" in card.text and "| **mean** | **0.875** | **0.700** |" in card.text
    splits = {result.dataset_split for result in card.data.eval_results}
    assert splits == {"fashion-hf-validation", "fashion-hf-validation-without-train-duplicates"}
    assert card_mismatches(str(card), metrics) == []


def test_a_split_used_for_choices_is_called_optimistic(model_folder, metrics, no_network):
    recipe = {**RECIPE, "selected_on": {"split": "validation", "choices": ["the epochs", "the ensemble members"]}}
    text = build_model_card(model_folder, metrics, recipe, DATASET_ID, BASE_MODEL).text
    assert "These figures are optimistic." in text and "to choose the epochs, the ensemble members" in text
    recipe["selected_on"]["split"] = "fashion-hf-validation-part"  # chosen elsewhere: this split is clean
    assert "optimistic" not in build_model_card(model_folder, metrics, recipe, DATASET_ID, BASE_MODEL).text


def test_a_catalogues_card_names_the_catalogue_not_a_local_path(model_folder, metrics, no_network):
    catalogue_metrics = {**metrics, "dataset": "spring-shop", "split_definition": "validation of spring-shop by hash"}
    card = build_model_card(model_folder, catalogue_metrics, RECIPE, "spring-shop", BASE_MODEL,
                            title="fashion-tagger-spring-shop")  # fmt: skip
    assert card.text.startswith("\n# fashion-tagger-spring-shop\n") or "# fashion-tagger-spring-shop\n" in card.text
    assert "the catalogue `spring-shop` (a local data set, not on the Hub)" in card.text
    assert card.data.model_name == "fashion-tagger-spring-shop" and not card.data.datasets
    assert {result.dataset_split for result in card.data.eval_results} == {"validation"}


def test_card_metadata(model_folder, metrics, no_network):
    data = build_model_card(model_folder, metrics, RECIPE, DATASET_ID, BASE_MODEL, repo_id="someone/tagger").data
    assert data.library_name == "transformers"
    assert data.pipeline_tag == "image-classification"
    assert data.base_model == BASE_MODEL
    assert data.datasets == [DATASET_ID]
    assert data.license == "other"
    assert "fashion" in data.tags and data.model_name == "tagger"


def test_card_states_the_command_wall_time_and_hardware(model_folder, metrics, no_network):
    text = build_model_card(model_folder, metrics, RECIPE, DATASET_ID, BASE_MODEL).text
    assert RECIPE["command"] in text
    assert "1 h 02 min (3725 s)" in text
    assert RECIPE["hardware"] in text
    assert "**learning_rate:** 0.001" in text and "**seed:** 1234" in text


def test_card_shows_results_usage_limitations_and_citations(model_folder, metrics, no_network):
    text = build_model_card(model_folder, metrics, RECIPE, DATASET_ID, BASE_MODEL, repo_id="someone/tagger").text
    assert "| gender | 0.750 | 1.000 |" in text
    assert "| usage | 1.000 | 1.000 | 1.000 | 0.000 | 3 |" in text  # the missing label is not counted
    assert "| gender | 0.750 | 1.000 | 0.667 | 0.250 | 4 |" in text  # ECE: right 75% of the time at 100% confidence
    assert 'pipeline("fashion-tagging", model="someone/tagger")' in text
    assert 'AutoModel.from_pretrained("someone/tagger", trust_remote_code=True)' in text
    assert "Myntra" in text and "licence" in text
    assert "Show and Tell" in text and "CNN-RNN" in text


def test_recipe_as_the_training_script_writes_it(model_folder, metrics, no_network):
    recipe = {"command": "accelerate launch train/train.py --epochs 3", "wall_time_seconds": 42.0,
              "hardware": "1 x cuda", "train_images": 33315, "best_epoch": 2,
              "arguments": {"epochs": 3, "output_dir": "runs/x", "push_to_hub": None}}  # fmt: skip
    text = build_model_card(model_folder, metrics, recipe, DATASET_ID, BASE_MODEL).text
    assert "42.0 s" in text and "33315 images" in text
    assert "**epochs:** 3" in text and "**best_epoch:** 2" in text
    assert "push_to_hub" not in text  # unset settings are left out


def test_a_model_trained_in_stages_lists_every_stage_and_the_total_time(model_folder, metrics, no_network):
    first = {"command": "accelerate launch train/train.py --config stage1.yaml", "wall_time_seconds": 3600.0,
             "hardware": "1 x cpu (2 threads)"}  # fmt: skip
    recipe = {"command": "accelerate launch train/train.py --config stage2.yaml", "wall_time_seconds": 1800.0,
              "hardware": "1 x cpu (2 threads)", "previous_stages": [first], "arguments": {"epochs": 6}}  # fmt: skip
    text = build_model_card(model_folder, metrics, recipe, DATASET_ID, BASE_MODEL).text
    assert text.index("--config stage1.yaml") < text.index("Stage 2 of 2") < text.index("--config stage2.yaml")
    assert "1 h 00 min (3600 s)" in text and "30 min 00 s (1800 s)" in text
    assert "**Total wall time, all stages:** 1 h 30 min (5400 s)" in text
    assert "**epochs:** 6" in text and "previous_stages" not in text


def test_phone_shift_scores_sit_next_to_the_clean_ones(model_folder, metrics, no_network):
    shifted = json.loads(json.dumps(metrics))
    shifted["shift"] = "phone"
    shifted["attributes"]["gender"]["top1"] = 0.5
    shifted["tags"]["attribute_tags"]["generated"]["overall"]["f1"] = 0.25
    text = build_model_card(model_folder, metrics, RECIPE, DATASET_ID, BASE_MODEL, shifted_metrics=shifted).text
    assert "## Robustness to synthetic phone-style photos (secondary)" in text
    assert "| gender | 0.750 | 0.500 |" in text and "| usage | 1.000 | 1.000 |" in text
    assert "| attribute-tag F1 (decoder) |" in text and "| 0.250 |" in text
    assert "Robustness" not in build_model_card(model_folder, metrics, RECIPE, DATASET_ID, BASE_MODEL).text


def test_real_phone_photos_sit_in_a_column_beside_the_product_figures(model_folder, metrics, user_photo_metrics,
                                                                      no_network):  # fmt: skip
    from card_figures import card_mismatches

    card = build_model_card(model_folder, metrics, RECIPE, DATASET_ID, BASE_MODEL,
                            user_photo_metrics=user_photo_metrics)  # fmt: skip
    text = card.text
    assert "| Attribute | Top-1 | Top-1 on real phone photos | Top-5 |" in text
    assert "| gender | 0.750 | 0.667 | 1.000 |" in text
    assert "| usage | 1.000 | n/a | 1.000 |" in text  # the photos have no usage label
    assert "### Real phone photos" in text and "photographer-disjoint validation split" in text
    assert "| Dress | 2 | Women | 0.500 | Men |" in text and "| Shirt | 1 | Men | 1.000 | Men |" in text
    assert card_mismatches(str(card), metrics, user_photos=user_photo_metrics) == []
    # The check catches a wrong figure in the column or the table, and a column shown without its metrics.
    wrong = json.loads(json.dumps(user_photo_metrics))
    wrong["attributes"]["gender"]["top1"] = 0.5
    wrong["per_label"]["labels"]["Dress"]["top1"]["gender"] = 1.0
    assert len(card_mismatches(str(card), metrics, user_photos=wrong)) == 2
    assert card_mismatches(str(card), metrics) != []
    # Without phone-photo metrics the card is as before, and they cannot stand in for the product figures.
    assert "real phone photos" not in build_model_card(model_folder, metrics, RECIPE, DATASET_ID, BASE_MODEL).text
    with pytest.raises(ValueError, match="score no tags"):
        build_model_card(model_folder, user_photo_metrics, RECIPE, DATASET_ID, BASE_MODEL)


def test_community_corrections_say_what_was_learned_from_which_store(model_folder, metrics, no_network):
    feedback = {"source": "someone/fashion-feedback", "revision": "0123456789ab", "records_used": 42,
                "attributes": {"articleType": {"changed": 9, "confirmed": 30, "untouched": 3},
                               "baseColour": {"changed": 4, "confirmed": 11, "untouched": 27}},
                "init_from": "someone/fashion-tagger"}  # fmt: skip
    text = build_model_card(model_folder, metrics, {**RECIPE, "feedback": feedback}, DATASET_ID, BASE_MODEL).text
    assert "## Community corrections" in text
    assert "continued training from [someone/fashion-tagger](https://huggingface.co/someone/fashion-tagger)" in text
    assert " ".join(text.split()).count("with 42 corrections that people sent through the app's") == 1
    store = "[someone/fashion-feedback](https://huggingface.co/datasets/someone/fashion-feedback)"
    assert f"{store} at revision `0123456789ab`" in text
    assert "| articleType | 9 | 30 | 3 |" in text and "| baseColour | 4 | 11 | 27 |" in text
    assert "untouched are not learned from" in text and "**feedback:**" not in text  # not listed as a setting
    local = {**feedback, "source": "/home/someone/app/feedback", "revision": None,
             "init_from": "/home/someone/models/v1"}  # fmt: skip
    text = build_model_card(model_folder, metrics, {**RECIPE, "feedback": local}, DATASET_ID, BASE_MODEL).text
    assert "`feedback` (a local folder), no store revision recorded" in text and "from `v1`" in text
    assert "/home/someone" not in text  # a card never shows where things lie on the machine that wrote it
    assert "Community corrections" not in build_model_card(model_folder, metrics, RECIPE, DATASET_ID, BASE_MODEL).text


def test_retrieval_figures_get_a_similar_items_section(model_folder, metrics, no_network):
    row = {"Recall@1": 0.601, "Recall@10": 0.891, "mAP@10": 0.155}
    retrieval = {
        "date": "2026-11-30T15:19:00+00:00", "catalogue_items": 33315, "product_queries": 4384, "phone_queries": 464,
        "product": [{"embedding": "embedding alone", "queries": "all validation queries (4,503)", **row},
                    {"embedding": "re-ranked", "queries": "without a byte copy in train (4,384)", **row}],
        "phone": [{"embedding": "re-ranked", "recall@10 subCategory": 0.92}],
    }  # fmt: skip
    card = build_model_card(model_folder, metrics, RECIPE, DATASET_ID, BASE_MODEL, retrieval=retrieval).text
    assert "### Similar items" in card and "(33,315 items): 4,384 product validation photos" in card
    assert "| re-ranked | 0.601 | 0.891 | 0.155 | 0.920 |" in card
    assert "| embedding alone |" not in card  # only the photos without a byte copy in the catalogue
    assert "### Similar items" not in build_model_card(model_folder, metrics, RECIPE, DATASET_ID, BASE_MODEL).text
    assert "only as good as the model's" not in card  # a report without the ceiling
    retrieval["label_ceiling"] = {"own kind in the top 1": 0.604, "own kind in the top 5": 0.879, "own kind in the top 10": 0.927}
    card = build_model_card(model_folder, metrics, RECIPE, DATASET_ID, BASE_MODEL, retrieval=retrieval).text
    assert "is the model's first for\n0.604 of these product photos, and among its first ten for 0.927." in card


def test_only_existing_plots_are_embedded(model_folder, metrics, no_network):
    (model_folder / "attribute_accuracy.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    text = build_model_card(model_folder, metrics, RECIPE, DATASET_ID, BASE_MODEL).text
    assert "](attribute_accuracy.png)" in text
    assert "confusion_matrix.png" not in text and "training_curves.png" not in text


def test_saved_card_reads_back_offline(model_folder, metrics, no_network):
    card = build_model_card(model_folder, metrics, RECIPE, DATASET_ID, BASE_MODEL)
    card.save(model_folder / "README.md")
    loaded = ModelCard.load(model_folder / "README.md")
    assert metric_values(loaded) == metric_values(card)


def test_recipe_without_command_is_refused(model_folder, metrics):
    with pytest.raises(ValueError, match="recipe needs 'command'"):
        build_model_card(model_folder, metrics, {"wall_time_s": 1.0}, DATASET_ID, BASE_MODEL)


def test_folder_without_config_is_refused(tmp_path, metrics):
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        build_model_card(tmp_path, metrics, RECIPE, DATASET_ID, BASE_MODEL)


@pytest.mark.slow
def test_cli_writes_readme_and_copies_the_plots(model_folder, metrics, user_photo_metrics, tmp_path):
    evaluation = tmp_path / "eval"
    evaluation.mkdir()
    (model_folder / "metrics-user-photos.json").write_text(json.dumps(user_photo_metrics))  # read by default
    (evaluation / "metrics.json").write_text(json.dumps(metrics))
    (evaluation / "confusion_matrix.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (tmp_path / "recipe.json").write_text(json.dumps({**RECIPE, "base_model": BASE_MODEL}))
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"}  # nowhere to go
    subprocess.run(
        [sys.executable, "-m", "fashion_hf.training.model_card", str(model_folder), "--metrics", str(evaluation / "metrics.json"),
         "--recipe", str(tmp_path / "recipe.json"), "--repo-id", "someone/tagger"],
        cwd=REPO, env=environment, check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    card = ModelCard.load(model_folder / "README.md")
    assert (model_folder / "confusion_matrix.png").is_file()
    assert "](confusion_matrix.png)" in card.text
    assert card.data.datasets == [DATASET_ID]  # evaluate's "fashion-product-images" maps to its Hub id
    assert metric_values(card)[("accuracy", "gender")] == 0.75
    assert "| gender | 0.750 | 0.667 |" in card.text  # the folder's metrics-user-photos.json
