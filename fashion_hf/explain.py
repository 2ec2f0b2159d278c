"""Explanations of the tagger's predictions: Grad-CAM heatmaps and how unsure the model is about an image.

Grad-CAM (Selvaraju et al., 2017) weighs the encoder's last convolutional feature map by the gradient of one
attribute logit (by default the top articleType) and keeps the positive part: the regions that raised that score.
"""

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

DEFAULT_ATTRIBUTE = "articleType"

# A perceptually ordered blue -> cyan -> green -> yellow -> red ramp (the usual "jet"-like heatmap) without matplotlib.
_RAMP = np.array(
    [[0, 0, 128], [0, 0, 255], [0, 160, 255], [0, 255, 200], [120, 255, 0], [255, 220, 0], [255, 100, 0], [200, 0, 0]],
    dtype=np.float32,
)


@dataclass
class GradCam:
    """
    Args:
        attribute (`str`): the attribute head that was explained.
        labels (`list[str]`): per image, the label whose logit was explained (the top one unless given).
        maps (`np.ndarray` of shape `(batch, h, w)`): heatmaps in `[0, 1]` over the model input (after padding to
            the model's aspect ratio), at the resolution of the feature map.
    """

    attribute: str
    labels: list[str]
    maps: np.ndarray


def explained_attribute(config, attribute: str | None = None) -> str:
    """The attribute to explain: the one asked for, else articleType, else the first head."""
    if attribute is not None:
        if attribute not in config.attributes:
            raise ValueError(f"unknown attribute {attribute!r}; the model has {list(config.attributes)}")
        return attribute
    return DEFAULT_ATTRIBUTE if DEFAULT_ATTRIBUTE in config.attributes else next(iter(config.attributes))


def grad_cam(model, pixel_values: torch.Tensor, attribute: str | None = None, label_ids=None) -> GradCam:
    """Grad-CAM of one attribute head on the encoder's last feature map, for a whole batch at once.

    `pixel_values` come from the image processor. `label_ids` (one per image) pick the label to explain; by default
    each image's top label. Images are independent (the model is in eval mode), so one backward pass serves the batch.
    An ensemble's map is the mean of its members' maps for the label the ensemble ranks first, on the photo as given;
    with experts behind a gate, each member's map counts with the weight the gate gives its domain for that photo.
    """
    attribute = explained_attribute(model.config, attribute)
    pixel_values = pixel_values.to(model.device, model.dtype)
    if label_ids is not None:
        label_ids = torch.as_tensor(label_ids, device=pixel_values.device).long().view(-1)
    members = getattr(model, "members", None)  # an ensemble (duck-typed: remote-code classes are other objects)
    if members is not None:
        with torch.no_grad():  # the embeddings only when the label or the gate needs them: a pass per member
            gated = getattr(model, "gate", None) is not None
            image_embeds = model.encode_images(pixel_values) if gated or label_ids is None else None
            if label_ids is None:  # its own top label: a forward pass of the whole ensemble, which callers can spare
                label_ids = model(image_embeds=image_embeds).attribute_logits[attribute].argmax(-1)
            if gated:
                weights = member_weights(model, image_embeds)
            else:
                weights = pixel_values.new_full((len(pixel_values), len(members)), 1 / len(members))
        used = [index for index in range(len(members)) if weights[:, index].any()]
        cams = {
            index: _class_activation(members[index], model.member_pixel_values(index, pixel_values), attribute, label_ids)[0]
            for index in used
        }
        size = max((cams[index].shape[-2:] for index in used), key=lambda shape: shape.numel())  # the finest map
        cams = sum(
            F.interpolate(cams[index][:, None], size=size, mode="bilinear")[:, 0] * weights[:, index, None, None]
            for index in used
        )
    else:
        cams, label_ids = _class_activation(model, pixel_values, attribute, label_ids)
    peak = cams.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]
    maps = (cams / peak).cpu().numpy()
    names = model.config.attributes[attribute]
    return GradCam(attribute=attribute, labels=[names[i] for i in label_ids.tolist()], maps=maps)


def member_weights(model, image_embeds: torch.Tensor) -> torch.Tensor:
    """`(batch, members)`: each member's share in each photo's answer, for an ensemble with a gate: its domain's
    weight, split evenly among the domain's members."""
    config, domain_weights = model.config, model.domain_weights(image_embeds)
    columns = [
        domain_weights[:, config.domains.index(domain)] / config.member_domains.count(domain)
        for domain in config.member_domains
    ]
    return torch.stack(columns, 1).to(image_embeds.dtype)


def _class_activation(model, pixel_values, attribute: str, label_ids) -> tuple[torch.Tensor, torch.Tensor]:
    """`(cams, label_ids)`: one [`FashionTaggerModel`]'s unnormalised `(batch, h, w)` Grad-CAM maps; `label_ids`: a
    `(batch,)` tensor, or None for each image's top label."""
    with torch.enable_grad():
        features = model.encoder.forward_features(pixel_values)
        if not features.requires_grad:  # a frozen encoder: the gradient is still taken w.r.t. the features
            features.requires_grad_(True)
        image_embeds = model.encoder.forward_head(features)
        logits = model(image_embeds=image_embeds).attribute_logits[attribute].float()
        if label_ids is None:
            label_ids = logits.argmax(-1)
        chosen = logits.gather(1, label_ids[:, None]).sum()
        (gradients,) = torch.autograd.grad(chosen, features)
    weights = gradients.float().mean(dim=(2, 3), keepdim=True)
    return torch.relu((weights * features.detach().float()).sum(1)), label_ids


def _padded_canvas(width: int, height: int, target_height: int, target_width: int) -> tuple[int, int, int, int]:
    """`(canvas_width, canvas_height, left, top)` of the white padding the image processor adds (`fit_and_pad`)."""
    target = target_width / target_height
    if abs(width / height - target) < 1e-3:
        return width, height, 0, 0
    if width / height > target:
        canvas_width, canvas_height = width, round(width / target)
    else:
        canvas_width, canvas_height = round(height * target), height
    return canvas_width, canvas_height, (canvas_width - width) // 2, (canvas_height - height) // 2


def colorize(heatmap: np.ndarray) -> np.ndarray:
    """`(h, w)` values in `[0, 1]` -> `(h, w, 3)` uint8 colours."""
    positions = np.clip(heatmap, 0.0, 1.0) * (len(_RAMP) - 1)
    low = np.floor(positions).astype(int).clip(0, len(_RAMP) - 2)
    fraction = (positions - low)[..., None]
    return (_RAMP[low] * (1 - fraction) + _RAMP[low + 1] * fraction).round().astype(np.uint8)


def overlay_heatmap(
    image: Image.Image, heatmap: np.ndarray, input_size, max_side: int = 384, alpha: float = 0.45
) -> Image.Image:
    """Blend a Grad-CAM map over the photo it explains, shown with its longer side at `max_side` pixels.

    `image` is the photo as the image processor frames it (`processor.framed`: a landscape phone photo without its
    side strips). `heatmap` covers the model input, which is that image padded to the model's aspect ratio: the map
    is stretched over that padded canvas and the image's own region is cut back out, so it lines up with it.
    `input_size` is the model's `(height, width)`.
    """
    image = image.convert("RGB")
    scale = max_side / max(image.width, image.height)
    shown_size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    shown = image.resize(shown_size, Image.Resampling.BICUBIC)
    canvas_width, canvas_height, left, top = _padded_canvas(image.width, image.height, *input_size)
    stretched = Image.fromarray(np.ascontiguousarray(heatmap, dtype=np.float32)).resize(
        (max(1, round(canvas_width * scale)), max(1, round(canvas_height * scale))), Image.Resampling.BILINEAR
    )
    box = (round(left * scale), round(top * scale))
    cropped = stretched.crop((box[0], box[1], box[0] + shown.width, box[1] + shown.height))
    colours = Image.fromarray(colorize(np.asarray(cropped)))
    return Image.blend(shown, colours, alpha)


def uncertainty(prediction: dict) -> float:
    """How unsure a prediction (the pipeline's output) is: 1 - the mean top-label probability over the attributes.

    0 means every head is certain; values near 1 mean the heads spread their probability thinly. Used to put the
    images whose labels would teach the model most at the front of the annotation queue.
    """
    top_scores = [labels[0]["score"] for labels in prediction["attributes"].values() if labels]
    return 1.0 - float(np.mean(top_scores)) if top_scores else 1.0


__all__ = ["GradCam", "colorize", "explained_attribute", "grad_cam", "overlay_heatmap", "uncertainty"]
