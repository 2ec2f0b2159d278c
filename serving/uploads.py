"""Uploads decoded safely: the user's file name for messages, the bytes' hash, an upright RGB image."""

import base64
import binascii
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from fashion_hf import InvalidImageError

from .errors import UploadError, shown
from .settings import Settings


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


def read_upload(payload, load_image, settings: Settings) -> Upload:
    """Decode one uploaded image with `load_image` (the image processor's) within the settings' upload limit, or raise
    `UploadError` naming the file and what would be valid."""
    if not payload:
        raise UploadError("No image: upload, paste or take a photo first.")
    path, data_url, name = payload_parts(payload)
    limit, limit_mb = settings.max_upload_bytes, f"{settings.max_upload_mb:g} MB"
    if data_url is not None:
        encoded = data_url.partition(",")[2]
        if len(encoded) * 3 // 4 > limit:
            raise UploadError(f"{shown(name)}: the pasted image is over the {limit_mb} upload limit.")
        try:
            data = base64.b64decode(encoded)
        except (ValueError, binascii.Error):
            raise UploadError(f"{shown(name)}: the pasted image could not be read.") from None
    else:
        if not path or not Path(path).is_file():
            raise UploadError(f"{shown(name)}: the upload did not arrive; please upload it again.")
        size = Path(path).stat().st_size
        if size > limit:
            raise UploadError(f"{shown(name)}: {size / 2**20:.1f} MB is over the {limit_mb} upload limit.")
        data = Path(path).read_bytes()
    try:
        image = load_image(data)
    except InvalidImageError as error:
        raise UploadError(f"{shown(name)}: {shown(error, 400)}") from None
    return Upload(name=name, path=path, sha256=hashlib.sha256(data).hexdigest(), image=image)
