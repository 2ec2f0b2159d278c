"""Combine trained fashion taggers into one ensemble model folder: weights, config, processor, code, metrics, card.

    python train/ensemble.py outputs/fashion-product-images-160/model \
        outputs/fashion-product-images-lite1-finetune/model --output-dir models/fashion-tagger

The members must share their vocabularies and input size (trained on one data set by `train/train.py`). Their
weights are stored in float16 by default, half the size, and the model is loaded and run in float32; the
evaluation written to the folder measures the stored weights, not the members' originals.
"""

import argparse
import shlex
import sys
import time
from pathlib import Path

import torch

from .. import FashionTaggerEnsembleModel, FashionTaggerImageProcessor
from .. import data
from .combine import combine, save
from .evaluate import load_eval_dataset, write_evaluation
from .model_card import build_model_card
from .recipe import combined_ensemble_recipe, push_to_hub, write_recipe


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("members", nargs="+", help="model folders written by train/train.py (their `model/`)")
    parser.add_argument("--output-dir", type=Path, required=True, help="the ensemble's model folder")
    parser.add_argument("--no-mirror", dest="mirror_views", action="store_false",
                        help="do not also run each member on the mirrored photo (half the encoder work)")  # fmt: skip
    parser.add_argument("--weights-dtype", choices=("float16", "float32"), default="float16",
                        help="dtype the weights are stored in; the model always runs in float32")  # fmt: skip
    parser.add_argument("--dataset", default="fashion-product-images", help="evaluation data, as train/evaluate.py")
    parser.add_argument("--eval-split", default="validation")
    parser.add_argument("--limit-eval", type=int, default=None, help="evaluate on the first N images only")
    parser.add_argument("--push-to-hub", default=None, metavar="ORG/NAME", help="upload the folder to this Hub repo")
    parser.add_argument("--hub-private", action="store_true")
    return parser.parse_args(argv)


def main(argv=None) -> Path:
    args = parse_args(argv)
    started = time.time()
    ensemble = combine(args.members, args.mirror_views)
    output_dir = args.output_dir
    save(ensemble, FashionTaggerImageProcessor.from_pretrained(args.members[0]), output_dir, getattr(torch, args.weights_dtype))

    model = FashionTaggerEnsembleModel.from_pretrained(output_dir).eval()  # measure what was stored
    processor = FashionTaggerImageProcessor.from_pretrained(output_dir)
    eval_set = load_eval_dataset(args.dataset, args.eval_split, model.config.attributes)
    if args.limit_eval:
        eval_set = eval_set.select(range(min(args.limit_eval, len(eval_set))))
    metrics = write_evaluation(model, processor, eval_set, output_dir, dataset_name=args.dataset, split=args.eval_split)
    dataset_id = data.PRODUCT_IMAGES_HUB_ID if args.dataset == "fashion-product-images" else args.dataset
    base_models = [f"timm/{member['encoder_name']}" for member in model.config.members]
    command = shlex.join(["python", "train/ensemble.py", *(argv if argv is not None else sys.argv[1:])])
    recipe = combined_ensemble_recipe(args, command, time.time() - started, dataset_id, base_models)
    write_recipe(output_dir, recipe)
    card = build_model_card(output_dir, metrics, recipe, dataset_id=dataset_id, base_model=base_models, repo_id=args.push_to_hub)
    card.save(output_dir / "README.md")
    print(f"model folder: {output_dir}")
    if args.push_to_hub:
        print(push_to_hub(output_dir, args.push_to_hub, private=args.hub_private))
    return output_dir


if __name__ == "__main__":
    main()
