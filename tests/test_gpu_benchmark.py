"""benchmarks/gpu/train_speed.py: its --cpu-smoke run on a tiny packed folder, and `pack`'s size limit."""

import gzip
import importlib.util
import json
import struct

import numpy as np
import pytest

from helpers import REPO, write_product_parquet


def load_script():
    spec = importlib.util.spec_from_file_location("train_speed", REPO / "benchmarks" / "gpu" / "train_speed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_idx(path, array):
    header = b"\x00\x00\x08" + bytes([array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as file:
        file.write(header + array.astype(np.uint8).tobytes())


def write_fake_mnist(folder, train=40, test=20):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, count in (("train", train), ("t10k", test)):
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (count, 28, 28)))
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", np.arange(count) % 10)


@pytest.fixture
def sources(tmp_path):
    write_product_parquet(tmp_path / "products", "train", 24)
    write_fake_mnist(tmp_path / "mnist")
    return tmp_path


def test_cpu_smoke_prints_positive_rates_and_accuracies(sources, capsys):
    script = load_script()
    packed = sources / "packed"
    script.main(["pack", "--out", str(packed), "--product-source", str(sources / "products"),
                 "--fashion-mnist-source", str(sources / "mnist"), "--photos", "16"])  # fmt: skip
    capsys.readouterr()
    script.main(["--data", str(packed), "--cpu-smoke"])
    summary = json.loads(capsys.readouterr().out)
    assert summary["device"] == "cpu" and summary["torch"]
    assert summary["product_training"]["photos_per_s"] > 0
    assert summary["product_training"]["train_photos_packed"] == 16
    run = summary["fashion_mnist_speed_run"]
    for key in ("accuracy_at_0.5s", "accuracy_at_1s"):
        assert 0.0 <= run[key] <= 1.0


def test_pack_refuses_to_exceed_the_size_limit(sources):
    script = load_script()
    packed = sources / "packed"
    with pytest.raises(SystemExit, match="exceed the limit"):
        script.main(["pack", "--out", str(packed), "--product-source", str(sources / "products"),
                     "--fashion-mnist-source", str(sources / "mnist"), "--limit-mib", "0.001"])  # fmt: skip
    assert not packed.exists()
