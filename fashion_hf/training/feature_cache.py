"""The fast CPU mode: freeze the encoder's first stages, run them once per (augmented) image, train the rest.

fb-model-library's `finetune=False` froze the whole CNN and trained the heads on its features. Freezing only a
prefix keeps most of that speed (the early, high-resolution stages are where the compute is) while the later
stages still adapt to fashion; `frozen_stages="all"` is the classic pooled-embedding cache.
"""

import torch
from torch import nn


def split_encoder(encoder: nn.Module, frozen_stages) -> tuple[nn.Module, nn.Module]:
    """`(trunk, top)` such that `top(trunk(x)) == encoder(x)`. `frozen_stages`: "all" or the number of blocks frozen."""
    if frozen_stages == "all":
        return encoder, nn.Identity()
    if not all(hasattr(encoder, name) for name in ("conv_stem", "bn1", "blocks", "conv_head", "bn2", "global_pool")):
        raise ValueError(f"{type(encoder).__name__} cannot be split by stage; use frozen_stages='all' or 0")
    stages = int(frozen_stages)
    trunk = nn.Sequential(encoder.conv_stem, encoder.bn1, *encoder.blocks[:stages])
    top = nn.Sequential(*encoder.blocks[stages:], encoder.conv_head, encoder.bn2, encoder.global_pool)
    return trunk, top


def freeze(module: nn.Module, frozen: bool = True) -> None:
    for parameter in module.parameters():
        parameter.requires_grad_(not frozen)


@torch.inference_mode()
def compute_trunk_features(trunk: nn.Module, loader, device, dtype=torch.float16, progress=None):
    """Run the frozen trunk over a loader of `{"pixel_values", "attribute_labels", "tag_ids"}` batches.

    Returns the stacked features (stored in half precision: they are inputs, not weights) and the labels.
    """
    trunk.eval()
    features, attribute_labels, tag_ids = [], [], []
    for batch in loader:
        features.append(trunk(batch["pixel_values"].to(device)).to("cpu", dtype))
        attribute_labels.append(batch["attribute_labels"])
        tag_ids.append(batch["tag_ids"])
        if progress is not None:
            progress.update(1)
    width = max(t.shape[1] for t in tag_ids)
    tag_ids = torch.cat([nn.functional.pad(t, (0, width - t.shape[1])) for t in tag_ids])
    return torch.cat(features), torch.cat(attribute_labels), tag_ids


class CachedFeatures(torch.utils.data.Dataset):
    """`views` cached trunk outputs per image; each epoch draws one view per image at random."""

    def __init__(self, features: list[torch.Tensor], attribute_labels: torch.Tensor, tag_ids: torch.Tensor, seed: int):
        self.views, self.attribute_labels, self.tag_ids = features, attribute_labels, tag_ids
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self):
        return len(self.attribute_labels)

    def __getitem__(self, index):
        view = torch.randint(len(self.views), (), generator=self.generator).item()
        return {
            "trunk_features": self.views[view][index].float(),
            "attribute_labels": self.attribute_labels[index],
            "tag_ids": self.tag_ids[index],
        }
