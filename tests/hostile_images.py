"""Hostile image files, generated in a few KB each: what the image processor, /tag and /feedback must refuse cheaply.

Each is small on disk and would cost gigabytes, or a raw decoder exception, if handled naively. Shared by
tests/test_image_processing.py (the processor), tests/test_feedback.py (the store) and tests/test_hostile.py (the
app in its own process).
"""

import io
import re
import resource
import struct
import zlib
from contextlib import contextmanager
from pathlib import Path

from PIL import Image

MiB = 1024 * 1024
# The one message every reader gives for a file outside the accepted formats.
UNLISTED_FORMAT = "not a readable image.*JPEG, PNG, WebP, GIF, BMP or TIFF"


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def deflated_zeros(size: int) -> bytes:
    """zlib data that inflates to `size` zero bytes, compressed piece by piece (never `size` bytes in memory)."""
    compressor, pieces, block = zlib.compressobj(9), [], bytes(MiB)
    for start in range(0, size, MiB):
        pieces.append(compressor.compress(block[: min(MiB, size - start)]))
    return b"".join(pieces) + compressor.flush()


def grey_png(width: int, height: int) -> bytes:
    """A valid all-black 8-bit greyscale PNG of any size: 40,000,000 x 1 pixels is 39 KB."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    rows = deflated_zeros((width + 1) * height)  # each row: filter byte 0, then `width` zero pixels
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", rows) + png_chunk(b"IEND", b"")


def encode(image: Image.Image, image_format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **options)
    return buffer.getvalue()


def icon_hiding_a_large_png(claimed: int = 256, real: int = 9000) -> bytes:
    """An ICO whose directory says `claimed` x `claimed` but whose image is a `real` x `real` PNG (81 megapixels)."""
    embedded = encode(Image.new("1", (real, real)), "PNG")
    size_byte = 0 if claimed >= 256 else claimed  # 0 means 256 in an ICO directory
    directory = struct.pack("<BBBBHHII", size_byte, size_byte, 0, 0, 1, 32, len(embedded), 6 + 16)
    return struct.pack("<HHH", 0, 1, 1) + directory + embedded


def png_with_metadata_bomb(kind: bytes, after_pixels: bool = False, inflated: int = 200 * MiB) -> bytes:
    """An 8x8 PNG with a compressed zTXt, iTXt or iCCP chunk that inflates to `inflated` bytes (200 KB on disk)."""
    heads = {b"zTXt": b"Comment\0\0", b"iTXt": b"Comment\0\1\0\0\0", b"iCCP": b"profile\0\0"}
    bomb = png_chunk(kind, heads[kind] + deflated_zeros(inflated))
    data = encode(Image.new("RGB", (8, 8), (200, 30, 30)), "PNG")
    at = data.index(b"IEND" if after_pixels else b"IDAT") - 4
    return data[:at] + bomb + data[at:]


def photo() -> Image.Image:
    image = Image.new("RGB", (48, 64), (255, 255, 255))
    image.paste((30, 60, 160), (8, 8, 40, 56))
    return image


def truncated_psd() -> bytes:
    """A Photoshop header announcing a 64x48 RGB image, then nothing."""
    return b"8BPS" + struct.pack(">H6xHIIHH", 1, 3, 48, 64, 8, 3) + b"\0\0"


# Formats Pillow can decode that are not on the accepted list: each must be refused without being parsed.
UNLISTED_FORMATS = {
    "ICO": ("icon.ico", lambda: encode(photo(), "ICO")),
    "ICNS": ("icon.icns", lambda: encode(photo().resize((64, 64)), "ICNS")),
    "PCX": ("scan.pcx", lambda: encode(photo(), "PCX")),
    "TGA": ("photo.tga", lambda: encode(photo(), "TGA")),
    "PSD (truncated)": ("layers.psd", truncated_psd),
    "QOI (truncated)": ("photo.qoi", lambda: encode(photo(), "QOI")[:40]),
    "DDS (truncated)": ("texture.dds", lambda: encode(photo().resize((64, 64)), "DDS")[:200]),
}

# case -> (the user's file name, bytes maker, regex of the expected error). The app tests use these file names.
HOSTILE = {
    "40000000x1 PNG": ("wide.png", lambda: grey_png(40_000_000, 1), "aspect ratio 40000000:1 is over the limit of 20:1"),
    "1x40000000 PNG": ("tall.png", lambda: grey_png(1, 40_000_000), "aspect ratio 1:40000000 is over the limit of 1:20"),
    "ICO hiding a 9000x9000 PNG": ("favicon.ico", icon_hiding_a_large_png, UNLISTED_FORMAT),
    "zTXt bomb": ("ztxt.png", lambda: png_with_metadata_bomb(b"zTXt"), "metadata.*decompresses to too much data"),
    "zTXt bomb after the pixels": (
        "ztxt-end.png", lambda: png_with_metadata_bomb(b"zTXt", after_pixels=True), "metadata.*too much data"
    ),
    "iTXt bomb": ("itxt.png", lambda: png_with_metadata_bomb(b"iTXt"), "metadata.*decompresses to too much data"),
    "iCCP bomb": ("iccp.png", lambda: png_with_metadata_bomb(b"iCCP"), "metadata.*decompresses to too much data"),
    **{f"{kind} file": (name, make, UNLISTED_FORMAT) for kind, (name, make) in UNLISTED_FORMATS.items()},
}


def write_hostile(folder: Path) -> dict[str, Path]:
    """Every HOSTILE case written under `folder` (one sub-folder per case), by case id."""
    paths = {}
    for index, (case, (name, make, _)) in enumerate(HOSTILE.items()):
        path = folder / f"hostile-{index}" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(make())
        paths[case] = path
    return paths


def memory_kib(pid: int | str = "self") -> dict[str, int]:
    """VmRSS (resident now), VmHWM (resident at its peak) and VmSize (address space) of a process, in KiB."""
    text = Path(f"/proc/{pid}/status").read_text()
    return {key: int(value) for key, value in re.findall(r"^(VmRSS|VmHWM|VmSize):\s+(\d+)", text, re.MULTILINE)}


def reset_peak_memory(pid: int | str = "self") -> None:
    """Start VmHWM afresh at the current resident size (Linux: writing 5 to clear_refs)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


@contextmanager
def address_space_cap(extra: int = 1024 * MiB):
    """Let this process map at most `extra` more bytes while the block runs: a regression fails with MemoryError
    instead of taking the machine's memory (the naive 40000000x1 PNG asks for far more than any machine has)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = memory_kib()["VmSize"] * 1024 + extra
    resource.setrlimit(resource.RLIMIT_AS, (cap if hard == resource.RLIM_INFINITY else min(cap, hard), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
