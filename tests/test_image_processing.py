"""FashionTaggerImageProcessor: every input kind and mode becomes upright RGB; non-images get a clear error."""

import io
import os
import subprocess
import sys
import textwrap
import time
import tracemalloc

import numpy as np
import pytest
import torch
from helpers import REPO, encode, product_photo
from hostile_images import (
    HOSTILE,
    UNLISTED_FORMAT,
    UNLISTED_FORMATS,
    address_space_cap,
    grey_png,
    memory_kib,
    reset_peak_memory,
    write_hostile,
)
from PIL import Image

from fashion_hf import FashionTaggerImageProcessor, InvalidImageError
from fashion_hf.image_decoding import ACCEPTED_FORMATS, accepted_suffixes

processor = FashionTaggerImageProcessor(size={"height": 64, "width": 48})


def pixel_values(image):
    return processor(image, return_tensors="pt")["pixel_values"]


def test_output_shape_and_normalisation():
    values = pixel_values(product_photo())
    assert values.shape == (1, 3, 64, 48) and values.dtype == torch.float32
    assert values.min() >= -1.0 and values.max() <= 1.0
    assert torch.allclose(values[0, :, 0, 0], torch.ones(3), atol=0.02)  # white corner -> +1 with mean/std 0.5


@pytest.mark.parametrize("kind", ["pil", "path", "bytes", "bytearray", "numpy"])
def test_every_input_kind_gives_the_same_pixels(tmp_path, kind):
    image = product_photo()
    data = encode(image, "PNG")
    path = tmp_path / "photo.png"
    path.write_bytes(data)
    inputs = {"pil": image, "path": str(path), "bytes": data, "bytearray": bytearray(data), "numpy": np.asarray(image)}
    assert torch.allclose(pixel_values(inputs[kind]), pixel_values(image))


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16", "1"])
def test_every_mode_becomes_rgb(mode):
    rgb = product_photo(colour=(0, 0, 0))  # black on white survives even 1-bit
    image = rgb.convert("L").convert(mode) if mode in ("I;16", "1") else rgb.convert(mode)
    if mode == "I;16":
        image = Image.fromarray((np.asarray(rgb.convert("L"), dtype=np.uint16) * 257))
    loaded = processor.load_image(image)
    assert loaded.mode == "RGB" and loaded.size == rgb.size
    assert np.abs(np.asarray(loaded, dtype=int) - np.asarray(rgb.convert("L").convert("RGB"), dtype=int)).max() <= 40


def test_transparency_is_flattened_onto_white():
    image = Image.new("RGBA", (10, 10), (255, 0, 0, 0))
    assert processor.load_image(image).getpixel((5, 5)) == (255, 255, 255)


def test_exif_orientation_is_applied():
    upright = product_photo(size=(40, 80))
    rotated = upright.transpose(Image.Transpose.ROTATE_90)  # stored sideways ...
    exif = Image.Exif()
    exif[0x0112] = 8  # ... with the EXIF tag that says "rotate 90 CW to display"
    data = encode(rotated, "JPEG", exif=exif, quality=95)
    loaded = processor.load_image(data)
    assert loaded.size == upright.size


def test_sixteen_bit_arrays_and_float_arrays_are_scaled():
    grey = np.full((8, 6, 3), 128, dtype=np.uint8)
    assert processor.load_image(grey.astype(np.uint16) * 257).getpixel((0, 0)) == (128, 128, 128)
    assert processor.load_image(grey / 255.0).getpixel((0, 0)) == (128, 128, 128)


def test_a_batch_of_mixed_inputs():
    values = processor([product_photo(), encode(product_photo()), np.zeros((5, 5, 3), np.uint8)], return_tensors="pt")
    assert values["pixel_values"].shape == (3, 3, 64, 48)


def test_wide_images_are_padded_not_squashed():
    wide = Image.new("RGB", (200, 50), (255, 255, 255))
    wide.paste(Image.new("RGB", (196, 50), (0, 0, 0)), (2, 0))  # a wide item on studio white: padded, not cropped
    values = pixel_values(wide)[0]
    assert values[:, 0, :].mean() > 0.9  # top rows are white padding
    assert values[:, 32, :].mean() < -0.9  # the black strip stays in the middle


def scene_photo(size=(400, 300)) -> Image.Image:
    """A landscape phone-style photo: a blue item in the middle of a grey room, a red mark at each far side."""
    width, height = size
    image = Image.new("RGB", size, (120, 110, 100))
    image.paste(Image.new("RGB", (width // 4, height // 2), (30, 30, 200)), (3 * width // 8, height // 4))
    for left in (0, width - width // 10):
        image.paste(Image.new("RGB", (width // 10, height), (220, 20, 20)), (left, 0))
    return image


def test_a_landscape_photo_of_a_scene_loses_its_sides_down_to_square():
    photo = scene_photo()
    assert processor.framed(photo).size == (300, 300)
    pixels = processor.to_model_size(photo)
    assert pixels.shape == (64, 48, 3)
    red = (pixels[..., 0] > 180) & (pixels[..., 1] < 80)
    assert not red.any()  # the far sides are cut off, not squeezed in
    white_rows = (pixels.min(-1) > 250).all(1)
    assert white_rows[:7].all() and not white_rows[8:56].any()  # square into 48 x 64: 8 white rows above and below
    blue = (pixels[..., 2] > 180) & (pixels[..., 0] < 80)
    letterboxed = FashionTaggerImageProcessor(size={"height": 64, "width": 48}, widest_aspect=None).to_model_size(photo)
    blue_letterboxed = (letterboxed[..., 2] > 180) & (letterboxed[..., 0] < 80)
    assert blue.sum() > 1.5 * blue_letterboxed.sum()  # letterboxed, the item keeps about 56% of its size


def test_a_wide_studio_shot_on_white_is_padded_whole():
    sunglasses = Image.new("RGB", (400, 200), (255, 255, 255))
    sunglasses.paste(Image.new("RGB", (360, 40), (10, 10, 10)), (20, 80))
    assert processor.framed(sunglasses) is sunglasses
    pixels = processor.to_model_size(sunglasses)
    dark_columns = (pixels.max(-1) < 60).any(0)
    assert dark_columns[3] and dark_columns[-4] and not dark_columns[[0, -1]].any()  # both ends, with white beyond


@pytest.mark.parametrize("size", [(300, 400), (300, 300), (90, 160)])
def test_portrait_and_square_photos_are_never_cropped(size):
    photo = scene_photo(size)
    assert processor.framed(photo) is photo


def test_widest_aspect_round_trips_and_none_turns_cropping_off(tmp_path):
    FashionTaggerImageProcessor(widest_aspect=1.25).save_pretrained(tmp_path)
    loaded = FashionTaggerImageProcessor.from_pretrained(tmp_path)
    assert loaded.widest_aspect == 1.25 and loaded.framed(scene_photo()).size == (375, 300)
    never = FashionTaggerImageProcessor(widest_aspect=None)
    assert never.framed(scene_photo()).size == (400, 300)
    with pytest.raises(ValueError, match="widest_aspect must be positive"):
        FashionTaggerImageProcessor(widest_aspect=0)


@pytest.mark.parametrize(
    "bad, message",
    [
        (b"", "empty"),
        (b"this is plain text, not a picture\n" * 3, "not a readable image"),
        ("no/such/file.jpg", "no such file"),
        (12345, "expected a PIL image"),
        (np.zeros((4, 4, 2), np.uint8), "HxW"),
    ],
)
def test_non_images_raise_a_clear_error(bad, message):
    with pytest.raises(InvalidImageError, match=message):
        processor.load_image(bad)


def test_text_file_renamed_jpg_names_the_file(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("<html>hello</html>")
    with pytest.raises(InvalidImageError, match="notes.jpg"):
        processor(str(path))


def test_truncated_jpeg_raises_a_clear_error():
    data = encode(Image.effect_noise((256, 256), 80).convert("RGB"), "JPEG", quality=95)
    with pytest.raises(InvalidImageError, match="corrupt or truncated"):
        processor.load_image(data[: len(data) // 2])


def test_decompression_bomb_is_refused_before_decoding():
    bomb = io.BytesIO()
    Image.new("1", (30000, 30000)).save(bomb, format="PNG")
    assert len(bomb.getvalue()) < 200_000
    with pytest.raises(InvalidImageError, match="over the limit"):
        processor.load_image(bomb.getvalue())


def test_oversized_file_is_refused_before_reading(tmp_path):
    small_limit = FashionTaggerImageProcessor(max_file_bytes=1000)
    path = tmp_path / "big.png"
    path.write_bytes(encode(Image.effect_noise((200, 200), 50), "PNG"))
    with pytest.raises(InvalidImageError, match="byte limit"):
        small_limit.load_image(str(path))


def test_limits_round_trip_through_save_pretrained(tmp_path):
    FashionTaggerImageProcessor(max_image_pixels=1234, max_file_bytes=5678).save_pretrained(tmp_path)
    loaded = FashionTaggerImageProcessor.from_pretrained(tmp_path)
    assert (loaded.max_image_pixels, loaded.max_file_bytes) == (1234, 5678)


# --- hostile files: refused before anything large is allocated, with a clear error -------------------------------


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_file_is_refused_with_a_clear_error_naming_it(tmp_path, case):
    path = write_hostile(tmp_path)[case]
    name, _, message = HOSTILE[case]
    with address_space_cap(), pytest.raises(InvalidImageError, match=message) as error:
        processor.load_image(str(path))
    assert name in str(error.value)


@pytest.mark.parametrize("size", [(40_000_000, 1), (1, 40_000_000)], ids=["wide", "tall"])
def test_extreme_aspect_ratio_is_refused_in_a_blink_and_without_memory(size):
    # Within the pixel limit, but padding it to the model's aspect ratio once meant a canvas sized from its long side.
    data = grey_png(*size)
    assert len(data) < 100_000
    reset_peak_memory()
    before, start = memory_kib(), time.perf_counter()
    with address_space_cap(), pytest.raises(InvalidImageError, match="aspect ratio .* is over the limit"):
        processor.load_image(data)
    seconds, growth_mib = time.perf_counter() - start, (memory_kib()["VmHWM"] - before["VmRSS"]) / 1024
    assert seconds < 1.0 and growth_mib < 50, f"{seconds:.2f} s, peak RSS +{growth_mib:.0f} MiB"


@pytest.mark.parametrize(
    "size", [(1080, 1920), (4032, 3024), (1000, 1000), (728, 90), (4000, 500), (20_000, 1000), (600, 12_000)]
)
def test_real_photo_and_banner_aspect_ratios_are_accepted(size):
    # Phone portrait and landscape, square, a web banner (8:1), a panorama, and the 20:1 limit either way.
    assert pixel_values(Image.new("L", size, 90)).shape == (1, 3, 64, 48)


def test_arrays_and_pil_images_of_absurd_aspect_ratio_are_refused_too():
    with pytest.raises(InvalidImageError, match="aspect ratio 1:100 is over the limit of 1:20"):
        processor.load_image(np.zeros((10_000, 100), np.uint8))
    with pytest.raises(InvalidImageError, match="aspect ratio 21:1 is over the limit of 20:1"):
        processor.load_image(Image.new("RGB", (2100, 100)))


def test_no_canvas_is_larger_than_the_input_or_the_output(monkeypatch):
    """Padding happens at the model's size: a 20:1 strip never becomes a 2000x2667 canvas before resizing."""
    sizes, real_new = [], Image.new

    def recording_new(mode, size, *args, **kwargs):
        sizes.append(size)
        return real_new(mode, size, *args, **kwargs)

    monkeypatch.setattr(Image, "new", recording_new)
    pixel_values(Image.new("RGBA", (2000, 100), (10, 10, 10, 128)))
    assert sizes and max(width * height for width, height in sizes) <= 2000 * 100


def test_sixteen_bit_images_are_converted_without_float64_copies():
    # A 40-megapixel 16-bit PNG once took 2 x 320 MB of float64 arrays on the way to 8 bits.
    image = Image.fromarray(np.full((1000, 1000), 40_000, dtype=np.uint16))
    tracemalloc.start()
    try:
        loaded = processor.load_image(image)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert loaded.getpixel((0, 0)) == (155, 155, 155)
    # One float64 copy alone would be 8 bytes per pixel.
    assert peak < 8 * image.width * image.height, f"{peak / 1e6:.1f} MB traced for a 1-megapixel image"


# --- one explicit list of formats ------------------------------------------------------------------------------------


@pytest.mark.parametrize("image_format", ["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "MPO"])
def test_every_accepted_format_is_read(image_format):
    options = {"save_all": True, "append_images": [product_photo()]} if image_format == "MPO" else {}
    assert processor.load_image(encode(product_photo(), image_format, **options)).size == product_photo().size


@pytest.mark.parametrize("kind", list(UNLISTED_FORMATS))
def test_formats_off_the_list_are_refused_without_being_parsed(kind, monkeypatch):
    _, make = UNLISTED_FORMATS[kind]
    parsed = []

    def spying(plugin_format, factory):
        def factory_called(*args):
            parsed.append(plugin_format)
            return factory(*args)

        return factory_called

    Image.init()  # every plugin registered, so that every one is spied on
    for plugin_format, (factory, accept) in list(Image.OPEN.items()):
        if plugin_format not in ACCEPTED_FORMATS:
            monkeypatch.setitem(Image.OPEN, plugin_format, (spying(plugin_format, factory), accept))
    with pytest.raises(InvalidImageError, match=UNLISTED_FORMAT):
        processor.load_image(make())
    assert parsed == []


@pytest.mark.parametrize("image_format", ["PNG", "GIF", "BMP", "TIFF", "WEBP", "JPEG"])
def test_truncated_files_of_every_accepted_format_give_a_clear_error(image_format):
    data = encode(Image.effect_noise((64, 48), 60).convert("RGB"), image_format)
    for cut in range(1, len(data), max(1, len(data) // 50)):
        try:
            processor.load_image(data[:cut])
        except InvalidImageError as error:
            assert "bytes of image data" in str(error)


# --- what the processor declares to transformers ----------------------------------------------------------------------


@pytest.mark.slow
def test_loading_the_processor_and_the_shipped_model_logs_no_backend_fallback(tmp_path):
    # transformers warns "Requested torchvision backend is not available. Falling back to pil backend." when the
    # registered backends do not cover the one it asks for; warning_once, so a fresh process sees it.
    script = textwrap.dedent(f"""
        import fashion_hf
        from transformers import AutoImageProcessor, pipeline
        AutoImageProcessor.from_pretrained({str(REPO / "models" / "fashion-tagger")!r})
        pipeline("fashion-tagging", model={str(REPO / "models" / "fashion-tagger")!r})
        print("loaded")
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "info"}
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and "loaded" in result.stdout, result.stderr[-3000:]
    assert "backend is not available" not in result.stderr and "Falling back" not in result.stderr


def test_save_pretrained_ships_the_decoder_with_the_processor(tmp_path):
    # The processor's remote code imports `.image_decoding`: without it a trust_remote_code load fails.
    FashionTaggerImageProcessor().save_pretrained(tmp_path)
    assert (tmp_path / "image_processing_fashion_tagger.py").is_file() and (tmp_path / "image_decoding.py").is_file()


def test_the_example_catalogue_reads_the_suffixes_of_the_accepted_formats_only():
    suffixes = accepted_suffixes()
    assert {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"} <= suffixes
    assert not {".ico", ".psd", ".tga", ".pcx", ".icns"} & suffixes


def test_quarter_turns_are_made_from_the_turn_source_a_pipeline_keeps():
    processor = FashionTaggerImageProcessor(size={"height": 64, "width": 48})
    small = product_photo(size=(48, 64))
    assert processor.turn_source(small) is small  # fits twice the model's size: nothing is copied
    large = product_photo(size=(600, 800))
    source = processor.turn_source(large)
    assert source.size == (96, 128) and large.size == (600, 800)  # reduced to fit 128 x 128; the photo untouched
    np.testing.assert_array_equal(processor.quarter_turns(source), processor.quarter_turns(large))
