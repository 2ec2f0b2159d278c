"""Image processor of the fashion tagger: decode anything image-like safely, frame, resize, pad and normalise.

Decoding is `image_decoding`'s (the project's one safe decoder). The image is resized before it is padded, so the
padded canvas is the model's input size, never one sized from the image's long side.
"""

import numpy as np
import torch
from PIL import Image
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature

from .configuration_fashion_tagger import QUARTER_TURNS
from .image_decoding import (
    DEFAULT_MAX_FILE_BYTES,
    DEFAULT_MAX_IMAGE_PIXELS,
    WHITE,
    ImageLimits,
    InvalidImageError,
    load_rgb_image,
)


WIDEST_ASPECT = 1.0  # square keeps 75% of a 4:3 photo's width; the input's 3:4 would keep 56%, for no more gain
# A side strip counts as studio white when this share of its pixels is at least this bright in every channel.
STUDIO_WHITE_LEVEL = 235
STUDIO_WHITE_SHARE = 0.9


def crop_sides(image: Image.Image, widest_aspect: float) -> Image.Image:
    """Cut equal strips off the left and right of an image wider than `widest_aspect` (width / height) down to it."""
    width = max(1, round(image.height * widest_aspect))
    if image.width <= width:
        return image
    left = (image.width - width) // 2
    return image.crop((left, 0, left + width, image.height))


def has_white_sides(image: Image.Image, strip: int = 2) -> bool:
    """Whether the image's left and right edges are studio white, as around a product shot."""
    strip = min(strip, image.width)
    sides = np.concatenate([
        np.asarray(image.crop((0, 0, strip, image.height))),
        np.asarray(image.crop((image.width - strip, 0, image.width, image.height))),
    ])
    return bool((sides.min(-1) >= STUDIO_WHITE_LEVEL).mean() >= STUDIO_WHITE_SHARE)


def fit_and_pad(image: Image.Image, height: int, width: int) -> Image.Image:
    """Resize to fit `width` x `height` keeping proportions, then pad with white: the whole item stays in frame.

    Resizing first keeps every canvas within the input and the output size (padding first made one as large as the
    image's long side squared).
    """
    scale = min(width / image.width, height / image.height)
    fitted = (max(1, min(width, round(image.width * scale))), max(1, min(height, round(image.height * scale))))
    resized = image.resize(fitted, Image.Resampling.BICUBIC)
    if fitted == (width, height):
        return resized
    canvas = Image.new("RGB", (width, height), WHITE)
    canvas.paste(resized, ((width - fitted[0]) // 2, (height - fitted[1]) // 2))
    return canvas


class FashionTaggerImageProcessor(BaseImageProcessor):
    r"""
    Turns product photos into the tagger's `pixel_values`.

    Accepts PIL images, numpy arrays (HxW, HxWx3, HxWx4; uint8, uint16 or 0..1 floats), file paths and encoded bytes.
    Encoded images must be JPEG, PNG, WebP, GIF, BMP or TIFF (`image_decoding.ACCEPTED_FORMATS`). Every input
    becomes upright RGB: EXIF orientation is applied; L, LA, P, RGBA, CMYK and 16-bit images are converted,
    transparency flattened onto white. A landscape photo of a scene is framed first (`framed`); the image is then
    resized to fit the model's input, padded with white to its aspect ratio and normalised.
    Anything that is not an image raises [`InvalidImageError`] naming the input.

    Args:
        size (`dict[str, int]`, *optional*, defaults to `{"height": 128, "width": 96}`):
            Output size.
        image_mean (`list[float]`, *optional*, defaults to `[0.5, 0.5, 0.5]`):
            Normalisation mean.
        image_std (`list[float]`, *optional*, defaults to `[0.5, 0.5, 0.5]`):
            Normalisation standard deviation.
        max_image_pixels (`int`, *optional*, defaults to 40,000,000):
            Largest width x height accepted, checked before decoding (decompression bombs), as is the aspect ratio
            (at most 20:1 either way, `image_decoding.MAX_ASPECT_RATIO`).
        max_file_bytes (`int`, *optional*, defaults to 20 MiB):
            Largest encoded file accepted.
        widest_aspect (`float`, *optional*, defaults to 1.0):
            Width / height beyond which a photo without studio-white sides is cropped at both sides (`framed`).
            `None` never crops.
    """

    model_input_names = ["pixel_values"]

    def __init__(
        self,
        size: dict[str, int] | None = None,
        image_mean: list[float] | None = None,
        image_std: list[float] | None = None,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
        widest_aspect: float | None = WIDEST_ASPECT,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.size = dict(size or {"height": 128, "width": 96})
        self.image_mean = list(image_mean or [0.5, 0.5, 0.5])
        self.image_std = list(image_std or [0.5, 0.5, 0.5])
        self.max_image_pixels = max_image_pixels
        self.max_file_bytes = max_file_bytes
        if widest_aspect is not None and widest_aspect <= 0:
            raise ValueError(f"widest_aspect must be positive or None, got {widest_aspect}")
        self.widest_aspect = widest_aspect

    @property
    def backend(self) -> str:
        """`str`: what the image work runs on, as transformers' `PilBackend` says it: PIL decodes, resizes and pads.

        (Only the final normalisation is torch, on the model's device; torchvision is not used.)
        """
        return "pil"

    @classmethod
    def from_model_config(cls, config, **kwargs) -> "FashionTaggerImageProcessor":
        height, width = config.image_size
        return cls(size={"height": height, "width": width}, image_mean=config.image_mean, image_std=config.image_std, **kwargs)

    @property
    def image_limits(self) -> ImageLimits:
        """`ImageLimits`: the two limits above, read at each call (the app sets them after loading)."""
        return ImageLimits(max_image_pixels=self.max_image_pixels, max_file_bytes=self.max_file_bytes)

    def load_image(self, image) -> Image.Image:
        """Decode one input of any accepted kind into an upright RGB PIL image, or raise `InvalidImageError`."""
        return load_rgb_image(image, self.image_limits)

    def preprocess(self, images, return_tensors="pt", **kwargs) -> BatchFeature:
        """`images`: one image or a list of them, of any accepted kind. Returns `pixel_values` `(batch, 3, H, W)`."""
        if not isinstance(images, (list, tuple)):
            images = [images]
        pixels = np.stack([self.to_model_size(self.load_image(image)) for image in images])
        pixel_values = self.normalize_pixels(torch.from_numpy(pixels))
        if return_tensors != "pt":
            pixel_values = pixel_values.numpy()
        return BatchFeature({"pixel_values": pixel_values}, tensor_type=return_tensors)

    def framed(self, image: Image.Image) -> Image.Image:
        """The part of an RGB PIL image the model sees: all of it, except that a photo wider than `widest_aspect`
        whose sides are a scene rather than studio white loses equal strips at both sides down to that aspect.

        Why: a landscape phone photo (a cap on a bed) letterboxed into the portrait input keeps about half its
        height, so the item shrinks and sits between white bands no phone photo has. Cropping to square keeps it
        large (BENCHMARKS.md, "Landscape phone photos"). A studio shot on white loses nothing by padding, and a wide
        product (sunglasses, a belt) would lose its ends by cropping, so it is left whole.
        """
        if self.widest_aspect is None or image.width <= self.widest_aspect * image.height or has_white_sides(image):
            return image
        return crop_sides(image, self.widest_aspect)

    def to_model_size(self, image: Image.Image) -> np.ndarray:
        """An RGB PIL image -> `(H, W, 3)` uint8 at the model's size: `framed`, fitted, padded with white."""
        image = fit_and_pad(self.framed(image), self.size["height"], self.size["width"])
        return np.array(image)  # writable, so torch.from_numpy shares it without a warning

    def quarter_turns(self, image: Image.Image) -> np.ndarray:
        """`(3, H, W, 3)` uint8: the image turned by 90, 180 and 270 degrees counter-clockwise, each at the model's
        size (`QUARTER_TURNS`), for `FashionTaggerPreTrainedModel.turn_upright` to try on a photo that looks turned.
        Made from its `turn_source`: a pipeline keeps that alone, and turns it only for a photo that looks turned."""
        source = self.turn_source(image)
        return np.stack([self.to_model_size(source.rotate(degrees, expand=True)) for degrees in QUARTER_TURNS])

    def turn_source(self, image: Image.Image) -> Image.Image:
        """The image reduced to fit twice the model's size (the image itself when it fits): what `quarter_turns`
        turns. A phone photo's full resolution, turned three times, would cost more than the model's work on it and
        add nothing at the model's size. `quarter_turns` of the image and of its turn source are the same."""
        longest = 2 * max(self.size["height"], self.size["width"])
        if max(image.size) <= longest:
            return image
        reduced = image.copy()
        reduced.thumbnail((longest, longest), Image.Resampling.BICUBIC)
        return reduced

    def turned_pixel_values(self, quarter_turns: torch.Tensor) -> torch.Tensor:
        """`(photos, turns, H, W, 3)` uint8 quarter turns -> normalised `(turns * photos, 3, H, W)`, turn-major: the
        encoder's embeddings of them `.unflatten(0, (turns, photos))` are what `turn_upright` takes."""
        return self.normalize_pixels(quarter_turns.transpose(0, 1).flatten(0, 1))

    def normalize_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """`(batch, H, W, 3)` uint8 -> normalised `(batch, 3, H, W)` float32, on the device `pixels` are on.

        One pass over a whole batch: cheaper than normalising image by image, and a pipeline on a GPU moves a
        quarter of the bytes (uint8) and normalises there. The result stays in the channels-last memory of its
        input, the layout the model's encoder runs in, so no transposing copy is made here or there.
        """
        scale = torch.tensor([1.0 / (255.0 * std) for std in self.image_std], device=pixels.device)
        offset = torch.tensor([-mean / std for mean, std in zip(self.image_mean, self.image_std)], device=pixels.device)
        pixel_values = pixels.permute(0, 3, 1, 2).to(torch.float32, memory_format=torch.channels_last)
        return pixel_values.mul_(scale.view(1, 3, 1, 1)).add_(offset.view(1, 3, 1, 1))

    def pixel_values_of(self, image: Image.Image) -> torch.Tensor:
        """One RGB PIL image -> its normalised `(3, H, W)` float32 tensor."""
        return self.normalize_pixels(torch.from_numpy(self.to_model_size(image))[None])[0]


__all__ = ["FashionTaggerImageProcessor", "InvalidImageError"]
