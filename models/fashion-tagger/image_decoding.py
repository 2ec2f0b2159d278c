"""The one safe image decoder: every image the project reads (processor, app uploads, feedback store) goes through it.

Every allocation is bounded before it happens: the file's size is checked before it is read, the header's size
(pixel limit and aspect ratio) before a pixel is decoded, only the accepted formats' parsers ever see the bytes, and
each conversion holds at most 4 bytes per pixel of that checked size. The limits are one `ImageLimits`, given by
the caller. Imports only numpy and Pillow and nothing of this package, so `save_pretrained` ships it beside the image
processor (transformers copies a remote-code file's relative imports) and the feedback store uses it without loading
torch or transformers.

    >>> limits = ImageLimits(max_image_pixels=40_000_000, max_file_bytes=20 * 1024 * 1024)
    >>> image = load_rgb_image("shirt.jpg", limits)  # the processor: upright RGB pixels
    >>> decoded = read_image(upload_bytes, limits, "shirt.jpg", srgb=True)  # the store: sRGB, and the bytes' SHA-256
"""

import hashlib
import io
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageCms, ImageOps, UnidentifiedImageError

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
ENCODED_INPUTS = (str, os.PathLike, bytes, bytearray, memoryview)  # read as a file's bytes, then decoded
# The modes an embedded colour profile is applied to; any other keeps its raw values.
COLOUR_MANAGED_MODES = ("RGB", "CMYK", "L")


class InvalidImageError(ValueError):
    """The input is not an image the tagger can read; the message names the input and what would be valid."""


@dataclass(frozen=True)
class ImageLimits:
    """What one input may cost, each checked before it is paid.

    Args:
        max_image_pixels (`int`, *optional*, defaults to 40,000,000):
            Largest width x height, read from the header before decoding (decompression bombs).
        max_file_bytes (`int`, *optional*, defaults to 20 MiB):
            Largest encoded input, checked before a file is read.
    """

    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES


@dataclass(frozen=True)
class DecodedImage:
    """An input decoded by `read_image`."""

    image: Image.Image  # upright RGB
    sha256: str  # hex SHA-256 of the file's bytes (path, bytes) or, for a decoded input, `pixel_sha256(image)`


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


def read_image_bytes(image, limits: ImageLimits, name: str | None = None) -> bytes:
    """The raw bytes of a path or bytes-like input, refusing oversized files before reading them.

    `name` is what messages call the input (default `describe_input(image)`): a server names a file by its user's
    file name, so that its own folders never reach the user.
    """
    name = name or describe_input(image)
    limit = limits.max_file_bytes
    if isinstance(image, (str, os.PathLike)):
        text = os.fspath(image)
        if text.startswith(("http://", "https://")):
            raise InvalidImageError(f"{name}: URLs are not fetched; pass a local path, bytes or a PIL image")
        path = Path(text)
        if not path.is_file():
            raise InvalidImageError(f"{name}: not an existing file (no such file, or a folder)")
        try:
            size = path.stat().st_size
            if size > limit:
                raise InvalidImageError(f"{name}: {size} bytes is over the {limit}-byte limit")
            return path.read_bytes()
        except OSError as error:
            raise InvalidImageError(f"{name}: the file cannot be read ({error.strerror})") from None
    data = bytes(image)
    if len(data) > limit:
        raise InvalidImageError(f"{name}: {len(data)} bytes is over the {limit}-byte limit")
    return data


def decode_image(data: bytes, name: str, limits: ImageLimits) -> Image.Image:
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
        check_image_size(*checked, name, limits)
        image.seek(0)  # animated GIF/WebP, multi-page TIFF, MPO: the first frame
        image.load()
        if image.size != checked:  # no accepted format does this; a container like ICO does (and is not accepted)
            size = f"{image.width}x{image.height}"
            raise InvalidImageError(f"{name}: the decoded image is {size}, not the size its header said")
        return upright(image)
    except InvalidImageError:
        raise
    except Image.DecompressionBombError as error:  # Pillow's own, looser limit, checked while opening
        raise InvalidImageError(f"{name}: the image is over the limit of {limits.max_image_pixels} pixels") from error
    except UnidentifiedImageError as error:
        raise InvalidImageError(f"{name}: not a readable image; accepted formats: {ACCEPTED_FORMATS_TEXT}") from error
    except DECODER_ERRORS as error:
        if "decompressed data too large" in str(error).lower():
            raise InvalidImageError(
                f"{name}: a metadata chunk (text or colour profile) decompresses to too much data; save the image "
                "again without metadata"
            ) from error
        raise InvalidImageError(f"{name}: the image data is corrupt or truncated ({error})") from error


def check_image_size(width: int, height: int, name: str, limits: ImageLimits) -> None:
    """Refuse, before decoding or converting, an image over the pixel limit or of an absurd aspect ratio."""
    if width < 1 or height < 1:
        raise InvalidImageError(f"{name}: the image has no pixels")
    limit = limits.max_image_pixels
    if width * height > limit:
        raise InvalidImageError(f"{name}: {width}x{height} pixels is over the limit of {limit} pixels")
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


def to_rgb(image: Image.Image, name: str, *, srgb: bool = False) -> Image.Image:
    """Upright RGB from any PIL mode: EXIF orientation applied, 16-bit scaled, transparency flattened onto white.

    With `srgb`, the pixels are first converted from the image's embedded colour profile to sRGB. Each step holds at
    most 4 bytes per pixel of the (already checked) image size besides its input.
    """
    try:
        icc_profile = image.info.get("icc_profile") if srgb else None
        image = upright(image)
        if icc_profile and image.mode in COLOUR_MANAGED_MODES:
            image = profile_to_srgb(image, icc_profile)
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


def profile_to_srgb(image: Image.Image, icc_profile: bytes) -> Image.Image:
    """The pixels converted from `icc_profile` to sRGB, as RGB; unchanged when the profile cannot be read."""
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(icc_profile))
        return ImageCms.profileToProfile(image, source, ImageCms.createProfile("sRGB"), outputMode="RGB")
    except (ImageCms.PyCMSError, OSError, ValueError):
        return image  # the raw values are the best guess left


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


def pixel_sha256(image: Image.Image) -> str:
    """Hex SHA-256 of `b"RGB <width>x<height>\\n"` and the pixels of an RGB image: what identifies a decoded input."""
    digest = hashlib.sha256(f"RGB {image.width}x{image.height}\n".encode("ascii"))
    digest.update(image.tobytes())
    return digest.hexdigest()


def decoded_input(image, name: str, limits: ImageLimits) -> Image.Image:
    """A PIL image or numpy array, once its size is checked, as a PIL image; any other object is refused."""
    if isinstance(image, Image.Image):
        check_image_size(image.width, image.height, name, limits)
        return image
    if isinstance(image, np.ndarray):
        height, width = image.shape[:2] if image.ndim >= 2 else (0, 0)
        check_image_size(width, height, name, limits)
        return array_to_image(image, name)
    raise InvalidImageError(
        f"{name}: expected a PIL image, a numpy array, a file path or encoded image bytes; a decoded image must be a "
        "PIL image or a numpy array"
    )


def load_rgb_image(image, limits: ImageLimits, name: str | None = None, *, srgb: bool = False) -> Image.Image:
    """Any accepted input (PIL image, numpy array, path, encoded bytes) as upright RGB, or `InvalidImageError`.

    `name` is what messages call the input (default `describe_input(image)`). `srgb` converts the pixels from their
    embedded colour profile to sRGB (`to_rgb`); the image processor leaves them as stored, as the model was trained.
    """
    name = name or describe_input(image)
    if isinstance(image, ENCODED_INPUTS):
        image = decode_image(read_image_bytes(image, limits, name), name, limits)
    else:
        image = decoded_input(image, name, limits)
    return to_rgb(image, name, srgb=srgb)


def read_image(image, limits: ImageLimits, name: str | None = None, *, srgb: bool = False) -> DecodedImage:
    """`load_rgb_image`, with the SHA-256 that identifies the input: of the file's bytes for a path or bytes (the
    hash of the upload itself), of the upright RGB pixels for a PIL image or an array (`pixel_sha256`)."""
    name = name or describe_input(image)
    if isinstance(image, ENCODED_INPUTS):
        data = read_image_bytes(image, limits, name)
        return DecodedImage(load_rgb_image(data, limits, name, srgb=srgb), hashlib.sha256(data).hexdigest())
    rgb = load_rgb_image(image, limits, name, srgb=srgb)
    return DecodedImage(rgb, pixel_sha256(rgb))


__all__ = [
    "ACCEPTED_FORMATS", "DecodedImage", "ImageLimits", "InvalidImageError", "check_image_size", "decode_image",
    "describe_input", "load_rgb_image", "read_image",
]  # fmt: skip
