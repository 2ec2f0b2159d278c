"""Calibrated scores, "not sure" and the out-of-distribution flag: the fitting, the model, the pipeline and the
`fashion-hf calibrate` command on a tiny model."""

import json

import numpy as np
import pytest
import torch
from helpers import product_photo, save_model_with_detector, tagging_model, tiny_config, write_product_parquet
from PIL import Image
from safetensors.torch import load_file
from transformers import pipeline

import fashion_hf
from fashion_hf import FashionTaggerImageProcessor
from fashion_hf.calibration import (
    FeatureDensity,
    apply_temperature,
    fit_feature_density,
    fit_tag_score_scaling,
    fit_temperature,
    precision_threshold,
    scale_tag_scores,
)
from fashion_hf.configuration_fashion_tagger import DEFAULT_DOMAIN, USER_PHOTOS_DOMAIN
from fashion_hf.metrics import calibration_error
from fashion_hf.pipeline_fashion_tagging import save_tagger
from fashion_hf.training import calibrate


def sampled_labels(logits: np.ndarray, temperature: float, seed: int = 0) -> np.ndarray:
    """Labels drawn from softmax(logits / temperature): data on which that temperature is the calibrated one."""
    probabilities = apply_temperature(logits, temperature)
    rng = np.random.default_rng(seed)
    return np.array([rng.choice(len(row), p=row) for row in probabilities])


def test_fit_temperature_recovers_the_temperature_the_labels_were_drawn_with():
    logits = np.random.default_rng(1).normal(0, 3, (6000, 5))
    for true_temperature in (0.5, 2.0):
        labels = sampled_labels(logits, true_temperature)
        fitted = fit_temperature(logits, labels)
        assert fitted == pytest.approx(true_temperature, rel=0.1)
        before = calibration_error(labels, apply_temperature(logits, 1.0))
        after = calibration_error(labels, apply_temperature(logits, fitted))
        assert after < before and after < 0.03


def test_fit_temperature_skips_missing_labels_and_keeps_1_without_any():
    logits = np.random.default_rng(2).normal(0, 3, (4000, 4))
    labels = sampled_labels(logits, 2.0)
    with_missing = np.where(np.arange(4000) % 2 == 0, labels, -100)
    assert fit_temperature(logits, with_missing) == pytest.approx(2.0, rel=0.15)
    assert fit_temperature(logits, [-100] * 4000) == 1.0


def test_precision_threshold_keeps_the_largest_set_of_answers_that_is_right_often_enough():
    # 100 answers right at confidence 0.9 and above, then a band where only half are right.
    confidence = np.r_[np.linspace(0.9, 1.0, 100), np.linspace(0.5, 0.89, 100)]
    correct = np.r_[np.ones(100, bool), np.arange(100) % 2 == 0]
    threshold = precision_threshold(confidence, correct, precision=0.95)
    answered = confidence >= threshold
    assert correct[answered].mean() >= 0.95
    assert 0.8 < threshold < 0.9  # some of the mixed band is still affordable, not all of it
    assert precision_threshold(confidence, np.zeros(200, bool)) == 1.0  # never right: nothing is answered


def test_tag_score_scaling_makes_scores_match_how_often_tags_are_right():
    rng = np.random.default_rng(3)
    scores = rng.uniform(0.05, 0.99, 5000)
    correct = rng.uniform(size=5000) < scores**2  # the decoder claims more than it delivers
    scaling = fit_tag_score_scaling(scores, correct)
    scaled = scale_tag_scores(scores, scaling)
    gap_before = abs(scores.mean() - correct.mean())
    assert abs(scaled.mean() - correct.mean()) < gap_before / 5
    assert fit_tag_score_scaling(scores, np.ones(5000, bool)) == [1.0, 0.0]


def test_a_calibrated_heads_scores_are_a_temperature_scaled_softmax_of_its_logits():
    model = tagging_model()
    torch.manual_seed(0)
    embeds = torch.randn(3, model.encoder.num_features)
    raw = model(image_embeds=embeds).attribute_logits
    model.config.attribute_temperatures = {DEFAULT_DOMAIN: {"articleType": 0.5, "gender": 3.0}}
    calibrated = model(image_embeds=embeds).attribute_logits
    for name, temperature in (("articleType", 0.5), ("gender", 3.0), ("season", 1.0)):
        expected = (raw[name] / temperature).softmax(-1)
        torch.testing.assert_close(calibrated[name].softmax(-1), expected)


def test_the_loss_is_computed_on_the_heads_own_logits_whatever_the_temperature():
    model = tagging_model()
    embeds = torch.randn(4, model.encoder.num_features)
    labels = torch.zeros(4, len(model.config.attributes), dtype=torch.long)
    before = model(image_embeds=embeds, attribute_labels=labels).loss
    model.config.attribute_temperatures = {DEFAULT_DOMAIN: {name: 0.2 for name in model.config.attributes}}
    assert model(image_embeds=embeds, attribute_labels=labels).loss.item() == pytest.approx(before.item())


def ensemble_of_two(domains=(DEFAULT_DOMAIN, USER_PHOTOS_DOMAIN)):
    torch.manual_seed(0)
    members = [tagging_model(), tagging_model()]
    config = fashion_hf.FashionTaggerEnsembleConfig.from_members(
        [member.config for member in members], mirror_views=False, domains=list(domains), member_domains=list(domains)
    )
    ensemble = fashion_hf.FashionTaggerEnsembleModel(config).eval()
    for target, member in zip(ensemble.members, members):
        target.load_state_dict(member.state_dict())
    return ensemble


def test_an_ensemble_scales_each_domain_by_its_own_temperature_before_mixing():
    ensemble = ensemble_of_two()
    embeds = torch.randn(5, 2, ensemble.members[0].encoder.num_features)
    with torch.no_grad():
        ensemble.gate.weight.zero_()
        ensemble.gate.bias.copy_(torch.tensor([0.0, 0.5]))  # every photo: weights 0.38 and 0.62
    weights = ensemble.domain_weights(embeds)
    per_domain = ensemble.domain_attribute_log_probs(embeds)["articleType"]
    ensemble.config.attribute_temperatures = {DEFAULT_DOMAIN: {"articleType": 0.5}, USER_PHOTOS_DOMAIN: {"articleType": 2.0}}
    mixed = ensemble(image_embeds=embeds).attribute_logits["articleType"].softmax(-1)
    expected = weights[:, :1] * (per_domain[0] / 0.5).softmax(-1) + weights[:, 1:] * (per_domain[1] / 2.0).softmax(-1)
    torch.testing.assert_close(mixed, expected)


MASTER_OF_ARTICLE = {"Casual Shoes": {"Footwear": 1.0}, "Handbags": {"Accessories": 1.0}, "Jeans": {"Apparel": 1.0},
                     "Tops": {"Apparel": 0.75, "Accessories": 0.25}}  # Shirts, Tshirts and Watches: not in the table


@pytest.mark.parametrize("kind", ["model", "ensemble"])
def test_a_coarse_head_answers_from_its_finer_heads_probabilities_summed_into_groups(kind):
    model = tagging_model() if kind == "model" else ensemble_of_two()
    width = (model.members[0] if kind == "ensemble" else model).encoder.num_features
    embeds = torch.randn(5, width) if kind == "model" else torch.randn(5, 2, width)
    raw = {name: logits.softmax(-1) for name, logits in model(image_embeds=embeds).attribute_logits.items()}
    model.config.label_hierarchy = {"masterCategory": {"from": "articleType", "parents": MASTER_OF_ARTICLE}}
    served = {name: logits.softmax(-1) for name, logits in model(image_embeds=embeds).attribute_logits.items()}

    articles, masters = model.config.attributes["articleType"], model.config.attributes["masterCategory"]
    article = {label: raw["articleType"][:, articles.index(label)] for label in articles}
    unknown = article["Shirts"] + article["Tshirts"] + article["Watches"]  # keeps masterCategory's own answer
    own = {label: raw["masterCategory"][:, masters.index(label)] for label in masters}
    expected = {
        "Accessories": article["Handbags"] + 0.25 * article["Tops"] + unknown * own["Accessories"],
        "Apparel": article["Jeans"] + 0.75 * article["Tops"] + unknown * own["Apparel"],
        "Footwear": article["Casual Shoes"] + unknown * own["Footwear"],
        "Personal Care": unknown * own["Personal Care"],
    }
    torch.testing.assert_close(served["masterCategory"], torch.stack([expected[label] for label in masters], -1))
    torch.testing.assert_close(served["articleType"], raw["articleType"])
    uncalibrated = model(image_embeds=embeds, calibrated=False).attribute_logits["masterCategory"].softmax(-1)
    torch.testing.assert_close(uncalibrated, raw["masterCategory"])


def test_the_label_hierarchy_is_checked_saved_and_forgotten_with_the_calibration():
    hierarchy = {"masterCategory": {"from": "articleType", "parents": MASTER_OF_ARTICLE}}
    config = tiny_config(label_hierarchy=hierarchy)
    assert type(config).from_dict(config.to_dict()).label_hierarchy == hierarchy
    for wrong in ({"masterCategory": {"from": "masterCategory", "parents": {}}},
                  {"masterCategory": {"from": "articleType", "parents": {"Jeans": {"Bottomwear": 1.0}}}},
                  {"masterCategory": {"from": "articleType", "parents": {"Kurtas": {"Apparel": 1.0}}}}):  # fmt: skip
        with pytest.raises(ValueError, match="label_hierarchy"):
            tiny_config(label_hierarchy=wrong)
    config.without_calibration()
    assert config.label_hierarchy == {}


def test_calibrate_counts_the_label_hierarchy_on_the_training_labels():
    from datasets import Dataset

    config = tiny_config(attributes={"subCategory": ["Dress", "Topwear"], "articleType": ["Dresses", "Tops", "Tshirts"]})
    labels = Dataset.from_dict({
        "articleType": ["Dresses", "Dresses", "Dresses", "Dresses", "Tops", "Tshirts", "Kurtas", None],
        "subCategory": ["Dress", "Dress", "Dress", "Topwear", "Topwear", "Topwear", "Topwear", "Dress"],
    })  # fmt: skip
    hierarchy = calibrate.fit_label_hierarchy(config, labels)
    assert hierarchy == {"subCategory": {"from": "articleType", "parents": {
        "Dresses": {"Dress": 0.75, "Topwear": 0.25}, "Tops": {"Topwear": 1.0}, "Tshirts": {"Topwear": 1.0}}}}  # fmt: skip
    assert calibrate.fit_label_hierarchy(tiny_config(), labels) == {}  # no subCategory head: nothing to answer


def test_calibrate_reads_each_head_as_the_model_serves_it_with_the_label_hierarchy():
    from fashion_hf.calibration import HeldOutScores

    config = tiny_config(attributes={"subCategory": ["Dress", "Topwear"], "articleType": ["Dresses", "Tops", "Tshirts"],
                                     "gender": ["Men", "Women"]})  # fmt: skip
    config.label_hierarchy = {"subCategory": {"from": "articleType", "parents": {
        "Dresses": {"Dress": 1.0}, "Tops": {"Topwear": 0.5, "Dress": 0.5}, "Tshirts": {"Topwear": 1.0}}}}  # fmt: skip
    config.attribute_temperatures = {DEFAULT_DOMAIN: {"articleType": 0.5, "gender": 2.0}}
    rng = np.random.default_rng(0)
    log_probs = {name: torch.randn(1, 6, len(labels)).log_softmax(-1).numpy() for name, labels in config.attributes.items()}
    scores = HeldOutScores(domain_log_probs=log_probs, domain_weights=np.ones((6, 1)),
                           labels={name: rng.integers(len(labels), size=6) for name, labels in config.attributes.items()},
                           ood_features=np.zeros((6, 4)), tag_rows=np.zeros(0, int), tag_groups=np.zeros(0, str),
                           tag_scores=np.zeros(0), tag_correct=np.zeros(0, bool))  # fmt: skip
    article = apply_temperature(log_probs["articleType"][0], 0.5)
    expected = np.stack([article[:, 0] + 0.5 * article[:, 1], 0.5 * article[:, 1] + article[:, 2]], -1)
    np.testing.assert_allclose(calibrate.served_probabilities(config, scores, "subCategory"), expected, rtol=1e-5)
    np.testing.assert_allclose(calibrate.served_probabilities(config, scores, "gender"),
                               apply_temperature(log_probs["gender"][0], 2.0), rtol=1e-5)  # fmt: skip
    np.testing.assert_allclose(calibrate.served_probabilities(config, scores, "subCategory", calibrated=False),
                               np.exp(log_probs["subCategory"][0]), rtol=1e-5)  # fmt: skip
    thresholds = calibrate.fit_thresholds(config, {"product": scores})
    assert set(thresholds) <= set(config.attributes)
    assert set(calibrate.head_report(config, scores, thresholds)) == set(config.attributes)
    assert calibrate.uncertainty_of(scores, config).shape == (6,)


def test_training_starts_from_the_model_as_trained():
    limits = {"distance": 1.0, "uncertainty": 2.0, "turned": 0.5}
    model = tagging_model(confidence_thresholds={"season": 0.9}, ood_thresholds=limits,
                          attribute_temperatures={DEFAULT_DOMAIN: {"season": 0.5}})  # fmt: skip
    assert {"ood_means", "ood_precision", "ood_turned"} <= set(model.state_dict())
    model.drop_calibration()
    assert not model.config.attribute_temperatures and model.config.ood_thresholds is None
    assert model.config.confidence_thresholds == {}
    assert not {"ood_means", "ood_precision", "ood_turned"} & set(model.state_dict())
    members = fashion_hf.FashionTaggerEnsembleConfig.from_members(
        [tiny_config(confidence_thresholds={"season": 0.9})]
    ).member_configs()
    assert members[0].confidence_thresholds == {}  # a member never inherits the ensemble's calibration


def test_calibration_fields_are_checked():
    with pytest.raises(ValueError, match="temperature"):
        tiny_config(attribute_temperatures={DEFAULT_DOMAIN: {"season": 0.0}})
    with pytest.raises(ValueError, match="threshold"):
        tiny_config(confidence_thresholds={"season": 1.5})
    with pytest.raises(ValueError, match="ood_thresholds"):
        tiny_config(ood_thresholds={"distance": 1.0})


def tagger_of(model):
    processor = FashionTaggerImageProcessor(size={"height": 64, "width": 48})
    return pipeline("fashion-tagging", model=model, image_processor=processor)


def test_a_threshold_from_the_config_changes_the_not_sure_flag():
    model = tagging_model()
    tagger = tagger_of(model)
    image = Image.new("RGB", (48, 64), (200, 30, 30))
    result = tagger(image)
    assert set(result) == {"attributes", "tags", "not_sure", "out_of_distribution", "turned_by"}
    assert result["out_of_distribution"] is None  # no detector
    assert not any(result["not_sure"].values())  # no thresholds: nothing is marked
    top = result["attributes"]["season"][0]["score"]
    model.config.confidence_thresholds = {"season": min(1.0, top + 0.01), "usage": 0.0}
    result = tagger(image)
    assert result["not_sure"]["season"] is True and result["not_sure"]["usage"] is False
    model.config.confidence_thresholds = {"season": top - 0.01}
    assert tagger(image)["not_sure"]["season"] is False


def detector_around(model, images):
    """A detector whose in-distribution mean is these images' embedding, and whose limits sit just beyond them."""
    processor = FashionTaggerImageProcessor(size={"height": 64, "width": 48})
    with torch.no_grad():
        embeds = model.encode_images(processor(images, return_tensors="pt")["pixel_values"])
        features = model.ood_features(embeds).numpy()
        density = fit_feature_density([features], shrinkage=0.5)
        model.config.ood_thresholds = {"distance": 1.0, "uncertainty": 1e9, "turned": 1e9}  # buffers registered below
        model._add_ood_detector(features.shape[1])
        model.ood_means.copy_(torch.as_tensor(density.means))
        model.ood_precision.copy_(torch.as_tensor(density.precision))
        distances = model.ood_distance(embeds)
    model.config.ood_thresholds = {"distance": float(distances.max()) * 1.5, "uncertainty": 1e9, "turned": 1e9}


def test_an_off_distribution_image_is_flagged_through_the_pipeline():
    from helpers import product_photo

    model = tagging_model()
    products = [product_photo(colour, size=(48, 64)) for colour in ((200, 30, 30), (30, 30, 200), (30, 160, 60), (120, 90, 40))]
    detector_around(model, products)
    tagger = tagger_of(model)
    assert not tagger(product_photo((180, 40, 40), size=(48, 64)))["out_of_distribution"]["flagged"]
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 48, 3), dtype=np.uint8))
    flagged = tagger(noise)
    assert flagged["out_of_distribution"]["flagged"] and flagged["out_of_distribution"]["score"] > 1.0
    assert flagged["out_of_distribution"]["reason"] == "distance"
    assert flagged["attributes"]["articleType"]  # the best guess is still there


@pytest.fixture(scope="module")
def calibrated_run(tmp_path_factory):
    """`fashion-hf calibrate` on a tiny model and a tiny product catalogue, into a new folder."""
    import helpers

    root = tmp_path_factory.mktemp("calibrate")
    write_product_parquet(root / "data", "train", 24)
    plain_encode = helpers.encode
    helpers.encode = lambda image, format="JPEG", **options: plain_encode(image, "PNG")  # validation: no train copies
    try:
        write_product_parquet(root / "data", "validation", 40)
    finally:
        helpers.encode = plain_encode
    save_tagger(tagging_model(), FashionTaggerImageProcessor(size={"height": 64, "width": 48}), root / "model")
    photos = root / "photos"
    photos.mkdir()
    for index in range(4):
        Image.new("RGB", (80, 60), (40 * index, 200, 90)).save(photos / f"{index}.jpg")
    report = calibrate.main([str(root / "model"), "--output", str(root / "out"), "--save-to", str(root / "calibrated"),
                             "--data-source", str(root / "data"), "--no-user-photos", "--ood-photos", str(photos),
                             "--rotated-photos", "6", "--turned-photos", "8", "--no-progress"])  # fmt: skip
    return root, report


def test_calibrate_writes_its_report_and_plots(calibrated_run):
    root, report = calibrated_run
    written = json.loads((root / "out" / "calibration.json").read_text())
    assert written["files"] == report["files"]
    for file in report["files"]:
        assert (root / "out" / file).stat().st_size > 0
    assert report["fitted_on"]["product"] + report["measured_on"]["product"] == 40
    heads = report["heads"]["product"]
    assert {"before", "after", "coverage_curve"} <= set(heads["baseColour"])
    assert set(report["ood"]["auroc"]) == {"generated", "photos"}
    # Through the upright search, as the pipeline answers: the same sets, the held-out half measured again.
    searched = report["ood"]["through_search"]
    assert set(searched["flagged"]) == {"product", "generated", "photos"} and set(searched["auroc"]) == {"generated", "photos"}
    assert searched["flagged"]["photos"] in {share / 4 for share in range(5)}  # a share of the 4 photos
    assert all(0.0 <= value <= 1.0 for value in searched["auroc"].values())
    assert set(report["rotated"]["sources"]["product"]) == {"0", "90", "180", "270"}
    assert report["upright_search"] == calibrate.UPRIGHT_SEARCH
    assert report["ood_uncertainty_heads"] == ["masterCategory", "articleType"]  # the tiny model has no subCategory


def test_the_calibrated_folder_keeps_the_weights_and_loads_with_its_calibration(calibrated_run):
    root, report = calibrated_run
    before, after = load_file(root / "model" / "model.safetensors"), load_file(root / "calibrated" / "model.safetensors")
    assert set(after) - set(before) == {"ood_means", "ood_precision", "ood_turned", "ood_orientation"}
    for key, value in before.items():
        assert torch.equal(after[key], value)
    tagger = pipeline("fashion-tagging", model=str(root / "calibrated"))
    config = tagger.model.config
    assert config.attribute_temperatures == report["attribute_temperatures"]
    assert config.ood_thresholds == report["ood_thresholds"]
    assert config.ood_uncertainty_heads == report["ood_uncertainty_heads"]
    result = tagger(Image.new("RGB", (48, 64), "white"))
    assert result["out_of_distribution"]["threshold"] == 1.0
    # The distance the limits were fitted with (numpy, `FeatureDensity`) is the one the model serves.
    model = tagger.model
    with torch.no_grad():
        embeds = model.encode_images(torch.randn(3, 3, 64, 48))
        density = FeatureDensity(means=model.ood_means.numpy(), precision=model.ood_precision.numpy())
        served = model.ood_distance(embeds).numpy()
    np.testing.assert_allclose(density.scores(model.ood_features(embeds).numpy()), served, rtol=1e-4)
    assert set(result["not_sure"]) == set(config.attributes)


def test_generated_non_photos_cover_the_cases_users_upload_by_mistake():
    kinds = {kind for kind, _ in calibrate.generated_non_photos()}
    assert {"flat colour", "tiny image", "text screenshot", "uniform noise"} <= kinds


def test_halves_keep_a_photographer_on_one_side():
    keys = ["ann", "bob", "ann", "cy", "bob", "dee"] * 5
    fit, held_out = calibrate.halves(keys)
    assert not {keys[row] for row in fit} & {keys[row] for row in held_out}
    assert sorted([*fit, *held_out]) == list(range(len(keys)))


def test_evaluate_and_the_model_card_show_the_calibration(calibrated_run):
    from fashion_hf.training import evaluate, model_card

    root, report = calibrated_run
    folder = root / "calibrated"
    metrics = evaluate.main([str(folder), "--dataset", "fashion-product-images", "--data-source", str(root / "data"),
                             "--output", str(root / "eval"), "--no-progress"])  # fmt: skip
    gender = metrics["attributes"]["gender"]
    assert gender["ece"] != gender["ece_uncalibrated"]  # scored as served and as the model was before calibration
    assert set(metrics["reliability"]["gender"]) == {"before", "after"}
    assert (root / "eval" / "reliability.png").is_file()
    recipe = root / "recipe.json"
    recipe.write_text(json.dumps({"command": "train.py --tiny"}))
    card = model_card.main([str(folder), "--metrics", str(root / "eval" / "metrics.json"), "--recipe", str(recipe),
                            "--dataset-id", "fashion-product-images", "--base-model", "none"]).read_text()  # fmt: skip
    assert "### Calibrated scores" in card
    temperature = report["attribute_temperatures"][DEFAULT_DOMAIN]["gender"]
    assert f"| gender | {temperature:.2f} |" in card
    assert "![Reliability diagrams, product photos (held-out half)](reliability_product.png)" in card
    searched = report["ood"]["through_search"]
    as_served = card.split("as the pipeline answers")[1].split("Photos turned")[0]
    assert f"real photos of other things {searched['auroc']['photos']:.3f}" in as_served.split("; AUROC ")[1]
    assert "Where a turn looks more upright by over 0.4 but not clearly" in card
    assert "(summed entropy of\nmasterCategory, articleType)" in card


def test_the_turned_probe_and_the_joint_limits():
    from fashion_hf.calibration import fit_turned_probe, joint_limits, turned_probability

    rng = np.random.default_rng(4)
    upright, turned = rng.normal(0, 1, (400, 8)), rng.normal(0, 1, (400, 8))
    turned[:, 0] += 3  # turned photos differ along one direction
    probe = fit_turned_probe(upright, turned)
    assert turned_probability(turned, probe).mean() > 0.8 > 0.2 > turned_probability(upright, probe).mean()
    signals = [{"a": rng.uniform(size=1000), "b": rng.uniform(size=1000)} for _ in range(2)]
    limits = joint_limits(signals, budget=0.03)
    for source in signals:
        flagged = (source["a"] > limits["a"]) | (source["b"] > limits["b"])
        assert 0.02 <= flagged.mean() <= 0.03  # the two signals share the budget, and spend it


def test_the_orientation_probe_tells_each_quarter_turn_apart():
    from fashion_hf.calibration import fit_orientation_probe

    rng = np.random.default_rng(5)
    upright = rng.normal(0, 1, (300, 6))
    turned = [upright + 5 * np.eye(6)[kind] for kind in range(3)]  # each turn moves the embedding its own way
    probe = fit_orientation_probe(upright, turned)
    assert probe.shape == (4, 7)
    logits = np.concatenate([upright, *turned]) @ probe[:, :-1].T + probe[:, -1]
    assert (logits.argmax(1) == np.repeat(np.arange(4), 300)).mean() > 0.9


def test_the_model_upright_probability_is_the_probes_softmax():
    model = tagging_model()
    processor = FashionTaggerImageProcessor(size={"height": 64, "width": 48})
    with torch.no_grad():
        embeds = model.encode_images(processor([Image.new("RGB", (48, 64), c) for c in ("red", "navy")], return_tensors="pt")["pixel_values"])
        features = model.ood_features(embeds)
        probe = torch.randn(4, features.shape[1] + 1)
        model.config.upright_search = {"below": 0.5, "margin": 0.3}
        model.register_buffer("ood_orientation", probe)
        expected = (features @ probe[:, :-1].T + probe[:, -1]).softmax(-1)[:, 0]
        torch.testing.assert_close(model.upright_probability(embeds), expected)


def test_turn_upright_tags_the_turn_that_looks_clearly_more_upright(monkeypatch):
    model = tagging_model()
    model.config.upright_search = {"below": 0.5, "margin": 0.3}
    embeds = torch.arange(4, dtype=torch.float32)[:, None].repeat(1, 3)  # photo i's embedding: all i
    # Upright probabilities by embedding value: photos 0 and 1 as given look upright; 2 and 3 do not. A turned copy
    # is the embedding + 10 * (turn + 1); its upright probability is set per (photo, turn) below.
    as_given = {0: 0.9, 1: 0.6, 2: 0.2, 3: 0.3}
    turned = {(2, 0): 0.1, (2, 1): 0.95, (2, 2): 0.3,  # photo 2: the 180 turn is clearly more upright
              (3, 0): 0.5, (3, 1): 0.4, (3, 2): 0.45}  # photo 3: the best turn is only 0.2 more upright: kept
    def upright_probability(batch):
        values = batch[:, 0].long().tolist()
        return torch.tensor([as_given[v] if v < 10 else turned[(v % 10, v // 10 - 1)] for v in values])

    monkeypatch.setattr(model, "upright_probability", upright_probability)
    asked = []
    def encode_turns(rows):
        asked.append(rows.tolist())
        return torch.stack([embeds[rows] + 10 * (turn + 1) for turn in range(3)])

    chosen, turned_by, turn_gain = model.turn_upright(embeds, encode_turns)
    assert asked == [[2, 3]]  # only the photos that may be turned are encoded again
    assert turned_by.tolist() == [0, 0, 180, 0]
    assert chosen[2].tolist() == [22.0] * 3 and torch.equal(chosen[[0, 1, 3]], embeds[[0, 1, 3]])
    # Only photo 3 was tried and kept as given: its best turn looked 0.5 - 0.3 more upright.
    torch.testing.assert_close(turn_gain, torch.tensor([0.0, 0.0, 0.0, 0.2]))
    model.config.upright_search = None
    same, none_turned, no_gain = model.turn_upright(embeds, encode_turns)
    assert same is embeds and not none_turned.any() and not no_gain.any() and len(asked) == 1


def model_with_detector(limits: dict[str, float]):
    """A tiny model with a detector (zero means, identity precision, a turned probe that says 0.5) and these
    limits, its embeddings and head logits of two photos."""
    model = tagging_model()
    processor = FashionTaggerImageProcessor(size={"height": 64, "width": 48})
    with torch.no_grad():
        embeds = model.encode_images(processor([Image.new("RGB", (48, 64), c) for c in ("red", "navy")], return_tensors="pt")["pixel_values"])
        width = model.ood_features(embeds).shape[1]
        model.config.ood_thresholds = limits
        model.register_buffer("ood_means", torch.zeros(2, width))
        model.register_buffer("ood_precision", torch.eye(width))
        model.register_buffer("ood_turned", torch.zeros(width + 1))
        return model, embeds, model(image_embeds=embeds).attribute_logits


def test_a_turn_gain_over_the_flag_margin_flags_the_photo_as_turned():
    model, embeds, logits = model_with_detector({"distance": 1e9, "uncertainty": 1e9, "turned": 0.5})  # turned: at its limit
    with torch.no_grad():
        turn_gain = torch.tensor([0.0, 0.3])
        model.config.upright_search = {"below": 0.5, "margin": 0.9}
        torch.testing.assert_close(model.ood_signals(embeds, logits, turn_gain)["turned"], torch.ones(2))
        model.config.upright_search["flag_margin"] = 0.25
        signals = model.ood_signals(embeds, logits, turn_gain)
        torch.testing.assert_close(signals["turned"], torch.tensor([1.0, 0.3 / 0.25]))
        assert (model.ood_scores(embeds, logits, turn_gain) > 1).tolist() == [False, True]
        assert (model.ood_scores(embeds, logits) > 1).tolist() == [False, False]  # no search, no gain


def test_the_pipeline_flags_a_photo_whose_turn_looked_more_upright_by_over_the_flag_margin(tmp_path):
    folder = save_model_with_detector(tmp_path / "model", {}, upright_search=True)
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text())
    config["ood_thresholds"]["distance"] = 1e9  # only the turn can flag
    photo = product_photo((200, 30, 30))
    photo.paste((20, 20, 20), (0, 0, photo.width, photo.height // 4))  # a dark band on top: its turns differ
    photos = [photo.rotate(degrees, expand=True) for degrees in (0, 90, 180, 270)]

    def answers(upright_search):
        config_file.write_text(json.dumps({**config, "upright_search": upright_search}))
        return pipeline("fashion-tagging", model=str(folder))(photos)

    # Every photo's turns are tried (below 1) and none is turned (no gain exceeds 1).
    kept = answers({"below": 1.0, "margin": 1.0})
    flagged = answers({"below": 1.0, "margin": 1.0, "flag_margin": 0.01})
    assert [a["turned_by"] for a in kept + flagged] == [0] * 8
    assert not any(a["out_of_distribution"]["flagged"] for a in kept)
    assert any(a["out_of_distribution"]["flagged"] for a in flagged)  # the probe is sharp: a turn looks upright
    for before, after in zip(kept, flagged):
        assert after["attributes"] == before["attributes"]  # flagged, not re-tagged
        if after["out_of_distribution"]["flagged"]:
            assert after["out_of_distribution"]["reason"] == "turned"


@pytest.mark.parametrize("search", [{"below": 0.3}, {"below": 0.3, "margin": 0.9, "flag_margin": 0.0},
                                    {"below": 0.3, "margin": 0.9, "limit": 0.4}])
def test_config_refuses_a_malformed_upright_search(search):
    with pytest.raises(ValueError, match="upright_search"):
        tiny_config(upright_search=search)


def test_the_uncertainty_signal_sums_the_entropy_of_the_heads_the_config_names():
    model, embeds, logits = model_with_detector({"distance": 1e9, "uncertainty": 2.0, "turned": 1e9})
    with torch.no_grad():

        def entropy(name):
            log_probs = logits[name].log_softmax(-1)
            return -(log_probs.exp() * log_probs).sum(-1)

        every_head = sum(entropy(name) for name in logits)
        torch.testing.assert_close(model.ood_signals(embeds, logits)["uncertainty"], every_head / 2.0)
        model.config.ood_uncertainty_heads = ["masterCategory", "articleType"]
        garment_heads = entropy("masterCategory") + entropy("articleType")
        torch.testing.assert_close(model.ood_signals(embeds, logits)["uncertainty"], garment_heads / 2.0)
        assert (garment_heads < every_head).all()
    with pytest.raises(ValueError, match="ood_uncertainty_heads"):
        tiny_config(ood_uncertainty_heads=["fabric"])
    model.drop_calibration()
    assert model.config.ood_uncertainty_heads is None


def test_quarter_turns_are_the_photo_turned_at_the_model_size():
    processor = FashionTaggerImageProcessor(size={"height": 64, "width": 48})
    photo = Image.new("RGB", (40, 100), "white")
    photo.paste((200, 0, 0), (0, 0, 40, 20))  # a red band at the top
    turns = processor.quarter_turns(photo)
    assert turns.shape == (3, 64, 48, 3) and turns.dtype == np.uint8
    for turn, degrees in zip(turns, (90, 180, 270)):
        expected = processor.to_model_size(photo.rotate(degrees, expand=True)).astype(int)
        assert np.abs(turn.astype(int) - expected).mean() < 3
    red = lambda pixels: (pixels[..., 0] > 150) & (pixels[..., 1] < 80)  # noqa: E731
    rows, columns = np.nonzero(red(turns[1]))  # upside down: the band is at the bottom
    assert rows.min() > 32


def test_only_upright_search_refits_the_orientation_of_a_calibrated_model(calibrated_run, tmp_path):
    root, _ = calibrated_run
    report = calibrate.main([str(root / "calibrated"), "--only-upright-search", "--output", str(tmp_path / "out"),
                             "--save-to", str(tmp_path / "model"), "--data-source", str(root / "data"),
                             "--no-user-photos", "--rotated-photos", "6", "--turned-photos", "5",
                             "--upright-below", "0.6", "--no-progress"])  # fmt: skip
    rotated = report["rotated"]["sources"]["product"]
    assert set(rotated) == {"0", "90", "180", "270"} and rotated["90"]["n"] == 6
    assert 0.0 <= rotated["0"]["turned"] <= 1.0 and {"turned_upright", "handled"} <= set(rotated["180"])
    before = load_file(root / "calibrated" / "model.safetensors")
    after = load_file(tmp_path / "model" / "model.safetensors")
    assert after["ood_orientation"].shape == (4, before["ood_turned"].shape[0])
    assert not torch.equal(after["ood_orientation"], before["ood_orientation"])  # fitted on 5 photos, not 8
    for key in set(before) - {"ood_orientation"}:
        assert torch.equal(after[key], before[key])  # everything else as calibrated
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["upright_search"] == {"below": 0.6, "margin": calibrate.UPRIGHT_SEARCH["margin"],
                                        "flag_margin": calibrate.UPRIGHT_SEARCH["flag_margin"]}
    written = json.loads((tmp_path / "out" / "calibration.json").read_text())
    assert written["ood"]["auroc"] == json.loads((root / "calibrated" / "calibration.json").read_text())["ood"]["auroc"]
    assert set(written["ood"]["through_search"]["auroc"]) == {"generated"}  # measured again; no --ood-photos here
    # --turned-photos 0: new limits for the probe the model has, measured again, nothing fitted
    again = calibrate.main([str(tmp_path / "model"), "--only-upright-search", "--turned-photos", "0",
                            "--output", str(tmp_path / "out2"), "--save-to", str(tmp_path / "model2"),
                            "--data-source", str(root / "data"), "--no-user-photos", "--rotated-photos", "4",
                            "--upright-margin", "0.9", "--upright-flag-margin", "0", "--no-progress"])  # fmt: skip
    kept = load_file(tmp_path / "model2" / "model.safetensors")
    assert torch.equal(kept["ood_orientation"], after["ood_orientation"])
    assert again["upright_search"] == {"below": calibrate.UPRIGHT_SEARCH["below"], "margin": 0.9}  # 0: no flag
    assert 0.0 <= again["rotated"]["sources"]["product"]["0"]["searched"] <= 1.0
    import shutil

    without_probe = shutil.copytree(root / "calibrated", tmp_path / "without-probe")
    config["upright_search"] = None  # calibrated before the orientation probe existed
    (without_probe / "config.json").write_text(json.dumps(config))
    with pytest.raises(SystemExit, match="no orientation probe"):
        calibrate.main([str(without_probe), "--only-upright-search", "--turned-photos", "0", "--output",
                        str(tmp_path / "out3"), "--data-source", str(root / "data"), "--no-user-photos"])  # fmt: skip


def test_the_pipeline_tags_a_photo_that_looks_turned_the_right_way_up(monkeypatch):
    from helpers import product_photo

    model = tagging_model()
    tagger = tagger_of(model)
    photo = product_photo((30, 30, 200), size=(48, 64))
    photo.paste((250, 200, 0), (0, 0, 48, 12))  # not symmetric: its turns differ
    as_given = tagger(photo)
    assert as_given["turned_by"] == 0  # no upright_search: tagged as given
    upright_copy = tagger(photo.rotate(180, expand=True))

    model.config.upright_search = {"below": 0.5, "margin": 0.3}
    calls = []
    def upright_probability(image_embeds):  # the photo as given looks turned; of its turns, 180 looks upright
        calls.append(len(image_embeds))
        return torch.full((len(image_embeds),), (0.1, 0.2, 0.9, 0.3)[len(calls) - 1])

    monkeypatch.setattr(model, "upright_probability", upright_probability)
    turned_back = tagger(photo)
    assert calls == [1, 1, 1, 1] and turned_back["turned_by"] == 180
    for name, ranked in upright_copy["attributes"].items():
        assert [entry["label"] for entry in turned_back["attributes"][name]] == [entry["label"] for entry in ranked]
        assert turned_back["attributes"][name][0]["score"] == pytest.approx(ranked[0]["score"], abs=0.02)
