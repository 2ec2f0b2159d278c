"""Training speed on a lent GPU machine: one script, its data packed beside it (the GPU machine sees no ../shared).

    python benchmarks/gpu/train_speed.py pack --out gpu-data            # here: 4,000 product photos + Fashion-MNIST
    python benchmarks/gpu/train_speed.py --data gpu-data                # there: bf16 on CUDA, a few minutes
    python benchmarks/gpu/train_speed.py --data gpu-data --cpu-smoke    # the same code paths on CPU, tiny sizes

Measures (1) training photos/s of the shipped recipe's model (train/configs/fashion-product-images.yaml:
tf_efficientnet_lite0 tagger, its batch size, image size, frozen stages and augmentation) with data loading included:
the project's `TaggingExamples` over the packed parquet in a DataLoader, every step decoding, augmenting and
preprocessing its photos, then the frozen trunk and the trained top, heads and decoder (the recipe caches the trunk's
features instead; here the trunk runs every step, so this is the rate of an uncached epoch); and (2) a Fashion-MNIST
speed run with train/configs/fashion-mnist.yaml's model, settings and loader: accuracy on the test images reached
after 10 s and 60 s of training wall time (evaluation pauses the clock). Prints a JSON summary.
"""

import argparse
import contextlib
import io
import json
import shutil
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from fashion_hf import data
from fashion_hf.image_processing_fashion_tagger import FashionTaggerImageProcessor
from fashion_hf.training.examples import TaggingExamples, collate, dataset_attributes
from fashion_hf.training.feature_cache import freeze
from fashion_hf.training.loop import TrainingTagger, build_model, parameter_groups
from fashion_hf.training.train import parse_args as parse_train_args

REPO = Path(__file__).resolve().parents[2]

PRODUCT_CONFIG = REPO / "train" / "configs" / "fashion-product-images.yaml"
MNIST_CONFIG = REPO / "train" / "configs" / "fashion-mnist.yaml"
PRODUCTS, MNIST = "fashion-product-images", "fashion-mnist"
MNIST_FILES = [f"{prefix}-{kind}-idx{dims}-ubyte.gz" for prefix in ("train", "t10k")
               for kind, dims in (("images", 3), ("labels", 1))]  # fmt: skip
MIB = 1 << 20


def pack(product_source: Path, mnist_source: Path, out: Path, photos: int, limit_mib: float) -> dict:
    """Write `photos` product training photos as one parquet file and copy the Fashion-MNIST IDX files into `out`;
    refuse, writing nothing, when they would take more than `limit_mib` MiB."""
    table = pa.concat_tables([pq.read_table(f) for f in sorted((product_source / "data").glob("train-*.parquet"))])
    buffer = io.BytesIO()
    pq.write_table(table.slice(0, photos), buffer)
    mnist_bytes = sum((mnist_source / name).stat().st_size for name in MNIST_FILES)
    total = len(buffer.getvalue()) + mnist_bytes
    if total > limit_mib * MIB:
        raise SystemExit(f"pack: {total / MIB:.1f} MiB would exceed the limit of {limit_mib} MiB; pack fewer photos")
    (out / PRODUCTS / "data").mkdir(parents=True, exist_ok=True)
    (out / PRODUCTS / "data" / "train-00000-of-00001.parquet").write_bytes(buffer.getvalue())
    (out / MNIST).mkdir(parents=True, exist_ok=True)
    for name in MNIST_FILES:
        shutil.copyfile(mnist_source / name, out / MNIST / name)
    return {"out": str(out), "photos": min(photos, len(table)), "mib": round(total / MIB, 2)}


def recipe_args(config: Path, source: Path, overrides: list[str]):
    return parse_train_args(["--config", str(config), "--data-source", str(source), *overrides])


def build(args, train_set, device):
    attributes = dataset_attributes(args, train_set)
    model = build_model(args, train_set, attributes)
    processor = FashionTaggerImageProcessor.from_model_config(model.config)
    tagger = TrainingTagger(model, args.frozen_stages)
    freeze(tagger.trunk)
    tagger.to(device).to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(parameter_groups(model, args))
    return tagger, processor, optimizer, attributes


def loader(args, dataset, config, processor, batch_size, shuffle, augment_strength, workers):
    examples = TaggingExamples(dataset, config, processor, args.augment, augment_strength, args.seed, 1)
    return torch.utils.data.DataLoader(examples, batch_size=batch_size, shuffle=shuffle, num_workers=workers,
                                       collate_fn=collate, pin_memory=torch.cuda.is_available(),
                                       persistent_workers=workers > 0, drop_last=shuffle)  # fmt: skip


def to_device(batch, device):
    batch = {key: value.to(device, non_blocking=True) for key, value in batch.items()}
    batch["pixel_values"] = batch["pixel_values"].contiguous(memory_format=torch.channels_last)
    return batch


def step(tagger, optimizer, batch, autocast):
    tagger.train()
    tagger.trunk.eval()  # frozen batch-norm statistics, as in train_epoch
    with autocast():
        loss = tagger(**batch).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(tagger.parameters(), 5.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def product_throughput(data_dir: Path, device, autocast, settings) -> dict:
    args = recipe_args(PRODUCT_CONFIG, data_dir / PRODUCTS, settings["product_overrides"])
    train_set = data.load_fashion_product_images(args.data_source, split="train")
    tagger, processor, optimizer, _ = build(args, train_set, device)
    batch_size = settings["product_batch_size"] or args.batch_size
    batches = loader(args, train_set, tagger.model.config, processor, batch_size, True, args.augment_strength,
                     settings["workers"])  # fmt: skip
    warmup, steps = settings["warmup_steps"], settings["steps"]
    done, started, photos = 0, None, 0
    while done < warmup + steps:
        for batch in batches:
            if done == warmup:
                synchronize(device)
                started = time.perf_counter()  # includes waiting for the loader from here on
            step(tagger, optimizer, to_device(batch, device), autocast)
            photos += len(batch["pixel_values"]) if done >= warmup else 0
            done += 1
            if done == warmup + steps:
                break
    synchronize(device)
    seconds = time.perf_counter() - started
    return {"photos_per_s": photos / seconds, "photos": photos, "seconds": seconds, "batch_size": batch_size,
            "image_size": list(tagger.model.config.image_size), "frozen_stages": args.frozen_stages,
            "train_photos_packed": len(train_set), "warmup_steps": warmup, "steps": steps}  # fmt: skip


@torch.inference_mode()
def accuracy(tagger, batches, device, autocast, attribute) -> float:
    tagger.eval()
    correct = counted = 0
    for batch in batches:
        batch = to_device(batch, device)
        with autocast():
            logits = tagger(pixel_values=batch["pixel_values"]).attribute_logits[attribute]
        labels = batch["attribute_labels"][:, 0]
        correct += (logits.argmax(-1) == labels).sum().item()
        counted += len(labels)
    return correct / max(counted, 1)


def mnist_speed_run(data_dir: Path, device, autocast, settings) -> dict:
    args = recipe_args(MNIST_CONFIG, data_dir / MNIST, settings["mnist_overrides"])
    train_set = data.load_fashion_mnist(args.data_source, split="train+validation")
    test_set = data.load_fashion_mnist(args.data_source, split="test")
    if settings["test_images"]:
        test_set = test_set.select(range(min(settings["test_images"], len(test_set))))
    tagger, processor, optimizer, attributes = build(args, train_set, device)
    config = tagger.model.config
    train_batches = loader(args, train_set, config, processor, args.batch_size, True, args.augment_strength,
                           settings["workers"])  # fmt: skip
    test_batches = loader(args, test_set, config, processor, 512, False, 0.0, settings["workers"])
    checkpoints, reached, elapsed, steps, photos = list(settings["checkpoints_s"]), {}, 0.0, 0, 0
    synchronize(device)
    started = time.perf_counter()
    while checkpoints:
        for batch in train_batches:
            step(tagger, optimizer, to_device(batch, device), autocast)
            steps, photos = steps + 1, photos + len(batch["pixel_values"])
            synchronize(device)
            now = elapsed + time.perf_counter() - started
            if now >= checkpoints[0]:
                mark = checkpoints.pop(0)
                reached[f"accuracy_at_{mark:g}s"] = accuracy(tagger, test_batches, device, autocast, attributes[0])
                reached[f"steps_by_{mark:g}s"] = steps
                elapsed, started = now, time.perf_counter()  # the clock stood still while it evaluated
                if not checkpoints:
                    break
    return {**reached, "train_images": len(train_set), "test_images": len(test_set), "photos_trained": photos,
            "batch_size": args.batch_size, "image_size": list(config.image_size), "frozen_stages": args.frozen_stages,
            "learning_rate": args.learning_rate, "evaluated_on": "test" if not settings["test_images"] else "test (first rows)"}  # fmt: skip


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["pack"]:
        parser = argparse.ArgumentParser(prog="train_speed.py pack")
        parser.add_argument("--out", type=Path, required=True)
        parser.add_argument("--product-source", type=Path, default=data.data_dir() / PRODUCTS)
        parser.add_argument("--fashion-mnist-source", type=Path, default=data.data_dir() / MNIST)
        parser.add_argument("--photos", type=int, default=4000)
        parser.add_argument("--limit-mib", type=float, default=60.0)
        a = parser.parse_args(argv[1:])
        summary = pack(a.product_source, a.fashion_mnist_source, a.out, a.photos, a.limit_mib)
        print(json.dumps(summary))
        return summary
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="a folder written by `pack`")
    parser.add_argument("--cpu-smoke", action="store_true", help="CPU, tiny sizes, a few seconds: the test's run")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup-steps", type=int, default=10)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--pretrained", default="auto", help="as train.py's --pretrained (auto, none, ...)")
    a = parser.parse_args(argv)
    pretrained = ["--pretrained", "none" if a.cpu_smoke else a.pretrained]
    if a.cpu_smoke:
        device = torch.device("cpu")
        settings = dict(steps=2, warmup_steps=1, workers=0, product_batch_size=4, test_images=32,
                        checkpoints_s=(0.5, 1.0), product_overrides=[*pretrained, "--image-size", "64", "48"],
                        mnist_overrides=[*pretrained, "--batch-size", "8"])  # fmt: skip
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: pass --cpu-smoke for the CPU check")
        device = torch.device("cuda")
        torch.backends.cudnn.benchmark = True
        settings = dict(steps=a.steps, warmup_steps=a.warmup_steps, workers=a.workers, product_batch_size=None,
                        test_images=None, checkpoints_s=(10.0, 60.0), product_overrides=pretrained,
                        mnist_overrides=pretrained)  # fmt: skip

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()

    torch.manual_seed(42)
    summary = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "precision": "bf16 autocast" if device.type == "cuda" else "float32",
        "cpu_smoke": a.cpu_smoke,
        "product_training": product_throughput(a.data, device, autocast, settings),
        "fashion_mnist_speed_run": mnist_speed_run(a.data, device, autocast, settings),
        "settings": {key: value for key, value in settings.items() if not key.endswith("overrides")}
                    | {"pretrained": pretrained[1], "data": str(a.data)},  # fmt: skip
    }
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
