"""train/train.py end to end on CPU: accelerate launch, resume, YAML config, Hub upload (mocked)."""

import json
import os
import subprocess
import sys
import time
from unittest import mock

import pytest
import torch
from card_figures import card_mismatches
from helpers import COLOURS, REPO, TINY_FLAGS, product_photo, run_training, tiny_model
from transformers import AutoModel, pipeline

import fashion_hf
from fashion_hf import data
from fashion_hf.training.loop import TrainingTagger
from fashion_hf.training.recipe import previous_stages, push_to_hub
from fashion_hf.training.train import parse_args

@pytest.mark.slow
def test_accelerate_launch_trains_and_writes_a_loadable_model_folder(trained):
    output, log = trained
    assert "epoch 2/2" in log
    model_dir = output / "model"
    for name in ("model.safetensors", "config.json", "preprocessor_config.json", "modeling_fashion_tagger.py",
                 "README.md", "metrics.json", "recipe.json"):
        assert (model_dir / name).exists(), name
    model = AutoModel.from_pretrained(model_dir)
    assert list(model.config.attributes)[:2] == ["gender", "masterCategory"]  # head order, not sorted
    assert model.config.attributes["articleType"] == ["Shirts", "Tshirts"]
    assert ["check", "detail"] in model.config.tags and ["striped", "detail"] in model.config.tags
    result = pipeline("fashion-tagging", model=str(model_dir))(product_photo())
    assert set(result["attributes"]) == set(model.config.attributes)


@pytest.mark.slow
def test_the_documented_accelerate_launch_warns_of_nothing(trained):
    # accelerate's "values were not passed ... had defaults used instead" (`--num_processes 0` on a CPU machine)
    # reads as something broken; train/accelerate/one-process.yaml sets every value it would guess.
    _, log = trained
    assert "were not passed to `accelerate launch`" not in log and "--num_processes" not in log


@pytest.mark.slow
def test_model_card_carries_measured_metrics_and_the_command(trained):
    output, _ = trained
    card = (output / "model" / "README.md").read_text()
    metrics = json.loads((output / "model" / "metrics.json").read_text())
    recipe = json.loads((output / "model" / "recipe.json").read_text())
    assert "model-index" in card and "accelerate launch train/train.py" in card
    assert recipe["command"].startswith("accelerate launch train/train.py") and recipe["wall_time_seconds"] > 0
    assert recipe["command"] in card
    # Every figure of metrics.json, in the tables and the model-index, as the card builder rounds it.
    assert card_mismatches(card, metrics) == []


@pytest.mark.slow
def test_tensorboard_logs_and_checkpoints_are_written(trained):
    output, _ = trained
    assert list((output / "logs").rglob("events.out.tfevents.*"))
    assert sorted(p.name for p in (output / "checkpoints").iterdir())[-1] == "checkpoint_1"


@pytest.mark.slow
def test_resume_continues_from_the_last_checkpoint(tiny_catalogue, tmp_path):
    flags = ["--data-source", str(tiny_catalogue), *TINY_FLAGS, "--output-dir", str(tmp_path), "--finetune-epochs", "0"]
    run_training([*flags, "--epochs", "1"], launcher=(sys.executable,))
    first_session = json.loads((tmp_path / "checkpoints" / "checkpoint_0" / "progress.json").read_text())
    assert first_session["epoch"] == 1 and first_session["seconds"] > 0
    assert not list((tmp_path / "checkpoints").rglob("custom_checkpoint_*.pkl"))  # nothing that resumes by unpickling
    log = run_training([*flags, "--epochs", "2", "--resume"], launcher=(sys.executable,))
    assert "at epoch 1" in log and "epoch 2/2" in log and "epoch 1/2" not in log
    recipe = json.loads((tmp_path / "model" / "recipe.json").read_text())
    assert recipe["wall_time_seconds"] > first_session["seconds"]  # the card reports both sessions together
    assert (tmp_path / "checkpoints" / "checkpoint_1").exists()


@pytest.mark.slow
def test_resume_without_a_checkpoint_stops_with_a_message_and_no_traceback(tiny_catalogue, tmp_path):
    flags = ["--data-source", str(tiny_catalogue), *TINY_FLAGS, "--output-dir", str(tmp_path), "--resume"]
    result = subprocess.run([sys.executable, str(REPO / "train" / "train.py"), *flags], cwd=REPO, capture_output=True,
                            text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)  # fmt: skip
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"--resume: no checkpoint in {tmp_path / 'checkpoints'}" in result.stderr


@pytest.mark.slow
def test_a_second_stage_from_init_from_records_both_stages_and_uses_every_core(trained, tiny_catalogue, tmp_path):
    """Plain `accelerate launch` (no --cpu) pins OMP_NUM_THREADS=1; on CPU train.py still uses all the cores.
    The second stage also moves the model to a larger input size, which the saved config and processor carry."""
    first_stage, _ = trained
    flags = ["--data-source", str(tiny_catalogue), *TINY_FLAGS, "--epochs", "1", "--output-dir", str(tmp_path)]
    run_training([*flags, "--init-from", str(first_stage / "model"), "--image-size", "80", "60"],
                 launcher=("accelerate", "launch", "--num_processes", "1"))  # fmt: skip
    assert json.loads((first_stage / "model" / "config.json").read_text())["image_size"] == [64, 48]
    assert json.loads((tmp_path / "model" / "config.json").read_text())["image_size"] == [80, 60]
    assert json.loads((tmp_path / "model" / "preprocessor_config.json").read_text())["size"] == {"height": 80, "width": 60}
    recipe = json.loads((tmp_path / "model" / "recipe.json").read_text())
    first = json.loads((first_stage / "model" / "recipe.json").read_text())
    assert [stage["command"] for stage in recipe["previous_stages"]] == [first["command"]]
    assert recipe["previous_stages"][0]["wall_time_seconds"] == first["wall_time_seconds"]
    card = (tmp_path / "model" / "README.md").read_text()
    assert "Stage 2 of 2" in card and "Total wall time, all stages" in card
    if "cpu" in recipe["hardware"]:
        assert recipe["hardware"].endswith(f"{len(os.sched_getaffinity(0))} threads)")


@pytest.mark.slow
def test_feedback_records_join_the_training_data(tiny_catalogue, tmp_path):
    from fashion_hf.feedback import FeedbackStore

    with FeedbackStore(tmp_path / "feedback") as store:
        for colour in ("Red", "Blue"):
            store.add(
                product_photo(COLOURS[colour]), predicted={"attributes": {}, "tags": []},
                corrected_attributes={"articleType": "Shirts", "baseColour": colour}, corrected_tags=["check"],
                consent=True, model_id="tiny", model_revision="0",
            )  # fmt: skip
    flags = ["--data-source", str(tiny_catalogue), *TINY_FLAGS, "--epochs", "1", "--output-dir", str(tmp_path / "run")]
    log = run_training([*flags, "--feedback", str(tmp_path / "feedback"), "--augment", "phone"], launcher=(sys.executable,))
    assert "train 26 / eval 12 images" in log  # 24 catalogue rows + 2 corrected records
    assert "8 backdrops cut from the run's user photos" in log  # the 4 corners of each record's photo
    assert json.loads((tmp_path / "run" / "model" / "recipe.json").read_text())["train_images"] == 26


def test_channels_last_training_gives_the_contiguous_loss_and_gradients():
    torch.manual_seed(0)
    model = tiny_model()
    pixel_values = torch.randn(4, 3, *model.config.image_size)
    labels = {"attribute_labels": torch.zeros(4, len(model.config.attributes), dtype=torch.long)}

    def loss_and_gradients(memory_format):
        tagger = TrainingTagger(model, 0).to(memory_format=memory_format)
        tagger.zero_grad()
        loss = tagger(pixel_values=pixel_values, **labels).loss
        loss.backward()
        return loss.item(), {name: p.grad.clone() for name, p in tagger.named_parameters() if p.grad is not None}

    loss, gradients = loss_and_gradients(torch.contiguous_format)
    loss_cl, gradients_cl = loss_and_gradients(torch.channels_last)
    assert model.encoder.conv_stem.weight.is_contiguous(memory_format=torch.channels_last)
    assert gradients.keys() == gradients_cl.keys() and "model.encoder.conv_stem.weight" in gradients
    assert loss_cl == pytest.approx(loss, rel=1e-5)
    for name, gradient in gradients.items():
        torch.testing.assert_close(gradients_cl[name], gradient, rtol=1e-4, atol=1e-6, msg=name)
    assert parse_args([]).memory_format == "channels_last"


def test_yaml_config_sets_defaults_and_flags_override(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("epochs: 7\nlearning-rate: 0.01\nimage_size: [32, 24]\n")
    args = parse_args(["--config", str(config), "--epochs", "3"])
    assert (args.epochs, args.learning_rate, args.image_size) == (3, 0.01, [32, 24])
    config.write_text("epoch: 7\n")
    with pytest.raises(SystemExit):
        parse_args(["--config", str(config)])


def test_push_to_hub_uploads_the_folder_as_one_model_commit(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    api = mock.MagicMock()
    api.upload_folder.return_value = mock.Mock(commit_url="https://huggingface.co/org/tagger/commit/abc")
    assert push_to_hub(tmp_path, "org/tagger", private=True, api=api).endswith("/commit/abc")
    api.create_repo.assert_called_once_with("org/tagger", repo_type="model", private=True, exist_ok=True)
    kwargs = api.upload_folder.call_args.kwargs
    assert kwargs["repo_id"] == "org/tagger" and kwargs["repo_type"] == "model"
    assert kwargs["folder_path"] == str(tmp_path) and "fashion tagger" in kwargs["commit_message"]


def _tiny_ensemble(member_folder, folder):
    from fashion_hf.training.combine import combine, save

    ensemble = combine([str(member_folder), str(member_folder)], mirror_views=True)
    save(ensemble, fashion_hf.FashionTaggerImageProcessor.from_pretrained(member_folder), folder, torch.float16)
    stages = previous_stages(str(member_folder))
    (folder / "recipe.json").write_text(json.dumps({"command": "python train/ensemble.py ...", "members": [
        {"folder": str(member_folder), "stages": stages}] * 2}))  # fmt: skip
    return ensemble


@pytest.mark.slow
def test_init_from_an_ensemble_trains_user_photo_experts_beside_its_unchanged_catalogue_members(trained, tiny_catalogue, tmp_path):
    """The shipped model is an ensemble: --init-from it with feedback trains a copy of each member on the feedback
    and a replayed sample of the catalogue, keeps the members as they were, and writes one ensemble of both with a
    gate fitted on the feedback photos against catalogue photos, and its lineage (start model, records, revision)."""
    from fashion_hf.feedback import FeedbackStore

    first_stage, _ = trained
    start = _tiny_ensemble(first_stage / "model", tmp_path / "start")
    with FeedbackStore(tmp_path / "feedback") as store:
        for colour in ("Red", "Blue", "Green"):  # phone-style: only articleType known, the rest untouched
            store.add(
                product_photo(COLOURS[colour], size=(90, 70)), predicted={"attributes": {}, "tags": []},
                corrected_attributes={"articleType": "Shirts", "baseColour": "Red"}, corrected_tags=[],
                attribute_status={"articleType": "changed", "baseColour": "untouched"},
                consent=True, model_id="tiny", model_revision="0",
            )  # fmt: skip
    flags = ["--data-source", str(tiny_catalogue), *TINY_FLAGS, "--epochs", "1", "--output-dir", str(tmp_path / "run")]
    started = time.time()
    log = run_training([*flags, "--init-from", str(tmp_path / "start"), "--feedback", str(tmp_path / "feedback"),
                        "--replay-images", "10", "--feedback-repeats", "2"], launcher=(sys.executable,))  # fmt: skip
    assert log.count("train 16 / eval 12 images") == 2  # per member: 10 replayed rows + 2 x 3 corrections

    folder = tmp_path / "run" / "model"
    model = AutoModel.from_pretrained(folder)
    assert isinstance(model, fashion_hf.FashionTaggerEnsembleModel) and len(model.members) == 4
    assert model.config.domains == ["catalogue", "user-photos"]
    assert model.config.member_domains == ["catalogue"] * 2 + ["user-photos"] * 2
    assert model.config.mirror_views and model.config.tags == start.config.tags
    for kept, expert, start_member in zip(model.members[:2], model.members[2:], start.members):
        before = start_member.heads["articleType"].weight.to(torch.float16).float()
        assert torch.equal(kept.heads["articleType"].weight.float(), before)  # the catalogue members are kept
        assert not torch.equal(expert.heads["articleType"].weight.float(), before)  # the experts learned
    recipe = json.loads((folder / "recipe.json").read_text())
    assert recipe["gate"]["fitted_on"] == {"catalogue": 24, "user-photos": 3}
    assert set(recipe["gate"]["routing_on_fitting_photos"]) == {"catalogue", "user-photos"}
    assert [member["domain"] for member in recipe["members"]] == ["catalogue"] * 2 + ["user-photos"] * 2
    assert recipe["init_from"] == recipe["feedback"]["init_from"] == str(tmp_path / "start")  # not a member's
    assert recipe["feedback"]["records_used"] == 3 and recipe["feedback"]["revision"]
    assert recipe["feedback"]["attributes"]["articleType"]["changed"] == 3
    assert recipe["feedback"]["attributes"]["baseColour"]["untouched"] == 3
    assert [len(member["stages"]) for member in recipe["members"]] == [1, 1, 2, 2]  # first stage, then this one
    member_seconds = [member["stages"][-1]["wall_time_seconds"] for member in recipe["members"][2:]]
    assert sum(member_seconds) < recipe["wall_time_seconds"] < sum(member_seconds) + (time.time() - started)
    card = (folder / "README.md").read_text()
    assert card_mismatches(card, json.loads((folder / "metrics.json").read_text())) == []
    assert "Community corrections" in card and str(tmp_path / "start") in card
    assert pipeline("fashion-tagging", model=str(folder))(product_photo())["attributes"]


def test_new_typed_tags_grow_the_vocabulary_and_keep_the_old_rows():
    from fashion_hf.training.loop import add_detail_tags

    torch.manual_seed(0)
    model = tiny_model(tags=[["Shirts", "articleType"], ["check", "detail"]], attributes={"articleType": ["Shirts", "Tshirts"]})
    pixels, sequence = torch.rand(2, 3, 64, 48), torch.tensor([[1, 3, 4, 2]] * 2)  # <bos> Shirts check <eos>
    before = model(pixels, tag_ids=sequence)
    old_size = model.config.tag_vocab_size
    assert add_detail_tags(model, ["check", "linen"]) == ["linen"]
    assert model.config.tags[-1] == ["linen", "detail"] and model.config.tag_vocab_size == old_size + 1
    after = model(pixels, tag_ids=sequence)
    assert torch.equal(after.tag_logits[..., :old_size], before.tag_logits)  # every old tag scores as before
    assert (after.tag_logits[..., old_size] <= before.tag_logits[..., 3:].max(-1).values).all()  # the new one starts low
    assert torch.equal(after.attribute_logits["articleType"], before.attribute_logits["articleType"])
    assert add_detail_tags(model, ["linen"]) == []


def test_an_unknown_tag_sequence_trains_the_heads_and_not_the_decoder():
    from fashion_hf.training.examples import TaggingExamples, collate

    torch.manual_seed(0)
    model = tiny_model(tags=[["Shirts", "articleType"]], attributes={"articleType": ["Shirts", "Tshirts"]}).train()
    processor = fashion_hf.FashionTaggerImageProcessor.from_model_config(model.config)
    rows = [{"image": product_photo(), "articleType": "Tshirts", "tags": ["articleType:Tshirts"], "tags_known": False}]
    batch = collate([TaggingExamples(rows, model.config, processor)[0]])
    assert batch["tag_ids"].tolist() == [[1, 0]]  # <bos> <pad>: no target the decoder could learn
    output = model(**batch)
    assert torch.isfinite(output.loss)
    output.loss.backward()
    assert model.heads["articleType"].weight.grad.abs().sum() > 0
    assert model.tag_classifier.weight.grad.abs().sum() == 0


@pytest.mark.slow
def test_phone_photos_mixed_in_with_self_distillation_and_measured_for_the_card(trained, tiny_catalogue, tmp_path,
                                                                                monkeypatch):
    """--mix-dataset adds the phone photos' train split (two heads labelled, the rest masked); the starting model
    is a soft teacher (--distill-from-start); --eval-user-photos measures the result on their validation split."""
    from test_user_photos import write_user_photos

    first_stage, _ = trained
    (tmp_path / "fashion-product-images").symlink_to(tiny_catalogue)
    rows = [("Shirt", "Shirts", "Topwear", 1), ("T-Shirt", "Tshirts", "Topwear", 2), ("Shirt", "Shirts", "Topwear", 3)]
    write_user_photos(tmp_path / data.CLOTHING_USER_PHOTOS, "train", rows)
    write_user_photos(tmp_path / data.CLOTHING_USER_PHOTOS, "validation", rows[:2])
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path))  # the data folder: product images and phone photos
    flags = [*TINY_FLAGS, "--epochs", "1", "--output-dir", str(tmp_path / "run"), "--init-from", str(first_stage / "model")]
    log = run_training([*flags, "--mix-dataset", data.CLOTHING_USER_PHOTOS, "--mix-repeats", "2", "--distill-from-start",
                        "--eval-user-photos"], launcher=(sys.executable,))  # fmt: skip
    assert "train 30 / eval 12 images" in log  # 24 catalogue rows + 2 x 3 phone photos

    folder = tmp_path / "run" / "model"
    phone = json.loads((folder / "metrics-user-photos.json").read_text())
    assert phone["n_images"] == 2 and set(phone["per_label"]["labels"]) == {"Shirt", "T-Shirt"}
    assert {head for head, values in phone["attributes"].items() if values.get("support")} == {"subCategory", "articleType"}
    card = (folder / "README.md").read_text()
    assert card_mismatches(card, json.loads((folder / "metrics.json").read_text()), user_photos=phone) == []
    assert "real phone photos" in card.lower()


def test_the_start_model_teaches_every_head_a_label_does_not_contradict():
    from fashion_hf.training.distillation import start_model_term

    torch.manual_seed(0)
    model = tiny_model(attributes={"articleType": ["Shirts", "Tshirts", "Tops"], "gender": ["Men", "Women"]})
    pixels = torch.rand(4, 3, 64, 48)
    start_logits = model(pixels).attribute_logits
    start_top = start_logits["articleType"].argmax(-1)
    unlabelled = torch.full((4, 2), -100)
    batch = {"pixel_values": pixels, "attribute_labels": unlabelled}
    assert start_model_term(model, 1.0, 2.0, start_logits, batch).abs() < 1e-6  # the start model agrees with itself

    moved = {name: logits + torch.randn_like(logits) for name, logits in start_logits.items()}
    everywhere = start_model_term(model, 1.0, 2.0, moved, batch)
    contradicted = unlabelled.clone()
    contradicted[:, 0] = (start_top + 1) % 3  # every articleType label disagrees with the start model
    only_gender = start_model_term(model, 1.0, 2.0, moved, {**batch, "attribute_labels": contradicted})
    agreeing = unlabelled.clone()
    agreeing[:, 0] = start_top
    assert start_model_term(model, 1.0, 2.0, moved, {**batch, "attribute_labels": agreeing}) == everywhere
    gender_alone = start_model_term(model, 1.0, 2.0, {"articleType": start_logits["articleType"], "gender": moved["gender"]}, batch)
    assert 0 < only_gender < everywhere and torch.allclose(only_gender, gender_alone)


def two_shirt_corrections(folder):
    """A feedback store of two phone-size photos corrected to Shirts (articleType only)."""
    from fashion_hf.feedback import FeedbackStore

    with FeedbackStore(folder) as store:
        for colour in ("Red", "Blue"):
            store.add(
                product_photo(COLOURS[colour], size=(90, 70)), predicted={"attributes": {}, "tags": []},
                corrected_attributes={"articleType": "Shirts"}, corrected_tags=[], consent=True, model_id="tiny",
                model_revision="0",
            )  # fmt: skip


@pytest.mark.slow
def test_init_from_an_ensemble_with_experts_trains_only_its_experts_and_fits_the_gate_again(trained, tiny_catalogue,
                                                                                           tmp_path):
    """The next turn of the loop: the shipped ensemble already has user-photo experts. They continue on the new
    corrections; the catalogue members stay as they are; the gate is fitted again."""
    from fashion_hf.training.combine import combine_models, save

    first_stage, _ = trained
    member = fashion_hf.FashionTaggerModel.from_pretrained(first_stage / "model", dtype=torch.float32)
    start = combine_models([member, member, member], domains=["catalogue", "user-photos"],
                           member_domains=["catalogue", "catalogue", "user-photos"])  # fmt: skip
    with torch.no_grad():
        start.gate.weight.zero_()
        start.gate.bias.copy_(torch.tensor([0.0, -9.0]))  # a gate that knows nothing yet
    save(start, fashion_hf.FashionTaggerImageProcessor.from_pretrained(first_stage / "model"), tmp_path / "start", torch.float16)
    start = AutoModel.from_pretrained(tmp_path / "start")
    two_shirt_corrections(tmp_path / "feedback")
    flags = ["--data-source", str(tiny_catalogue), *TINY_FLAGS, "--epochs", "1", "--output-dir", str(tmp_path / "run")]
    log = run_training([*flags, "--init-from", str(tmp_path / "start"), "--feedback", str(tmp_path / "feedback"),
                        "--replay-images", "10"], launcher=(sys.executable,))  # fmt: skip
    assert log.count("train 12 / eval 12 images") == 1  # only the expert trains: 10 replayed rows + 2 corrections
    assert [path.name for path in (tmp_path / "run" / "members").iterdir()] == ["2"]

    model = AutoModel.from_pretrained(tmp_path / "run" / "model")
    assert model.config.member_domains == ["catalogue", "catalogue", "user-photos"]
    for kept, before in zip(model.members[:2], start.members[:2]):
        assert torch.equal(kept.heads["articleType"].weight, before.heads["articleType"].weight)
    assert not torch.equal(model.members[2].heads["articleType"].weight, start.members[2].heads["articleType"].weight)
    assert not torch.equal(model.gate.bias, start.gate.bias)  # fitted on this run's photos
    recipe = json.loads((tmp_path / "run" / "model" / "recipe.json").read_text())
    assert recipe["gate"]["fitted_on"]["user-photos"] == 2


@pytest.mark.slow
def test_the_first_expert_added_to_a_catalogue_ensemble_gets_a_gate(trained, tiny_catalogue, tmp_path):
    """An ensemble of catalogue members alone takes its first user-photo expert the same way: the members stay, the
    expert joins them in a second domain, and a gate is fitted on the corrections against catalogue photos."""
    from fashion_hf.training import ensemble as ensemble_script
    from fashion_hf.training.combine import combine_models, save

    first_stage, _ = trained
    member = fashion_hf.FashionTaggerModel.from_pretrained(first_stage / "model", dtype=torch.float32)
    save(combine_models([member, member]), fashion_hf.FashionTaggerImageProcessor.from_pretrained(first_stage / "model"),
         tmp_path / "start", torch.float16)  # fmt: skip
    (tmp_path / "start" / "recipe.json").write_text(json.dumps({"command": "ensemble.py ...", "members": [{"folder": "m"}] * 2}))
    two_shirt_corrections(tmp_path / "feedback")
    ensemble_script.main([str(first_stage / "model"), "--add-experts-to", str(tmp_path / "start"), "--feedback",
                          str(tmp_path / "feedback"), "--data-source", str(tiny_catalogue), "--output-dir",
                          str(tmp_path / "gated")])  # fmt: skip
    model = AutoModel.from_pretrained(tmp_path / "gated")
    assert model.config.domains == ["catalogue", "user-photos"] and model.gate is not None
    assert model.config.member_domains == ["catalogue", "catalogue", "user-photos"]
    assert json.loads((tmp_path / "gated" / "recipe.json").read_text())["gate"]["fitted_on"] == {"catalogue": 24, "user-photos": 2}


@pytest.mark.slow
def test_a_new_expert_with_its_own_encoder_and_input_size_joins_an_ensembles_experts(trained, tiny_catalogue, tmp_path):
    """train.py --vocabulary-from an ensemble trains a new model on its labels and tags (here at twice its input
    size); train/ensemble.py --add-experts-to adds it to the ensemble's user-photo experts, keeps every member it had
    and fits the gate again on the corrections; the recipe records both."""
    from fashion_hf.training import ensemble as ensemble_script
    from fashion_hf.training.combine import combine_models, save

    first_stage, _ = trained
    member = fashion_hf.FashionTaggerModel.from_pretrained(first_stage / "model", dtype=torch.float32)
    start = combine_models([member, member], domains=["catalogue", "user-photos"], member_domains=["catalogue", "user-photos"])
    save(start, fashion_hf.FashionTaggerImageProcessor.from_pretrained(first_stage / "model"), tmp_path / "start", torch.float16)
    (tmp_path / "start" / "recipe.json").write_text(json.dumps({"command": "train.py ...", "wall_time_seconds": 60.0,
                                                                "members": [{"folder": "m"}] * 2}))  # fmt: skip
    two_shirt_corrections(tmp_path / "feedback")
    flags = list(TINY_FLAGS)  # the vocabulary is the ensemble's, so no --min-tag-count; twice the input size
    del flags[flags.index("--min-tag-count") : flags.index("--min-tag-count") + 2]
    flags[flags.index("--image-size") + 1 : flags.index("--image-size") + 3] = ["128", "96"]
    run_training(["--data-source", str(tiny_catalogue), *flags, "--epochs", "1", "--output-dir", str(tmp_path / "new"),
                  "--vocabulary-from", str(tmp_path / "start"), "--feedback", str(tmp_path / "feedback"),
                  "--replay-images", "10"], launcher=(sys.executable,))  # fmt: skip
    new = fashion_hf.FashionTaggerModel.from_pretrained(tmp_path / "new" / "model")
    assert new.config.attributes == start.config.attributes and new.config.tags == start.config.tags
    assert new.config.image_size == [128, 96]

    output = tmp_path / "with-new-expert"
    ensemble_script.main([str(tmp_path / "new" / "model"), "--add-experts-to", str(tmp_path / "start"), "--feedback",
                          str(tmp_path / "feedback"), "--data-source", str(tiny_catalogue), "--output-dir", str(output)])  # fmt: skip
    model = AutoModel.from_pretrained(output)
    assert model.config.member_domains == ["catalogue", "user-photos", "user-photos"]
    assert [m.config.image_size for m in model.members] == [[64, 48], [64, 48], [128, 96]]
    assert fashion_hf.FashionTaggerImageProcessor.from_pretrained(output).size == {"height": 128, "width": 96}
    for kept, before in zip(model.members[:2], start.members):
        assert torch.equal(kept.heads["articleType"].weight.float(), before.heads["articleType"].weight.to(torch.float16).float())
    recipe = json.loads((output / "recipe.json").read_text())
    assert recipe["gate"]["fitted_on"] == {"catalogue": 24, "user-photos": 2}
    assert recipe["members"][-1]["folder"] == str(tmp_path / "new" / "model")
    assert recipe["members"][-1]["domain"] == "user-photos" and recipe["added_experts"]["to"] == str(tmp_path / "start")
    member_seconds = json.loads((tmp_path / "new" / "model" / "recipe.json").read_text())["wall_time_seconds"]
    assert member_seconds < recipe["wall_time_seconds"] < 60.0 + member_seconds  # the new member's time and this step's
    card = (output / "README.md").read_text()
    assert "`test_efficientnet` at 128x96, with a GRU" in card and "`test_efficientnet` at 64x48, with a GRU" in card
    assert recipe["members"][-1]["continue_with"] == {"frozen_stages": "2", "cache_views": 2}
    assert pipeline("fashion-tagging", model=str(output))(product_photo())["attributes"]

    # The next turn of the loop: each expert continues; the added one keeps the encoder freezing it was trained with.
    flags[flags.index("--frozen-stages") + 1] = "1"
    run_training(["--data-source", str(tiny_catalogue), *flags, "--epochs", "1", "--output-dir", str(tmp_path / "next"),
                  "--init-from", str(output), "--feedback", str(tmp_path / "feedback"), "--replay-images", "10"],
                 launcher=(sys.executable,))  # fmt: skip
    frozen = [json.loads((tmp_path / "next" / "members" / index / "model" / "recipe.json").read_text())["arguments"]["frozen_stages"]
              for index in ("1", "2")]  # fmt: skip
    assert frozen == ["1", "2"]
    assert json.loads((tmp_path / "next" / "model" / "recipe.json").read_text())["members"][-1]["continue_with"]["frozen_stages"] == "2"
    with pytest.raises(SystemExit):
        ensemble_script.main([str(tmp_path / "new" / "model"), "--add-experts-to", str(tmp_path / "start"), "--output-dir",
                              str(tmp_path / "no-photos")])  # fmt: skip
