"""`fashion-hf tag`: tag every image of a folder, a table or a dataset, into parquet, JSONL or CSV shards.

    fashion-hf tag photos/ --output tags/                      # an image folder -> tags/part-00000.parquet, ...
    fashion-hf tag shop/catalogue.csv --output tags/ --format csv --top-k 3
    fashion-hf tag ../shared/data/fashion-product-images --split validation --output tags/ --limit 1000 --embeddings
    fashion-hf tag ashraq/fashion-product-images-small --output tags/   # a Hub dataset id (online)
    python -m fashion_hf.tag photos/ --output tags/ --model models/fashion-tagger --batch-size 64 --num-workers 2
    fashion-hf tag photos/ --output tags/ --engine ray                   # Ray Data actors on a local Ray
    fashion-hf tag /shared/catalogue.csv --output /shared/tags/ --engine ray --ray-address auto   # on a Ray cluster

Input (the first argument): an image folder (every image in it, or the `load_dataset("imagefolder")` layout read by
`fashion_hf.data.load_catalogue`); a CSV/TSV/JSONL/parquet table whose `--image-column` (default `image`) holds image
paths relative to the table, or encoded image bytes (a parquet `Image()` column, or a binary one); a local folder of
parquet files in the Hub layout (`data/<split>-*.parquet`, `--split`); or a Hub dataset id (needs the network).

Output (`--output FOLDER`): one row per image, in input order, in shards of `--shard-size` rows
(`part-00000.parquet`, ... or `.jsonl`/`.csv` with `--format`), and `_manifest.json`; `pd.read_parquet(FOLDER)`
reads them all. Columns:
- `id`: the input's `--id-column` (default `id`, where there is one), else the row number; `path`: the image's path
  as the input names it (relative to the folder or table), null for image bytes without one;
- `error`: null, or why the image could not be read (its predictions are then empty and the run goes on);
- per attribute: `<attribute>` (the top label), `<attribute>_score`, `<attribute>_top_k` (`--top-k` `{label, score}`);
- `tags`, `tag_groups`, `tag_scores`: the generated tag sequence; `not_sure`: the attributes whose top score is under
  the model's confidence threshold; `out_of_distribution` (flagged, or null for a model without a detector) and
  `out_of_distribution_score`, `turned_by` (0, or the degrees the image was turned to be tagged the right way up):
  all as `pipeline("fashion-tagging")` says them;
- with `--embeddings`, `embedding`: a single model's pooled image embedding; for an ensemble, the embedding its
  out-of-distribution detector measures (`model.ood_features`: the general members' views averaged, L2-normalised).
Lists and records are JSON text in CSV.

Resuming: each shard is written to a temporary name, then renamed, so a shard is complete or absent. Run the same
command again after a kill and it counts the rows of the shards there and tags from the next row on: no row twice,
none lost. `_manifest.json` holds the input, the model's fingerprint and the options that shape the rows; a run that
differs in any of them is refused (`--overwrite` starts again). `--limit N` tags the first N rows only (a later run
with a larger limit, or none, continues).

Engines (`--engine`): `local` (default) decodes and resizes in `--num-workers` worker processes while this one runs the
model on batches of `--batch-size`. `ray` runs a pool of Ray Data actors, one per CPU (one per GPU where there are
GPUs), each loading the model once from `--model` and decoding and tagging its own batches; it starts a local Ray on
this machine, or joins a running cluster with `--ray-address auto` (run on a cluster's machine, every machine reading
the input, the model and the HF datasets cache at the same paths) or `--ray-address ray://HEAD:10001`. Both give the
same rows (to the last bit where the model runs on as many threads: an actor runs it on one). An engine is a
function in `ENGINES`: given the model, the images and a range of rows, it yields lists of `(row, columns)` in row
order; the shards, resuming and progress around it are the same for every engine.

Runtimes (`--runtime`): `onnx` (the local engine's default on a CPU) runs the model's image encoders in ONNX Runtime
(`onnx_runtime.OnnxTagger`: the graphs in the model folder's `onnx/`, else exported once into a cache), the rest in
PyTorch: the same top labels, scores within 1e-3, several times the photos/s of the pipeline called photo by photo;
`torch` (the default on a GPU and for Ray's actors) runs the encoders with their batch norms folded into the
convolutions (`FoldedTagger`). The manifest records it: no run mixes them.
"""

import argparse
import contextlib
import csv
import fcntl
import hashlib
import json
import logging
import math
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import AutoImageProcessor, AutoModel

from .data import load_from_hub, local_path, read_table, load_catalogue
from .evaluation import model_device_and_dtype
from .image_decoding import InvalidImageError, load_rgb_image
from .modeling_fashion_tagger import FoldedTagger
from .runtime import cpu_threads_per_process, keep_freed_memory

DEFAULT_MODEL = "models/fashion-tagger"
FORMATS = ("parquet", "jsonl", "csv")
# "_" and "." hide the manifest, lock and temporary files from `pd.read_parquet(folder)` and pyarrow's datasets.
MANIFEST = "_manifest.json"
SHARD_PREFIX = "part-"
TEMPORARY_SUFFIX = ".tmp"
LOCK_FILE = ".lock"
# The manifest's sections that make two runs' rows the same rows: a run continues another only if all are equal.
MUST_MATCH = ("input", "model", "output")

# ---------------------------------------------------------------------------------------------------------------------
# The input: any source, as an ordered list of undecoded images with their ids and paths.
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class ImageCells:
    """Each row's image, undecoded: all of the input that a decoding worker or a Ray actor needs. Cheap to send to
    one: a memory-mapped dataset pickles as its cache file's path, an image folder or a table of paths as its paths."""

    dataset: datasets.Dataset  # the image column only, cells as stored: a path, bytes or an `Image()` {bytes, path}
    image_column: str
    base_folder: Path | None  # what relative image paths are relative to

    def image_input(self, row: int) -> str | bytes:
        """What the decoder reads for `row`: a file path or encoded bytes."""
        cell = self.dataset[row][self.image_column]
        if isinstance(cell, dict):
            cell = cell["bytes"] if cell.get("bytes") is not None else cell.get("path")
        if isinstance(cell, str) and self.base_folder is not None:
            return str(self.base_folder / cell)  # an absolute cell stays itself
        if cell is None:
            raise InvalidImageError(f"row {row} has no image in column {self.image_column!r}")
        return cell


@dataclass
class ImageRows:
    """The images to tag, in order and undecoded, so that the workers decode them (and the main process never does)."""

    cells: ImageCells
    ids: list
    paths: list[str | None]
    id_type: pa.DataType
    description: dict  # for the manifest

    def __len__(self) -> int:
        return len(self.ids)


def load_input_dataset(source: str, split: str) -> tuple[datasets.Dataset, Path | None]:
    """The dataset `source` names and the folder its relative image paths start from (None for a Hub id)."""
    path = local_path(source)
    if path is None:
        return load_from_hub(source, split, "Pass a local image folder, table or dataset folder instead."), None
    path = path.resolve()  # image folders store absolute paths: made relative to this for the output
    if path.is_dir() and any(path.rglob("*.parquet")):  # a Hub-style dataset folder
        return datasets.load_dataset(str(path), split=split), path
    if path.is_dir():
        return load_catalogue(path), path
    if path.suffix.lower() == ".parquet":  # memory-mapped, not read whole: it may hold every image's bytes
        return datasets.load_dataset("parquet", data_files=str(path), split="train"), path.parent
    # A text table is read here, not by load_catalogue, which refuses a whole table for one missing file: here that
    # file's row gets an error and the others are tagged. Every column is text, so ids keep their leading zeros.
    return datasets.Dataset.from_pandas(read_table(path), preserve_index=False), path.parent


def stored_paths(images: pa.ChunkedArray, base_folder: Path | None) -> list[str | None]:
    """Each image's path as the input names it: relative to `base_folder` where it lies inside it, None for bytes."""
    if pa.types.is_struct(images.type):  # an `Image()` column: {bytes, path}
        paths = pc.struct_field(images, "path").to_pylist()  # reads no image bytes
    elif pa.types.is_string(images.type) or pa.types.is_large_string(images.type):
        paths = images.to_pylist()
    else:
        return [None] * len(images)
    if base_folder is None:
        return paths
    return [str(Path(path).relative_to(base_folder)) if path and Path(path).is_relative_to(base_folder) else path
            for path in paths]  # fmt: skip


def load_image_rows(
    source: str, split: str = "train", image_column: str = "image", id_column: str | None = None
) -> ImageRows:
    """Read an input (see the module's docstring) without decoding an image. `id_column` None: `id` where present."""
    dataset, base_folder = load_input_dataset(source, split)
    if id_column is None and "id" in dataset.column_names:
        id_column = "id"
    for column, flag in ((image_column, "--image-column"), (id_column, "--id-column")):
        if column is not None and column not in dataset.column_names:
            raise ValueError(f"{source} has no column {column!r} ({flag}); its columns: {dataset.column_names}")
    if isinstance(dataset.features[image_column], datasets.Image):
        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    table = dataset.select_columns([image_column] + ([id_column] if id_column else [])).with_format("arrow")[:]
    paths = stored_paths(table.column(image_column), base_folder)
    ids = table.column(id_column).to_pylist() if id_column else list(range(len(table)))
    description = {
        "source": source if base_folder is None else str(Path(source).expanduser().resolve()),
        "split": split, "image_column": image_column, "id_column": id_column, "rows": len(ids),
        # Catches a changed input that keeps its row count: a file added here and one removed there.
        "ids_and_paths_sha256": hashlib.sha256(json.dumps([ids, paths], default=str).encode()).hexdigest(),
    }  # fmt: skip
    id_type = table.schema.field(id_column).type if id_column else pa.int64()
    images = dataset.select_columns([image_column])
    return ImageRows(ImageCells(images, image_column, base_folder), ids, paths, id_type, description)


# ---------------------------------------------------------------------------------------------------------------------
# Rows: what one image's predictions (or its error) look like in the output.
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TagSettings:
    """What shapes the rows (in the manifest: a run continues another only with the same) and how to make them."""

    top_k: int = 5
    num_beams: int = 1
    max_tags: int | None = None
    embeddings: bool = False
    batch_size: int = 32
    num_workers: int = 0  # the local engine's decoding processes
    ray_address: str | None = None  # the ray engine's cluster (see `ray_cluster`; None: a new local one)
    runtime: str = "torch"  # "onnx": the encoders in ONNX Runtime (`onnx_runtime.OnnxTagger`), on CPU

    def output_options(self) -> dict:
        return {name: getattr(self, name) for name in ("top_k", "num_beams", "max_tags", "embeddings")}


def empty_predictions(config, settings: TagSettings) -> dict:
    """The prediction columns of an image that could not be read."""
    row = {}
    for name in config.attributes:
        row.update({name: None, f"{name}_score": None, f"{name}_top_k": []})
    row.update(tags=[], tag_groups=[], tag_scores=[], not_sure=[])
    row.update(out_of_distribution=None, out_of_distribution_score=None, turned_by=None)
    if settings.embeddings:
        row["embedding"] = None
    return row


def output_schema(config, id_type: pa.DataType, settings: TagSettings) -> pa.Schema:
    """The parquet schema, fixed up front so that a shard of unreadable images types its columns like the others."""
    ranked = pa.list_(pa.struct([("label", pa.string()), ("score", pa.float64())]))
    strings, scores = pa.list_(pa.string()), pa.list_(pa.float64())
    fields = [("id", id_type), ("path", pa.string()), ("error", pa.string())]
    for name in config.attributes:
        fields += [(name, pa.string()), (f"{name}_score", pa.float64()), (f"{name}_top_k", ranked)]
    fields += [("tags", strings), ("tag_groups", strings), ("tag_scores", scores), ("not_sure", strings),
               ("out_of_distribution", pa.bool_()), ("out_of_distribution_score", pa.float64()),
               ("turned_by", pa.int64())]  # fmt: skip
    if settings.embeddings:
        fields.append(("embedding", pa.list_(pa.float32())))
    return pa.schema(fields)


# ---------------------------------------------------------------------------------------------------------------------
# The local engine: decoding and resizing in DataLoader workers, the model in this process.
# ---------------------------------------------------------------------------------------------------------------------


def decode_row(
    cells: ImageCells, row: int, processor, quarter_turns: bool = False
) -> tuple[int, torch.Tensor | None, str | None]:
    """`row`, its image decoded and resized to the model's input size (`(H, W, 3)`; with `quarter_turns`,
    `(1 + turns, H, W, 3)`: the image, then `processor.quarter_turns` of it), or why it cannot be: the decoders' part."""
    try:
        image = cells.image_input(row)
        name = None if isinstance(image, str) else f"the image bytes of row {row}"  # a path names itself
        image = load_rgb_image(image, processor.image_limits, name)
        pixels = processor.to_model_size(image)
        if quarter_turns:
            pixels = np.concatenate([pixels[None], processor.quarter_turns(image)])
        return row, torch.from_numpy(pixels), None
    except InvalidImageError as error:
        return row, None, str(error)


class DecodedImages(torch.utils.data.Dataset):
    """Rows decoded by `decode_row`, in the local engine's DataLoader workers."""

    def __init__(self, cells: ImageCells, rows: range, processor, quarter_turns: bool = False):
        self.cells, self.rows, self.processor, self.quarter_turns = cells, rows, processor, quarter_turns

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str | None]:
        return decode_row(self.cells, self.rows[index], self.processor, self.quarter_turns)


def needs_quarter_turns(model) -> bool:
    """Whether the model tries a turned-looking photo's quarter turns (`turn_upright`): the decoders then make them."""
    return model.config.upright_search is not None


def collate_decoded(items: list) -> tuple[list[int], torch.Tensor | None, dict[int, str]]:
    """A batch: its rows, the stacked pixels of those that decoded (in row order), and the others' errors."""
    pixels = [item_pixels for _, item_pixels, _ in items if item_pixels is not None]
    errors = {row: error for row, _, error in items if error is not None}
    return [row for row, _, _ in items], torch.stack(pixels) if pixels else None, errors


def image_embeddings(model, image_embeds: torch.Tensor) -> torch.Tensor:
    """`(batch, width)`: a single model's pooled embedding; an ensemble's `(batch, views, width)` as its detector
    measures them (`ood_features`)."""
    return image_embeds if image_embeds.ndim == 2 else model.ood_features(image_embeds)


def ranked_labels(labels: list[str], logits: torch.Tensor, top_k: int) -> list[list[dict]]:
    """Per image, one head's `top_k` labels and their probabilities, best first."""
    top = logits.float().softmax(-1).topk(min(top_k, len(labels)))
    return [
        [{"label": labels[index], "score": score} for score, index in zip(scores, indices)]
        for scores, indices in zip(top.values.tolist(), top.indices.tolist())
    ]


def prediction_columns(
    config, ranked: dict[str, list[dict]], tags: list[dict], ood_score: float | None, turned_by: int = 0
) -> dict:
    """One image's columns, as the pipeline says them: "not sure" where the top score is under the head's threshold,
    flagged where the out-of-distribution score is over 1, and the degrees the image was turned to be tagged."""
    row = {}
    for name, top_k in ranked.items():
        row.update({name: top_k[0]["label"], f"{name}_score": top_k[0]["score"], f"{name}_top_k": top_k})
    row.update(
        tags=[tag["tag"] for tag in tags],
        tag_groups=[tag["group"] for tag in tags],
        tag_scores=[tag["score"] for tag in tags],
        not_sure=[name for name, top_k in ranked.items() if config.is_not_sure(name, top_k[0]["score"])],
        out_of_distribution=None if ood_score is None else ood_score > 1.0,
        out_of_distribution_score=ood_score,
        turned_by=turned_by,
    )
    return row


@torch.inference_mode()
def predict_batch(model, processor, pixels: torch.Tensor, settings: TagSettings) -> list[dict]:
    """The prediction columns of a batch of `(batch, H, W, 3)` uint8 images, one dict per image; or of
    `(batch, 1 + turns, H, W, 3)`, each image followed by its quarter turns, for a model that tries them
    (`config.upright_search`: `needs_quarter_turns`)."""
    device, dtype = model_device_and_dtype(model)
    quarter_turns = pixels[:, 1:] if pixels.ndim == 5 else None
    pixels = pixels[:, 0] if pixels.ndim == 5 else pixels
    pixel_values = processor.normalize_pixels(pixels.to(device)).to(dtype)
    image_embeds = model.encode_images(pixel_values)

    def encode_turns(rows: torch.Tensor) -> torch.Tensor:
        turns = quarter_turns[rows.cpu()]  # (rows, turns, H, W, 3)
        turned_values = processor.turned_pixel_values(turns.to(device)).to(dtype)
        return model.encode_images(turned_values).unflatten(0, (turns.shape[1], turns.shape[0]))

    image_embeds, turned_by, turn_gain = model.turn_upright(image_embeds, encode_turns)
    logits = model(image_embeds=image_embeds).attribute_logits
    hypotheses = model.generate_tags(
        image_embeds=image_embeds, num_beams=settings.num_beams, max_length=settings.max_tags
    )
    ood_scores = model.ood_scores(image_embeds, logits, turn_gain)
    ood_scores = [None] * len(pixels) if ood_scores is None else ood_scores.float().tolist()
    attributes = model.config.attributes
    ranked = {name: ranked_labels(labels, logits[name], settings.top_k) for name, labels in attributes.items()}
    rows = [
        prediction_columns(
            model.config,
            {name: per_image[index] for name, per_image in ranked.items()},
            image_hypotheses[0]["tags"] if image_hypotheses else [],
            ood_scores[index],
            int(turned_by[index]),
        )
        for index, image_hypotheses in enumerate(hypotheses)
    ]
    if settings.embeddings:
        for row, embedding in zip(rows, image_embeddings(model, image_embeds).float().cpu().tolist()):
            row["embedding"] = embedding
    return rows


def tag_decoded(model, processor, batch: tuple, settings: TagSettings) -> list[tuple[int, dict]]:
    """A `collate_decoded` batch's `(row, columns)` in row order, an unreadable image's columns empty but for
    `error`: every engine's rows come from here, so that they are the same rows."""
    batch_rows, pixels, errors = batch
    predictions = iter(predict_batch(model, processor, pixels, settings) if pixels is not None else [])
    return [
        (row, {"error": errors[row], **empty_predictions(model.config, settings)}) if row in errors
        else (row, {"error": None, **next(predictions)})
        for row in batch_rows
    ]  # fmt: skip


def tag_locally(
    model, processor, images: ImageRows, rows: range, settings: TagSettings
) -> Iterator[list[tuple[int, dict]]]:
    """The `local` engine: yields each batch's `(row, columns)` in row order.

    With `num_workers` > 0, worker processes decode and resize the next batches while this process runs the model on
    this one (`prefetch_factor` batches ahead per worker); 0 does everything here, in turn.
    """
    loader = torch.utils.data.DataLoader(
        DecodedImages(images.cells, rows, processor, needs_quarter_turns(model)),
        batch_size=settings.batch_size,
        num_workers=settings.num_workers,
        collate_fn=collate_decoded,
    )
    for batch in loader:
        yield tag_decoded(model, processor, batch, settings)


# ---------------------------------------------------------------------------------------------------------------------
# The Ray engine: Ray Data actors, each with its own copy of the model, decode and tag blocks of rows.
# ---------------------------------------------------------------------------------------------------------------------

# Ray Data is given row numbers, never images: each actor reads its rows' images itself through the input's
# `ImageCells` (sent once, and small: see there), so the driver neither holds nor ships the images of a catalogue of
# any size, and every input kind works the same way. `ray.data.read_parquet` would stream images too, but for parquet
# inputs only, and its rows would have to be matched to the input's order and resume position all over again.
# The row numbers go in as in-memory blocks rather than as `ray.data.range`, whose read tasks wait for a CPU forever
# once the actors hold every one; and as at most this many, because `ray.data.from_arrow` slows down past a
# thousand or so. A block is a whole number of batches, so that the batches are the local engine's batches.
MAX_RAY_BLOCKS = 1000


def row_blocks(rows: range, batch_size: int) -> list[pa.Table]:
    """`rows` in consecutive blocks of a whole number of batches each (but the last), as few batches as will do."""
    batches_per_block = math.ceil(math.ceil(len(rows) / batch_size) / MAX_RAY_BLOCKS)
    rows_per_block = batches_per_block * batch_size
    return [pa.table({"row": pa.array(rows[start : start + rows_per_block], pa.int64())})
            for start in range(0, len(rows), rows_per_block)]  # fmt: skip


def model_source(model) -> str:
    """Where an actor loads `model` from: the folder (made absolute) or the Hub id that it was loaded from."""
    source = model.name_or_path
    if not source:
        raise ValueError("the ray engine loads the model in each actor from the folder or Hub id it came from, and "
                         "this model has none: save it with save_pretrained and load it from there")  # fmt: skip
    path = Path(source).expanduser()
    return str(path.resolve()) if path.exists() else source


class RayTagger:
    """A Ray Data actor (`map_batches`): loads the model once, then tags batches of row numbers, decoding their
    images itself. Returns each batch's rows as a table: a `row` column, then the output's columns but `id`, `path`."""

    def __init__(self, source: str, fingerprint: str, cells: ImageCells, settings: TagSettings):
        keep_freed_memory()
        model = AutoModel.from_pretrained(source)
        processor = AutoImageProcessor.from_pretrained(source)
        # On a cluster the folder is another machine's copy, a Hub id may have moved on: either gives other rows.
        if model_fingerprint(model, processor) != fingerprint:
            raise RuntimeError(f"{source} on {socket.gethostname()} is not the model this run was started with: "
                               "give every machine the same copy (shared storage, or a Hub id at a fixed revision)")
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # CUDA only where Ray gave it a GPU
        self.model, self.processor = with_runtime(model.to(device).eval(), source, settings.runtime), processor
        self.cells, self.settings = cells, settings
        prediction_fields = [field for field in output_schema(model.config, pa.int64(), settings)
                             if field.name not in ("id", "path")]  # fmt: skip
        self.schema = pa.schema([("row", pa.int64()), *prediction_fields])

    def __call__(self, batch: pa.Table) -> pa.Table:
        turns = needs_quarter_turns(self.model)
        decoded = [decode_row(self.cells, row, self.processor, turns) for row in batch.column("row").to_pylist()]
        tagged = tag_decoded(self.model, self.processor, collate_decoded(decoded), self.settings)
        return pa.Table.from_pylist([{"row": row, **columns} for row, columns in tagged], schema=self.schema)


@contextlib.contextmanager
def ray_cluster(address: str | None):
    """The Ray this process is already connected to; else the cluster at `address` ("auto": the one this machine
    belongs to, "ray://head:10001" through Ray Client); else (None) a new local one sized to this machine. Only a Ray
    connected here is shut down on leaving."""
    try:
        import ray
        import ray.data  # sets up its loggers, which are then quietened: our progress bar says how far the run is
    except ImportError as error:
        raise ImportError(f"--engine ray needs Ray Data ({error}): pip install 'ray[data]'") from error

    data_logger = logging.getLogger("ray.data")
    data_log_level = data_logger.level
    data_logger.setLevel(logging.ERROR)
    connected_here = not ray.is_initialized()
    if connected_here:
        quiet = {"log_to_driver": False, "logging_level": logging.ERROR}
        if address is None:
            ray.init(address="local", include_dashboard=False, **quiet)
        else:
            ray.init(address=address, **quiet)
    try:
        yield ray
    finally:
        if connected_here:
            ray.shutdown()
        data_logger.setLevel(data_log_level)


def actor_pool(ray, blocks: int) -> dict:
    """`map_batches` arguments for one actor per GPU of the cluster where it has GPUs, else one per CPU; no more
    actors than `blocks`, since each loads the model and one without a block would never use it."""
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    if gpus:
        return {"compute": ray.data.ActorPoolStrategy(size=min(gpus, blocks)), "num_cpus": 1, "num_gpus": 1}
    return {"compute": ray.data.ActorPoolStrategy(size=min(int(resources["CPU"]), blocks)), "num_cpus": 1}


def tag_with_ray(
    model, processor, images: ImageRows, rows: range, settings: TagSettings
) -> Iterator[list[tuple[int, dict]]]:
    """The `ray` engine: yields blocks of `(row, columns)` in row order, the same rows as the local engine's.

    A pool of Ray Data actors (`RayTagger`), one per CPU of the cluster (one per GPU where it has GPUs), each load the
    model from the folder or Hub id `model` was loaded from, then decode and tag the batches of rows Ray Data hands
    them; Ray Data returns their tables in row order (`preserve_order`). `settings.ray_address` picks the cluster.
    """
    if not rows:
        return
    source, fingerprint = model_source(model), model_fingerprint(model, processor)
    blocks = row_blocks(rows, settings.batch_size)
    with ray_cluster(settings.ray_address) as ray:
        row_numbers = ray.data.from_arrow(blocks)
        row_numbers.context.execution_options.preserve_order = True
        row_numbers.context.enable_progress_bars = False
        tagged = row_numbers.map_batches(
            RayTagger,
            fn_constructor_kwargs={"source": source, "fingerprint": fingerprint, "cells": images.cells,
                                   "settings": settings},
            batch_size=settings.batch_size,
            batch_format="pyarrow",
            **actor_pool(ray, len(blocks)),
        )  # fmt: skip
        for table in tagged.iter_batches(batch_size=None, batch_format="pyarrow"):
            yield [(columns.pop("row"), columns) for columns in table.to_pylist()]


ENGINES = {"local": tag_locally, "ray": tag_with_ray}

# ---------------------------------------------------------------------------------------------------------------------
# Shards and the manifest: each written whole under a temporary name, then renamed over its final one.
# ---------------------------------------------------------------------------------------------------------------------


def write_atomically(path: Path, write) -> None:
    """`write(temporary_path)`, flushed to disk, then renamed to `path`: a reader (or a resumed run) sees the whole
    file or none of it, even after a kill or a power cut."""
    temporary = path.with_name(f".{path.name}{TEMPORARY_SUFFIX}")
    write(temporary)
    with open(temporary, "rb") as file:
        os.fsync(file.fileno())
    os.replace(temporary, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself
    finally:
        os.close(directory)


def _csv_cell(value):
    return json.dumps(value, ensure_ascii=False) if isinstance(value, (list, dict)) else value


def write_shard(path: Path, rows: list[dict], output_format: str, schema: pa.Schema) -> None:
    if output_format == "parquet":
        table = pa.Table.from_pylist(rows, schema=schema)
        write_atomically(path, lambda temporary: pq.write_table(table, temporary))
    elif output_format == "jsonl":
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        write_atomically(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))
    else:

        def write_csv(temporary: Path) -> None:
            with open(temporary, "w", newline="", encoding="utf-8") as file:
                writer = csv.DictWriter(file, fieldnames=schema.names)
                writer.writeheader()
                writer.writerows({name: _csv_cell(value) for name, value in row.items()} for row in rows)

        write_atomically(path, write_csv)


def shard_path(output: Path, index: int, output_format: str) -> Path:
    return output / f"{SHARD_PREFIX}{index:05d}.{output_format}"


def shard_rows(path: Path, output_format: str) -> int:
    if output_format == "parquet":
        return pq.ParquetFile(path).metadata.num_rows
    with open(path, newline="", encoding="utf-8") as file:
        if output_format == "jsonl":
            return sum(1 for line in file if line.strip())
        return sum(1 for _ in csv.reader(file)) - 1  # the header; quoted newlines stay inside their row


def existing_shards(output: Path, output_format: str) -> list[Path]:
    """The complete shards there, checked to be numbered 0, 1, ... without a gap (a gap would lose rows)."""
    shards = sorted(output.glob(f"{SHARD_PREFIX}*.{output_format}"))
    expected = [shard_path(output, index, output_format) for index in range(len(shards))]
    if shards != expected:
        missing = min(set(expected) - set(shards)).name  # same count, other names: one expected is missing
        raise SystemExit(f"{output}: {missing} is missing, so rows would be lost; pass --overwrite to start again")
    return shards


def read_manifest(output: Path) -> dict | None:
    path = output / MANIFEST
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def write_manifest(output: Path, manifest: dict) -> None:
    text = json.dumps(manifest, indent=2, ensure_ascii=False) + "\n"
    write_atomically(output / MANIFEST, lambda temporary: temporary.write_text(text, encoding="utf-8"))


def remove_outputs(output: Path) -> None:
    """This command's files only (shards of any format, leftovers, the manifest): the folder may hold others."""
    for pattern in (f"{SHARD_PREFIX}*", f".*{TEMPORARY_SUFFIX}", MANIFEST):
        for path in output.glob(pattern):
            path.unlink()


def rows_already_written(output: Path, manifest: dict, overwrite: bool) -> int:
    """Prepare `output` for this run and return how many rows are there to keep: 0 for a new or overwritten output,
    else the rows of the complete shards of a run with the same input, model and output options."""
    output.mkdir(parents=True, exist_ok=True)
    if overwrite:
        remove_outputs(output)
    previous = read_manifest(output)
    output_format = manifest["output"]["format"]
    if previous is None:
        if any(output.glob(f"{SHARD_PREFIX}*")):
            raise SystemExit(f"{output} holds shards but no {MANIFEST}: pass --overwrite, or another --output")
        return 0
    differs = [section for section in MUST_MATCH if previous.get(section) != manifest[section]]
    if differs:
        details = "; ".join(f"{section}: was {previous.get(section)}, now {manifest[section]}" for section in differs)
        raise SystemExit(f"{output} holds rows of another run ({details}). Pass --overwrite to start again, or "
                         "another --output")  # fmt: skip
    for leftover in output.glob(f".*{TEMPORARY_SUFFIX}"):  # a shard a killed run was writing
        leftover.unlink()
    return sum(shard_rows(path, output_format) for path in existing_shards(output, output_format))


@contextlib.contextmanager
def only_run_on(output: Path):
    """Refuse a second run on the same output while this one runs: two would write the same shards."""
    output.mkdir(parents=True, exist_ok=True)
    with open(output / LOCK_FILE, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SystemExit(f"another `fashion-hf tag` is writing to {output}") from None
        yield


# ---------------------------------------------------------------------------------------------------------------------
# The run.
# ---------------------------------------------------------------------------------------------------------------------


class ShardWriter:
    """Rows in, in order; numbered shards of `shard_size` rows out, the manifest's count updated after each."""

    def __init__(self, output: Path, manifest: dict, schema: pa.Schema, shard_size: int, rows_written: int):
        self.output, self.manifest, self.schema, self.shard_size = output, manifest, schema, shard_size
        self.format = manifest["output"]["format"]
        self.shards = len(existing_shards(output, self.format))
        self.rows_written = rows_written
        self.pending = []
        self.write_manifest()

    def add(self, rows: list[dict]) -> None:
        self.pending.extend(rows)
        while len(self.pending) >= self.shard_size:
            self._write(self.pending[: self.shard_size])
            del self.pending[: self.shard_size]

    def flush(self) -> None:
        if self.pending:
            self._write(self.pending)
            self.pending = []

    def _write(self, rows: list[dict]) -> None:
        write_shard(shard_path(self.output, self.shards, self.format), rows, self.format, self.schema)
        self.shards += 1
        self.rows_written += len(rows)
        self.write_manifest()

    def write_manifest(self) -> None:
        complete = self.rows_written == self.manifest["input"]["rows"]
        progress = {"rows": self.rows_written, "shards": self.shards, "complete": complete}
        write_manifest(self.output, {**self.manifest, **progress})


def model_fingerprint(model, processor) -> str:
    """SHA-256 of what decides the predictions: the config, the processor's settings and every weight."""
    unrelated = ("_name_or_path", "transformers_version")
    config = {key: value for key, value in model.config.to_dict().items() if key not in unrelated}
    digest = hashlib.sha256(json.dumps([config, processor.to_dict()], sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def tag(
    images: ImageRows,
    model,
    processor,
    output: str | Path,
    settings: TagSettings = TagSettings(),
    output_format: str = "parquet",
    shard_size: int = 1024,
    limit: int | None = None,
    model_name: str | None = None,
    engine: str = "local",
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Tag the first `limit` rows of `images` (all with None) into `output`, continuing a run that stopped there.

    Returns the manifest as written. See the module's docstring for the columns and the files.
    """
    if output_format not in FORMATS:
        raise ValueError(f"output_format must be one of {FORMATS}, got {output_format!r}")
    if shard_size < 1:
        raise ValueError(f"shard_size must be at least 1, got {shard_size}")
    output = Path(output)
    end = len(images) if limit is None else min(limit, len(images))
    manifest = {
        "input": images.description,
        # The runtime too: ONNX Runtime's scores differ from PyTorch's in the sixth decimal, so no run mixes them.
        "model": {"name": model_name, "sha256": model_fingerprint(model, processor), "runtime": settings.runtime},
        "output": {"format": output_format, **settings.output_options()},
        "run": {"engine": engine, "shard_size": shard_size, "limit": limit, "batch_size": settings.batch_size,
                "num_workers": settings.num_workers},  # fmt: skip
    }
    schema = output_schema(model.config, images.id_type, settings)
    model.eval()
    with only_run_on(output):
        start = rows_already_written(output, manifest, overwrite)
        shards = ShardWriter(output, manifest, schema, shard_size, start)
        with tqdm(total=end, initial=min(start, end), unit="img", desc="tag", disable=not progress) as bar:
            for batch in ENGINES[engine](model, processor, images, range(start, end), settings):
                # A resumed run skips as many rows as the shards hold: they must be the first ones, in input order.
                next_row = shards.rows_written + len(shards.pending)
                if [row for row, _ in batch] != list(range(next_row, next_row + len(batch))):
                    raise RuntimeError(f"engine {engine!r} returned rows out of order, expected {next_row} next")
                shards.add([{"id": images.ids[row], "path": images.paths[row], **columns} for row, columns in batch])
                bar.update(len(batch))
            shards.flush()
    return read_manifest(output)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="fashion-hf tag",
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[2:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "input", help="an image folder, a CSV/TSV/JSONL/parquet table, a Hub-style dataset folder or a Hub dataset id"
    )
    parser.add_argument("--output", required=True, help="the folder of shards and _manifest.json")
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"a model folder or Hub id (default {DEFAULT_MODEL})")
    parser.add_argument("--format", choices=FORMATS, default="parquet")
    parser.add_argument("--split", default="train", help="the split of a dataset folder or Hub dataset (default train)")
    parser.add_argument("--image-column", default="image")
    parser.add_argument("--id-column", default=None, help="default: `id` where the input has one, else the row number")
    parser.add_argument("--top-k", type=int, default=5, help="labels per attribute (default 5)")
    parser.add_argument("--num-beams", type=int, default=1, help="beams of the tag decoder (default 1: greedy)")
    parser.add_argument("--max-tags", type=int, default=None, help="at most this many tags (default the model's)")
    parser.add_argument("--embeddings", action="store_true", help="add each image's embedding")
    parser.add_argument("--limit", type=int, default=None, help="tag the first N rows only")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=None,
                        help="decoding processes (default: one per core but the one running the model; 0: none)")
    parser.add_argument("--shard-size", type=int, default=1024, help="rows per output file (default 1024)")
    parser.add_argument("--engine", choices=sorted(ENGINES), default="local")
    parser.add_argument("--ray-address", default=None,
                        help="the ray engine's cluster: auto (the one this machine is in) or ray://HEAD:10001 "
                             "(default: start a local Ray on this machine)")  # fmt: skip
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--runtime", choices=("torch", "onnx"), default=None,
                        help="onnx: the encoders in ONNX Runtime, 1.1-2.6x faster on CPU (default: onnx for the "
                             "local engine on CPU, else torch)")
    parser.add_argument("--overwrite", action="store_true", help="start again: delete this command's files in --output")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def with_runtime(model, source: str, runtime: str):
    """For "torch", the model with its encoders' batch norms folded (`FoldedTagger`); for "onnx", with its encoders
    run by ONNX Runtime (the graphs in the folder's `onnx/`, else exported once into a cache:
    `onnx_runtime.exported_folder`)."""
    if runtime == "torch":
        return FoldedTagger(model)
    from .onnx_runtime import OnnxTagger  # only here: the default runtime needs no onnxruntime

    return OnnxTagger.for_model(model, source)


def default_num_workers() -> int:
    return max(1, cpu_threads_per_process() - 1)


def main(argv=None) -> dict:
    args = parse_args(argv)
    keep_freed_memory()  # the encoder's activation buffers, reused instead of page-faulted in again per batch
    # With Ray this process's model only describes the rows (fingerprint, columns): the actors run their own.
    default_device = "cuda" if torch.cuda.is_available() and args.engine == "local" else "cpu"
    device = torch.device(args.device or default_device)
    model = AutoModel.from_pretrained(args.model).to(device).eval()
    processor = AutoImageProcessor.from_pretrained(args.model)
    # ONNX Runtime where it is known to run on a CPU: here; a Ray cluster's actors may have GPUs.
    runtime = args.runtime or ("onnx" if device.type == "cpu" and args.engine == "local" else "torch")
    if args.engine == "local":  # the ray engine's actors wrap their own models
        model = with_runtime(model, args.model, runtime)
    images = load_image_rows(args.input, args.split, args.image_column, args.id_column)
    settings = TagSettings(
        top_k=args.top_k, num_beams=args.num_beams, max_tags=args.max_tags, embeddings=args.embeddings,
        batch_size=args.batch_size, num_workers=default_num_workers() if args.num_workers is None else args.num_workers,
        ray_address=args.ray_address, runtime=runtime,
    )  # fmt: skip
    manifest = tag(
        images, model, processor, args.output, settings, args.format, args.shard_size, args.limit,
        model_name=args.model, engine=args.engine, overwrite=args.overwrite, progress=not args.no_progress,
    )  # fmt: skip
    print(f"{manifest['rows']} of {len(images)} rows in {args.output} ({manifest['shards']} {args.format} shards)")
    return manifest


if __name__ == "__main__":
    main()
