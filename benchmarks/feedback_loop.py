"""The feedback loop, measured: phone photos corrected through the app, a model retrained on them, before and after.

1. `python app.py` runs in its own process on 127.0.0.1 (`app_harness.AppServer`), serving `--model` with an empty
   feedback store in the work folder.
2. `--threads` simulated contributors, one `gradio_client.Client` each, take the train split of the phone photos
   (`clothing-user-photos` in the data folder, `fashion_hf.data.data_dir()`): each photo is tagged first (/tag: the
   prediction a person would see), then sent to /feedback with the two fields its contributor knows, articleType and
   subCategory, set to the true labels, each marked "changed" where the prediction's top label differs and
   "confirmed" where it matches. A failed call is counted, not retried; the run stops only if every photo fails.
3. With the app stopped, the model is retrained from `--model` with that store (`--train-config`, a YAML for
   train/train.py), timed: `accelerate launch ... train/train.py --config CONFIG --feedback STORE --output-dir OUT`.
4. Both models are evaluated (`train/evaluate.py`) on the phone validation split (photographers never seen in train)
   and on the product validation split of Fashion Product Images.

Writes `summary.json` to the work folder; `--write-benchmarks` appends the table to BENCHMARKS.md.

    python benchmarks/feedback_loop.py --reuse-shipped-metrics --write-benchmarks   # the whole loop
    python benchmarks/feedback_loop.py --smoke                    # toy data, tiny model, 1 epoch: 1-2 min
    python benchmarks/feedback_loop.py --workdir W --retrained W/retrain/model      # evaluate a run again
"""

import argparse
import json
import os
import platform
import queue
import shlex
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import yaml
from app_harness import REPO, AppServer, machine_line, record, tiny_model
from gradio_client import Client, handle_file
from load_app import stored_ids

from fashion_hf import data
from fashion_hf.configuration_fashion_tagger import USER_PHOTOS_DOMAIN
from fashion_hf.feedback import CHANGED, CONFIRMED
from fashion_hf.feedback import dataset as feedback_dataset
from fashion_hf.training.recipe import WALL_TIME, read_key, read_recipe

PHONE_PHOTOS = data.data_dir() / data.CLOTHING_USER_PHOTOS
PHONE_HEADS = data.CLOTHING_USER_PHOTOS_ATTRIBUTES  # what a contributor knows about a phone photo
PRODUCTS = "fashion-product-images"
SPLIT_NAMES = {"phone_validation": "phone validation", "product_validation": "product validation"}
TITLE = "Feedback loop: phone-photo corrections -> retrained model"
# Toy data for --smoke: (the photographer's label, articleType, subCategory, masterCategory, colour, RGB).
SMOKE_KINDS = (
    ("T-Shirt", "Tshirts", "Topwear", "Apparel", "Red", (200, 30, 30)),
    ("Pants", "Trousers", "Bottomwear", "Apparel", "Blue", (30, 30, 200)),
    ("Shoes", "Casual Shoes", "Shoes", "Footwear", "Green", (30, 160, 60)),
)
SMOKE_TRAINING = {  # train/train.py flags of the --smoke retraining: one epoch of a tiny model on cached features
    "dataset": PRODUCTS, "epochs": 1, "frozen_stages": "2", "cache_views": 2, "batch_size": 8, "num_workers": 0,
    "replay_images": 16, "feedback_repeats": 2, "keep_epoch": "last", "seed": 0,
}  # fmt: skip


def here(path: str) -> str:
    """A path of this repository as seen from the current folder ("train/train.py" from the repository root)."""
    return os.path.relpath(REPO / path)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=here("models/fashion-tagger"), help="model served and retrained from")
    parser.add_argument("--workdir", type=Path, help="work folder (default: a new one under outputs/feedback-loop/)")
    parser.add_argument("--threads", type=int, default=16, help="simulated contributors (default 16)")
    parser.add_argument("--limit", type=int, default=None, metavar="N", help="send the first N train photos only")
    parser.add_argument("--train-config", default=here("train/configs/feedback-loop.yaml"), help="train/train.py YAML")
    parser.add_argument("--phone-data", type=Path, default=PHONE_PHOTOS, help="clothing-user-photos folder")
    parser.add_argument("--product-data", default=None, help="Fashion Product Images folder (default: the loader's)")
    parser.add_argument("--skip-retrain", action="store_true", help="send the photos, evaluate --model only")
    parser.add_argument("--retrained", metavar="MODEL", help="no sending or training: evaluate MODEL as the after")
    parser.add_argument(
        "--reuse-shipped-metrics", action="store_true",
        help="product figures before: --model's own metrics.json (when it is of the product validation split)",
    )  # fmt: skip
    parser.add_argument("--write-benchmarks", action="store_true", help="append the results to BENCHMARKS.md")
    parser.add_argument("--smoke", action="store_true", help="toy data and a tiny model: checks that the loop runs")
    return parser.parse_args(argv)


# -- data -------------------------------------------------------------------------------------------------------------


@dataclass
class Photo:
    path: str
    labels: dict[str, str]  # the fields its contributor knows: articleType and subCategory


def read_photos(source: Path, split: str, folder: Path, limit: int | None) -> list[Photo]:
    """The phone photos of `split` as JPEG files (their own bytes, uploaded as a phone would) and their labels."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = sorted((source / "data").glob(f"{split}-*.parquet"))
    if not files:
        raise SystemExit(f"no {split} split of the phone photos at {source} (data/{split}-*.parquet): see --phone-data")
    table = pa.concat_tables(pq.read_table(file, columns=["image", *PHONE_HEADS]) for file in files)
    rows = table.slice(0, limit).to_pylist() if limit else table.to_pylist()
    folder.mkdir(parents=True, exist_ok=True)
    photos = []
    for index, row in enumerate(rows):
        path = folder / f"{index:05d}{Path(row['image'].get('path') or '.jpg').suffix or '.jpg'}"
        path.write_bytes(row["image"]["bytes"])
        photos.append(Photo(str(path), {head: row[head] for head in PHONE_HEADS}))
    return photos


def smoke_image(kind: tuple, index: int, phone: bool) -> dict:
    """A garment-coloured shape: on white like a product photo, or on a varied backdrop like a phone photo."""
    import io

    from PIL import Image

    backdrop = (90 + index * 37 % 120, 80 + index * 53 % 100, 70 + index * 29 % 110) if phone else (255, 255, 255)
    size = (90, 120) if phone else (60, 80)
    image = Image.new("RGB", size, backdrop)
    shape = {"Tshirts": (0.2, 0.2, 0.8, 0.6), "Trousers": (0.35, 0.15, 0.65, 0.9), "Casual Shoes": (0.1, 0.6, 0.9, 0.8)}
    left, top, right, bottom = shape[kind[1]]
    image.paste(kind[5], (int(left * size[0]), int(top * size[1]), int(right * size[0]), int(bottom * size[1])))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return {"bytes": buffer.getvalue(), "path": f"{index}.jpg"}


def write_smoke_data(folder: Path) -> tuple[Path, Path, dict[str, list[str]]]:
    """Tiny product and phone-photo data sets in their Hub parquet layouts, and the tiny model's heads and labels."""
    from datasets import Dataset, Features, Image, Value

    string = Value("string")
    product_features = Features({"id": Value("int64"), "image": Image(),
                                 **{name: string for name in data.PRODUCT_ATTRIBUTES}, "productDisplayName": string})
    phone_features = Features({"image": Image(), "label": string, "articleType": string, "subCategory": string,
                               "sender_id": Value("int64")})  # fmt: skip
    for split, count in (("train", 24), ("validation", 12)):
        products, phones = [], []
        for index in range(count):
            kind = SMOKE_KINDS[index % len(SMOKE_KINDS)]
            label, article, sub, master, colour, _ = kind
            products.append({
                "id": index, "image": smoke_image(kind, index, False), "gender": ("Men", "Women")[index % 2],
                "masterCategory": master, "subCategory": sub, "articleType": article, "baseColour": colour,
                "season": "Summer", "usage": "Casual", "productDisplayName": f"Acme {colour} {article}",
            })  # fmt: skip
            sender = index % 4 + (10 if split == "validation" else 0)  # no photographer in both splits
            phones.append({"image": smoke_image(kind, index, True), "label": label, "articleType": article,
                           "subCategory": sub, "sender_id": sender})  # fmt: skip
        for name, rows, features in (("products", products, product_features), ("phones", phones, phone_features)):
            (folder / name / "data").mkdir(parents=True, exist_ok=True)
            path = folder / name / "data" / f"{split}-00000-of-00001.parquet"
            Dataset.from_list(rows, features=features).to_parquet(path)
    column = {"masterCategory": 3, "subCategory": 2, "articleType": 1, "baseColour": 4}
    attributes = {name: sorted({kind[index] for kind in SMOKE_KINDS}) for name, index in column.items()}
    attributes = {"gender": ["Men", "Women"], **attributes, "season": ["Summer", "Winter"], "usage": ["Casual"]}
    return folder / "products", folder / "phones", attributes


def prepare_smoke(args: argparse.Namespace, workdir: Path) -> None:
    """--smoke: toy data, a tiny untrained model to serve, and a one-epoch training config, all in `workdir`."""
    products, phones, attributes = write_smoke_data(workdir / "smoke-data")
    args.model = str(tiny_model(workdir / "tiny-model", attributes))
    args.phone_data, args.product_data = phones, str(products)
    args.train_config = str(workdir / "smoke-training.yaml")
    Path(args.train_config).write_text(yaml.safe_dump({**SMOKE_TRAINING, "data_source": str(products)}))


# -- sending ----------------------------------------------------------------------------------------------------------


class Tally:
    """What the contributors' threads did: the record ids they were given, the statuses they sent, the errors."""

    def __init__(self):
        self.lock = threading.Lock()
        self.ids: list[str] = []
        self.statuses = {head: Counter() for head in PHONE_HEADS}
        self.errors: list[str] = []

    def ok(self, record_id: str, status: dict[str, str]) -> None:
        with self.lock:
            self.ids.append(record_id)
            for head, value in status.items():
                self.statuses[head][value] += 1

    def error(self, error: Exception) -> None:
        with self.lock:
            self.errors.append(f"{type(error).__name__}: {str(error)[:200]}")


def top_label(prediction: dict, head: str) -> str:
    """The top label of a head in /tag's answer (`{"attributes": {head: [{"label", "score"}, ...]}, "tags": ...}`)."""
    value = prediction["attributes"][head]
    return (value[0] if isinstance(value, list) else value)["label"]


def contributor(url: str, todo: queue.Queue, tally: Tally) -> None:
    """One person: tags each photo, then corrects or confirms the two fields they know, with consent."""
    try:
        client = Client(url, verbose=False)
    except Exception as error:  # noqa: BLE001 - counted; the other contributors take the photos
        tally.error(error)
        return
    while True:
        try:
            photo = todo.get_nowait()
        except queue.Empty:
            return
        try:
            shown = client.predict(handle_file(photo.path), api_name="/tag")
            status = {head: CONFIRMED if top_label(shown, head) == label else CHANGED
                      for head, label in photo.labels.items()}  # fmt: skip
            answer = client.predict(
                handle_file(photo.path), json.dumps(photo.labels), "", True, json.dumps(status), api_name="/feedback"
            )  # fmt: skip
            tally.ok(answer["id"], status)
        except Exception as error:  # noqa: BLE001 - counted and reported
            tally.error(error)


def send(model: str, photos: list[Photo], threads: int, workdir: Path) -> dict:
    """Start the app, let the contributors send every photo, stop the app; what was sent and stored."""
    store = workdir / "feedback"
    start = time.monotonic()
    server = AppServer(workdir, model, store).launch()
    try:
        server.wait_ready()
        ready = time.monotonic() - start
        print(f"app start: {ready:.1f} s ({server.url}, log {server.log_path})", flush=True)
        todo, tally = queue.Queue(), Tally()
        for photo in photos:
            todo.put(photo)
        workers = [threading.Thread(target=contributor, args=(server.url, todo, tally), daemon=True)
                   for _ in range(threads)]  # fmt: skip
        start = time.monotonic()
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        wall = time.monotonic() - start
    finally:
        server.stop()
    failed = len(photos) - len(tally.ids)
    print(f"sending: {len(tally.ids)} of {len(photos)} photos in {wall:.1f} s ({len(tally.ids) / wall:.2f} photos/s, "
          f"{threads} contributors), {len(tally.errors)} errors", flush=True)  # fmt: skip
    if tally.errors:
        print(f"first error: {tally.errors[0]}")
    if not tally.ids:
        raise SystemExit(f"every /feedback call failed; app log: {server.log_path}")
    summary = feedback_dataset.feedback_summary(store)
    return {
        "store": str(store), "app_start_seconds": round(ready, 1), "threads": threads, "photos": len(photos),
        "sent": len(tally.ids), "failed": failed, "errors": len(tally.errors),
        "first_error": next(iter(tally.errors), None),
        "seconds": round(wall, 1), "photos_per_second": len(tally.ids) / wall,
        "sent_statuses": {head: dict(counts) for head, counts in tally.statuses.items()},
        "records_in_store": len(stored_ids(store)), "training_records": summary["records"],
        "stored_statuses": summary["attributes"],
    }  # fmt: skip


# -- retraining and evaluation ----------------------------------------------------------------------------------------


def retrain(model: str, train_config: str, store: str, workdir: Path) -> dict:
    """train/train.py from `model` with the feedback store, as one process; the whole command timed."""
    accelerate = Path(sys.executable).with_name("accelerate")
    output = workdir / "retrain"
    command = [
        str(accelerate) if accelerate.is_file() else "accelerate", "launch",
        "--config_file", here("train/accelerate/one-process.yaml"), here("train/train.py"), "--config", train_config,
        "--feedback", store, "--output-dir", str(output), "--init-from", model,
    ]  # fmt: skip
    log_path = workdir / "retrain.log"
    print(f"retraining (log {log_path}): {shlex.join(command)}", flush=True)
    start = time.monotonic()
    with open(log_path, "wb") as log:
        returncode = subprocess.run(
            command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"}
        ).returncode  # fmt: skip
    wall = time.monotonic() - start
    if returncode:
        tail = log_path.read_text(errors="replace")[-3000:]
        raise SystemExit(f"retraining failed (exit status {returncode}); {log_path} ends:\n{tail}")
    print(f"retraining: {wall:.1f} s", flush=True)
    shown = shlex.join(["accelerate", *command[1:]])
    return {"command": shown, "wall_seconds": round(wall, 1), "model": str(output / "model"),
            **recipe_figures(output / "model")}  # fmt: skip


def recipe_figures(model: str | Path) -> dict:
    """What the run's recipe.json says of itself: its own wall time, hardware and the feedback it learned from."""
    recipe = read_recipe(model)
    return {"recipe_wall_seconds": read_key(recipe, WALL_TIME), "hardware": recipe.get("hardware"),
            "feedback": recipe.get("feedback")}  # fmt: skip


def figures(metrics: dict, path: Path, seconds: float | None = None) -> dict:
    """Top-1 per scored head of an evaluate.py metrics.json (heads with no label in the data are left out)."""
    scored = {
        head: values.get("top1")
        for head, values in (metrics.get("attributes") or {}).items()
        if values.get("support") and values.get("top1") is not None
    }
    return {"top1": scored, "n_images": metrics.get("n_images"), "metrics": str(path), "seconds": seconds,
            "domains_reached": metrics.get("domains_reached")}  # fmt: skip


def evaluate(model: str, dataset: str, source, output: Path) -> dict:
    """`python train/evaluate.py MODEL --dataset D --split validation --output DIR`, run in this process."""
    from fashion_hf.training import evaluate as evaluation

    argv = [model, "--dataset", dataset, "--split", "validation", "--output", str(output), "--no-progress"]
    argv += ["--data-source", str(source)] if source else []
    print(f"evaluating: python train/evaluate.py {shlex.join(argv)}", flush=True)
    start = time.monotonic()
    metrics = evaluation.main(argv)
    seconds = time.monotonic() - start
    print(f"evaluation: {seconds:.1f} s", flush=True)
    return figures(metrics, output / "metrics.json", round(seconds, 1))


def product_metrics(model: str, reuse: bool, like: dict | None) -> dict | None:
    """A model folder's own metrics.json, if it scores the product validation split (of `like`'s size, if given)."""
    path = Path(model) / "metrics.json"
    if not reuse or not path.is_file():
        return None
    metrics = json.loads(path.read_text())
    same = metrics.get("dataset") == PRODUCTS and metrics.get("split") == "validation"
    if not same or (like is not None and metrics.get("n_images") != like["n_images"]):
        return None
    print(f"product validation: {path} (already measured)")
    return figures(metrics, path)


def evaluations(args: argparse.Namespace, after: str | None, workdir: Path) -> dict:
    """Top-1 per head before and after, on the phone validation split and on the product validation split."""
    results = {"phone_validation": {}, "product_validation": {}}
    for when, model in (("before", args.model), ("after", after)):
        if model is None:
            continue
        phone = evaluate(model, data.CLOTHING_USER_PHOTOS, args.phone_data, workdir / f"eval-phone-{when}")
        results["phone_validation"][when] = phone
        # The retrained folder's metrics.json is the product validation split, as training measured it at the end.
        reuse = args.reuse_shipped_metrics if when == "before" else True
        like = results["product_validation"].get("before")
        results["product_validation"][when] = product_metrics(model, reuse, like) or evaluate(
            model, PRODUCTS, args.product_data, workdir / f"eval-product-{when}"
        )
    return results


# -- the report -------------------------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        lines = []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("Model name:")]
    return names[0] if names else platform.processor() or platform.machine()


def accuracy_table(results: dict) -> str:
    """Per head: top-1 before, after and the change, on the phone photos and on the product photos."""
    splits = [results["phone_validation"], results["product_validation"]]
    heads = list(dict.fromkeys(head for split in splits[::-1] for run in split.values() for head in run["top1"]))

    def cells(split: dict, head: str) -> list[str]:
        before, after = (split.get(when, {}).get("top1", {}).get(head) for when in ("before", "after"))
        change = f"{after - before:+.3f}" if before is not None and after is not None else "–"
        return [f"{value:.3f}" if value is not None else "–" for value in (before, after)] + [change]

    sizes = [next((str(run["n_images"]) for run in split.values()), "–") for split in splits]
    lines = [
        "| head | phone val. before | phone val. after | change | product val. before | product val. after | change |",
        "|---|---:|---:|---:|---:|---:|---:|",
        *[f"| {head} | " + " | ".join([*cells(splits[0], head), *cells(splits[1], head)]) + " |" for head in heads],
        f"| photos | {sizes[0]} | | | {sizes[1]} | | |",
    ]
    return "\n".join(lines)


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    if seconds < 120:
        return f"{seconds:.0f} s"
    hours, minutes = divmod(round(seconds / 60), 60)
    return f"{f'{hours} h ' if hours else ''}{minutes} min ({seconds:,.0f} s)"


def report_lines(summary: dict) -> list[str]:
    lines = []
    sending = summary.get("sending")
    if sending:
        changed = ", ".join(
            f"{head} {counts.get(CHANGED, 0)} changed / {counts.get(CONFIRMED, 0)} confirmed"
            for head, counts in sending["sent_statuses"].items()
        )
        lines += [
            f"corrections: {sending['records_in_store']} records in the store from {sending['sent']} photos sent "
            f"({sending['photos']} tried, {sending['errors']} failed calls); {changed}; "
            f"{sending['training_records']} records used by training",
            f"sending: {sending['photos_per_second']:.2f} photos/s ({sending['threads']} contributors, /tag then "
            f"/feedback per photo, {sending['seconds']:.0f} s; app start {sending['app_start_seconds']:.0f} s)",
        ]  # fmt: skip
    reached = {split: (summary.get(split) or {}).get("after", {}).get("domains_reached") for split in SPLIT_NAMES}
    if all(reached.values()):  # a retrained ensemble with user-photo experts behind a gate
        lines.append("gate: share of photos that reach the user-photo experts: " + ", ".join(
            f"{name} {reached[split][USER_PHOTOS_DOMAIN]:.1%}" for split, name in SPLIT_NAMES.items()
        ))  # fmt: skip
    retraining = summary.get("retraining")
    if retraining:
        recipe = retraining.get("recipe_wall_seconds")
        lines.append(
            f"retraining: {duration(retraining.get('wall_seconds'))} wall clock for the whole command"
            + (f" ({duration(recipe)} by its recipe.json)" if recipe is not None else "")
            + f" on {retraining.get('hardware') or 'this machine'}: `{retraining.get('command', '?')}`"
        )
    return lines


def main(argv=None) -> int:
    args = parse_args(argv)
    stamp = datetime.now(timezone.utc)
    workdir = args.workdir or REPO / "outputs" / "feedback-loop" / stamp.strftime("%Y%m%d-%H%M%S")
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    if args.smoke:
        prepare_smoke(args, workdir)
    elif not args.retrained and not args.skip_retrain and not Path(args.train_config).is_file():
        raise SystemExit(f"--train-config {args.train_config} not found")
    command = "python benchmarks/feedback_loop.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    machine = f"{cpu_model()}, {machine_line()}"
    print(f"work folder: {workdir}\nmodel: {args.model}\n{machine}", flush=True)

    summary_path = workdir / "summary.json"
    earlier = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    summary = {"command": command, "date": stamp.isoformat(timespec="seconds"), "machine": machine,
               "model": args.model}  # fmt: skip
    if args.retrained:  # an earlier run: its sending and training figures, from its summary or its recipe.json
        summary["sending"] = earlier.get("sending")
        summary["retraining"] = earlier.get("retraining") or {"model": args.retrained, **recipe_figures(args.retrained)}
        after = args.retrained
    else:
        photos = read_photos(Path(args.phone_data), "train", workdir / "photos", args.limit)
        print(f"{len(photos)} phone photos of the train split to send", flush=True)
        summary["sending"] = send(args.model, photos, args.threads, workdir)
        summary_path.write_text(json.dumps(summary, indent=2) + "\n")
        after = None
        if not args.skip_retrain:
            summary["retraining"] = retrain(args.model, args.train_config, summary["sending"]["store"], workdir)
            after = summary["retraining"]["model"]
    summary["retrained"] = after
    summary.update(evaluations(args, after, workdir))
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")

    table = accuracy_table(summary)
    lines = report_lines(summary)
    print(f"\n{table}\n" + "\n".join(f"- {line}" for line in lines) + f"\nsummary: {summary_path}")
    if args.write_benchmarks:
        body = "\n".join([
            f"Simulated contributors send the train split of the phone photos ({data.CLOTHING_USER_PHOTOS}) through "
            "`/feedback` of `python app.py`, each after tagging it, with articleType and subCategory set to the true "
            "labels (changed where the prediction differs, confirmed where it matches); the model is retrained from "
            f"{args.model} with that store, and both are evaluated on the phone validation split (photographers never "
            "seen in train) and on the product validation split. Top-1 per head:",
            "", f"```bash\n{command}\n```", "", f"Machine: {machine}.", "", table, "",
            *[f"- {line}" for line in lines],
        ])  # fmt: skip
        record(TITLE, body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
