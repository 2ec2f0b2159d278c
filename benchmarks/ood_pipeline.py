"""The "not a product photo" flag through the public pipeline: how often it flags product and phone photos, real
photos of other things and generated images, and how well its score ranks them (AUROC).

    python benchmarks/ood_photos.py                       # once: 142 licensed non-fashion photos in /work/ood-photos
    python benchmarks/ood_pipeline.py                     # the shipped model as configured
    python benchmarks/ood_pipeline.py --upright-search '{"below": 0.1, "margin": 0.9}'   # another setting, same photos

The pipeline first tries the quarter turns of photos that look turned (`config.upright_search`), tags a turn
instead where it looks clearly upright, and flags a photo whose turn looks more upright by over `flag_margin`: both
change what is flagged. `fashion-hf calibrate` measures that too (`ood.through_search`), with the model's own
encoders; this scores what a user gets, through `pipeline("fashion-tagging")`, and can try another setting.
In-distribution photos are calibration's held-out halves (product validation without its copies of training photos,
halved by image digest; phone validation halved by photographer), the ones its figures are measured on; out of
distribution, the photos of `--ood-photos` and `generated_non_photos()`.
"""

import argparse
import json
from pathlib import Path

import numpy as np
from bench_utils import PRODUCT_IMAGES  # noqa: F401  (sets HF_HUB_OFFLINE first)
from PIL import Image
from transformers import pipeline  # noqa: E402

from fashion_hf.training.calibrate import flag_report, generated_non_photos, held_out_half, validation_sources  # noqa: E402

IN_DISTRIBUTION = ("product", "phone")


def held_out_photos(limit: int | None) -> dict[str, list[Image.Image]]:
    """Calibration's held-out halves, the first `limit` photos of each (all without one)."""
    photos = {}
    for name, (dataset, keys) in validation_sources().items():
        held_out = held_out_half(dataset, keys)
        held_out = held_out.select(range(min(limit, len(held_out)))) if limit else held_out
        if not len(held_out):
            raise SystemExit(f"no held-out {name} photos: the {name} validation split is empty or all copies of train")
        photos[name] = [image.convert("RGB") for image in held_out.with_format(None)["image"]]
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
    measured = flag_report({name: scores[name] for name in IN_DISTRIBUTION},
                           {name: values for name, values in scores.items() if name not in IN_DISTRIBUTION})  # fmt: skip
    report = {"upright_search": tagger.model.config.upright_search, "sets": {}}
    print(f"upright_search: {json.dumps(report['upright_search'])}\n")
    print("| photos | count | flagged | AUROC against the product and phone photos |\n|---|---:|---:|---:|")
    for name, values in scores.items():
        entry = {"count": len(values), "flagged": measured["flagged"][name]}
        if name in measured["auroc"]:
            entry["auroc"] = measured["auroc"][name]
        report["sets"][name] = entry
        auroc = f"{entry['auroc']:.3f}" if "auroc" in entry else "–"
        print(f"| {name} | {entry['count']} | {entry['flagged']:.1%} | {auroc} |")
    return report


if __name__ == "__main__":
    main()
