"""Uploads decoded safely: the user's file name for messages, the bytes' hash, an upright RGB image.

Decoding is `fashion_hf.image_decoding.read_image`'s, the project's one safe decoder; what is left here is what only
an upload has: Gradio's payloads and pasted data URLs.
"""

import base64
import binascii
import os
from dataclasses import dataclass
from pathlib import Path

from fashion_hf.image_decoding import ImageLimits, InvalidImageError, read_image

from .errors import UploadError, shown


@dataclass
class Upload:
    name: str  # the user's file name, for messages (never the server path)
    path: str | None  # where Gradio keeps the file (None for a pasted data URL)
    sha256: str  # of the uploaded bytes
    image: object  # upright RGB PIL image


def payload_parts(payload) -> tuple[str | None, str | None, str]:
    """(path, data URL, name) of a file payload: a Gradio FileData dict (events run with preprocess=False) or a path."""
    if isinstance(payload, dict):
        path, url = payload.get("path"), payload.get("url")
        name = payload.get("orig_name") or (Path(path).name if path else "image")
        if not path and str(url or "").startswith("data:"):
            return None, url, name
        return path, None, name
    if isinstance(payload, (str, os.PathLike)):
        return os.fspath(payload), None, Path(payload).name
    raise UploadError("Expected an image file.")


def read_upload(payload, limits: ImageLimits) -> Upload:
    """Decode one uploaded image within `limits` (the image processor's, which the app sets from its settings), or
    raise `UploadError` naming the file and what would be valid."""
    if not payload:
        raise UploadError("No image: upload, paste or take a photo first.")
    path, data_url, name = payload_parts(payload)
    source = path
    if data_url is not None:
        encoded = data_url.partition(",")[2]
        if len(encoded) * 3 // 4 > limits.max_file_bytes:  # refused before the text is decoded into bytes
            limit_mb = f"{limits.max_file_bytes / 2**20:g} MB"
            raise UploadError(f"{shown(name)}: the pasted image is over the {limit_mb} upload limit.")
        try:
            source = base64.b64decode(encoded)
        except (ValueError, binascii.Error):
            raise UploadError(f"{shown(name)}: the pasted image could not be read.") from None
    elif not path:
        raise UploadError(f"{shown(name)}: the upload did not arrive; please upload it again.")
    return decoded_upload(source, name, path, limits)


def decoded_upload(source, name: str, path: str | None, limits: ImageLimits) -> Upload:
    """`source` (a path or the file's bytes) decoded within `limits`, or `UploadError` naming `name`."""
    try:
        decoded = read_image(source, limits, name)
    except InvalidImageError as error:
        raise UploadError(shown(error, 600)) from None
    return Upload(name=name, path=path, sha256=decoded.sha256, image=decoded.image)
