"""What the app benchmarks share: the model to serve, `python app.py` in its own process, real photos, figures.

Used by `load_app.py` and `bench_feedback.py`; see benchmarks/README.md ("Load and durability").
"""

import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO / "models" / "fashion-tagger"
BENCHMARKS_MD = REPO / "BENCHMARKS.md"


def served_model(path: str | None, workdir: Path) -> tuple[str, str]:
    """(model folder, description): `path`, else the shipped `models/fashion-tagger`, else a tiny model built here."""
    if path:
        return path, f"model {path}"
    if (DEFAULT_MODEL / "config.json").is_file():
        return str(DEFAULT_MODEL), f"the shipped model {DEFAULT_MODEL.relative_to(REPO)}"
    return str(tiny_model(workdir / "tiny-model")), (
        "a tiny untrained stand-in built on the fly (timm test_efficientnet, 64x48): models/fashion-tagger is "
        "absent, so the figures measure the app and its queue more than the model"
    )


def tiny_model(folder: Path, attributes: dict[str, list[str]] | None = None) -> Path:
    """An untrained model (timm test_efficientnet, 64x48) with its processor saved to `folder`; `attributes`: its
    heads and their labels (default: the configuration's)."""
    import torch

    import fashion_hf

    torch.manual_seed(0)
    config = fashion_hf.FashionTaggerConfig(
        encoder_name="test_efficientnet", image_size=(64, 48), decoder_hidden_size=32, tag_embedding_size=16,
        max_tag_length=8, attributes=attributes,
    )  # fmt: skip
    fashion_hf.FashionTaggerModel(config).eval().save_pretrained(folder)
    fashion_hf.FashionTaggerImageProcessor.from_model_config(config).save_pretrained(folder)
    return folder


def model_attributes(folder: str) -> dict[str, list[str]]:
    config = json.loads((Path(folder) / "config.json").read_text())
    order = config.get("attribute_order") or list(config["attributes"])
    return {name: config["attributes"][name] for name in order}


def photo_files(count: int, folder: Path) -> tuple[list[str], str]:
    """`count` JPEG files: the first photos of the validation split of Fashion Product Images, else synthetic ones."""
    from fashion_hf.data import data_dir  # here, not above, like tiny_model's imports: it loads torch and transformers

    folder.mkdir(parents=True, exist_ok=True)
    files = sorted((data_dir() / "fashion-product-images" / "data").glob("validation-*.parquet"))
    if files:
        import pyarrow.parquet as pq

        table = pq.read_table(files[0], columns=["id", "image"]).slice(0, count)
        paths = []
        for item_id, image in zip(table.column("id").to_pylist(), table.column("image").to_pylist()):
            path = folder / f"{item_id}.jpg"
            path.write_bytes(image["bytes"])  # the dataset's own encoded bytes, uploaded as they are
            paths.append(str(path))
        sizes = sorted(os.path.getsize(path) for path in paths)
        return paths, (
            f"{len(paths)} validation photos of Fashion Product Images (median {sizes[len(sizes) // 2] / 1024:.0f} KB)"
        )
    from PIL import Image

    paths = []
    for index in range(count):
        image = Image.new("RGB", (60, 80), (255, 255, 255))
        image.paste((index * 37 % 256, index * 91 % 256, index * 53 % 256), (15, 20, 45, 60))
        path = folder / f"synthetic-{index}.jpg"
        image.save(path, format="JPEG", quality=90)
        paths.append(str(path))
    return paths, f"{count} synthetic 60x80 photos (the shared data set is absent)"


@dataclass
class BenchmarkInputs:
    """What a benchmark run serves and uploads, and how to describe it in its record."""

    model: str
    photos: list[str]
    correction: str  # a valid /feedback correction (the first label of the first head), as JSON
    model_text: str
    photos_text: str
    machine: str


def prepare_inputs(model_path: str | None, image_count: int, workdir: Path) -> BenchmarkInputs:
    model, model_text = served_model(model_path, workdir)
    photos, photos_text = photo_files(image_count, workdir / "photos")
    attributes = model_attributes(model)
    first = next(iter(attributes))
    inputs = BenchmarkInputs(
        model, photos, json.dumps({first: attributes[first][0]}), model_text, photos_text, machine_line()
    )
    print(f"serving {model_text}\nuploading {photos_text}\n{inputs.machine}")
    return inputs


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class AppServer:
    """`python app.py` in its own process on 127.0.0.1, configured like a Space by environment variables."""

    def __init__(self, workdir: Path, model: str, feedback_dir: Path, extra_env: dict[str, str] | None = None):
        self.feedback_dir = Path(feedback_dir)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log_path = workdir / "app.log"
        self.env = {key: value for key, value in os.environ.items() if key != "HF_TOKEN"}
        self.env.update(
            FASHION_MODEL=model,
            FEEDBACK_DIR=str(feedback_dir),
            EXAMPLES_DIR=str(workdir / "no-examples"),
            GRADIO_SERVER_NAME="127.0.0.1",
            GRADIO_SERVER_PORT=str(self.port),
            GRADIO_ANALYTICS_ENABLED="False",
            HF_HUB_OFFLINE="1",
            PYTHONUNBUFFERED="1",
            **(extra_env or {}),
        )
        self.process = None

    def launch(self) -> "AppServer":
        """Start the process and return at once, so that it can boot while the caller does other work."""
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, str(REPO / "app.py")], cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT
            )
        return self

    def wait_ready(self, timeout: float = 300) -> "AppServer":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"app.py exited ({self.process.returncode}); its log ends:\n{self.log()[-3000:]}")
            try:
                if httpx.get(self.url, timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"app.py did not answer within {timeout:.0f} s; its log ends:\n{self.log()[-3000:]}")

    def start(self, timeout: float = 300) -> "AppServer":
        return self.launch().wait_ready(timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def memory(self) -> dict[str, int]:
        """Resident memory now and at its peak (VmRSS, VmHWM), bytes."""
        fields = {}
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) * 1024
        return {"rss": fields["VmRSS"], "peak": fields["VmHWM"]}

    def cpu_seconds(self) -> float:
        """CPU time the server process has used so far (user + system), seconds."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()

    def __enter__(self) -> "AppServer":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


def latency_row(name: str, clients: str, seconds: list[float], errors: int, wall: float) -> dict:
    """Figures of one run: requests, errors, throughput (answered requests per second), latency percentiles (ms)."""
    ms = sorted(1000 * value for value in seconds)
    quantiles = statistics.quantiles(ms, n=100, method="inclusive") if len(ms) >= 2 else ms * 99
    return {
        "run": name,
        "clients": clients,
        "requests": len(ms) + errors,
        "errors": errors,
        "per_second": len(ms) / wall if wall > 0 else float("nan"),
        "p50": quantiles[49] if ms else float("nan"),
        "p95": quantiles[94] if ms else float("nan"),
        "p99": quantiles[98] if ms else float("nan"),
        "max": ms[-1] if ms else float("nan"),
    }


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| run | clients | requests | errors | answered/s | p50 ms | p95 ms | p99 ms | max ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['run']} | {row['clients']} | {row['requests']} | {row['errors']} | {row['per_second']:.1f} "
            f"| {row['p50']:.0f} | {row['p95']:.0f} | {row['p99']:.0f} | {row['max']:.0f} |"
        )
    return "\n".join(lines)


def machine_line() -> str:
    load = " ".join(f"{value:.2f}" for value in os.getloadavg())
    return f"python {platform.python_version()}, {os.cpu_count()} CPUs, load average {load} at the start"


def record(title: str, body: str) -> None:
    """Append a dated section to BENCHMARKS.md (created if missing)."""
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    text = "" if BENCHMARKS_MD.exists() else "# Benchmarks\n"
    text += f"\n## {title} ({stamp})\n\n{wrap_prose(body.strip())}\n"
    with open(BENCHMARKS_MD, "a", encoding="utf-8") as handle:
        handle.write(text)
    print(f"appended to {BENCHMARKS_MD}")


def wrap_prose(text: str, width: int = 116) -> str:
    """Wrap the prose lines of a Markdown block (not tables, code or list items, which stay one line each)."""
    lines, in_code = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        if in_code or line.startswith(("```", "|", "- ")) or len(line) <= width:
            lines.append(line)
        else:
            lines.extend(textwrap.wrap(line, width, break_on_hyphens=False))
    return "\n".join(lines)


def mib(value: int) -> str:
    return f"{value / 2**20:.0f} MiB"
