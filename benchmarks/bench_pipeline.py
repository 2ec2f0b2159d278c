"""Throughput of `pipeline("fashion-tagging")` against the bare timm encoder on the same images.

For each image size, a `tf_efficientnet_lite0` tagger with the shipped model's vocabulary size is saved to a
temporary folder and loaded with `pipeline("fashion-tagging", model=folder)`. Per round, interleaved:

- pipeline: `tagger(images, batch_size=B)` on a list of decoded PIL images (real product photos from the validation
  split of Fashion Product Images when present, synthetic ones otherwise): preprocessing, encoder, attribute heads,
  greedy tag decoding and post-processing;
- encoder: `model.encoder(pixel_values)` under `inference_mode`, batch by batch, on the same images preprocessed
  once beforehand, in the channels-last layout the model runs its encoder in;
- encoder, timm's default layout: the same call on the same tensors left contiguous (NCHW), as plain timm code runs.

Overhead = pipeline time / encoder time - 1 (median of the per-round ratios), against the channels-last encoder so
that it counts only what the pipeline adds; the ratio to timm's default layout is shown beside it. The stages outside
the encoder are timed on their own in the same rounds, so the table says where the overhead goes.

`--model` takes any saved folder, loaded with `AutoModel`: a single tagger, or an ensemble, whose "encoder" is then
the bare timm encoder work it does: every member's encoder over each photo and (with mirroring) its mirror, the
mirrored copies made beforehand; making them inside the model counts as overhead.

    python benchmarks/bench_pipeline.py --repeats 9
    python benchmarks/bench_pipeline.py --repeats 5 --model models/fashion-tagger --sizes 160x120
"""

import argparse
import statistics
import tempfile

import numpy as np
import torch
from bench_utils import (
    image_size,
    interleaved,
    members_of,
    ratio_summary,
    real_size_vocabulary,
    runtime_line,
    validation_photos,
    verdict,
)
from PIL import Image
from transformers import AutoConfig, AutoModel, pipeline

from fashion_hf import FashionTaggerConfig, FashionTaggerEnsembleModel, FashionTaggerImageProcessor, FashionTaggerModel
from fashion_hf.runtime import keep_freed_memory

TARGET_OVERHEAD = 0.15


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=32, help="pipeline and encoder batch size (default 32)")
    parser.add_argument("--num-images", type=int, default=128, help="images per round (default 128)")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds per size (default 7)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    parser.add_argument(
        "--sizes",
        type=image_size,
        nargs="+",
        default=[(128, 96), (224, 224)],
        metavar="HxW",
        help="input sizes (default: 128x96, the config default, and 224x224)",
    )
    parser.add_argument("--max-tags", type=int, help="cap on generated tags (default: the model's max_tag_length)")
    parser.add_argument("--model", help="a saved model or ensemble folder to use (resized per --sizes) instead of an "
                        "untrained one")
    parser.add_argument(
        "--decoder-matmul-dtype",
        choices=["float32", "bfloat16"],
        default="bfloat16",
        help="the untrained tagger's decoder_matmul_dtype (default bfloat16, the shipped model's; --model keeps its own)",
    )
    parser.add_argument("--synthetic", action="store_true", help="synthetic photos even when the dataset is present")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1, see benchmarks/README.md)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def product_photos(count: int, synthetic: bool, seed: int) -> tuple[list[Image.Image], str]:
    """Decoded RGB photos: the first `count` of the validation split, or coloured garments on white."""
    photos = [] if synthetic else validation_photos(count)
    if photos:
        return photos, f"{count} validation photos of Fashion Product Images ({photos[0].width}x{photos[0].height})"
    rng = np.random.default_rng(seed)
    photos = []
    for _ in range(count):
        photo = Image.new("RGB", (60, 80), (255, 255, 255))
        garment = rng.integers(0, 256, size=(40, 30, 3), dtype=np.uint8)
        photo.paste(Image.fromarray(garment), (15, 20))
        photos.append(photo)
    return photos, f"{count} synthetic 60x80 photos"


def save_tagger(args, size: tuple[int, int], folder: str) -> None:
    if args.model:
        model = AutoModel.from_pretrained(args.model)  # a single tagger or an ensemble, as its config says
        model.config.image_size = list(size)
    else:
        torch.manual_seed(args.seed)
        attributes, tags = real_size_vocabulary()
        config = FashionTaggerConfig(
            image_size=size, attributes=attributes, tags=tags, decoder_matmul_dtype=args.decoder_matmul_dtype
        )
        model = FashionTaggerModel(config)
    model.save_pretrained(folder)
    FashionTaggerImageProcessor.from_model_config(model.config).save_pretrained(folder)


def batches(items, size):
    return [items[start : start + size] for start in range(0, len(items), size)]


def encoder_inputs(model, pixels: torch.Tensor) -> torch.Tensor:
    """What the bare encoders read for a batch: the photos, and for a mirroring ensemble their mirrors after them."""
    if isinstance(model, FashionTaggerEnsembleModel) and model.config.mirror_views:
        return torch.cat([pixels, pixels.flip(-1)])
    return pixels


def bare_encoders(model) -> list[torch.nn.Module]:
    return [member.encoder for member in members_of(model)]


def measure_size(args, size, photos) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        save_tagger(args, size, folder)
        tagger = pipeline("fashion-tagging", model=folder)
    model, processor = tagger.model, tagger.image_processor
    pixel_values = processor(photos, return_tensors="pt")["pixel_values"]
    encoder_batches = [encoder_inputs(model, pixels) for pixels in batches(pixel_values, args.batch_size)]
    pixel_batches = [pixels.contiguous(memory_format=torch.channels_last) for pixels in encoder_batches]
    nchw_batches = [pixels.contiguous() for pixels in encoder_batches]
    with torch.inference_mode():
        embed_batches = [model.encode_images(pixels) for pixels in batches(pixel_values, args.batch_size)]

    def encoder(layout_batches=pixel_batches):
        with torch.inference_mode():
            for pixels in layout_batches:
                for bare in bare_encoders(model):
                    bare(pixels)

    def preprocess():  # what the pipeline does before the encoder: decode and resize per image, normalise per batch
        for group in batches(photos, args.batch_size):
            processor.normalize_pixels(torch.cat([tagger.preprocess(photo)["image"] for photo in group]))

    def heads_and_decoding():
        with torch.inference_mode():
            for embeds in embed_batches:
                model(image_embeds=embeds)
                model.generate_tags(image_embeds=embeds, max_length=args.max_tags)

    call = {"batch_size": args.batch_size, "max_tags": args.max_tags}
    results = tagger(photos, **call)
    assert len(results) == len(photos) and all({"attributes", "tags"} <= set(result) for result in results)
    tag_counts = [len(result["tags"]) for result in results]
    seconds = interleaved(
        {
            "pipeline": lambda: tagger(photos, **call),
            "encoder": encoder,
            "encoder NCHW": lambda: encoder(nchw_batches),
            "preprocess": preprocess,
            "heads+decode": heads_and_decoding,
        },
        repeats=args.repeats,
        warmup=args.warmup,
    )
    # Shares of the encoder's time per round, then their medians: each round's stages ran under the same load.
    rounds = list(zip(seconds["pipeline"], seconds["encoder"], seconds["preprocess"], seconds["heads+decode"]))
    shares = {
        "preprocess": statistics.median(pre / enc for _, enc, pre, _ in rounds),
        "heads+decode": statistics.median(dec / enc for _, enc, _, dec in rounds),
        "rest": statistics.median((pipe - enc - pre - dec) / enc for pipe, enc, pre, dec in rounds),
    }
    return {
        "size": size,
        "mean_tags": statistics.mean(tag_counts),
        "medians": {name: statistics.median(values) for name, values in seconds.items()},
        "overhead": [ratio - 1 for ratio in ratio_summary(seconds["pipeline"], seconds["encoder"])],
        "versus_nchw": ratio_summary(seconds["pipeline"], seconds["encoder NCHW"])[0] - 1,
        "shares": shares,
    }


def main(argv=None) -> int:
    keep_freed_memory()
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    photos, source = product_photos(args.num_images, args.synthetic, args.seed)
    print(runtime_line())
    described = (f"model {args.model} ({AutoConfig.from_pretrained(args.model).encoder_description})" if args.model
                 else "untrained tf_efficientnet_lite0, 309 tags, GRU 512")  # fmt: skip
    print(
        f"tagger: {described}; "
        f"decoder matmuls {'as the model says' if args.model else args.decoder_matmul_dtype}; "
        f"max tags {args.max_tags or 'max_tag_length'}; {source}; batch {args.batch_size}; "
        f"{args.repeats} interleaved rounds (+{args.warmup} warm-up), medians"
    )
    results = [measure_size(args, size, photos) for size in args.sizes]

    count = args.num_images
    print()
    print(
        f"| size | pipeline img/s | encoder img/s | overhead (median, range) | fastest vs fastest "
        f"| target <= {TARGET_OVERHEAD:.0%} (median) | encoder img/s, timm's NCHW | pipeline vs NCHW encoder |"
    )
    print("|---|---:|---:|---:|---:|---|---:|---:|")
    for result in results:
        medians = result["medians"]
        overhead, low, high, best = result["overhead"]
        print(
            f"| {result['size'][0]}x{result['size'][1]} | {count / medians['pipeline']:,.0f} "
            f"| {count / medians['encoder']:,.0f} | {overhead:+.1%} ({low:+.0%} to {high:+.0%}) | {best:+.1%} "
            f"| {verdict(overhead <= TARGET_OVERHEAD)} | {count / medians['encoder NCHW']:,.0f} "
            f"| {result['versus_nchw']:+.1%} |"
        )
    print()
    print("Where the time beyond the encoder goes, as a share of the encoder's time (per-round shares, medians):")
    print("| size | tags/image | preprocess (per image) + normalise (per batch) | heads + tag decoding | rest: batching, post-processing |")
    print("|---|---:|---:|---:|---:|")
    for result in results:
        shares = result["shares"]
        print(
            f"| {result['size'][0]}x{result['size'][1]} | {result['mean_tags']:.1f} | {shares['preprocess']:+.1%} "
            f"| {shares['heads+decode']:+.1%} | {shares['rest']:+.1%} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
