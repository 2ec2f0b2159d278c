"""Export a model folder's image encoders to ONNX, for `runtime="onnx"` (see `fashion_hf.onnx_runtime`).

    fashion-hf export-onnx models/fashion-tagger                 # -> models/fashion-tagger/onnx/encoder-*.onnx
    fashion-hf export-onnx models/fashion-tagger --output /tmp/export --quantize
    fashion-hf export-onnx MODEL --quantize --calibration-images photos/ --calibration-count 512

`--quantize` adds INT8 copies (`encoder-<domain>.int8.onnx`, for `runtime="onnx-int8"`), their activation ranges
measured on `--calibration-count` photos taken evenly from each `--calibration-images` source (an image folder, a
table or a Hub-style dataset folder, its `--split`): by default the product and phone-photo training splits of the
data folder, the two kinds of photo the model serves.
"""

import argparse
from pathlib import Path

import torch
from transformers import AutoImageProcessor, AutoModel

from ..data import data_dir
from ..onnx_runtime import export_onnx, quantize_onnx
from ..tag import load_image_rows

CALIBRATION_BATCH = 32


def default_calibration_sources() -> list[str]:
    return [str(data_dir() / name) for name in ("fashion-product-images", "clothing-user-photos")]


def calibration_batches(processor, sources: list[str], split: str, count: int) -> list[torch.Tensor]:
    """`count` photos in all, taken evenly from each source's rows (the same ones every run), as normalised batches."""
    pixels = []
    for number, source in enumerate(sources):
        rows = load_image_rows(source, split)
        wanted = count // len(sources) + (number < count % len(sources))
        for row in range(0, len(rows), max(1, len(rows) // wanted))[:wanted]:
            pixels.append(torch.from_numpy(processor.to_model_size(processor.load_image(rows.image_input(row)))))
    return [processor.normalize_pixels(torch.stack(pixels[start : start + CALIBRATION_BATCH]))
            for start in range(0, len(pixels), CALIBRATION_BATCH)]  # fmt: skip


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(
        prog="fashion-hf export-onnx",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", help="a model folder (or Hub id, with --output)")
    parser.add_argument("--output", default=None, help="the folder to write onnx/ into (default: the model folder)")
    parser.add_argument("--quantize", action="store_true", help="add INT8 graphs, calibrated on photos")
    parser.add_argument("--calibration-images", nargs="+", default=None,
                        help="image sources for --quantize (default: the data folder's product and phone photos)")
    parser.add_argument("--split", default="train", help="the split of a dataset folder (default train)")
    parser.add_argument("--calibration-count", type=int, default=256, help="photos for --quantize (default 256)")
    args = parser.parse_args(argv)
    output = args.output or args.model
    if not Path(output).is_dir():
        raise SystemExit(f"{output} is not a folder: pass a model folder, or --output for a Hub id")
    if args.calibration_count < 1:
        raise SystemExit(f"--calibration-count must be at least 1, got {args.calibration_count}")
    model = AutoModel.from_pretrained(args.model).eval()
    folder = export_onnx(model, output)
    if args.quantize:
        processor = AutoImageProcessor.from_pretrained(args.model)
        sources = args.calibration_images or default_calibration_sources()
        quantize_onnx(folder, calibration_batches(processor, sources, args.split, args.calibration_count))
    for path in sorted(folder.glob("*.onnx")):
        print(f"{path} ({path.stat().st_size / 2**20:.1f} MiB)")
    return folder


if __name__ == "__main__":
    main()
