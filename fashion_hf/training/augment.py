"""Training augmentation that never touches colour (colour is a label), and the "phone photo" shift used to check
robustness: product shots on white become crops, zoom-outs, tilts and busy backgrounds."""

import numpy as np
from PIL import Image, ImageFilter

WHITE_THRESHOLD = 235  # studio backgrounds are near-white; everything brighter on all channels counts as background


def background_mask(image: Image.Image) -> Image.Image:
    """L-mode mask, 255 where the pixel is studio background, softened so replacement leaves no hard halo."""
    pixels = np.asarray(image)
    mask = (pixels >= WHITE_THRESHOLD).all(axis=-1).astype(np.uint8) * 255
    return Image.fromarray(mask).filter(ImageFilter.GaussianBlur(0.6))


def random_background(size, rng: np.random.Generator) -> Image.Image:
    """A flat, gradient or noisy backdrop: walls, floors, beds and shop rails in phone photos."""
    width, height = size
    kind = rng.integers(3)
    base = rng.integers(0, 256, size=3)
    if kind == 0:
        array = np.broadcast_to(base, (height, width, 3))
    elif kind == 1:
        other = rng.integers(0, 256, size=3)
        ramp = np.linspace(0.0, 1.0, height)[:, None, None]
        array = np.broadcast_to(base * (1 - ramp) + other * ramp, (height, width, 3))
    else:
        array = base + rng.normal(0, 40, size=(height, width, 3))
    return Image.fromarray(np.clip(array, 0, 255).astype(np.uint8))


def replace_background(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    return Image.composite(random_background(image.size, rng), image, background_mask(image))


def zoom_out(image: Image.Image, rng: np.random.Generator, fill=(255, 255, 255)) -> Image.Image:
    """The item smaller and off-centre on a larger canvas, as when photographed from further away."""
    scale = rng.uniform(1.0, 1.6)
    canvas = Image.new("RGB", (round(image.width * scale), round(image.height * scale)), fill)
    x = int(rng.integers(0, canvas.width - image.width + 1))
    y = int(rng.integers(0, canvas.height - image.height + 1))
    canvas.paste(image, (x, y))
    return canvas


def random_resized_crop(image: Image.Image, rng: np.random.Generator, min_scale=0.55) -> Image.Image:
    area = image.width * image.height * rng.uniform(min_scale, 1.0)
    aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))) * image.width / image.height
    width = int(min(image.width, round(np.sqrt(area * aspect))))
    height = int(min(image.height, round(np.sqrt(area / aspect))))
    x = int(rng.integers(0, image.width - width + 1))
    y = int(rng.integers(0, image.height - height + 1))
    return image.crop((x, y, x + width, y + height))


def augment_product_photo(image: Image.Image, rng: np.random.Generator, strength: float = 1.0) -> Image.Image:
    """One random training view. Geometry and backdrop change; the item's own colours never do."""
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if rng.random() < 0.4 * strength:
        image = replace_background(image, rng)
    if rng.random() < 0.3 * strength:
        image = zoom_out(image, rng)
    if rng.random() < 0.5 * strength:
        image = random_resized_crop(image, rng)
    if rng.random() < 0.3 * strength:
        image = image.rotate(rng.uniform(-12, 12), resample=Image.Resampling.BILINEAR, expand=False, fillcolor=(255, 255, 255))
    if rng.random() < 0.2 * strength:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0)))
    return image


def augment_geometry(image: Image.Image, rng: np.random.Generator, strength: float = 1.0) -> Image.Image:
    """Flip and crop only: for data that is not studio shots on white (Fashion-MNIST is white on black)."""
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if rng.random() < 0.5 * strength:
        image = random_resized_crop(image, rng, min_scale=0.75)
    return image


AUGMENTATIONS = {"product": augment_product_photo, "geometric": augment_geometry}


def phone_photo_shift(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """The fixed, harder shift used to measure robustness: always a busy backdrop, a zoom-out or crop, and a tilt."""
    image = replace_background(image, rng)
    image = zoom_out(image, rng, fill=tuple(int(v) for v in rng.integers(0, 256, size=3)))
    image = random_resized_crop(image, rng, min_scale=0.7)
    return image.rotate(rng.uniform(-10, 10), resample=Image.Resampling.BILINEAR, fillcolor=(128, 128, 128))
