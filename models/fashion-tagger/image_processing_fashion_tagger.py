"""Image processor of the fashion tagger: decode anything image-like safely, then pad, resize and normalise."""

import io
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature

DEFAULT_MAX_IMAGE_PIXELS = 40_000_000  # a 40-megapixel phone photo decodes; a decompression bomb does not
DEFAULT_MAX_FILE_BYTES = 20 * 1024 * 1024
WHITE = (255, 255, 255)  # studio product shots sit on white, so padding and transparency become white too


class InvalidImageError(ValueError):
    """The input is not an image the tagger can read; the message names the input and what would be valid."""


def describe_input(image) -> str:
    if isinstance(image, (str, os.PathLike)):
        return f"file {os.fspath(image)!r}"
    if isinstance(image, (bytes, bytearray, memoryview)):
        return f"{len(image)} bytes of image data"
    if isinstance(image, np.ndarray):
        return f"array of shape {image.shape} and dtype {image.dtype}"
    if isinstance(image, Image.Image):
        return f"PIL image ({image.mode}, {image.width}x{image.height})"
    return f"object of type {type(image).__name__}"


def read_image_bytes(image, max_file_bytes: int) -> bytes:
    """The raw bytes of a path or bytes-like input, refusing oversized files before reading them."""
    if isinstance(image, (str, os.PathLike)):
        text = os.fspath(image)
        if text.startswith(("http://", "https://")):
            raise InvalidImageError(f"{describe_input(image)}: URLs are not fetched; pass a local path, bytes or a PIL image")
        path = Path(text)
        if not path.is_file():
            raise InvalidImageError(f"{describe_input(image)}: no such file")
        size = path.stat().st_size
        if size > max_file_bytes:
            raise InvalidImageError(f"{describe_input(image)}: {size} bytes is over the {max_file_bytes}-byte limit")
        return path.read_bytes()
    data = bytes(image)
    if len(data) > max_file_bytes:
        raise InvalidImageError(f"{describe_input(image)}: over the {max_file_bytes}-byte limit")
    return data


def decode_image(data: bytes, name: str, max_image_pixels: int) -> Image.Image:
    if not data:
        raise InvalidImageError(f"{name}: empty input, expected a JPEG, PNG, WebP, GIF, BMP or TIFF image")
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as error:
        raise InvalidImageError(f"{name}: the image is over the limit of {max_image_pixels} pixels ({error})") from error
    except (UnidentifiedImageError, OSError) as error:
        raise InvalidImageError(f"{name}: not a readable image (JPEG, PNG, WebP, GIF, BMP or TIFF expected)") from error
    # Check the header's size before decoding a single pixel: a few-KB PNG can claim 30000x30000.
    check_pixel_limit(image.width, image.height, name, max_image_pixels)
    try:
        image.seek(0)  # animated GIF/WebP: the first frame
        image.load()
    except (OSError, SyntaxError, ValueError) as error:
        raise InvalidImageError(f"{name}: the image data is corrupt or truncated ({error})") from error
    return image


def check_pixel_limit(width: int, height: int, name: str, max_image_pixels: int) -> None:
    if width * height > max_image_pixels:
        raise InvalidImageError(f"{name}: {width}x{height} pixels is over the limit of {max_image_pixels} pixels")
    if width < 1 or height < 1:
        raise InvalidImageError(f"{name}: the image has no pixels")


def array_to_image(array: np.ndarray, name: str) -> Image.Image:
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise InvalidImageError(f"{name}: expected an HxW, HxWx3 or HxWx4 array")
    if array.dtype == np.uint16:
        array = (array // 257).astype(np.uint8)
    elif np.issubdtype(array.dtype, np.floating):
        # Float images are taken as 0..1, the convention of skimage and torchvision.
        array = (np.clip(np.nan_to_num(array), 0.0, 1.0) * 255).round().astype(np.uint8)
    elif array.dtype != np.uint8:
        raise InvalidImageError(f"{name}: expected uint8, uint16 or float pixel values")
    return Image.fromarray(np.ascontiguousarray(array))


def to_rgb(image: Image.Image) -> Image.Image:
    """Upright RGB from any PIL mode: EXIF orientation applied, 16-bit scaled, transparency flattened onto white."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        pixels = np.asarray(image, dtype=np.float64)
        scale = 257.0 if pixels.max() > 255 else 1.0
        image = Image.fromarray((pixels / scale).clip(0, 255).astype(np.uint8))
    elif image.mode == "F":
        image = Image.fromarray(np.asarray(image).clip(0, 255).astype(np.uint8))
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, WHITE + (255,))
        image = Image.alpha_composite(background, image)
    return image.convert("RGB")


def pad_to_aspect(image: Image.Image, height: int, width: int) -> Image.Image:
    """Pad with white to the target aspect ratio, so the whole item stays in frame and keeps its proportions."""
    target = width / height
    if abs(image.width / image.height - target) < 1e-3:
        return image
    if image.width / image.height > target:
        canvas = Image.new("RGB", (image.width, round(image.width / target)), WHITE)
    else:
        canvas = Image.new("RGB", (round(image.height * target), image.height), WHITE)
    canvas.paste(image, ((canvas.width - image.width) // 2, (canvas.height - image.height) // 2))
    return canvas


class FashionTaggerImageProcessor(BaseImageProcessor):
    r"""
    Turns product photos into the tagger's `pixel_values`.

    Accepts PIL images, numpy arrays (HxW, HxWx3, HxWx4; uint8, uint16 or 0..1 floats), file paths and encoded bytes.
    Every input becomes upright RGB: EXIF orientation is applied; L, LA, P, RGBA, CMYK and 16-bit images are converted,
    transparency flattened onto white. The image is padded with white to the model's aspect ratio, resized and
    normalised. Anything that is not an image raises [`InvalidImageError`] naming the input.

    Args:
        size (`dict[str, int]`, *optional*, defaults to `{"height": 128, "width": 96}`):
            Output size.
        image_mean (`list[float]`, *optional*, defaults to `[0.5, 0.5, 0.5]`):
            Normalisation mean.
        image_std (`list[float]`, *optional*, defaults to `[0.5, 0.5, 0.5]`):
            Normalisation standard deviation.
        max_image_pixels (`int`, *optional*, defaults to 40,000,000):
            Largest width x height accepted, checked before decoding (decompression bombs).
        max_file_bytes (`int`, *optional*, defaults to 20 MiB):
            Largest encoded file accepted.
    """

    model_input_names = ["pixel_values"]

    def __init__(
        self,
        size: dict[str, int] | None = None,
        image_mean: list[float] | None = None,
        image_std: list[float] | None = None,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.size = dict(size or {"height": 128, "width": 96})
        self.image_mean = list(image_mean or [0.5, 0.5, 0.5])
        self.image_std = list(image_std or [0.5, 0.5, 0.5])
        self.max_image_pixels = max_image_pixels
        self.max_file_bytes = max_file_bytes

    @classmethod
    def from_model_config(cls, config, **kwargs) -> "FashionTaggerImageProcessor":
        height, width = config.image_size
        return cls(size={"height": height, "width": width}, image_mean=config.image_mean, image_std=config.image_std, **kwargs)

    def load_image(self, image) -> Image.Image:
        """Decode one input of any accepted kind into an upright RGB PIL image, or raise `InvalidImageError`."""
        name = describe_input(image)
        if isinstance(image, Image.Image):
            check_pixel_limit(image.width, image.height, name, self.max_image_pixels)
            return to_rgb(image)
        if isinstance(image, np.ndarray):
            height, width = image.shape[:2] if image.ndim >= 2 else (0, 0)
            check_pixel_limit(width, height, name, self.max_image_pixels)
            return to_rgb(array_to_image(image, name))
        if isinstance(image, (str, os.PathLike, bytes, bytearray, memoryview)):
            data = read_image_bytes(image, self.max_file_bytes)
            return to_rgb(decode_image(data, name, self.max_image_pixels))
        raise InvalidImageError(f"{name}: expected a PIL image, a numpy array, a file path or encoded image bytes")

    def preprocess(self, images, return_tensors="pt", **kwargs) -> BatchFeature:
        """`images`: one image or a list of them, of any accepted kind. Returns `pixel_values` `(batch, 3, H, W)`."""
        if not isinstance(images, (list, tuple)):
            images = [images]
        pixels = np.stack([self.to_model_size(self.load_image(image)) for image in images])
        pixel_values = self.normalize_pixels(torch.from_numpy(pixels))
        if return_tensors != "pt":
            pixel_values = pixel_values.numpy()
        return BatchFeature({"pixel_values": pixel_values}, tensor_type=return_tensors)

    def to_model_size(self, image: Image.Image) -> np.ndarray:
        """An RGB PIL image -> `(H, W, 3)` uint8 at the model's size, padded with white to its aspect ratio."""
        height, width = self.size["height"], self.size["width"]
        image = pad_to_aspect(image, height, width).resize((width, height), Image.Resampling.BICUBIC)
        return np.array(image)  # writable, so torch.from_numpy shares it without a warning

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
