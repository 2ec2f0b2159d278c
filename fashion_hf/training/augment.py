"""Training augmentation that never changes an item's hue (colour is a label), and the "phone photo" shift used to
check robustness: product shots on white become crops, zoom-outs, tilts and busy backgrounds."""

import functools

import numpy as np
import torch
import torchvision.transforms.v2.functional as F
from PIL import Image, ImageFilter
from scipy import ndimage

WHITE_THRESHOLD = 235  # studio backgrounds are near-white; everything brighter on all channels counts as background


def background_mask(image: Image.Image, from_border: bool = False) -> Image.Image:
    """L-mode mask, 255 where the pixel is studio background, softened so replacement leaves no hard halo.
    `from_border` keeps only the white regions that touch the frame, so a white shirt's body stays the shirt."""
    white = (np.asarray(image) >= WHITE_THRESHOLD).all(axis=-1)
    if from_border:
        regions, _ = ndimage.label(white)
        frame = np.concatenate([regions[0], regions[-1], regions[:, 0], regions[:, -1]])
        white = np.isin(regions, frame[frame > 0])
    return Image.fromarray(white.astype(np.uint8) * 255).filter(ImageFilter.GaussianBlur(0.6))


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


def replace_background(
    image: Image.Image, rng: np.random.Generator, backdrops=(), from_border: bool = False
) -> Image.Image:
    """The studio white (`background_mask`) replaced by a random backdrop, or by one of `backdrops` (photographed
    patches, `backdrop_patches`) where there are any."""
    backdrop = photographed_backdrop(image.size, rng, backdrops) if backdrops else random_background(image.size, rng)
    return Image.composite(backdrop, image, background_mask(image, from_border))


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


def tilt(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    return image.rotate(rng.uniform(-12, 12), resample=Image.Resampling.BILINEAR, expand=False, fillcolor=(255, 255, 255))


def soften(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Out of focus, or a small photo enlarged."""
    return image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0)))


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
        image = tilt(image, rng)
    if rng.random() < 0.2 * strength:
        image = soften(image, rng)
    return image


def augment_geometry(image: Image.Image, rng: np.random.Generator, strength: float = 1.0) -> Image.Image:
    """Flip and crop only: for data that is not studio shots on white (Fashion-MNIST is white on black)."""
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if rng.random() < 0.5 * strength:
        image = random_resized_crop(image, rng, min_scale=0.75)
    return image


def backdrop_patches(photos, patches_per_photo: int = 4, size: int = 64) -> list[Image.Image]:
    """Squares cut from the corners of phone photos (a floor, a bed, a carpet: the item is mostly in the middle),
    the backdrops `augment_phone_photo` puts behind studio shots."""
    patches = []
    for photo in photos:
        photo = photo.convert("RGB")
        side = round(0.3 * min(photo.size))
        corners = [(0, 0), (photo.width - side, 0), (0, photo.height - side), (photo.width - side, photo.height - side)]
        for x, y in corners[:patches_per_photo]:
            patches.append(photo.crop((x, y, x + side, y + side)).resize((size, size), Image.Resampling.BILINEAR))
    return patches


def photographed_backdrop(size, rng: np.random.Generator, patches) -> Image.Image:
    patch = patches[int(rng.integers(len(patches)))]
    if rng.random() < 0.5:
        patch = patch.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return patch.resize(size, Image.Resampling.BILINEAR)


def camera_angle(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A camera not square to the item: each corner of the frame moves inwards by up to 12% of its side."""
    width, height = image.size
    corners = [[0, 0], [width - 1, 0], [width - 1, height - 1], [0, height - 1]]
    shift = rng.uniform(0, 0.12, size=(4, 2)) * [width, height] * [[1, 1], [-1, 1], [-1, -1], [1, -1]]
    moved = (np.array(corners) + shift).round().astype(int).tolist()
    return F.perspective(image, corners, moved, fill=[255, 255, 255])


def drape(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Fabric lying or hanging unevenly: a smooth random displacement of up to ~3% of the frame (a 4x4 grid of
    offsets, upsampled), the low-frequency part of creases and folds."""
    grid = torch.from_numpy(rng.normal(0, 0.03, size=(1, 2, 4, 4))).float()
    size = (image.height, image.width)
    displacement = torch.nn.functional.interpolate(grid, size=size, mode="bicubic", align_corners=True)
    return F.elastic(image, displacement.permute(0, 2, 3, 1), fill=[255, 255, 255])


def uneven_light(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Room light instead of a studio's: overall brighter or darker, and a shadow falling off across the frame.
    Every channel is scaled alike, so the item's hue stays what its colour label says."""
    pixels = np.asarray(image, dtype=np.float32)
    height, width = pixels.shape[:2]
    angle = rng.uniform(0, 2 * np.pi)
    ramp = np.cos(angle) * np.linspace(-0.5, 0.5, width)[None, :] + np.sin(angle) * np.linspace(-0.5, 0.5, height)[:, None]
    gain = rng.uniform(0.8, 1.15) * (1 + rng.uniform(0, 0.5) * ramp)
    return Image.fromarray(np.clip(pixels * gain[..., None], 0, 255).astype(np.uint8))


def augment_phone_photo(image: Image.Image, rng: np.random.Generator, strength: float = 1.0, backdrops=()) -> Image.Image:
    """`augment_product_photo`'s changes and what a phone adds: the camera at an angle, fabric that drapes, a real
    floor, bed or carpet behind a studio shot (`backdrops`, from `backdrop_patches`) and room light."""
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if rng.random() < 0.4 * strength:
        image = camera_angle(image, rng)
    if rng.random() < 0.3 * strength:
        image = drape(image, rng)
    if rng.random() < 0.3 * strength:
        image = zoom_out(image, rng)
    if rng.random() < 0.3 * strength:
        image = tilt(image, rng)
    if rng.random() < 0.7 * strength:  # after the geometry, so the white its corners and canvas left is backdrop too
        image = replace_background(image, rng, backdrops, from_border=True)
    if rng.random() < 0.5 * strength:
        image = random_resized_crop(image, rng)
    if rng.random() < 0.5 * strength:
        image = uneven_light(image, rng)
    if rng.random() < 0.2 * strength:
        image = soften(image, rng)
    return image


AUGMENTATIONS = {"product": augment_product_photo, "phone": augment_phone_photo, "geometric": augment_geometry}


def augmentation(name: str, backdrops=()):
    """The augmentation called `name`; the phone one with its photographed backdrops, where there are any."""
    return functools.partial(augment_phone_photo, backdrops=backdrops) if name == "phone" else AUGMENTATIONS[name]


def phone_photo_shift(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """The fixed, harder shift used to measure robustness: always a busy backdrop, a zoom-out or crop, and a tilt."""
    image = replace_background(image, rng)
    image = zoom_out(image, rng, fill=tuple(int(v) for v in rng.integers(0, 256, size=3)))
    image = random_resized_crop(image, rng, min_scale=0.7)
    return image.rotate(rng.uniform(-10, 10), resample=Image.Resampling.BILINEAR, fillcolor=(128, 128, 128))
