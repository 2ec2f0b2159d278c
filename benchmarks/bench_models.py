"""What serving one trained tagger costs against another: `pipeline("fashion-tagging")` side by side.

For each model folder, interleaved in the same rounds (so background load falls on all of them):

- one photo: `tagger(photo)` for each of `--single` photos in turn, as the app tags one upload (seconds per photo);
- a batch: `tagger(photos, batch_size=32)` on `--batch` photos, as a catalogue run (photos per second).

Photos are real product photos from the validation split of Fashion Product Images, or with `--phone-photos` the
phone photos of `clothing-user-photos` validation (what a Space visitor uploads, and what the user-photo experts
run on). Ratios are to the first model, per round (median, lowest, highest).

    python benchmarks/bench_models.py models/fashion-tagger outputs/fashion-product-images-distill/model --repeats 7
"""

import argparse
import statistics

from bench_utils import interleaved, ratio_summary, runtime_line
from transformers import pipeline

from fashion_hf import data
from fashion_hf.runtime import keep_freed_memory


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", help="model folders; ratios are to the first")
    parser.add_argument("--data-source", default=None,
                        help="Fashion Product Images folder or Hub id (default: as fashion_hf.data finds it)")  # fmt: skip
    parser.add_argument("--phone-photos", action="store_true", help="phone photos (clothing-user-photos) instead")
    parser.add_argument("--single", type=int, default=16, help="photos tagged one by one per round")
    parser.add_argument("--batch", type=int, default=256, help="photos tagged in batches of 32 per round")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    if len(set(args.models)) != len(args.models):
        parser.error("give each model folder once")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    keep_freed_memory()
    if args.phone_photos:
        dataset = data.load_clothing_user_photos(split="validation")
    else:
        dataset = data.load_fashion_product_images(args.data_source, split="validation")
    photos = list(dataset.select(range(min(args.batch, len(dataset))))["image"])
    taggers = {folder: pipeline("fashion-tagging", model=folder) for folder in args.models}
    print(runtime_line())
    kind = "phone" if args.phone_photos else "product"
    print(f"{args.single} {kind} photos one by one and {len(photos)} in batches of 32 per round, {args.repeats} rounds")

    def one_by_one(tagger):
        return lambda: [tagger(photo) for photo in photos[: args.single]]

    def batched(tagger):
        return lambda: tagger(photos, batch_size=32)

    single = interleaved({folder: one_by_one(tagger) for folder, tagger in taggers.items()}, args.repeats)
    batch = interleaved({folder: batched(tagger) for folder, tagger in taggers.items()}, args.repeats)
    first = args.models[0]
    print("\n| model | encoder | one photo, ms (median) | vs first | batch of 32, photos/s (median) | vs first |")
    print("|---|---|---:|---:|---:|---:|")
    results = {}
    for folder, tagger in taggers.items():
        per_photo = [seconds / args.single for seconds in single[folder]]
        per_second = [len(photos) / seconds for seconds in batch[folder]]
        single_ratio = ratio_summary(single[folder], single[first])
        throughput_ratio = ratio_summary(batch[first], batch[folder])  # first's time / this one's
        results[folder] = {"ms_per_photo": 1000 * statistics.median(per_photo), "photos_per_s": statistics.median(per_second)}
        print(
            f"| {folder} | {tagger.model.config.encoder_description} | {results[folder]['ms_per_photo']:.1f} | "
            f"{single_ratio[0]:.2f}x ({single_ratio[1]:.2f}-{single_ratio[2]:.2f}) | "
            f"{results[folder]['photos_per_s']:.1f} | {throughput_ratio[0]:.2f}x ({throughput_ratio[1]:.2f}-{throughput_ratio[2]:.2f}) |"
        )
    return results


if __name__ == "__main__":
    main()
