"""`runtime="onnx"`: the encoders exported to ONNX and run by ONNX Runtime give the PyTorch model's answers: the same
top label on every head, probabilities within 1e-3, the same tag sequences; for a single model, a gated ensemble
whose experts see only some photos, the pipeline, and (slow) the shipped model on 1,000 validation photos."""

import io
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from helpers import PRODUCT_IMAGES, REPO, WITHOUT_FASHION_HF, encode, product_photo, tagging_model
from PIL import Image
from transformers import AutoImageProcessor, AutoModel, pipeline

from fashion_hf.cli import main as cli
from fashion_hf.configuration_fashion_tagger import FashionTaggerEnsembleConfig
from fashion_hf.modeling_fashion_tagger import FashionTaggerEnsembleModel
from fashion_hf.onnx_runtime import CACHE_ENV, EXPORT_RECORD, OnnxTagger, export_onnx, graph_name, quantize_onnx

SHIPPED = REPO / "models" / "fashion-tagger"


@pytest.fixture(autouse=True)
def onnx_cache(tmp_path, monkeypatch):
    """Graphs exported on demand go to a fresh cache, never the user's."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


def pixels(batch=4, seed=0, size=(64, 48)):
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed))


def gated_ensemble(rows_for_experts: str, expert_size=(64, 48)) -> FashionTaggerEnsembleModel:
    """A catalogue member and a user-photo expert (an LSTM) behind a gate that gives the expert `"none"`, `"all"` or
    `"half"` of `pixels()`: the two rows whose general embedding lies furthest along one direction."""
    torch.manual_seed(0)
    models = [tagging_model(), tagging_model(decoder_type="lstm", decoder_hidden_size=24, image_size=expert_size)]
    config = FashionTaggerEnsembleConfig.from_members(
        [model.config for model in models], domains=["catalogue", "user-photos"], member_domains=["catalogue", "user-photos"]
    )
    ensemble = FashionTaggerEnsembleModel(config)
    for slot, model in zip(ensemble.members, models):
        slot.load_state_dict(model.state_dict())
    ensemble.eval()
    with torch.no_grad():
        general = ensemble.members[0].encode_images(torch.cat([pixels(), pixels().flip(-1)])).view(2, 4, -1).mean(0)
        direction = torch.randn(general.shape[-1], generator=torch.Generator().manual_seed(1))
        projection = general @ direction
        ensemble.gate.weight.zero_()
        ensemble.gate.bias.zero_()
        if rows_for_experts == "half":  # the expert's logit: +-20 or beyond, a weight of ~1 or ~2e-9
            low, high = projection.sort().values[1:3]
            scale = 20.0 / ((high - low) / 2)
            ensemble.gate.weight[1] = direction * scale
            ensemble.gate.bias[1] = -(low + high) / 2 * scale
        else:
            ensemble.gate.bias[1] = 8.0 if rows_for_experts == "all" else -8.0
    return ensemble


def assert_same_answers(model, onnx_tagger, pixel_values, tolerance=1e-3):
    """Same top-1 on every head, probabilities within `tolerance`, the same tags and out-of-distribution scores."""
    with torch.inference_mode():
        expected_embeds, embeds = model.encode_images(pixel_values), onnx_tagger.encode_images(pixel_values)
        assert embeds.shape == expected_embeds.shape
        expected, actual = model(image_embeds=expected_embeds).attribute_logits, onnx_tagger(image_embeds=embeds).attribute_logits
        for name in model.config.attributes:
            assert torch.equal(actual[name].argmax(-1), expected[name].argmax(-1)), name
            assert torch.allclose(actual[name].softmax(-1), expected[name].softmax(-1), atol=tolerance), name
        tags = [hypotheses[0]["tag_ids"] for hypotheses in onnx_tagger.generate_tags(image_embeds=embeds)]
        assert tags == [hypotheses[0]["tag_ids"] for hypotheses in model.generate_tags(image_embeds=expected_embeds)]
        assert all(tags)  # the tiny tagging model always tags: an empty list on both sides would prove nothing


def test_a_single_models_onnx_encoder_gives_the_same_labels_probabilities_and_tags(tmp_path):
    model = tagging_model()
    onnx_tagger = OnnxTagger(model, export_onnx(model, tmp_path))
    assert_same_answers(model, onnx_tagger, pixels(batch=5))  # a batch size other than the export's


@pytest.mark.parametrize("rows_for_experts", ["none", "half", "all"])
def test_a_gated_ensembles_experts_run_only_on_the_photos_the_gate_gives_them(rows_for_experts, tmp_path):
    ensemble = gated_ensemble(rows_for_experts)
    onnx_tagger = OnnxTagger(ensemble, export_onnx(ensemble, tmp_path))
    expert_rows = []
    expert_session = onnx_tagger.sessions["user-photos"]
    onnx_tagger.sessions["user-photos"] = RecordingSession(expert_session, expert_rows)
    assert_same_answers(ensemble, onnx_tagger, pixels())
    expected_rows = {"none": [], "half": [2], "all": [4]}[rows_for_experts]
    assert expert_rows == expected_rows


@pytest.mark.parametrize("expert_size", [(128, 96), (96, 72)], ids=["2x", "1.5x"])
def test_an_expert_with_a_larger_input_exports_with_the_catalogue_members_reduction_in_their_graph(expert_size, tmp_path):
    ensemble = gated_ensemble("all", expert_size=expert_size)
    onnx_tagger = OnnxTagger(ensemble, export_onnx(ensemble, tmp_path))
    assert_same_answers(ensemble, onnx_tagger, pixels(size=expert_size))


class RecordingSession:
    """An InferenceSession that notes the batch size of every run."""

    def __init__(self, session, batch_sizes: list):
        self.session, self.batch_sizes = session, batch_sizes

    def run(self, outputs, inputs):
        self.batch_sizes.append(len(next(iter(inputs.values()))))
        return self.session.run(outputs, inputs)


def test_the_onnx_pipeline_answers_as_the_torch_one_and_exports_into_the_cache_by_itself(tiny_model_dir, onnx_cache):
    photos = [product_photo(), product_photo((30, 30, 200), size=(90, 70)), encode(product_photo((30, 160, 60)))]
    expected = pipeline("fashion-tagging", model=str(tiny_model_dir))(photos, top_k=3)
    tagger = pipeline("fashion-tagging", model=str(tiny_model_dir), runtime="onnx")
    assert not (tiny_model_dir / "onnx").exists()  # the model folder is left alone
    assert len(list(onnx_cache.glob(f"*/onnx/{EXPORT_RECORD}"))) == 1
    for answer, reference in zip(tagger(photos, top_k=3, batch_size=2), expected):
        assert answer["tags"] and [tag["tag"] for tag in answer["tags"]] == [tag["tag"] for tag in reference["tags"]]
        for name, ranked in reference["attributes"].items():
            assert [label["label"] for label in answer["attributes"][name]] == [label["label"] for label in ranked]
            np.testing.assert_allclose([label["score"] for label in answer["attributes"][name]], [label["score"] for label in ranked], atol=1e-3)


def test_the_pipeline_refuses_an_unknown_runtime(tiny_model_dir):
    with pytest.raises(ValueError, match=r"runtime must be one of \('torch', 'onnx'\), got 'tensorrt'"):
        pipeline("fashion-tagging", model=str(tiny_model_dir), runtime="tensorrt")


def test_graphs_exported_from_other_weights_are_refused(tmp_path):
    export_onnx(tagging_model(), tmp_path)
    retrained = tagging_model()
    with torch.no_grad():
        retrained.heads["articleType"].bias.add_(1.0)
    with pytest.raises(ValueError, match="other weights.*fashion-hf export-onnx"):
        OnnxTagger.for_model(retrained, tmp_path)


def test_the_int8_graphs_run_in_place_of_the_float_ones_and_stay_close(tmp_path):
    model = tagging_model()
    folder = export_onnx(model, tmp_path)
    quantize_onnx(folder, [pixels(batch=8, seed=seed) for seed in range(4)])
    float_embeds = OnnxTagger(model, folder).encode_images(pixels())
    int8_embeds = OnnxTagger(model, folder, quantized=True).encode_images(pixels())
    assert not torch.equal(int8_embeds, float_embeds)  # it is another graph
    cosine = torch.nn.functional.cosine_similarity(int8_embeds, float_embeds, dim=-1)
    assert cosine.min() > 0.95, cosine


def test_asking_for_int8_graphs_that_were_not_made_names_the_command(tmp_path):
    model = tagging_model()
    with pytest.raises(FileNotFoundError, match=r"encoder-catalogue\.int8\.onnx is missing.*--quantize"):
        OnnxTagger(model, export_onnx(model, tmp_path), quantized=True)


def test_the_export_command_writes_graphs_next_to_the_model(tiny_model_dir, tmp_path, capsys):
    cli(["export-onnx", str(tiny_model_dir), "--output", str(tmp_path)])
    folder = tmp_path / "onnx"
    assert (folder / graph_name("catalogue")).is_file() and (folder / EXPORT_RECORD).is_file()
    assert str(folder / graph_name("catalogue")) in capsys.readouterr().out
    model = AutoModel.from_pretrained(tiny_model_dir)
    assert OnnxTagger.for_model(model, tmp_path).onnx_folder == folder


def test_the_export_command_refuses_an_output_that_is_not_a_folder(tiny_model_dir, tmp_path):
    with pytest.raises(SystemExit, match="is not a folder"):
        cli(["export-onnx", str(tiny_model_dir), "--output", str(tmp_path / "missing")])


def test_a_saved_folder_carries_the_onnx_runtime_for_remote_code(tiny_model_dir):
    # The pipeline imports it only for runtime="onnx"; its code must travel with the folder all the same.
    assert (tiny_model_dir / "onnx_runtime.py").read_text() == (REPO / "fashion_hf" / "onnx_runtime.py").read_text()


@pytest.mark.slow
def test_a_remote_code_pipeline_runs_onnx_where_fashion_hf_is_not_installed(tiny_model_dir, tmp_path):
    script = WITHOUT_FASHION_HF + textwrap.dedent(f"""
        import json
        from PIL import Image
        from transformers import pipeline
        tagger = pipeline("fashion-tagging", model={str(tiny_model_dir)!r}, trust_remote_code=True, runtime="onnx")
        answer = tagger(Image.open({str(tmp_path / "photo.png")!r}), top_k=1)
        print(json.dumps([type(tagger.encoder).__module__, answer["attributes"]["articleType"][0]["label"]]))
    """)
    product_photo().save(tmp_path / "photo.png")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), CACHE_ENV: str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    module, label = json.loads(result.stdout.strip().splitlines()[-1])
    assert module.startswith("transformers_modules") and module.endswith(".onnx_runtime")
    assert label == pipeline("fashion-tagging", model=str(tiny_model_dir))(product_photo(), top_k=1)["attributes"]["articleType"][0]["label"]


# --- the shipped model ---------------------------------------------------------------------------------------------

PARITY_PHOTOS = 1000


@pytest.mark.slow
@pytest.mark.timeout(3600)  # 1,000 photos through the PyTorch ensemble as well: past pytest.ini's limit on a busy CPU
def test_the_shipped_model_answers_the_same_on_1000_validation_photos_with_onnx(tmp_path):
    files = sorted((PRODUCT_IMAGES / "data").glob("validation-*.parquet"))
    if not files:
        pytest.skip(f"no validation split in {PRODUCT_IMAGES}")
    model = AutoModel.from_pretrained(SHIPPED).eval()
    processor = AutoImageProcessor.from_pretrained(SHIPPED)
    onnx_tagger = OnnxTagger(model, export_onnx(model, tmp_path))
    images = pq.read_table(files[0], columns=["image"]).slice(0, PARITY_PHOTOS).column("image").to_pylist()
    assert len(images) == PARITY_PHOTOS
    same_tags, worst = 0, 0.0
    with torch.inference_mode():
        for start in range(0, len(images), 50):
            batch = [processor.to_model_size(processor.load_image(Image.open(io.BytesIO(cell["bytes"])))) for cell in images[start : start + 50]]
            pixel_values = processor.normalize_pixels(torch.from_numpy(np.stack(batch)))
            expected_embeds, embeds = model.encode_images(pixel_values), onnx_tagger.encode_images(pixel_values)
            expected, actual = model(image_embeds=expected_embeds).attribute_logits, model(image_embeds=embeds).attribute_logits
            for name in model.config.attributes:
                assert torch.equal(actual[name].argmax(-1), expected[name].argmax(-1)), (start, name)
                worst = max(worst, float((actual[name].softmax(-1) - expected[name].softmax(-1)).abs().max()))
            tags = model.generate_tags(image_embeds=embeds)
            expected_tags = model.generate_tags(image_embeds=expected_embeds)
            same_tags += sum(a[0]["tag_ids"] == b[0]["tag_ids"] for a, b in zip(tags, expected_tags))
    assert worst <= 1e-3
    assert same_tags >= 0.99 * PARITY_PHOTOS


def test_onnx_runtime_pool_threads_sleep_when_idle_instead_of_spinning():
    from fashion_hf.onnx_runtime import session_options

    options = session_options(2)
    assert options.intra_op_num_threads == 2
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
