"""The "not a product photo" flag through the public pipeline: how often it flags product and phone photos, real
photos of other things and generated images, and how well its score ranks them (AUROC).

    python benchmarks/ood_photos.py                       # once: 142 licensed non-fashion photos in /work/ood-photos
    python benchmarks/ood_pipeline.py                     # the shipped model as configured
    python benchmarks/ood_pipeline.py --upright-search '{"below": 0.1, "margin": 0.9}'   # another setting, same photos

`fashion-hf calibrate` measures its detector on the embeddings of photos as given. The pipeline first tries the
quarter turns of photos that look turned (`config.upright_search`), tags a turn instead where it looks clearly
upright, and flags a photo whose turn looks more upright by over `flag_margin`: both change what is flagged. This
scores what a user gets. In-distribution photos are calibration's held-out halves (product validation without its
copies of training photos, halved by image digest; phone validation halved by photographer), the ones its figures
are measured on; out of distribution, the photos of `--ood-photos` and `generated_non_photos()`.
"""

import argparse
import json
from pathlib import Path

import numpy as np
from bench_utils import PRODUCT_IMAGES  # noqa: F401  (sets HF_HUB_OFFLINE first)
from PIL import Image
from transformers import pipeline  # noqa: E402

from fashion_hf import data  # noqa: E402
from fashion_hf.calibration import binary_auroc  # noqa: E402
from fashion_hf.training.calibrate import generated_non_photos, halves  # noqa: E402
from fashion_hf.training.evaluate import duplicate_rows  # noqa: E402

IN_DISTRIBUTION = ("product", "phone")


def held_out_photos(limit: int | None) -> dict[str, list[Image.Image]]:
    """Calibration's held-out halves, the first `limit` photos of each (all without one)."""
    product = data.load_fashion_product_images(split="validation")
    copies = set(duplicate_rows(product, data.load_fashion_product_images(split="train")))
    product = product.select([row for row in range(len(product)) if row not in copies])
    phone = data.load_clothing_user_photos(split="validation")
    sets = {"product": (product, data.image_sha256s(product)), "phone": (phone, phone.with_format(None)["sender_id"])}
    photos = {}
    for name, (dataset, keys) in sets.items():
        _, held_out = halves(keys)
        rows = held_out[:limit].tolist()
        if not rows:
            raise SystemExit(f"no held-out {name} photos: the {name} validation split is empty or all copies of train")
        photos[name] = [image.convert("RGB") for image in dataset.select(rows).with_format(None)["image"]]
    return photos


def ood_scores(tagger, images: list, batch_size: int) -> np.ndarray:
    return np.asarray([result["out_of_distribution"]["score"] for result in tagger(images, batch_size=batch_size)])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="models/fashion-tagger")
    parser.add_argument("--ood-photos", type=Path, default=Path("/work/ood-photos/images"),
                        help="a folder of real photos that are not clothing (benchmarks/ood_photos.py builds it)")
    parser.add_argument("--upright-search", default=None, metavar="JSON",
                        help="a config.upright_search to use instead of the model's, or null for none")
    parser.add_argument("--limit", type=int, default=None, help="at most N held-out photos per source (a quick look)")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)
    tagger = pipeline("fashion-tagging", model=args.model)
    if tagger.model.config.ood_thresholds is None:
        raise SystemExit(f"{args.model} has no out-of-distribution detector: run fashion-hf calibrate first")
    if args.upright_search is not None:
        tagger.model.config.upright_search = json.loads(args.upright_search)
    real = sorted(path for path in args.ood_photos.glob("*") if path.suffix.lower() in {".jpg", ".jpeg", ".png"})
    if not real:
        raise SystemExit(f"no photos in {args.ood_photos}: build them with benchmarks/ood_photos.py")
    sets = held_out_photos(args.limit) | {
        "real non-fashion": [Image.open(path).convert("RGB") for path in real],
        "generated": [image.convert("RGB") for _, image in generated_non_photos()],
    }
    scores = {name: ood_scores(tagger, images, args.batch_size) for name, images in sets.items()}
    in_distribution = np.concatenate([scores[name] for name in IN_DISTRIBUTION])
    report = {"upright_search": tagger.model.config.upright_search, "sets": {}}
    print(f"upright_search: {json.dumps(report['upright_search'])}\n")
    print("| photos | count | flagged | AUROC against the product and phone photos |\n|---|---:|---:|---:|")
    for name, values in scores.items():
        entry = {"count": len(values), "flagged": float((values > 1).mean())}
        if name not in IN_DISTRIBUTION:
            entry["auroc"] = binary_auroc(in_distribution, values)
        report["sets"][name] = entry
        auroc = f"{entry['auroc']:.3f}" if "auroc" in entry else "–"
        print(f"| {name} | {entry['count']} | {entry['flagged']:.1%} | {auroc} |")
    return report


if __name__ == "__main__":
    main()
