"""Which ImageNet encoder to start from: each one frozen, with logistic-regression heads, on Fashion Product Images.

Issue 3's floor method (a frozen encoder's pooled features, one logistic regression per attribute, trained on 8,000
train images and scored on the validation split), run for several encoders at one input size. It says how much a
larger encoder's features give before any training run is spent on it. Offline, the encoders with weights are
`tf_efficientnet_lite0`, `lite1` and `lite2` (`fashion_hf.encoder_weights.OFFLINE_PACKAGES`); online, any timm name.

    python benchmarks/encoder_probe.py --encoders tf_efficientnet_lite0 tf_efficientnet_lite1 --size 160x120
"""

import argparse
import time

import numpy as np
import torch
from bench_utils import image_size, runtime_line
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from tqdm.auto import tqdm

from fashion_hf import FashionTaggerConfig, FashionTaggerImageProcessor, FashionTaggerModel, data
from fashion_hf.encoder_weights import load_pretrained_encoder

HEADS = ["masterCategory", "subCategory", "articleType", "baseColour", "gender", "season", "usage"]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--encoders", nargs="+", default=["tf_efficientnet_lite0", "tf_efficientnet_lite1"])
    parser.add_argument("--size", type=image_size, default=(128, 96), metavar="HxW", help="input size")
    parser.add_argument("--heads", nargs="+", default=HEADS, choices=HEADS)
    parser.add_argument("--train-images", type=int, default=8000, help="train images the regressions see")
    parser.add_argument("--data-source", default=None, help="Fashion Product Images folder or Hub id")
    parser.add_argument("--batch-size", type=int, default=256)
    return parser.parse_args(argv)


def pooled_features(encoder_name: str, size: tuple[int, int], *pixel_sets: list[torch.Tensor]) -> list[np.ndarray]:
    """The encoder's pooled ImageNet features for every image of each set (lists of batches); one encoder built."""
    model = FashionTaggerModel(FashionTaggerConfig(encoder_name=encoder_name, image_size=size)).eval()
    source = load_pretrained_encoder(model)
    print(f"{encoder_name}: weights from {source}, {sum(p.numel() for p in model.encoder.parameters()):,} parameters")
    with torch.inference_mode():
        return [
            torch.cat([model.encode_images(pixels) for pixels in tqdm(batches, desc=encoder_name, leave=False)])
            .float()
            .numpy()
            for batches in pixel_sets
        ]


def probe_accuracy(train_x, train_y, eval_x, eval_y) -> float:
    """Top-1 of a logistic regression on the images that carry a label."""
    train_known = np.array([label is not None for label in train_y])
    eval_known = np.array([label is not None for label in eval_y])
    train_labels, eval_labels = np.array(train_y)[train_known], np.array(eval_y)[eval_known]
    if len(set(train_labels)) == 1:  # nothing to learn: every prediction is the one label seen
        return float((eval_labels == train_labels[0]).mean())
    # Standardised features: lbfgs converges in the same iterations for every encoder, so they compare fairly.
    classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=300)).fit(train_x[train_known], train_labels)
    return float((classifier.predict(eval_x[eval_known]) == eval_labels).mean())


def main(argv=None) -> None:
    args = parse_args(argv)
    train = data.load_fashion_product_images(args.data_source, split="train").shuffle(seed=0)
    train = train.select(range(min(args.train_images, len(train))))
    validation = data.load_fashion_product_images(args.data_source, split="validation")
    processor = FashionTaggerImageProcessor(size={"height": args.size[0], "width": args.size[1]})
    print(runtime_line())
    print(f"{len(train)} train / {len(validation)} validation images at {args.size[0]}x{args.size[1]}")

    def batches(images):
        return [
            processor(images[start : start + args.batch_size], return_tensors="pt")["pixel_values"]
            for start in range(0, len(images), args.batch_size)
        ]

    train_pixels, eval_pixels = batches(train["image"]), batches(validation["image"])
    labels = {head: (train[head], validation[head]) for head in args.heads}
    rows = []
    for name in args.encoders:
        started = time.perf_counter()
        train_x, eval_x = pooled_features(name, args.size, train_pixels, eval_pixels)
        seconds = time.perf_counter() - started
        rows.append((name, seconds, [probe_accuracy(train_x, y_train, eval_x, y_eval) for y_train, y_eval in labels.values()]))

    print(f"\n| encoder | features s | {' | '.join(args.heads)} |")
    print("|---|---:|" + "---:|" * len(args.heads))
    for name, seconds, accuracies in rows:
        print(f"| {name} | {seconds:.0f} | " + " | ".join(f"{value:.4f}" for value in accuracies) + " |")


if __name__ == "__main__":
    main()
