"""Which heads the detector's `uncertainty` signal should sum: a model's limits fitted again as `fashion-hf calibrate`
fits them (`joint_limits` on calibration's fitting halves), once per set of heads, and what each then flags.

    python benchmarks/ood_photos.py                                   # once: the real non-product photos
    python benchmarks/ood_uncertainty.py models/fashion-tagger        # ~20 min for the shipped ensemble
    python benchmarks/ood_uncertainty.py outputs/candidate --detector-from models/fashion-tagger

The heads are read as the model serves them: its temperatures and label hierarchy, or, for a model not calibrated
yet, both fitted here as `calibrate` fits them. The `distance` and `turned` signals come from the model's detector,
or from `--detector-from`, a calibrated model whose detector reads the same embedding (an ensemble with the same
catalogue members). In-distribution photos are calibration's halves (`--product-photos` of product validation,
without its copies of training photos, and all phone validation photos); outside, the photos of `--ood-photos` and
`generated_non_photos()`.
"""

import argparse
import copy
from pathlib import Path

from bench_utils import PRODUCT_IMAGES  # noqa: F401  (sets HF_HUB_OFFLINE first)

import torch  # noqa: E402
from transformers import AutoModel  # noqa: E402

from fashion_hf.calibration import FeatureDensity, collect, joint_limits  # noqa: E402
from fashion_hf.image_processing_fashion_tagger import FashionTaggerImageProcessor  # noqa: E402
from fashion_hf.training import calibrate  # noqa: E402

HEAD_SETS = {
    "every head": None,
    "masterCategory, subCategory, articleType": ["masterCategory", "subCategory", "articleType"],
    "subCategory, articleType": ["subCategory", "articleType"],
    "articleType": ["articleType"],
}


def scores_of(model, processor, args) -> dict:
    """The model's uncalibrated scores: the fitting (`"<source> fit"`) and held-out halves of each source, and the
    outside images."""
    sources = calibrate.validation_sources(limit=args.product_photos)
    fitting, held_out = calibrate.held_out_sources(model, processor, args, sources)
    scores = {f"{name} fit": values for name, values in fitting.items()} | held_out
    for name, images in calibrate.outside_images(args).items():
        scores[name] = collect(model, processor, images, args.batch_size, with_tags=False, progress=False)
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--detector-from", type=Path, default=None, help="a calibrated model with the same detector")
    parser.add_argument("--ood-photos", type=Path, default=Path("/work/ood-photos/images"))
    parser.add_argument("--product-photos", type=int, default=600, help="product validation photos (phone: all 464)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()

    model = AutoModel.from_pretrained(args.model, dtype=torch.float32).eval()
    processor = FashionTaggerImageProcessor.from_pretrained(args.model)
    config = copy.deepcopy(model.config)
    model.config.without_calibration()  # scores before any temperature, as calibrate collects them
    scores = scores_of(model, processor, args)
    if not config.attribute_temperatures:
        model.config = config
        fitting = {"product": scores["product fit"], "phone": scores["phone fit"]}
        config.attribute_temperatures = calibrate.fit_temperatures(model, fitting)
        training_labels = calibrate.training_labels(argparse.Namespace(data_source=None))
        config.label_hierarchy = calibrate.fit_label_hierarchy(config, training_labels)
    calibrated = AutoModel.from_pretrained(args.detector_from) if args.detector_from else model
    detector = calibrate.Detector(
        FeatureDensity(calibrated.ood_means.numpy(), calibrated.ood_precision.numpy()),
        calibrated.ood_turned.numpy(),
        calibrated.ood_orientation.numpy(),
    )

    measured = ["product", "phone", "generated", "photos"]
    print(f"{args.model}: flagged share of each held-out set (limits fitted on the other halves, "
          f"{calibrate.IN_DISTRIBUTION_FLAGGED:.0%} budget)\n")
    print("| uncertainty reads | " + " | ".join(measured) + " | photos by uncertainty |")
    print("|---|" + "---:|" * (len(measured) + 1))
    for label, heads in HEAD_SETS.items():
        config.ood_uncertainty_heads = [name for name in heads if name in config.attributes] if heads else None
        signals = {name: calibrate.raw_signals(values, config, detector) for name, values in scores.items()}
        limits = joint_limits([signals["product fit"], signals["phone fit"]], calibrate.IN_DISTRIBUTION_FLAGGED)
        shares = [(calibrate.over_limits(signals[name], limits) > 1).mean() for name in measured]
        by_uncertainty = (signals["photos"]["uncertainty"] > limits["uncertainty"]).mean()
        print(f"| {label} | " + " | ".join(f"{share:.1%}" for share in shares) + f" | {by_uncertainty:.1%} |")
    print(f"\nphotos held out: " + ", ".join(f"{name} {len(scores[name].domain_weights)}" for name in measured))


if __name__ == "__main__":
    main()
