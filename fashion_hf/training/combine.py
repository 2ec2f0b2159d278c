"""Trained fashion taggers combined into one ensemble model, and the ensemble saved in the dtype asked (float16).

`ensemble.py` combines the members it is given; `continuation.py` combines the members it trained, with experts.
"""

from pathlib import Path

import torch

from .. import FashionTaggerEnsembleConfig, FashionTaggerEnsembleModel, FashionTaggerModel
from ..pipeline_fashion_tagging import save_tagger


def combine(member_folders: list[str], mirror_views: bool = True) -> FashionTaggerEnsembleModel:
    """One ensemble of the taggers saved in `member_folders`, loaded in float32."""
    members = [FashionTaggerModel.from_pretrained(folder, dtype=torch.float32) for folder in member_folders]
    return combine_models(members, mirror_views)


def combine_models(members: list[FashionTaggerModel], mirror_views: bool = True, **domain_fields) -> FashionTaggerEnsembleModel:
    """One ensemble of these trained taggers; `domain_fields` as `FashionTaggerEnsembleConfig.from_members` (the
    gate of an ensemble with experts is then still to be fitted: `domain_gate`)."""
    config = FashionTaggerEnsembleConfig.from_members([member.config for member in members], mirror_views, **domain_fields)
    ensemble = FashionTaggerEnsembleModel(config)
    for slot, member in zip(ensemble.members, members):
        slot.load_state_dict(member.state_dict())
    return ensemble.eval()


def save(ensemble: FashionTaggerEnsembleModel, processor, folder: Path, weights_dtype: torch.dtype) -> None:
    # Integer buffers (batch-norm counters) keep their dtype; the config keeps float32, the dtype it loads in.
    state_dict = {
        name: tensor.to(weights_dtype) if tensor.is_floating_point() else tensor
        for name, tensor in ensemble.state_dict().items()
    }
    save_tagger(ensemble, processor, folder, state_dict=state_dict)
