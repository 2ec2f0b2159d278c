"""Per-head top-1 of the ONNX variants of a model: INT8 graphs against float32 ones (and, with --torch, PyTorch), on
the product validation split and the phone-photo validation split, every variant on the same decoded photos.

    python benchmarks/onnx_accuracy.py --onnx-folder /tmp/onnx-export/onnx           # after export-onnx --quantize
    python benchmarks/onnx_accuracy.py --onnx-folder DIR --limit 1500 --torch

Only the heads are scored (the tag decoder reads the same embeddings and does not change the heads' answers). INT8 is
worth shipping only where no head loses more than 0.3 points of top-1 against float32 (issue 18).
"""

import argparse
import json

import numpy as np
import torch
from transformers import AutoImageProcessor, AutoModel

from fashion_hf.data import load_clothing_user_photos, load_fashion_product_images
from fashion_hf.onnx_runtime import OnnxTagger

MAX_LOSS_POINTS = 0.3
BATCH = 64


@torch.inference_mode()
def top1_per_head(variants: dict, processor, dataset, attributes: dict[str, list[str]]) -> dict[str, dict[str, float]]:
    """Variant -> head -> top-1 in % over the photos labelled for that head (labels the model does not know count
    as missing, as in `fashion_hf.evaluation`)."""
    right = {name: {head: 0 for head in attributes} for name in variants}
    labelled = {head: 0 for head in attributes}
    for batch in dataset.iter(batch_size=BATCH):
        pixel_values = processor(batch["image"], return_tensors="pt")["pixel_values"]
        label_ids = {}
        for head, labels in attributes.items():
            index = {label: position for position, label in enumerate(labels)}
            label_ids[head] = np.array([index.get(label, -1) for label in batch[head]])
            labelled[head] += int((label_ids[head] >= 0).sum())
        for name, variant in variants.items():
            logits = variant(image_embeds=variant.encode_images(pixel_values)).attribute_logits
            for head in attributes:
                predicted = logits[head].argmax(-1).numpy()
                right[name][head] += int(((predicted == label_ids[head]) & (label_ids[head] >= 0)).sum())
    return {name: {head: 100 * right[name][head] / labelled[head] for head in attributes if labelled[head]} for name in variants}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="models/fashion-tagger")
    parser.add_argument("--onnx-folder", required=True, help="an onnx/ folder holding float32 and INT8 graphs")
    parser.add_argument("--limit", type=int, default=None, help="the first N photos of each split (default all)")
    parser.add_argument("--torch", action="store_true", help="also score the PyTorch model")
    args = parser.parse_args(argv)
    model = AutoModel.from_pretrained(args.model).eval()
    processor = AutoImageProcessor.from_pretrained(args.model)
    variants = {"onnx-fp32": OnnxTagger(model, args.onnx_folder), "onnx-int8": OnnxTagger(model, args.onnx_folder, quantized=True)}
    if args.torch:
        variants = {"torch": model, **variants}
    splits = {"product": load_fashion_product_images(split="validation"), "phone": load_clothing_user_photos(split="validation")}
    results = {}
    for split, dataset in splits.items():
        if args.limit:
            dataset = dataset.select(range(min(args.limit, len(dataset))))
        results[split] = top1_per_head(variants, processor, dataset, model.config.attributes)
        heads = list(results[split]["onnx-fp32"])
        print(f"\n{split} validation, {len(dataset)} photos, top-1 %:")
        print(f"| variant | {' | '.join(heads)} |\n|---|{'---|' * len(heads)}")
        for name, top1 in results[split].items():
            print(f"| {name} | {' | '.join(f'{top1[head]:.2f}' for head in heads)} |")
        losses = [results[split]["onnx-fp32"][head] - results[split]["onnx-int8"][head] for head in heads]
        print(f"| int8 loss (points) | {' | '.join(f'{loss:.2f}' for loss in losses)} |", flush=True)
    product = results["product"]
    largest = max(product["onnx-fp32"][head] - product["onnx-int8"][head] for head in product["onnx-fp32"])
    print(f"\nINT8, product validation: largest head loss {largest:.2f} points: "
          f"{'keep' if largest <= MAX_LOSS_POINTS else 'do not ship'} (limit {MAX_LOSS_POINTS})")  # fmt: skip
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
