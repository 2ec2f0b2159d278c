"""FashionTaggerImageProcessor: every input kind and mode becomes upright RGB; non-images get a clear error."""

import io

import numpy as np
import pytest
import torch
from conftest import encode, product_photo
from PIL import Image

from fashion_hf import FashionTaggerImageProcessor, InvalidImageError

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
    wide = Image.new("RGB", (200, 50), (0, 0, 0))
    values = pixel_values(wide)[0]
    assert values[:, 0, :].mean() > 0.9  # top rows are white padding
    assert values[:, 32, :].mean() < -0.9  # the black strip stays in the middle


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
