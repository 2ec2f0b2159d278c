"""The one safe image decoder: every image the project reads (processor, app uploads, feedback store) goes through it.

Every allocation is bounded before it happens: the header's size is checked (pixel limit and aspect ratio) before a
pixel is decoded, only the accepted formats' parsers ever see the bytes, and each conversion holds at most 4 bytes per
pixel of that checked size. Imports only numpy and Pillow and nothing of this package, so `save_pretrained` ships it
beside the image processor (transformers copies a remote-code file's relative imports) and the feedback store uses
it without loading torch or transformers.
"""

import io
import os
import struct
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

DEFAULT_MAX_IMAGE_PIXELS = 40_000_000  # a 40-megapixel phone photo decodes; a decompression bomb does not
DEFAULT_MAX_FILE_BYTES = 20 * 1024 * 1024
# Phone photos are 4:3 or 16:9, web banners up to about 11:1, panoramas rarely past 10:1. Past 20:1 the item would
# shrink to a few pixel rows of the model's input, and Pillow's per-row bookkeeping of a 1 x 40,000,000 image costs
# gigabytes: such an image is refused from its header.
MAX_ASPECT_RATIO = 20
# The one list of accepted formats: `Image.open(formats=...)` tries only these Pillow plugins, so ICO, ICNS, PSD, TGA,
# PCX and every other container Pillow knows is refused without being parsed. JPEG includes MPO, the multi-picture
# JPEG that phones write (its first picture is read).
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
ACCEPTED_FORMATS_TEXT = "JPEG, PNG, WebP, GIF, BMP or TIFF"


def accepted_suffixes() -> set[str]:
    """The file name suffixes of the accepted formats (`.jpg`, `.png`, ...), as Pillow registers them."""
    Image.init()
    return {suffix for suffix, format in Image.registered_extensions().items() if format in ACCEPTED_FORMATS}

# What Pillow's decoders raise on malformed input besides OSError (truncated tables, bad offsets, short reads).
DECODER_ERRORS = (
    OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError, TypeError, ZeroDivisionError, struct.error,
)  # fmt: skip
WHITE = (255, 255, 255)  # studio product shots sit on white, so transparency becomes white too
ALPHA_MODES = ("RGBA", "LA", "PA", "La", "RGBa")


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
    """The upright first frame of an encoded image in an accepted format, decoded only once its size is checked.

    Raises `InvalidImageError` naming `name` for anything else: another format, a size over the limits, corrupt or
    truncated data, metadata that inflates past Pillow's safety limit.
    """
    if not data:
        raise InvalidImageError(f"{name}: empty input, expected a {ACCEPTED_FORMATS_TEXT} image")
    try:
        image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
        # The header's size, before a single pixel is decoded: a few-KB PNG can claim 30000x30000 or 40000000x1.
        checked = image.size
        check_image_size(*checked, name, max_image_pixels)
        image.seek(0)  # animated GIF/WebP, multi-page TIFF, MPO: the first frame
        image.load()
        if image.size != checked:  # no accepted format does this; a container like ICO does (and is not accepted)
            size = f"{image.width}x{image.height}"
            raise InvalidImageError(f"{name}: the decoded image is {size}, not the size its header said")
        return upright(image)
    except InvalidImageError:
        raise
    except Image.DecompressionBombError as error:  # Pillow's own, looser limit, checked while opening
        raise InvalidImageError(f"{name}: the image is over the limit of {max_image_pixels} pixels") from error
    except UnidentifiedImageError as error:
        raise InvalidImageError(f"{name}: not a readable image; accepted formats: {ACCEPTED_FORMATS_TEXT}") from error
    except DECODER_ERRORS as error:
        if "decompressed data too large" in str(error).lower():
            raise InvalidImageError(
                f"{name}: a metadata chunk (text or colour profile) decompresses to too much data; save the image "
                "again without metadata"
            ) from error
        raise InvalidImageError(f"{name}: the image data is corrupt or truncated ({error})") from error


def check_image_size(width: int, height: int, name: str, max_image_pixels: int) -> None:
    """Refuse, before decoding or converting, an image over the pixel limit or of an absurd aspect ratio."""
    if width < 1 or height < 1:
        raise InvalidImageError(f"{name}: the image has no pixels")
    if width * height > max_image_pixels:
        raise InvalidImageError(f"{name}: {width}x{height} pixels is over the limit of {max_image_pixels} pixels")
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        ratio = f"{max(width, height) / min(width, height):.1f}".removesuffix(".0")
        wide = width > height
        shape = f"{ratio}:1" if wide else f"1:{ratio}"
        limit = f"{MAX_ASPECT_RATIO}:1" if wide else f"1:{MAX_ASPECT_RATIO}"
        raise InvalidImageError(
            f"{name}: {width}x{height} pixels, aspect ratio {shape} is over the limit of {limit}; crop it so that "
            f"one side is at most {MAX_ASPECT_RATIO} times the other"
        )


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


def to_rgb(image: Image.Image, name: str) -> Image.Image:
    """Upright RGB from any PIL mode: EXIF orientation applied, 16-bit scaled, transparency flattened onto white.

    Each step holds at most 4 bytes per pixel of the (already checked) image size besides its input.
    """
    try:
        image = upright(image)
        if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            image = Image.fromarray(grey_to_uint8(np.asarray(image)))
        if image.mode == "P":
            image = image.convert("RGBA")
        if image.mode in ALPHA_MODES:
            rgba = image.convert("RGBA")
            image = Image.new("RGB", rgba.size, WHITE)
            image.paste(rgba, mask=rgba.getchannel("A"))
            return image
        return image if image.mode == "RGB" else image.convert("RGB")
    except DECODER_ERRORS as error:  # e.g. a LAB TIFF: Pillow has no conversion to RGB
        raise InvalidImageError(f"{name}: its {image.mode} pixels cannot be converted to RGB ({error})") from error


def upright(image: Image.Image) -> Image.Image:
    """The image turned as its EXIF orientation says; the image itself, not a copy, when it needs no turning."""
    if image.getexif().get(ExifTags.Base.Orientation, 1) in (0, 1):
        return image
    return ImageOps.exif_transpose(image)


def grey_to_uint8(pixels: np.ndarray) -> np.ndarray:
    """16- and 32-bit grey values (Pillow modes I;16, I, F) -> uint8, in integer arithmetic: no float64 copies.

    16-bit data (any value over 255) is scaled by 257 (65535 -> 255); 8-bit data kept in a wider mode is kept.
    """
    if pixels.dtype.kind == "f":
        return np.clip(pixels, 0, 255).astype(np.uint8)
    if pixels.max() > 255:
        pixels = pixels // 257  # a new array, clipped in place below
        return np.clip(pixels, 0, 255, out=pixels).astype(np.uint8)
    return np.clip(pixels, 0, 255).astype(np.uint8)


def load_rgb_image(image, max_image_pixels: int, max_file_bytes: int) -> Image.Image:
    """Any accepted input (PIL image, numpy array, path, encoded bytes) as upright RGB, or `InvalidImageError`."""
    name = describe_input(image)
    if isinstance(image, Image.Image):
        check_image_size(image.width, image.height, name, max_image_pixels)
    elif isinstance(image, np.ndarray):
        height, width = image.shape[:2] if image.ndim >= 2 else (0, 0)
        check_image_size(width, height, name, max_image_pixels)
        image = array_to_image(image, name)
    elif isinstance(image, (str, os.PathLike, bytes, bytearray, memoryview)):
        image = decode_image(read_image_bytes(image, max_file_bytes), name, max_image_pixels)
    else:
        raise InvalidImageError(f"{name}: expected a PIL image, a numpy array, a file path or encoded image bytes")
    return to_rgb(image, name)


__all__ = [
    "ACCEPTED_FORMATS", "InvalidImageError", "check_image_size", "decode_image", "describe_input", "load_rgb_image",
]  # fmt: skip
