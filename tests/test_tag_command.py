"""`fashion-hf tag`: every input image becomes one row, in order, as the pipeline tags it; runs resume without
duplicating or losing a row."""

import json
import sys

import numpy as np
import pandas as pd
import pytest
from transformers import pipeline

import fashion_hf
from fashion_hf.tag import MANIFEST, MAX_RAY_BLOCKS, TagSettings, load_image_rows, main, row_blocks
from fashion_hf.tag import tag as tag_images
from helpers import (
    COLOURS, encode, flat_colour, product_photo, save_model_with_detector, tagging_model, write_product_parquet,
)  # fmt: skip

NOT_AN_IMAGE = b"this is not an image"
LIST_COLUMNS = ("tags", "tag_groups", "tag_scores", "not_sure")


def write_photos(folder, count=5, corrupt_at=None):
    """`count` product photos named 00.jpg, 01.jpg, ... (one of them, `corrupt_at`, not an image)."""
    folder.mkdir(parents=True, exist_ok=True)
    colours = [*COLOURS.values(), (240, 200, 20), (90, 90, 90)]
    for index in range(count):
        path = folder / f"{index:02d}.jpg"
        if index == corrupt_at:
            path.write_bytes(NOT_AN_IMAGE)
        else:
            product_photo(colours[index % len(colours)], size=(50 + 7 * index, 80)).save(path)
    return folder


def tag(source, output, model, *flags) -> pd.DataFrame:
    """`fashion-hf tag` with PyTorch (the reference the pipeline is compared with) unless `flags` name a runtime."""
    runtime = [] if "--runtime" in flags else ["--runtime", "torch"]
    main([str(source), "--output", str(output), "--model", str(model), "--num-workers", "0", "--no-progress",
          *runtime, *flags])  # fmt: skip
    return read_parquet_rows(output)


def read_parquet_rows(output) -> pd.DataFrame:
    return pd.read_parquet(output)


def as_records(frame: pd.DataFrame) -> list[dict]:
    """Rows as plain Python values (lists, None), so that two frames compare with ==."""
    return json.loads(frame.to_json(orient="records"))


def labels(ranked: list[dict]) -> list[str]:
    return [entry["label"] for entry in ranked]


def test_an_unreadable_file_gets_an_error_row_and_the_others_are_tagged(tmp_path, tiny_model_dir):
    photos = write_photos(tmp_path / "photos", count=5, corrupt_at=2)
    rows = tag(photos, tmp_path / "tags", tiny_model_dir)

    assert rows["path"].tolist() == ["00.jpg", "01.jpg", "02.jpg", "03.jpg", "04.jpg"]
    assert rows["id"].tolist() == [0, 1, 2, 3, 4]
    broken = rows.iloc[2]
    assert "02.jpg" in broken["error"] and "not a readable image" in broken["error"]
    assert pd.isna(broken["articleType"]) and len(broken["articleType_top_k"]) == 0 and len(broken["tags"]) == 0
    tagged = rows.drop(index=2)
    assert tagged["error"].isna().all()
    assert tagged["articleType"].notna().all() and all(len(tags) > 0 for tags in tagged["tags"])


def test_rows_say_what_the_pipeline_says(tmp_path):
    model = save_model_with_detector(tmp_path / "model", {"articleType": 0.99, "gender": 0.01}, upright_search=True)
    photos = write_photos(tmp_path / "photos", count=4)
    flat_colour().save(photos / "04.png")  # flagged as not a product photo
    rows = tag(photos, tmp_path / "tags", model, "--top-k", "3", "--batch-size", "2")

    tagger = pipeline("fashion-tagging", model=str(model))
    expected = tagger([str(path) for path in sorted(photos.iterdir())], top_k=3)
    assert len(rows) == len(expected) == 5
    for row, said in zip(as_records(rows), expected):
        for attribute, ranked in said["attributes"].items():
            assert labels(row[f"{attribute}_top_k"]) == labels(ranked)
            assert [entry["score"] for entry in row[f"{attribute}_top_k"]] == pytest.approx(
                [entry["score"] for entry in ranked], abs=1e-5
            )
            assert row[attribute] == ranked[0]["label"]
            assert row[f"{attribute}_score"] == pytest.approx(ranked[0]["score"], abs=1e-5)
        assert row["tags"] == [tag["tag"] for tag in said["tags"]]
        assert row["tag_groups"] == [tag["group"] for tag in said["tags"]]
        assert row["tag_scores"] == pytest.approx([tag["score"] for tag in said["tags"]], abs=1e-5)
        assert row["not_sure"] == [name for name, unsure in said["not_sure"].items() if unsure] == ["articleType"]
        assert row["out_of_distribution"] == said["out_of_distribution"]["flagged"]
        assert row["out_of_distribution_score"] == pytest.approx(said["out_of_distribution"]["score"], abs=1e-5)
        assert row["turned_by"] == said["turned_by"]
    assert rows["out_of_distribution"].iloc[-1]
    assert 0 < (rows["turned_by"] > 0).sum() < len(rows)  # some photos were tagged turned, as the pipeline did


def test_embeddings_are_the_pooled_image_embeddings(tmp_path, tiny_model_dir):
    import torch
    from transformers import AutoImageProcessor, AutoModel

    photos = write_photos(tmp_path / "photos", count=3)
    rows = tag(photos, tmp_path / "tags", tiny_model_dir, "--embeddings")

    model = AutoModel.from_pretrained(tiny_model_dir).eval()
    processor = AutoImageProcessor.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        pixels = processor([str(path) for path in sorted(photos.iterdir())], return_tensors="pt")["pixel_values"]
        expected = model.encode_images(pixels)
    assert torch.from_numpy(np.stack(rows["embedding"])) == pytest.approx(expected, abs=1e-5)


def test_a_killed_run_continues_without_duplicating_or_losing_rows(tmp_path, tiny_model_dir):
    photos = write_photos(tmp_path / "photos", count=7, corrupt_at=3)
    uninterrupted = tag(photos, tmp_path / "whole", tiny_model_dir, "--shard-size", "2")
    output = tmp_path / "resumed"

    tag(photos, output, tiny_model_dir, "--shard-size", "2", "--limit", "5")  # stops after shards 0, 1 and 2
    assert sorted(path.name for path in output.glob("part-*")) == [f"part-0000{index}.parquet" for index in range(3)]
    # A kill while shard 2 was renamed and shard 3 was half written: the one lost, the other a temporary file.
    (output / "part-00002.parquet").unlink()
    (output / ".part-00003.parquet.tmp").write_bytes(b"PAR1 half a shard")
    resumed = tag(photos, output, tiny_model_dir, "--shard-size", "2")

    assert resumed["path"].tolist() == [f"{index:02d}.jpg" for index in range(7)]
    assert as_records(resumed) == as_records(uninterrupted)
    assert not list(output.glob(".*.tmp"))
    manifest = json.loads((output / MANIFEST).read_text())
    assert (manifest["rows"], manifest["complete"]) == (7, True)


def test_a_lost_shard_in_the_middle_is_refused_rather_than_skipped(tmp_path, tiny_model_dir):
    photos = write_photos(tmp_path / "photos", count=3)
    tag(photos, tmp_path / "tags", tiny_model_dir, "--shard-size", "1", "--limit", "2")
    (tmp_path / "tags" / "part-00000.parquet").unlink()
    with pytest.raises(SystemExit, match="part-00000.parquet is missing"):
        tag(photos, tmp_path / "tags", tiny_model_dir, "--shard-size", "1")


def test_a_finished_run_run_again_adds_nothing(tmp_path, tiny_model_dir):
    photos = write_photos(tmp_path / "photos", count=3)
    first = tag(photos, tmp_path / "tags", tiny_model_dir)
    again = tag(photos, tmp_path / "tags", tiny_model_dir)
    assert as_records(again) == as_records(first)


def test_resuming_with_another_model_is_refused(tmp_path, tiny_model_dir):
    photos = write_photos(tmp_path / "photos", count=3)
    other_model = save_model_with_detector(tmp_path / "other-model", {})
    tag(photos, tmp_path / "tags", tiny_model_dir, "--limit", "2")

    with pytest.raises(SystemExit, match="another run"):
        tag(photos, tmp_path / "tags", other_model)
    with pytest.raises(SystemExit, match="another run"):
        tag(photos, tmp_path / "tags", tiny_model_dir, "--top-k", "2")  # rows of another shape
    rows = tag(photos, tmp_path / "tags", other_model, "--overwrite")
    assert len(rows) == 3 and rows["out_of_distribution"].notna().all()  # all from the model with a detector


def test_resuming_with_another_input_is_refused(tmp_path, tiny_model_dir):
    photos = write_photos(tmp_path / "photos", count=3)
    tag(photos, tmp_path / "tags", tiny_model_dir, "--limit", "2")
    product_photo().save(photos / "01a.jpg")  # a new photo in the middle: every later row moves
    with pytest.raises(SystemExit, match="another run"):
        tag(photos, tmp_path / "tags", tiny_model_dir)


@pytest.mark.parametrize("output_format", ["jsonl", "csv"])
def test_jsonl_and_csv_hold_the_same_rows_as_parquet(tmp_path, tiny_model_dir, output_format):
    photos = write_photos(tmp_path / "photos", count=3, corrupt_at=1)
    expected = as_records(tag(photos, tmp_path / "parquet", tiny_model_dir, "--shard-size", "2"))
    output = tmp_path / output_format
    main([str(photos), "--output", str(output), "--model", str(tiny_model_dir), "--num-workers", "0", "--no-progress",
          "--format", output_format, "--shard-size", "2"])  # fmt: skip

    shards = sorted(output.glob(f"part-*.{output_format}"))
    assert [path.name for path in shards] == [f"part-00000.{output_format}", f"part-00001.{output_format}"]
    if output_format == "jsonl":
        rows = [json.loads(line) for path in shards for line in path.read_text().splitlines()]
    else:
        frame = pd.concat([pd.read_csv(path, keep_default_na=False, na_values=[""]) for path in shards])
        lists = [column for column in frame.columns if column.endswith("_top_k") or column in LIST_COLUMNS]
        frame[lists] = frame[lists].map(json.loads)
        rows = as_records(frame)
    assert len(rows) == 3
    assert rows[1]["error"] == expected[1]["error"] and "01.jpg" in rows[1]["error"]
    for row, want in zip(rows, expected):
        assert row["path"] == want["path"] and row["tags"] == want["tags"] and row["not_sure"] == want["not_sure"]
        assert row["articleType"] == want["articleType"]
        assert labels(row["articleType_top_k"]) == labels(want["articleType_top_k"])
        assert row["tag_scores"] == pytest.approx(want["tag_scores"])


def test_a_parquet_table_of_image_bytes_is_tagged_with_its_ids(tmp_path, tiny_model_dir):
    table = tmp_path / "images.parquet"
    images = [encode(product_photo(colour)) for colour in COLOURS.values()]
    pd.DataFrame({"sku": ["007", "008", "009", "010"], "photo": [*images, NOT_AN_IMAGE]}).to_parquet(table)
    rows = tag(table, tmp_path / "tags", tiny_model_dir, "--image-column", "photo", "--id-column", "sku")

    assert rows["id"].tolist() == ["007", "008", "009", "010"]
    assert rows["path"].isna().all()
    assert rows["error"].iloc[:3].isna().all() and "row 3" in rows["error"].iloc[3]


def test_a_dataset_folder_is_read_by_split_with_its_ids(tmp_path, tiny_model_dir):
    write_product_parquet(tmp_path / "products", "validation", 4)  # an `Image()` column of bytes, ids 0-3
    write_product_parquet(tmp_path / "products", "train", 6)
    rows = tag(tmp_path / "products", tmp_path / "tags", tiny_model_dir, "--split", "validation")
    assert rows["id"].tolist() == [0, 1, 2, 3]
    assert rows["path"].tolist() == ["0.jpg", "1.jpg", "2.jpg", "3.jpg"]
    assert rows["error"].isna().all()


def test_a_table_of_paths_tags_what_it_finds_and_names_what_is_missing(tmp_path, tiny_model_dir):
    write_photos(tmp_path / "shop" / "img", count=2)
    (tmp_path / "shop" / "catalogue.csv").write_text("id,image\n0001,img/00.jpg\n0002,img/gone.jpg\n0003,img/01.jpg\n")
    rows = tag(tmp_path / "shop" / "catalogue.csv", tmp_path / "tags", tiny_model_dir)

    assert rows["id"].tolist() == ["0001", "0002", "0003"]  # ids are text, leading zeros kept
    assert rows["path"].tolist() == ["img/00.jpg", "img/gone.jpg", "img/01.jpg"]
    assert "gone.jpg" in rows["error"].iloc[1] and "not an existing file" in rows["error"].iloc[1]
    assert rows["error"].iloc[[0, 2]].isna().all()


@pytest.mark.slow  # decoding worker processes
def test_decoding_workers_give_the_same_rows_as_decoding_in_turn(tmp_path, tiny_model_dir):
    photos = write_photos(tmp_path / "photos", count=9, corrupt_at=4)
    in_turn = tag(photos, tmp_path / "in-turn", tiny_model_dir, "--batch-size", "2")
    main([str(photos), "--output", str(tmp_path / "workers"), "--model", str(tiny_model_dir), "--no-progress",
          "--num-workers", "2", "--batch-size", "2"])  # fmt: skip
    assert as_records(read_parquet_rows(tmp_path / "workers")) == as_records(in_turn)


def test_the_fashion_hf_command_runs_tag(tmp_path, tiny_model_dir):
    from fashion_hf.cli import main as fashion_hf

    photos = write_photos(tmp_path / "photos", count=2)
    fashion_hf(["tag", str(photos), "--output", str(tmp_path / "tags"), "--model", str(tiny_model_dir),
                "--num-workers", "0", "--no-progress"])  # fmt: skip
    assert len(read_parquet_rows(tmp_path / "tags")) == 2


def test_a_hub_dataset_id_that_cannot_be_reached_says_so(tmp_path, tiny_model_dir):
    with pytest.raises(FileNotFoundError, match="not a local path and the Hub cannot be reached"):
        tag("someone/no-such-dataset", tmp_path / "tags", tiny_model_dir)


# --- the ray engine ----------------------------------------------------------------------------------------------


@pytest.fixture
def local_ray():
    """A local 2-CPU Ray, as a user's notebook or script would have started it: the ray engine joins it."""
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)  # not another's cluster
    yield ray
    ray.shutdown()


@pytest.fixture
def one_torch_thread():
    """The model's arithmetic in a Ray actor, which has one CPU: with more threads, the local engine's floats differ
    from the actors' in their last bits (oneDNN splits the work otherwise), as they would between two machines."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow  # starts Ray
def test_the_ray_engine_gives_the_local_engines_rows(tmp_path, tiny_model_dir, local_ray, one_torch_thread):
    photos = write_photos(tmp_path / "photos", count=40, corrupt_at=17)
    flags = ("--batch-size", "4", "--shard-size", "16", "--top-k", "3", "--embeddings")
    local = tag(photos, tmp_path / "local", tiny_model_dir, *flags)
    with_ray = tag(photos, tmp_path / "ray", tiny_model_dir, *flags, "--engine", "ray")

    assert as_records(with_ray) == as_records(local)  # every column, in the same order
    assert with_ray["path"].tolist() == [f"{index:02d}.jpg" for index in range(40)]
    assert "17.jpg" in with_ray["error"].iloc[17] and "not a readable image" in with_ray["error"].iloc[17]
    assert with_ray["error"].drop(index=17).isna().all() and all(len(tags) > 0 for tags in with_ray["tags"][:17])
    assert len(list((tmp_path / "ray").glob("part-*.parquet"))) == 3
    assert json.loads((tmp_path / "ray" / MANIFEST).read_text())["run"]["engine"] == "ray"
    assert local_ray.is_initialized()  # a Ray the engine joined is left running


@pytest.mark.slow  # starts Ray
def test_a_stopped_ray_run_continues_without_duplicating_or_losing_rows(
    tmp_path, tiny_model_dir, local_ray, one_torch_thread
):
    photos = write_photos(tmp_path / "photos", count=40, corrupt_at=17)
    flags = ("--batch-size", "4", "--shard-size", "6")
    uninterrupted = tag(photos, tmp_path / "local", tiny_model_dir, *flags)
    output = tmp_path / "ray"

    tag(photos, output, tiny_model_dir, *flags, "--engine", "ray", "--limit", "21")  # shards of 6, 6, 6 and 3 rows
    (output / "part-00003.parquet").unlink()  # a kill while its rename was on its way to the disk
    (output / ".part-00003.parquet.tmp").write_bytes(b"PAR1 half a shard")
    resumed = tag(photos, output, tiny_model_dir, *flags, "--engine", "ray")  # from row 18: mid-batch

    assert as_records(resumed) == as_records(uninterrupted)
    manifest = json.loads((output / MANIFEST).read_text())
    assert (manifest["rows"], manifest["complete"]) == (40, True)


@pytest.mark.slow  # starts Ray
def test_the_ray_engine_starts_a_local_ray_and_shuts_it_down(tmp_path, tiny_model_dir, monkeypatch, one_torch_thread):
    ray = pytest.importorskip("ray")
    init, starts = ray.init, []

    def init_two_cpus(**options):  # sized to a 2-core machine whatever this one is
        starts.append(options["address"])
        return init(num_cpus=2, **options)

    monkeypatch.setattr(ray, "init", init_two_cpus)
    photos = write_photos(tmp_path / "photos", count=5, corrupt_at=1)
    rows = tag(photos, tmp_path / "tags", tiny_model_dir, "--engine", "ray")

    assert starts == ["local"] and not ray.is_initialized()
    assert as_records(rows) == as_records(tag(photos, tmp_path / "local", tiny_model_dir))


@pytest.mark.slow  # starts Ray
def test_ray_actors_refuse_a_model_folder_that_is_not_the_runs_model(tmp_path, tiny_model_dir, local_ray):
    import torch
    from transformers import AutoImageProcessor, AutoModel

    model = AutoModel.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)  # what a stale copy of the folder on another machine would hold
    images = load_image_rows(str(write_photos(tmp_path / "photos", count=2)))
    processor = AutoImageProcessor.from_pretrained(tiny_model_dir)
    with pytest.raises(Exception, match="is not the model this run was started with"):
        tag_images(images, model, processor, tmp_path / "tags", TagSettings(), engine="ray", progress=False)
    assert not list((tmp_path / "tags").glob("part-*"))


def test_the_ray_engine_needs_a_model_it_can_load_again(tmp_path):
    model = tagging_model()  # never saved: the actors could not load it
    processor = fashion_hf.FashionTaggerImageProcessor.from_model_config(model.config)
    images = load_image_rows(str(write_photos(tmp_path / "photos", count=2)))
    with pytest.raises(ValueError, match="save it with save_pretrained"):
        tag_images(images, model, processor, tmp_path / "tags", TagSettings(), engine="ray", progress=False)


def test_without_ray_installed_the_ray_engine_says_how_to_install_it(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` does where it is not installed
    photos = write_photos(tmp_path / "photos", count=2)
    with pytest.raises(ImportError, match=r"pip install 'ray\[data\]'"):
        tag(photos, tmp_path / "tags", tiny_model_dir, "--engine", "ray")


def test_ray_blocks_are_whole_batches_in_row_order_and_few():
    for rows, batch_size in ((range(7, 47), 4), (range(3, 1_000_003), 32)):
        blocks = [block.column("row").to_numpy() for block in row_blocks(rows, batch_size)]
        assert np.array_equal(np.concatenate(blocks), np.arange(rows.start, rows.stop))
        assert all(len(block) % batch_size == 0 for block in blocks[:-1]) and len(blocks) <= MAX_RAY_BLOCKS
    assert len(row_blocks(range(7, 47), 4)) == 10  # a small run: one batch a block, for every actor to have some


def test_the_onnx_runtime_gives_the_torch_rows_within_a_thousandth(tmp_path, tiny_model_dir):
    photos = write_photos(tmp_path / "photos", count=4, corrupt_at=1)
    reference = as_records(tag(photos, tmp_path / "torch", tiny_model_dir))
    fast = as_records(tag(photos, tmp_path / "onnx", tiny_model_dir, "--runtime", "onnx"))
    assert json.loads((tmp_path / "onnx" / MANIFEST).read_text())["model"]["runtime"] == "onnx"
    for expected, row in zip(reference, fast, strict=True):
        assert row["error"] == expected["error"] and row["tags"] == expected["tags"]
        for name in ("articleType", "gender", "baseColour"):
            assert row[name] == expected[name]
            if expected[name] is not None:
                assert row[f"{name}_score"] == pytest.approx(expected[f"{name}_score"], abs=1e-3)
    with pytest.raises(SystemExit, match="runtime"):  # no run mixes the two runtimes' rows
        tag(photos, tmp_path / "torch", tiny_model_dir, "--runtime", "onnx")
