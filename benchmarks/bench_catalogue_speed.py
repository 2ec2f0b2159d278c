"""Catalogue tagging speed and single-photo latency: PyTorch against ONNX Runtime, side by side in one process.

Per round, interleaved (the order reversed every other round), on the first `--photos` product validation photos
as encoded bytes:

- (a) pipeline: `pipeline("fashion-tagging", model=MODEL)(photos)` as a user's code calls it today: default settings,
  glibc's default allocator thresholds (see below);
- (b) tag, torch: `fashion_hf.tag.tag(...)`, the local engine of `fashion-hf tag` (batches of 32, decoding workers,
  the allocator setting `fashion-hf tag` makes);
- (c) tag, onnx: the same call with the model's encoders in ONNX Runtime (`OnnxTagger`), float32, without the
  allocator setting (ONNX Runtime keeps its own buffers: the fast path must not need it);
- (d) tag, onnx int8: the same with the INT8 graphs, when `--onnx-folder` holds them;
- (e) tag, one-pass: with `--one-pass MODEL`, (b) with that model instead (one encoder pass per photo, e.g. the
  distilled lite0 tagger that was the default model before the ensemble): what a one-pass model gives.

Then the app's case: one photo at a time through the pipeline, PyTorch (as app.py runs it, with the allocator
setting) against `runtime="onnx"` (without it), and the `--one-pass` model's pipeline. Photos/s and the ratios are
medians of the per-round figures.

glibc's allocator settings are per process: the variants "without" run with the mmap and trim thresholds set back to
glibc's initial 128 KiB, the others with `keep_freed_memory()`. (Never set, glibc raises the mmap threshold by itself
as large blocks are freed; set, it stays at 128 KiB, so (a) may be somewhat slower here than in a fresh process.)

    python benchmarks/bench_catalogue_speed.py --photos 96 --repeats 3 --onnx-folder /tmp/onnx-export/onnx
"""

import argparse
import statistics
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
from bench_utils import PRODUCT_IMAGES, interleaved, runtime_line
from transformers import AutoImageProcessor, AutoModel, pipeline

from fashion_hf.onnx_runtime import OnnxTagger, exported_folder, graph_name
from fashion_hf.runtime import M_MMAP_THRESHOLD, M_TRIM_THRESHOLD, _mallopt, keep_freed_memory
from fashion_hf.tag import TagSettings, default_num_workers, load_image_rows, tag

GLIBC_INITIAL_THRESHOLD = 128 * 1024
LATENCY_CALLS = 5


def glibc_initial_thresholds() -> bool:
    return _mallopt((M_MMAP_THRESHOLD, GLIBC_INITIAL_THRESHOLD), (M_TRIM_THRESHOLD, GLIBC_INITIAL_THRESHOLD))


def validation_file() -> Path:
    files = sorted((PRODUCT_IMAGES / "data").glob("validation-*.parquet"))
    if not files:
        raise SystemExit(f"no validation split in {PRODUCT_IMAGES}")
    return files[0]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="models/fashion-tagger")
    parser.add_argument("--onnx-folder", default=None, help="graphs to run (default: the model's, or the cache's)")
    parser.add_argument("--one-pass", default=None, metavar="MODEL", help="also measure this (one-pass) model")
    parser.add_argument("--photos", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)

    source = validation_file()
    photos = [cell["bytes"] for cell in pq.read_table(source, columns=["image"]).slice(0, args.photos).column("image").to_pylist()]
    images = load_image_rows(str(source))
    model = AutoModel.from_pretrained(args.model).eval()
    processor = AutoImageProcessor.from_pretrained(args.model)
    onnx_folder = Path(args.onnx_folder) if args.onnx_folder else exported_folder(model, args.model)
    taggers = {"onnx": OnnxTagger(model, onnx_folder)}
    if (onnx_folder / graph_name(model.config.photo_domains()[0], quantized=True)).is_file():
        taggers["onnx int8"] = OnnxTagger(model, onnx_folder, quantized=True)
    today = pipeline("fashion-tagging", model=model, image_processor=processor)
    onnx_pipeline = pipeline("fashion-tagging", model=model, image_processor=processor, runtime="onnx")
    onnx_pipeline.encoder = taggers["onnx"]  # the graphs under test (the same export as the one it found)
    one_pass_pipeline = None
    if args.one_pass:  # loaded as MODEL is, so both go through the same code
        one_pass_pipeline = pipeline("fashion-tagging", model=AutoModel.from_pretrained(args.one_pass).eval(),
                                     image_processor=AutoImageProcessor.from_pretrained(args.one_pass))
    settings = TagSettings(batch_size=args.batch_size, num_workers=default_num_workers())
    output = Path(tempfile.mkdtemp(prefix="bench-catalogue-"))

    def pipeline_today():
        glibc_initial_thresholds()
        today(photos)

    def tag_with(tagger, allocator_setting: bool, tagger_processor=processor):
        def run():
            keep_freed_memory() if allocator_setting else glibc_initial_thresholds()
            tag(images, tagger, tagger_processor, output, settings, limit=len(photos), overwrite=True, progress=False)

        return run

    throughput = interleaved(
        {"(a) pipeline, today": pipeline_today, "(b) tag, torch": tag_with(model, allocator_setting=True),
         **{f"({letter}) tag, {name}": tag_with(tagger, allocator_setting=False)
            for letter, (name, tagger) in zip("cd", taggers.items())},
         **({"(e) tag, one-pass": tag_with(one_pass_pipeline.model, True, one_pass_pipeline.image_processor)}
            if one_pass_pipeline else {})},
        repeats=args.repeats,
    )  # fmt: skip

    def single_photo(tagger, allocator_setting: bool):
        def run():
            keep_freed_memory() if allocator_setting else glibc_initial_thresholds()
            for photo in photos[:LATENCY_CALLS]:
                tagger(photo)

        return run

    latency = interleaved(
        {"pipeline, torch": single_photo(today, allocator_setting=True),
         "pipeline, onnx": single_photo(onnx_pipeline, allocator_setting=False),
         **({"pipeline, one-pass": single_photo(one_pass_pipeline, allocator_setting=True)} if one_pass_pipeline else {})},
        repeats=args.repeats,
    )  # fmt: skip

    print(runtime_line())
    print(f"{len(photos)} product validation photos, {args.repeats} rounds, model {args.model}, graphs {onnx_folder}"
          + (f", one-pass model {args.one_pass}" if one_pass_pipeline else "") + "\n")
    print("| variant | photos/s | x (a) | seconds per round |")
    print("|---|---|---|---|")
    baseline = throughput["(a) pipeline, today"]
    results = {}
    for name, seconds in throughput.items():
        rate = statistics.median(len(photos) / second for second in seconds)
        ratio = statistics.median(base / second for base, second in zip(baseline, seconds))
        results[name] = {"photos_per_second": rate, "ratio": ratio}
        print(f"| {name} | {rate:.1f} | {ratio:.2f} | {' '.join(f'{second:.1f}' for second in seconds)} |")
    print("\n| single photo through the pipeline | ms per photo | x torch |")
    print("|---|---|---|")
    torch_latency = latency["pipeline, torch"]
    for name, seconds in latency.items():
        per_photo = statistics.median(1000 * second / LATENCY_CALLS for second in seconds)
        speedup = statistics.median(base / second for base, second in zip(torch_latency, seconds))
        results[name] = {"ms_per_photo": per_photo, "speedup": speedup}
        print(f"| {name} | {per_photo:.0f} | {speedup:.2f} |")
    return results


if __name__ == "__main__":
    main()
