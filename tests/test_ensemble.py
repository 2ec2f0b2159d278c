"""FashionTaggerEnsembleModel: averaged heads and decoding, float16 storage, Auto classes, remote code, the pipeline,
Grad-CAM, and train/ensemble.py end to end."""

import json
import math
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace
from unittest import mock

import huggingface_hub
import numpy as np
import pytest
import torch
from card_figures import card_mismatches
from gradio_server import import_app
from helpers import WITHOUT_FASHION_HF, product_photo, tagging_model
from safetensors import safe_open
from transformers import AutoModel, pipeline

from fashion_hf import (
    FashionTaggerEnsembleConfig,
    FashionTaggerEnsembleModel,
    FashionTaggerImageProcessor,
    FashionTaggerModel,
)
from fashion_hf.configuration_fashion_tagger import BOS_TAG_ID
from fashion_hf.explain import grad_cam
from fashion_hf.modeling_fashion_tagger import area_resize, area_weights, tag_conflicts
from fashion_hf import evaluation
from fashion_hf.training import ensemble as ensemble_script
from fashion_hf.training import evaluate as evaluate_script
from fashion_hf.training.combine import save as save_ensemble
from fashion_hf.training.distillation import load_teachers, teacher_probabilities


def pixels(batch=3, seed=0, size=(64, 48)):
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed))


def members():
    """Two differently built and initialised tiny taggers on one vocabulary (the second an LSTM)."""
    first = tagging_model()
    torch.manual_seed(1)
    second = tagging_model(decoder_type="lstm", decoder_hidden_size=24)
    return [first, second]


def ensemble_of(models, mirror_views=True) -> FashionTaggerEnsembleModel:
    config = FashionTaggerEnsembleConfig.from_members([model.config for model in models], mirror_views)
    ensemble = FashionTaggerEnsembleModel(config)
    for slot, model in zip(ensemble.members, models):
        slot.load_state_dict(model.state_dict())
    return ensemble.eval()


def views(x, mirror_views):
    return [x, x.flip(-1)] if mirror_views else [x]


@pytest.mark.parametrize("mirror_views", [True, False])
def test_heads_give_the_mean_of_the_members_probabilities_over_the_views(mirror_views):
    models, x = members(), pixels()
    ensemble = ensemble_of(models, mirror_views)
    with torch.no_grad():
        combined = ensemble(pixel_values=x).attribute_logits
        for name in ensemble.config.attributes:
            expected = torch.stack([
                model(pixel_values=view).attribute_logits[name].softmax(-1)
                for model in models for view in views(x, mirror_views)
            ]).mean(0)  # fmt: skip
            assert torch.allclose(combined[name].softmax(-1), expected, atol=1e-6)
            assert torch.allclose(combined[name].exp().sum(-1), torch.ones(len(x)), atol=1e-5)


def test_the_first_tag_is_the_one_the_averaged_next_tag_probabilities_rank_first():
    models, x = members(), pixels()
    ensemble = ensemble_of(models)
    tokens = torch.full((len(x),), BOS_TAG_ID)
    banned = ensemble._initial_banned(len(x), x.device)
    with torch.no_grad():
        first_step = []
        for model in models:
            for view in views(x, True):
                state, step = model._decoding_start(model.encode_images(view))
                first_step.append(step(tokens, state, banned)[0].exp())
        averaged = torch.stack(first_step).mean(0)
        hypotheses = ensemble.generate_tags(x)
    for row, (image,) in enumerate(hypotheses):
        first = image["tag_ids"][0]
        assert first == averaged[row].argmax().item()
        assert image["tags"][0]["score"] == pytest.approx(averaged[row, first].item(), abs=1e-5)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_an_ensemble_of_one_member_without_mirroring_tags_as_that_member(num_beams):
    model, x = tagging_model(), pixels(4)
    ensemble = ensemble_of([model], mirror_views=False)
    alone, combined = model.generate_tags(x, num_beams=num_beams), ensemble.generate_tags(x, num_beams=num_beams)
    assert [[h["tag_ids"] for h in image] for image in combined] == [[h["tag_ids"] for h in image] for image in alone]
    assert [h["score"] for image in combined for h in image] == pytest.approx([h["score"] for image in alone for h in image], abs=1e-5)


def test_beam_search_over_the_ensemble_keeps_the_tag_rules():
    ensemble, x = ensemble_of(members()), pixels(4)
    conflicts = tag_conflicts(ensemble.config)
    to_id = ensemble.config.tag_to_id()
    for image in ensemble.generate_tags(x, num_beams=3):
        assert len(image) == 3
        assert [h["score"] for h in image] == sorted((h["score"] for h in image), reverse=True)
        for hypothesis in image:
            ids = [to_id[f"{tag['group']}:{tag['tag']}"] for tag in hypothesis["tags"]]
            assert ids == hypothesis["tag_ids"] and len(ids) <= ensemble.config.max_tag_length
            assert not any(conflicts[a, b] for i, a in enumerate(ids) for b in ids[i + 1 :])


def test_members_must_share_the_vocabularies_and_input():
    first = tagging_model()
    with pytest.raises(ValueError, match="share attributes"):
        FashionTaggerEnsembleConfig.from_members([first.config, tagging_model(attributes={"gender": ["Men", "Women"]}).config])
    with pytest.raises(ValueError, match="share one aspect ratio"):
        FashionTaggerEnsembleConfig.from_members([first.config, tagging_model(image_size=(64, 64)).config])
    with pytest.raises(ValueError, match="only"):
        FashionTaggerEnsembleConfig(members=[{"encoder_name": "test_efficientnet", "attributes": {}}])


def test_a_member_trained_smaller_sees_the_photo_reduced_to_its_own_size(tmp_path):
    """A member may have its own input size (an expert that needs more of a phone photo's detail): the ensemble's
    processor makes the largest, and a member trained smaller gets it averaged down, 2x2 pixels to one."""
    small, large = tagging_model(image_size=(32, 24)), tagging_model(image_size=(64, 48))
    ensemble = ensemble_of([small, large])
    assert ensemble.config.image_size == [64, 48]
    assert [member["image_size"] for member in ensemble.config.members] == [[32, 24], [64, 48]]
    assert ensemble.config.encoder_description == "test_efficientnet + test_efficientnet at 64x48, with mirrored photos"
    x = pixels(2, size=(64, 48))
    with torch.no_grad():
        embeds = ensemble.encode_images(x)
        reduced = torch.nn.functional.avg_pool2d(x, 2)
        torch.testing.assert_close(embeds[:, 0], small.encode_images(reduced))
        torch.testing.assert_close(embeds[:, 1], small.encode_images(reduced.flip(-1)))
        torch.testing.assert_close(embeds[:, 2], large.encode_images(x))
    save_ensemble(ensemble, FashionTaggerImageProcessor.from_model_config(ensemble.config), tmp_path, torch.float32)
    loaded = AutoModel.from_pretrained(tmp_path)
    assert [member.config.image_size for member in loaded.members] == [[32, 24], [64, 48]]
    assert FashionTaggerImageProcessor.from_pretrained(tmp_path).size == {"height": 64, "width": 48}
    with pytest.raises(ValueError, match="share one aspect ratio"):
        FashionTaggerEnsembleConfig.from_members([small.config, tagging_model(image_size=(64, 32)).config])


def test_the_reduction_averages_the_area_under_each_new_pixel_for_any_ratio():
    x = torch.randn(2, 3, 8, 6)
    torch.testing.assert_close(area_resize(x, (4, 3)), torch.nn.functional.avg_pool2d(x, 2))
    torch.testing.assert_close(area_resize(x, (8, 3)), torch.nn.functional.avg_pool2d(x, (1, 2)))
    torch.testing.assert_close(area_weights(8, 4) @ x @ area_weights(6, 3).T, torch.nn.functional.avg_pool2d(x, 2))
    row = torch.tensor([[[[3.0, 6.0, 9.0]]]])  # 3 pixels to 2: each new one covers one and a half old ones
    torch.testing.assert_close(area_resize(row, (1, 2)), torch.tensor([[[[(3.0 + 6.0 / 2) / 1.5, (6.0 / 2 + 9.0) / 1.5]]]]))
    torch.testing.assert_close(area_resize(torch.ones(1, 1, 384, 288), (160, 120)), torch.ones(1, 1, 160, 120))


def test_an_ensemble_saved_before_members_had_their_own_size_runs_every_member_at_its_size():
    config = ensemble_of(members()).config.to_dict()
    for member in config["members"]:
        del member["image_size"]
    loaded = FashionTaggerEnsembleConfig(**{key: value for key, value in config.items() if key != "model_type"})
    assert [member.image_size for member in loaded.member_configs()] == [loaded.image_size] * 2


def test_both_models_name_what_they_need_without_images_or_embeddings():
    for model in (tagging_model(), ensemble_of(members())):
        for call in (model, model.generate_tags):
            with pytest.raises(ValueError, match=f"{type(model).__name__} needs pixel_values or image_embeds"):
                call()


def test_an_ensemble_is_not_trained_directly():
    ensemble = ensemble_of(members())
    with pytest.raises(ValueError, match="train its members"):
        ensemble(pixel_values=pixels(), attribute_labels=torch.zeros(3, len(ensemble.config.attributes), dtype=torch.long))


@pytest.fixture(scope="module")
def ensemble_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ensemble")
    models = members()
    save_ensemble(ensemble_of(models), FashionTaggerImageProcessor.from_model_config(models[0].config), folder, torch.float16)
    return folder, models


def test_weights_are_stored_in_float16_and_load_as_float32(ensemble_dir):
    folder, models = ensemble_dir
    with safe_open(folder / "model.safetensors", "pt") as stored:
        dtypes = {stored.get_slice(name).get_dtype() for name in stored.keys()}
    assert dtypes == {"F16", "I64"}  # batch-norm counters stay integers
    loaded = AutoModel.from_pretrained(folder).eval()
    assert isinstance(loaded, FashionTaggerEnsembleModel) and loaded.config.mirror_views
    assert {parameter.dtype for parameter in loaded.parameters()} == {torch.float32}
    x = pixels()
    with torch.no_grad():
        original = ensemble_of(models)(pixel_values=x).attribute_logits
        reloaded = loaded(pixel_values=x).attribute_logits
    for name in original:
        assert torch.allclose(reloaded[name].exp(), original[name].exp(), atol=2e-3)


def test_the_single_model_class_refuses_an_ensemble_folder_instead_of_initialising_at_random(ensemble_dir):
    folder, _ = ensemble_dir
    with pytest.raises(ValueError, match="describes an ensemble"):
        FashionTaggerModel.from_pretrained(folder)


def test_an_ensemble_can_teach_a_distilled_model(ensemble_dir):
    folder, models = ensemble_dir
    (teacher,) = load_teachers([folder], models[0].config, "cpu")
    x = pixels()
    with torch.no_grad():
        expected = teacher(pixel_values=x).attribute_logits
    soft_targets = teacher_probabilities([teacher], x, temperature=1.0)
    for name in expected:
        assert torch.allclose(soft_targets[name], expected[name].exp(), atol=1e-6)
    with pytest.raises(ValueError, match="differ"):
        load_teachers([folder], tagging_model(attributes={"gender": ["Men", "Women"]}).config, "cpu")


def test_the_pipeline_serves_an_ensemble_folder(ensemble_dir, photo):
    folder, _ = ensemble_dir
    tagger = pipeline("fashion-tagging", model=str(folder))
    model, processor = tagger.model, tagger.image_processor
    result = tagger(photo, top_k=2)
    with torch.no_grad():
        logits = model(**processor(photo, return_tensors="pt")).attribute_logits
    for name, labels in result["attributes"].items():
        top = logits[name][0].softmax(-1).max()
        assert labels[0]["label"] == model.config.attributes[name][logits[name][0].argmax()]
        assert labels[0]["score"] == pytest.approx(top.item(), abs=1e-5)
    assert result["tags"] and all(0 < tag["score"] <= 1 for tag in result["tags"])


@pytest.mark.slow
def test_trust_remote_code_loads_an_ensemble_where_fashion_hf_is_not_installed(ensemble_dir, tmp_path):
    folder, _ = ensemble_dir
    model = AutoModel.from_pretrained(folder).eval()
    x = pixels(2)
    with torch.no_grad():
        expected = model(x).attribute_logits["articleType"].tolist()
    torch.save(x, tmp_path / "x.pt")
    script = WITHOUT_FASHION_HF + textwrap.dedent(f"""
        import json, torch
        from transformers import AutoModel
        model = AutoModel.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        x = torch.load({str(tmp_path / "x.pt")!r}, weights_only=True)
        with torch.no_grad():
            logits = model(x).attribute_logits["articleType"].tolist()
            tags = model.generate_tags(x, num_beams=2)[0][0]["tags"]
        print(json.dumps({{"class": type(model).__name__, "module": type(model).__module__, "logits": logits,
                          "tags": len(tags)}}))
    """)
    env = {**os.environ, "PYTHONPATH": "", "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded["class"] == "FashionTaggerEnsembleModel" and loaded["module"].startswith("transformers_modules")
    assert torch.allclose(torch.tensor(loaded["logits"]), torch.tensor(expected), atol=1e-5)
    assert loaded["tags"] > 0


def test_the_apps_model_tab_names_every_member_encoder(ensemble_dir):
    folder, _ = ensemble_dir
    app = import_app()
    tagger = app.load_tagger(app.Settings(model=str(folder)))
    service = SimpleNamespace(config=tagger.model.config, settings=app.Settings(model=str(folder)), model_id=str(folder),
                              revision="local", detail_tags=[])  # fmt: skip
    assert "**Encoder:** `test_efficientnet + test_efficientnet, with mirrored photos` at 64x48 px" in app.model_card_markdown(service)


def test_grad_cam_of_an_ensemble_explains_the_ensembles_top_label():
    ensemble, x = ensemble_of(members()), pixels(2)
    explanation = grad_cam(ensemble, x, "articleType")
    with torch.no_grad():
        top = ensemble(pixel_values=x).attribute_logits["articleType"].argmax(-1)
    assert explanation.labels == [ensemble.config.attributes["articleType"][i] for i in top.tolist()]
    assert explanation.maps.shape[0] == 2 and explanation.maps.min() >= 0 and explanation.maps.max() <= 1 + 1e-6
    chosen = grad_cam(ensemble, x, "articleType", label_ids=[0, 1])
    assert chosen.labels == ensemble.config.attributes["articleType"][:2]
    members_maps = [grad_cam(member, x, "articleType", label_ids=[0, 1]).maps for member in ensemble.members]
    assert not all(np.allclose(chosen.maps, maps) for maps in members_maps)  # both members contribute


@pytest.mark.slow
def test_ensemble_script_writes_a_measured_folder_with_the_members_training_in_its_card(
    trained, tiny_catalogue, tmp_path, monkeypatch
):
    member = trained[0] / "model"
    output = tmp_path / "ensemble"
    hub = mock.MagicMock()
    hub.upload_folder.return_value = mock.Mock(commit_url="https://huggingface.co/me/tagger-ensemble/commit/abc")
    monkeypatch.setattr(huggingface_hub, "HfApi", mock.Mock(return_value=hub))
    ensemble_script.main([str(member), str(member), "--output-dir", str(output), "--dataset", str(tiny_catalogue),
                          "--push-to-hub", "me/tagger-ensemble"])  # fmt: skip
    hub.create_repo.assert_called_once_with("me/tagger-ensemble", repo_type="model", private=False, exist_ok=True)
    upload = hub.upload_folder.call_args.kwargs
    assert upload["repo_id"] == "me/tagger-ensemble" and upload["repo_type"] == "model"
    assert upload["folder_path"] == str(output) and "fashion tagger" in upload["commit_message"]
    model = AutoModel.from_pretrained(output)
    assert isinstance(model, FashionTaggerEnsembleModel) and len(model.members) == 2
    metrics = json.loads((output / "metrics.json").read_text())
    # Measured: the figures are those of the stored folder, evaluated again on its own from disk.
    independent = evaluate_script.main([str(output), "--dataset", str(tiny_catalogue), "--split", "validation",
                                        "--output", str(tmp_path / "evaluation"), "--no-progress"])  # fmt: skip
    assert metrics["n_images"] == independent["n_images"] == 12
    for key in ("attributes", "mean_top1", "mean_macro_f1", "tags"):
        assert metrics[key] == independent[key], key
    recipe = json.loads((output / "recipe.json").read_text())
    card = (output / "README.md").read_text()
    assert recipe["members"][0]["stages"] and recipe["members"][0]["stages"][-1]["command"] in card
    assert "Member 1 of 2 (`test_efficientnet`)" in card and "The members combined into the ensemble:" in card
    assert "train/ensemble.py" in card and "stored in float16" in card and "me/tagger-ensemble" in card
    assert card_mismatches(card, metrics) == []
    assert sorted(path.name for path in output.glob("*.py")) == [
        "configuration_fashion_tagger.py", "image_decoding.py", "image_processing_fashion_tagger.py",
        "modeling_fashion_tagger.py", "onnx_runtime.py", "pipeline_fashion_tagging.py",
    ]  # fmt: skip
    assert isinstance(FashionTaggerModel.from_pretrained(member), FashionTaggerModel)  # the members are untouched


# --- user-photo experts behind a gate -------------------------------------------------------------------------------


def gated_ensemble(expert_bias: float, expert_min_weight: float = 0.01) -> FashionTaggerEnsembleModel:
    """Catalogue member: the first tiny tagger; user-photo expert: the second. The gate's weights are zero, so its
    bias alone sets every photo's weight: softmax([0, expert_bias])."""
    models = members()
    config = FashionTaggerEnsembleConfig.from_members(
        [model.config for model in models], domains=["catalogue", "user-photos"],
        member_domains=["catalogue", "user-photos"], expert_min_weight=expert_min_weight,
    )  # fmt: skip
    ensemble = FashionTaggerEnsembleModel(config)
    for slot, model in zip(ensemble.members, models):
        slot.load_state_dict(model.state_dict())
    with torch.no_grad():
        ensemble.gate.weight.zero_()
        ensemble.gate.bias.copy_(torch.tensor([0.0, expert_bias]))
    return ensemble.eval()


def test_a_photo_the_gate_keeps_from_the_experts_is_tagged_by_the_catalogue_members_alone_and_skips_their_work():
    ensemble, x = gated_ensemble(expert_bias=-8.0), pixels(4)  # expert weight 3e-4 < 0.01
    catalogue_only = ensemble_of([members()[0]])
    expert = ensemble.members[1]
    with (
        mock.patch.object(expert, "encode_images", side_effect=AssertionError("expert encoder ran")),
        mock.patch.object(expert, "_decoding_start", side_effect=AssertionError("expert decoder ran")),
    ):
        embeds = ensemble.encode_images(x)
        combined = ensemble(image_embeds=embeds).attribute_logits
        tags = ensemble.generate_tags(image_embeds=embeds, num_beams=2)
    expected = catalogue_only(pixel_values=x).attribute_logits
    for name in ensemble.config.attributes:
        torch.testing.assert_close(combined[name], expected[name])
    assert [[h["tag_ids"] for h in image] for image in tags] == [
        [h["tag_ids"] for h in image] for image in catalogue_only.generate_tags(x, num_beams=2)
    ]
    assert torch.equal(ensemble.domain_weights(embeds), torch.tensor([[1.0, 0.0]] * 4))


def test_a_photo_the_gate_sends_to_the_experts_gets_the_gate_weighted_mixture():
    ensemble, x = gated_ensemble(expert_bias=math.log(3.0)), pixels(3)  # weights 1/4 catalogue, 3/4 experts
    catalogue_model, expert_model = members()
    with torch.no_grad():
        combined = ensemble(pixel_values=x).attribute_logits
        for name in ensemble.config.attributes:
            def mean_over_views(model):
                return torch.stack([model(pixel_values=v).attribute_logits[name].softmax(-1) for v in views(x, True)]).mean(0)

            expected = 0.25 * mean_over_views(catalogue_model) + 0.75 * mean_over_views(expert_model)
            assert torch.allclose(combined[name].softmax(-1), expected, atol=1e-6)
    first_tags = ensemble.generate_tags(x, max_length=1)
    assert all(len(image[0]["tags"]) == 1 for image in first_tags)


def test_a_batch_where_only_some_photos_reach_the_experts_decodes_each_photo_as_alone():
    ensemble, x = gated_ensemble(expert_bias=0.0), pixels(4)
    weights = torch.tensor([[1.0, 0.0], [0.5, 0.5], [1.0, 0.0], [0.5, 0.5]])
    with torch.no_grad(), mock.patch.object(ensemble, "_gate_weights", side_effect=lambda general: weights[: len(general)]):
        embeds = ensemble.encode_images(x)
        together = ensemble.generate_tags(image_embeds=embeds, num_beams=2)
    for row in range(len(x)):
        with torch.no_grad(), mock.patch.object(ensemble, "_gate_weights", return_value=weights[row : row + 1]):
            alone = ensemble.generate_tags(image_embeds=embeds[row : row + 1], num_beams=2)
        assert [h["tag_ids"] for h in together[row]] == [h["tag_ids"] for h in alone[0]]
        assert [h["score"] for h in together[row]] == pytest.approx([h["score"] for h in alone[0]], abs=1e-5)


def test_only_the_photos_the_gate_sends_to_the_experts_pay_for_their_encoder():
    ensemble, x = gated_ensemble(expert_bias=0.0), pixels(4)
    with torch.no_grad():  # photo-dependent gate: the first input pixel's sign decides
        ensemble.gate.weight.zero_()
    calls = []
    original = ensemble.members[1].encode_images
    ensemble.members[1].encode_images = lambda batch: calls.append(len(batch)) or original(batch)
    weights = torch.tensor([[1.0, 0.0], [0.5, 0.5], [1.0, 0.0], [0.5, 0.5]])
    with mock.patch.object(ensemble, "_gate_weights", return_value=weights):
        embeds = ensemble.encode_images(x)
    assert calls == [2 * 2]  # two photos, each with its mirror
    assert embeds[[0, 2], 2:].abs().sum() == 0 and embeds[[1, 3], 2:].abs().sum() > 0
    torch.testing.assert_close(embeds[[1, 3], 2:], members()[1].encode_images(torch.cat([x[[1, 3]], x[[1, 3]].flip(-1)])).view(2, 2, -1).transpose(0, 1))


def test_an_ensemble_with_experts_saves_and_loads_its_gate_and_domains(tmp_path):
    ensemble = gated_ensemble(expert_bias=1.5)
    ensemble.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert loaded.config.domains == ["catalogue", "user-photos"]
    assert loaded.config.member_domains == ["catalogue", "user-photos"]
    assert torch.equal(loaded.gate.bias, ensemble.gate.bias)
    assert "user-photos experts" in loaded.config.encoder_description
    x = pixels(2)
    with torch.no_grad():
        for name, logits in ensemble(pixel_values=x).attribute_logits.items():
            torch.testing.assert_close(loaded(pixel_values=x).attribute_logits[name], logits)


def test_domain_settings_are_checked_when_the_config_is_built():
    member = {"encoder_name": "test_efficientnet"}
    with pytest.raises(ValueError, match="at least one member; \\['user-photos'\\]"):
        FashionTaggerEnsembleConfig(members=[member], domains=["catalogue", "user-photos"])
    with pytest.raises(ValueError, match="not among the domains"):
        FashionTaggerEnsembleConfig(members=[member], member_domains=["studio"])
    with pytest.raises(ValueError, match="2 entries for 1 members"):
        FashionTaggerEnsembleConfig(members=[member], member_domains=["catalogue", "catalogue"])
    with pytest.raises(ValueError, match="expert_min_weight"):
        FashionTaggerEnsembleConfig(members=[member], expert_min_weight=1.0)


def test_the_fitted_gate_tells_two_kinds_of_photo_apart_and_counts_each_kind_equally():
    from fashion_hf.training.domain_gate import fit_gate, routing_rates

    generator = torch.Generator().manual_seed(0)
    catalogue = torch.randn(300, 16, generator=generator) * 3 + 5  # scaled and shifted: standardisation is folded in
    user_photos = torch.randn(30, 16, generator=generator) * 3 + 5
    user_photos[:, 0] += 15  # five standard deviations apart along one direction
    inputs, domains = torch.cat([catalogue, user_photos]), torch.tensor([0] * 300 + [1] * 30)
    weight, bias = fit_gate(inputs, domains, num_domains=2)
    predicted = (inputs @ weight.T + bias).argmax(-1)
    assert (predicted == domains).float().mean() > 0.97
    assert (predicted[300:] == 1).float().mean() > 0.9  # the rare kind is not sacrificed to the common one
    ensemble = gated_ensemble(expert_bias=0.0)
    ensemble.gate = torch.nn.Linear(16, 2)
    ensemble.gate.weight.data, ensemble.gate.bias.data = weight, bias
    rates = routing_rates(ensemble, inputs, domains)
    assert rates["catalogue"]["photos"] == 300 and rates["user-photos"]["reaches"]["user-photos"] > 0.9
    with pytest.raises(ValueError, match="every domain"):
        fit_gate(catalogue, torch.zeros(300, dtype=torch.long), num_domains=2)


@pytest.mark.parametrize(("expert_bias", "reached"), [(-8.0, 0.0), (8.0, 1.0)])
def test_the_evaluation_reports_how_many_photos_reached_the_experts(expert_bias, reached):
    import datasets

    ensemble = gated_ensemble(expert_bias)
    processor = FashionTaggerImageProcessor.from_model_config(ensemble.config)
    photos = datasets.Dataset.from_dict({"image": [product_photo(size=(48, 64))] * 3, "gender": ["Men", "Women", None]})
    metrics = evaluation.evaluate(ensemble, processor, photos, progress=False)
    assert metrics["domains_reached"] == {"catalogue": 1.0, "user-photos": reached}
    assert "domains_reached" not in evaluation.evaluate(ensemble_of(members()), processor, photos, progress=False)


def test_grad_cam_of_a_catalogue_photo_is_the_catalogue_members_map():
    ensemble, x = gated_ensemble(expert_bias=-8.0), pixels(2)
    label_ids = [0, 1]
    with mock.patch.object(ensemble.members[1].encoder, "forward_features", side_effect=AssertionError("expert ran")):
        combined = grad_cam(ensemble, x, "gender", label_ids=label_ids)
    alone = grad_cam(members()[0].eval(), x, "gender", label_ids=label_ids)
    np.testing.assert_allclose(combined.maps, alone.maps, atol=1e-5)
