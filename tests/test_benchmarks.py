"""The speed benchmarks run end to end at toy sizes and print their tables (figures: BENCHMARKS.md, not here)."""

import sys

import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))

import bench_decoding  # noqa: E402
import bench_pipeline  # noqa: E402


def test_decoding_benchmark_checks_both_decoders_agree_and_prints_its_table(capsys):
    assert bench_decoding.main(["--batch-size", "4", "--repeats", "1", "--warmup", "0", "--vocabulary", "default"]) == 0
    output = capsys.readouterr().out
    assert "identical tag sequences" in output
    rows = [line for line in output.splitlines() if line.startswith("| full length") or line.startswith("| natural")]
    assert len(rows) >= 2 and all("x (" in row and row.rstrip().endswith(("PASS |", "MISS |")) for row in rows)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_pipeline_benchmark_prints_overhead_and_breakdown(capsys, dtype):
    argv = ["--synthetic", "--num-images", "4", "--batch-size", "2", "--repeats", "1", "--warmup", "0"]
    assert bench_pipeline.main([*argv, "--sizes", "64x48", "--decoder-matmul-dtype", dtype]) == 0
    output = capsys.readouterr().out
    assert f"decoder matmuls {dtype}" in output
    assert sum(line.startswith("| 64x48 |") for line in output.splitlines()) == 2  # overhead row and breakdown row
