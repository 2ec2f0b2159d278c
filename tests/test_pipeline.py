"""The "fashion-tagging" pipeline honours its output contract for every input kind, and loads from a saved folder
with this package installed and, with trust_remote_code, where it is not."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from helpers import REPO, WITHOUT_FASHION_HF, encode, product_photo
from transformers import pipeline

from fashion_hf import InvalidImageError


@pytest.fixture(scope="module")
def tagger(tiny_model_dir):
    return pipeline("fashion-tagging", model=str(tiny_model_dir))


def assert_contract(result, config, top_k):
    assert set(result) == {"attributes", "tags", "not_sure", "out_of_distribution", "turned_by"}
    assert list(result["attributes"]) == list(config.attributes)
    assert result["not_sure"] == {name: False for name in config.attributes}  # no thresholds in the config
    assert result["out_of_distribution"] is None  # no detector
    for name, predictions in result["attributes"].items():
        assert len(predictions) == min(top_k, len(config.attributes[name]))
        scores = [p["score"] for p in predictions]
        assert scores == sorted(scores, reverse=True) and all(0 <= s <= 1 for s in scores)
        assert all(p["label"] in config.attributes[name] and isinstance(p["score"], float) for p in predictions)
    vocabulary = {(text, group) for text, group in config.tags}
    for tag in result["tags"]:
        assert set(tag) == {"tag", "group", "score"}
        assert (tag["tag"], tag["group"]) in vocabulary and 0 < tag["score"] <= 1


def assert_same_prediction(result, expected, tolerance=1e-5):
    """The same labels and tags in the same order, with the same scores to within `tolerance`."""
    assert list(result["attributes"]) == list(expected["attributes"])
    for name, predictions in expected["attributes"].items():
        assert [p["label"] for p in result["attributes"][name]] == [p["label"] for p in predictions], name
        assert [p["score"] for p in result["attributes"][name]] == pytest.approx([p["score"] for p in predictions], abs=tolerance)
    assert [(t["tag"], t["group"]) for t in result["tags"]] == [(t["tag"], t["group"]) for t in expected["tags"]]
    assert [t["score"] for t in result["tags"]] == pytest.approx([t["score"] for t in expected["tags"]], abs=tolerance)


def test_single_image(tagger):
    assert_contract(tagger(product_photo(), top_k=3), tagger.model.config, 3)


def test_path_bytes_and_numpy_agree_with_pil(tagger, tmp_path):
    image = product_photo()
    path = tmp_path / "photo.png"
    path.write_bytes(encode(image, "PNG"))
    expected = tagger(image, top_k=2)
    for same_image in (str(path), encode(image, "PNG"), np.asarray(image)):
        result = tagger(same_image, top_k=2)
        assert_contract(result, tagger.model.config, 2)
        assert_same_prediction(result, expected)


def test_list_gives_one_result_per_image_in_order(tagger):
    images = [product_photo(colour=(i * 40, 100, 200 - i * 40)) for i in range(5)]
    batched = tagger(images, batch_size=3, top_k=2)
    assert isinstance(batched, list) and len(batched) == 5
    one_by_one = [tagger(image, top_k=2) for image in images]
    for got, expected in zip(batched, one_by_one):
        assert_contract(got, tagger.model.config, 2)
        assert_same_prediction(got, expected)


def test_default_top_k_and_beam_search(tagger):
    result = tagger(product_photo(), num_beams=3, max_tags=2)
    assert len(result["tags"]) <= 2
    assert all(len(p) == min(5, len(tagger.model.config.attributes[n])) for n, p in result["attributes"].items())


def test_bad_input_raises_a_clear_error(tagger):
    with pytest.raises(InvalidImageError, match="not a readable image"):
        tagger(b"GIF89a but not really")


def test_only_photos_that_look_turned_have_their_quarter_turns_made(tiny_model_dir, monkeypatch):
    # The turns cost more than the rest of a photo's preprocessing; about one photo in ten needs them.
    tagger = pipeline("fashion-tagging", model=str(tiny_model_dir))  # its own: its config is changed below
    model, processor = tagger.model, tagger.image_processor
    photos = [product_photo(colour) for colour in ((200, 30, 30), (30, 30, 200), (30, 160, 60))]
    photos[1].paste((250, 200, 0), (0, 0, 60, 15))  # not symmetric: its turns differ
    upright_copy = photos[1].rotate(180, expand=True)
    expected = tagger([photos[0], upright_copy, photos[2]], batch_size=3)  # before any upright search

    def embedding(image):
        return model.encode_images(processor([image], return_tensors="pt")["pixel_values"])[0]

    looks_turned, looks_upright = embedding(photos[1]), embedding(upright_copy)

    def upright_probability(image_embeds):  # photo 1 looks turned, and its 180-degree turn upright; the rest upright
        def near(embeds):
            return torch.isclose(image_embeds, embeds, atol=1e-4).flatten(1).all(1)

        return torch.where(near(looks_turned), 0.1, torch.where(near(looks_upright), 0.95, 0.9))

    model.config.upright_search = {"below": 0.5, "margin": 0.3}
    monkeypatch.setattr(model, "upright_probability", upright_probability)
    turned = []
    quarter_turns = processor.quarter_turns
    monkeypatch.setattr(processor, "quarter_turns", lambda image: turned.append(image) or quarter_turns(image))
    batched = tagger(photos, batch_size=3)
    assert [result["turned_by"] for result in batched] == [0, 180, 0]
    assert len(turned) == 1  # photo 1's turns only
    alone = [tagger(photo) for photo in photos]
    assert [result["turned_by"] for result in alone] == [0, 180, 0] and len(turned) == 2
    for result, again, reference in zip(batched, alone, expected):
        assert_same_prediction(result, reference, tolerance=1e-4)
        assert_same_prediction(again, reference, tolerance=1e-4)


def test_a_saved_folder_names_its_pipeline_for_remote_code(tiny_model_dir):
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert config["custom_pipelines"]["fashion-tagging"]["impl"] == "pipeline_fashion_tagging.FashionTaggingPipeline"
    assert (tiny_model_dir / "pipeline_fashion_tagging.py").is_file()


def remote_code_predictions(folder, image_path, tmp_path) -> dict:
    """What `pipeline(..., trust_remote_code=True)` predicts in a fresh process where fashion_hf cannot be imported:
    with the task named, and without it (inferred from the folder's config, as for a Hub model id)."""
    script = WITHOUT_FASHION_HF + textwrap.dedent(f"""
        import json
        from transformers import pipeline
        named = pipeline("fashion-tagging", model={str(folder)!r}, trust_remote_code=True)
        inferred = pipeline(model={str(folder)!r}, trust_remote_code=True)
        print(json.dumps({{
            "module": type(named).__module__,
            "named": named({str(image_path)!r}, top_k=2),
            "inferred": inferred({str(image_path)!r}, top_k=2),
        }}))
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("folder", ["tiny", "shipped"])
def test_trust_remote_code_pipeline_tags_where_fashion_hf_is_not_installed(folder, tiny_model_dir, tmp_path):
    folder = tiny_model_dir if folder == "tiny" else REPO / "models" / "fashion-tagger"
    image_path = tmp_path / "photo.png"
    image_path.write_bytes(encode(product_photo(), "PNG"))
    remote = remote_code_predictions(folder, image_path, tmp_path)
    assert remote["module"].startswith("transformers_modules")
    expected = pipeline("fashion-tagging", model=str(folder))(str(image_path), top_k=2)
    # The shipped decoder runs its matmuls in bfloat16 where the CPU has it: another process, with another split of
    # the work over threads, rounds differently in the fourth decimal. Labels and tags must still be the same.
    tolerance = 1e-5 if folder == tiny_model_dir else 1e-3
    assert_same_prediction(remote["named"], expected, tolerance)
    assert_same_prediction(remote["inferred"], expected, tolerance)


def test_trust_remote_code_also_works_where_fashion_hf_is_installed(tiny_model_dir):
    tagger = pipeline("fashion-tagging", model=str(tiny_model_dir), trust_remote_code=True)
    assert_same_prediction(tagger(product_photo(), top_k=2), pipeline("fashion-tagging", model=str(tiny_model_dir))(product_photo(), top_k=2))


def test_the_default_runtime_folds_the_batch_norms_and_answers_as_the_model_itself(tiny_model_dir):
    from test_model import with_trained_looking_batch_norms
    from transformers import AutoImageProcessor, AutoModel

    from fashion_hf.modeling_fashion_tagger import FoldedTagger

    model = with_trained_looking_batch_norms(AutoModel.from_pretrained(tiny_model_dir).eval())
    processor = AutoImageProcessor.from_pretrained(tiny_model_dir)
    folded = pipeline("fashion-tagging", model=model, image_processor=processor)
    assert isinstance(folded.encoder, FoldedTagger) and folded.model is model
    reference = pipeline("fashion-tagging", model=model, image_processor=processor)
    reference.encoder = model  # the model's own encoders, batch norms unfolded
    photos = [product_photo(colour) for colour in [(200, 30, 30), (20, 40, 160), (240, 240, 240)]]
    for result, expected in zip(folded(photos, batch_size=3), reference(photos, batch_size=3)):
        assert_same_prediction(result, expected)
