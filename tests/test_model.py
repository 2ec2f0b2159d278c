"""FashionTaggerModel: outputs, loss, save/load, Auto classes, remote code, decoding."""

import copy
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import REPO, WITHOUT_FASHION_HF, tiny_config, tiny_model
from transformers import AutoConfig, AutoImageProcessor, AutoModel

from fashion_hf import FashionTaggerConfig, FashionTaggerImageProcessor, FashionTaggerModel
from fashion_hf.configuration_fashion_tagger import BOS_TAG_ID, EOS_TAG_ID, PAD_TAG_ID
from fashion_hf.modeling_fashion_tagger import (
    IGNORE_INDEX,
    FoldedTagger,
    fold_batch_norms,
    runs_bfloat16_natively,
    tag_conflicts,
)


def pixels(batch=3, seed=0, size=(64, 48)):
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed))


def tag_targets(model, rows):
    """`<bos> tags <eos> <pad>...` from lists of tag keys."""
    ids = model.config.tag_to_id()
    width = max(len(row) for row in rows) + 2
    out = torch.full((len(rows), width), PAD_TAG_ID)
    for r, row in enumerate(rows):
        sequence = [BOS_TAG_ID] + [ids[key] for key in row] + [EOS_TAG_ID]
        out[r, : len(sequence)] = torch.tensor(sequence)
    return out


def test_default_config_builds_a_working_model():
    config = FashionTaggerConfig()
    assert config.model_type == "fashion-tagger"
    assert config.encoder_name == "tf_efficientnet_lite0"
    model = FashionTaggerModel(FashionTaggerConfig(**{**config.to_dict(), "encoder_name": "test_efficientnet"})).eval()
    output = model(pixels(2, size=tuple(config.image_size)))
    assert set(output.attribute_logits) == set(config.attributes)


def test_forward_returns_logits_per_attribute_and_teacher_forced_tag_logits():
    model = tiny_model()
    tags = tag_targets(model, [["articleType:Tshirts", "detail:check"], ["gender:Men"], []])
    output = model(pixels(), tag_ids=tags)
    for name, labels in model.config.attributes.items():
        assert output.attribute_logits[name].shape == (3, len(labels))
    assert output.tag_logits.shape == (3, tags.shape[1] - 1, model.config.tag_vocab_size)
    assert output.image_embeds.shape[0] == 3
    assert output.loss is not None and torch.isfinite(output.loss)


def test_missing_attribute_labels_are_ignored_in_the_loss():
    model = tiny_model()
    x = pixels()
    labels = torch.zeros(3, len(model.config.attributes), dtype=torch.long)
    labels[:, 1:] = IGNORE_INDEX  # only the first head has labels
    torch.manual_seed(0)
    with torch.no_grad():
        partial = model(x, attribute_labels=labels).loss
        first_head = model(x).attribute_logits[next(iter(model.config.attributes))]
    expected = torch.nn.functional.cross_entropy(first_head, labels[:, 0])
    assert torch.allclose(partial, expected, atol=1e-6)
    everything_missing = torch.full_like(labels, IGNORE_INDEX)
    assert model(x, attribute_labels=everything_missing).loss.item() == 0.0


def test_gradients_reach_encoder_heads_and_decoder():
    model = tiny_model().train()
    labels = torch.zeros(3, len(model.config.attributes), dtype=torch.long)
    tags = tag_targets(model, [["articleType:Tshirts"], ["gender:Men", "detail:denim"], ["detail:check"]])
    model(pixels(), attribute_labels=labels, tag_ids=tags).loss.backward()
    for part in (model.encoder, model.heads, model.initial_state, model.tag_embeddings, model.decoder, model.tag_classifier):
        grads = [p.grad for p in part.parameters() if p.requires_grad]
        assert grads and any(g is not None and g.abs().sum() > 0 for g in grads), part.__class__.__name__


@pytest.mark.parametrize("decoder_type", ["gru", "lstm"])
def test_save_and_load_round_trip_gives_identical_outputs(tmp_path, decoder_type):
    model = tiny_model(decoder_type=decoder_type)
    x = pixels()
    model.save_pretrained(tmp_path)
    loaded = FashionTaggerModel.from_pretrained(tmp_path).eval()
    saved, restored = model.state_dict(), loaded.state_dict()
    assert saved.keys() == restored.keys() and all(torch.equal(saved[k], restored[k]) for k in saved)
    with torch.no_grad():
        before, after = model(x), loaded(x)
    # Same weights, same outputs up to the last bits: oneDNN's channels-last kernels may round differently when the
    # weights sit at other addresses (seen at 1 thread, ~1e-9).
    for name in model.config.attributes:
        torch.testing.assert_close(after.attribute_logits[name], before.attribute_logits[name], rtol=1e-5, atol=1e-7)
    hypotheses, reloaded_hypotheses = model.generate_tags(x, num_beams=3), loaded.generate_tags(x, num_beams=3)
    for image, reloaded_image in zip(hypotheses, reloaded_hypotheses, strict=True):
        assert [h["tag_ids"] for h in image] == [h["tag_ids"] for h in reloaded_image]
        assert [h["score"] for h in image] == pytest.approx([h["score"] for h in reloaded_image], rel=1e-5)
    assert (tmp_path / "model.safetensors").exists()
    assert not list(tmp_path.glob("*.bin"))


def test_head_order_survives_save_and_load(tmp_path):
    attributes = {"usage": ["Casual", "Sports"], "articleType": ["Shirts", "Tshirts"], "baseColour": ["Black", "Red"]}
    tiny_model(attributes=attributes).save_pretrained(tmp_path)
    assert list(FashionTaggerConfig.from_pretrained(tmp_path).attributes) == ["usage", "articleType", "baseColour"]


def test_auto_classes_load_a_saved_folder(tiny_model_dir):
    assert isinstance(AutoConfig.from_pretrained(tiny_model_dir), FashionTaggerConfig)
    assert isinstance(AutoModel.from_pretrained(tiny_model_dir), FashionTaggerModel)
    assert isinstance(AutoImageProcessor.from_pretrained(tiny_model_dir), FashionTaggerImageProcessor)


@pytest.mark.slow
def test_trust_remote_code_loads_where_fashion_hf_is_not_installed(tiny_model_dir, tmp_path):
    model = FashionTaggerModel.from_pretrained(tiny_model_dir).eval()
    x = pixels(2)
    expected = model(x).attribute_logits["articleType"].tolist()
    torch.save(x, tmp_path / "x.pt")
    script = WITHOUT_FASHION_HF + textwrap.dedent(f"""
        import json, torch
        try:
            import fashion_hf
        except ImportError:
            pass
        else:
            raise SystemExit("fashion_hf must not be importable here")
        from transformers import AutoImageProcessor, AutoModel
        model = AutoModel.from_pretrained({str(tiny_model_dir)!r}, trust_remote_code=True).eval()
        processor = AutoImageProcessor.from_pretrained({str(tiny_model_dir)!r}, trust_remote_code=True)
        x = torch.load({str(tmp_path / "x.pt")!r}, weights_only=True)
        with torch.no_grad():
            logits = model(x).attribute_logits["articleType"].tolist()
        print(json.dumps({{"module": type(model).__module__, "processor": type(processor).__name__, "logits": logits}}))
    """)
    env = {**os.environ, "PYTHONPATH": "", "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded["module"].startswith("transformers_modules")
    assert loaded["processor"] == "FashionTaggerImageProcessor"
    assert torch.allclose(torch.tensor(loaded["logits"]), torch.tensor(expected), atol=1e-5)


def silence_end_of_sequence(model):
    """An untrained decoder that never chooses <eos> on its own."""
    with torch.no_grad():
        model.tag_classifier.bias[EOS_TAG_ID] = -1e4
    return model


def test_untrained_decoding_stops_at_the_maximum_length():
    model = silence_end_of_sequence(tiny_model())
    for num_beams in (1, 3):
        for hypotheses in model.generate_tags(pixels(), num_beams=num_beams, max_length=4):
            assert all(len(h["tags"]) == 4 for h in hypotheses)


def test_decoding_ends_when_every_tag_is_used_up():
    model = silence_end_of_sequence(tiny_model(max_tag_length=1000))
    config = model.config
    reachable = len(config.attributes) + sum(group == "detail" for _, group in config.tags)
    for hypothesis in model.generate_tags(pixels())[0]:
        assert len(hypothesis["tags"]) == reachable


def test_no_tag_twice_and_one_value_per_attribute():
    model = silence_end_of_sequence(tiny_model())
    for num_beams in (1, 4):
        for hypotheses in model.generate_tags(pixels(4), num_beams=num_beams):
            for hypothesis in hypotheses:
                keys = [(t["group"], t["tag"]) for t in hypothesis["tags"]]
                assert len(keys) == len(set(keys))
                groups = [t["group"] for t in hypothesis["tags"] if t["group"] != "detail"]
                assert len(groups) == len(set(groups))


def test_beam_width_one_reproduces_greedy_exactly():
    model = tiny_model()
    x = pixels(5)
    greedy = model.generate_tags(x)
    beam = model.generate_tags(x, num_beams=1)
    assert [h[0]["tag_ids"] for h in greedy] == [h[0]["tag_ids"] for h in beam]
    # And the beam-search code path itself, at width 1, agrees with greedy.
    conflicts = tag_conflicts(model.config)
    state, step = model._decoding_start(model.encode_images(x))
    ids, log_probs, scores = model._beam_decode(state, step, len(x), x.device, model.config.max_tag_length, 1, conflicts)
    beam_tags = model._hypotheses(ids, log_probs, scores)
    assert [h[0]["tag_ids"] for h in beam_tags] == [h[0]["tag_ids"] for h in greedy]
    assert [h[0]["score"] for h in beam_tags] == pytest.approx([h[0]["score"] for h in greedy], abs=1e-5)


@pytest.mark.parametrize("decoder_type", ["gru", "lstm"])
def test_decoding_step_matches_the_recurrent_module(decoder_type):
    """The generation step (cell equations with precomputed input gates) computes what nn.GRU / nn.LSTM compute."""
    model = tiny_model(decoder_type=decoder_type, decoder_num_layers=2)
    tokens = torch.tensor([5, 9, 3])
    state = model._initial_decoder_state(torch.randn(3, model.encoder.num_features))
    expected, expected_state = model.decoder(model.tag_embeddings(tokens)[:, None], state)
    output, new_state = model._decoder_step(tokens, state, model._tag_input_gates(), model._recurrent_weights(tokens.device))
    assert torch.allclose(output, expected[:, 0], atol=1e-6)
    for got, want in zip(new_state if decoder_type == "lstm" else [new_state], expected_state if decoder_type == "lstm" else [expected_state]):
        assert torch.allclose(got, want, atol=1e-6)


def test_input_gate_table_follows_weight_changes():
    """The table is kept between decodes, and rebuilt after an in-place update or a load_state_dict."""
    model = tiny_model()
    x = pixels(3)
    before = model.generate_tags(x)
    assert model._tag_input_gates() is model._tag_input_gates()
    saved = {name: value.clone() for name, value in model.state_dict().items()}
    with torch.no_grad():
        model.tag_embeddings.weight.mul_(-3.0)  # what an optimizer step does: in place
    fresh = torch.addmm(model.decoder.bias_ih_l0, model.tag_embeddings.weight, model.decoder.weight_ih_l0.T)
    assert torch.equal(model._tag_input_gates(), fresh)
    model.load_state_dict(saved)
    assert [h[0]["tag_ids"] for h in model.generate_tags(x)] == [h[0]["tag_ids"] for h in before]


@pytest.mark.skipif(not runs_bfloat16_natively(torch.device("cpu")), reason="this CPU has no native bfloat16")
@pytest.mark.parametrize("decoder_type", ["gru", "lstm"])
def test_bfloat16_decoder_matmuls_stay_close_to_float32(decoder_type):
    """decoder_matmul_dtype="bfloat16" changes only the recurrent matmuls: the step output stays within bf16
    rounding of the float32 step, the state stays float32, and the classifier's scores keep float32."""
    model = tiny_model(decoder_type=decoder_type, decoder_num_layers=2)
    tokens = torch.tensor([5, 9, 3])
    state = model._initial_decoder_state(torch.randn(3, model.encoder.num_features))
    gates = model._tag_input_gates()
    exact, _ = model._decoder_step(tokens, state, gates, model._recurrent_weights(tokens.device))
    model.config.decoder_matmul_dtype = "bfloat16"
    weights = model._recurrent_weights(tokens.device)
    assert {weight.dtype for layer in weights for weight in layer if weight is not None} == {torch.bfloat16}
    rounded, new_state = model._decoder_step(tokens, state, gates, weights)
    assert rounded.dtype == torch.float32 and all(s.dtype == torch.float32 for s in (new_state if decoder_type == "lstm" else [new_state]))
    assert not torch.equal(rounded, exact)
    assert torch.allclose(rounded, exact, atol=2e-2)
    hypotheses = model.generate_tags(pixels(4), num_beams=2)
    assert all(0.0 < tag["score"] <= 1.0 for image in hypotheses for hypothesis in image for tag in hypothesis["tags"])


def test_decoder_matmul_dtype_is_validated():
    with pytest.raises(ValueError, match="decoder_matmul_dtype"):
        FashionTaggerConfig(decoder_matmul_dtype="float16")


def test_generated_scores_match_teacher_forced_probabilities():
    """Decoding and training see the same distribution: re-scoring a generated sequence reproduces its scores."""
    model = silence_end_of_sequence(tiny_model())
    x = pixels(1)
    hypothesis = model.generate_tags(x, max_length=3)[0][0]
    tag_ids = torch.tensor([[BOS_TAG_ID, *hypothesis["tag_ids"], EOS_TAG_ID]])
    logits = model(x, tag_ids=tag_ids).tag_logits[0]
    banned = model._initial_banned(1, x.device)[0]
    conflicts = tag_conflicts(model.config)
    for step, tag in enumerate(hypothesis["tags"]):
        log_probs = logits[step].masked_fill(banned, float("-inf")).log_softmax(-1)
        assert log_probs[hypothesis["tag_ids"][step]].exp().item() == pytest.approx(tag["score"], rel=1e-4)
        banned = banned | conflicts[hypothesis["tag_ids"][step]]


def test_one_image_and_a_batch_decode_alike():
    """Batching changes nothing: each image of a batch gets the tags it gets alone."""
    model = tiny_model()
    x = pixels(6)
    batch = model.generate_tags(x)
    singles = [model.generate_tags(x[i : i + 1])[0] for i in range(6)]
    assert [h[0]["tag_ids"] for h in batch] == [h[0]["tag_ids"] for h in singles]
    assert [h[0]["score"] for h in batch] == pytest.approx([h[0]["score"] for h in singles], abs=1e-5)


def test_wider_beam_returns_hypotheses_sorted_by_score():
    model = tiny_model()
    for hypotheses in model.generate_tags(pixels(4), num_beams=5):
        assert 1 < len(hypotheses) <= 5
        scores = [h["score"] for h in hypotheses]
        assert scores == sorted(scores, reverse=True)
        assert len({tuple(h["tag_ids"]) for h in hypotheses}) == len(hypotheses)


def test_tag_scores_are_probabilities_and_sum_to_the_sequence_score():
    model = silence_end_of_sequence(tiny_model())
    hypothesis = model.generate_tags(pixels(1), max_length=3)[0][0]
    assert all(0.0 < t["score"] <= 1.0 for t in hypothesis["tags"])
    total = sum(torch.log(torch.tensor(t["score"])) for t in hypothesis["tags"])
    assert hypothesis["score"] == pytest.approx(float(total), abs=1e-4)


def test_config_rejects_invalid_vocabularies():
    with pytest.raises(ValueError, match="decoder_type"):
        tiny_config(decoder_type="transformer")
    with pytest.raises(ValueError, match="distinct labels"):
        tiny_config(attributes={"gender": ["Men", "Men"]})
    with pytest.raises(ValueError, match="twice"):
        tiny_config(tags=[["check", "detail"], ["check", "detail"]])
    with pytest.raises(ValueError, match="feedback_tag_min_contributors.*got 0"):
        tiny_config(feedback_tag_min_contributors=0)


def test_a_config_json_from_before_feedback_tag_min_contributors_loads_with_3(tmp_path):
    tiny_config(feedback_tag_min_contributors=5).save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).feedback_tag_min_contributors == 5
    saved = json.loads((tmp_path / "config.json").read_text())
    del saved["feedback_tag_min_contributors"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    assert AutoConfig.from_pretrained(tmp_path).feedback_tag_min_contributors == 3


@pytest.mark.parametrize(
    "module",
    [
        "configuration_fashion_tagger.py",
        "modeling_fashion_tagger.py",
        "image_processing_fashion_tagger.py",
        "image_decoding.py",
        "pipeline_fashion_tagging.py",
        "onnx_runtime.py",
    ],
)
def test_shipped_model_remote_code_is_the_package_code(module):
    # save_pretrained copies these for trust_remote_code; the shipped folder must load exactly what the package runs.
    shipped = REPO / "models" / "fashion-tagger" / module
    assert shipped.read_text() == (REPO / "fashion_hf" / module).read_text()


def test_refresh_code_rewrites_a_folders_code_copies_and_keeps_its_stored_weights(tmp_path):
    from safetensors.torch import load_file

    from fashion_hf.pipeline_fashion_tagging import save_tagger
    from fashion_hf.training.refresh_code import main as refresh_code

    model = tiny_model()
    half = {name: tensor.half() if tensor.is_floating_point() else tensor for name, tensor in model.state_dict().items()}
    save_tagger(model, FashionTaggerImageProcessor.from_model_config(model.config), tmp_path, state_dict=half)
    stale = tmp_path / "modeling_fashion_tagger.py"
    stale.write_text(stale.read_text() + "\n# edited by hand\n")
    before = load_file(tmp_path / "model.safetensors")

    refresh_code([str(tmp_path)])
    assert stale.read_text() == (REPO / "fashion_hf" / "modeling_fashion_tagger.py").read_text()
    after = load_file(tmp_path / "model.safetensors")
    assert after.keys() == before.keys()
    assert all(after[name].dtype == before[name].dtype and torch.equal(after[name], before[name]) for name in before)
    with pytest.raises(SystemExit, match="no model.safetensors"):
        refresh_code([str(tmp_path / "missing")])


def with_trained_looking_batch_norms(model, seed=0):
    """Batch norms with running statistics and affines far from their initial 0/1, as training leaves them."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                shape = module.running_mean.shape
                module.running_mean.copy_(torch.randn(shape, generator=generator) * 0.5)
                module.running_var.copy_(torch.rand(shape, generator=generator) * 2 + 0.2)
                module.weight.copy_(torch.rand(shape, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(shape, generator=generator) * 0.3)
    return model


def test_folding_the_batch_norms_keeps_the_encoder_output_and_leaves_no_norm():
    model = with_trained_looking_batch_norms(tiny_model())
    norms = sum(isinstance(module, torch.nn.BatchNorm2d) for module in model.encoder.modules())
    assert norms > 5
    x = pixels(4)
    with torch.no_grad():
        expected = model.encode_images(x)
        folded = fold_batch_norms(model.encoder)
        assert not any(isinstance(module, torch.nn.BatchNorm2d) for module in folded.modules())
        torch.testing.assert_close(model.encode_images(x), expected, atol=1e-5, rtol=1e-4)


def test_the_folded_tagger_encodes_as_its_model_and_leaves_the_model_as_it_was():
    model = with_trained_looking_batch_norms(tiny_model())
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    tagger = FoldedTagger(model)
    x = pixels(3)
    with torch.no_grad():
        torch.testing.assert_close(tagger.encode_images(x), model.encode_images(x), atol=1e-5, rtol=1e-4)
        embeds = tagger.encode_images(x)
        # Everything but the encoding is the model's own: heads, decoder, weights, config.
        torch.testing.assert_close(tagger(image_embeds=embeds).attribute_logits["articleType"],
                                   model(image_embeds=embeds).attribute_logits["articleType"])  # fmt: skip
    assert tagger.config is model.config and tagger.generate_tags.__self__ is model
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(state[name], tensor) for name, tensor in model.state_dict().items())
    assert any(isinstance(module, torch.nn.BatchNorm2d) for module in model.modules())
    copied = copy.deepcopy(tagger)  # e.g. handed to a worker: a copy works as the original
    with torch.no_grad():
        torch.testing.assert_close(copied.encode_images(x), tagger.encode_images(x))
