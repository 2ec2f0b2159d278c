"""Combine trained fashion taggers into one ensemble model folder: weights, config, processor, code, metrics, card.

    python train/ensemble.py outputs/fashion-product-images-160/model \
        outputs/fashion-product-images-lite1-finetune/model --output-dir models/fashion-tagger

With `--add-experts-to ENSEMBLE`, the members given join that ensemble's user-photo experts instead (trained with
`train.py --vocabulary-from ENSEMBLE`): its own members stay as they are, and its gate is fitted again on the user
photos of `--feedback` or `--mix-dataset` against a catalogue sample. A member may have its own input size; the
ensemble's is the largest.

The members must share their vocabularies and input aspect (trained on one data set by `train/train.py`). Their
weights are stored in float16 by default, half the size, and the model is loaded and run in float32; the
evaluation written to the folder measures the stored weights, not the members' originals.
"""

import argparse
import shlex
import sys
import time
from pathlib import Path

import torch

from .. import FashionTaggerEnsembleModel, FashionTaggerImageProcessor, FashionTaggerModel
from .. import data
from ..configuration_fashion_tagger import USER_PHOTOS_DOMAIN
from .combine import combine, save
from .continuation import combine_with_experts
from .evaluate import load_eval_dataset, write_evaluation
from .loop import evaluate_user_photos
from .model_card import build_model_card
from .recipe import added_experts_recipe, combined_ensemble_recipe, push_to_hub, read_recipe, write_recipe


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
    parser.add_argument("--add-experts-to", default=None, metavar="ENSEMBLE",
                        help="add the members to this ensemble's user-photo experts (it may have none yet) and fit its gate")  # fmt: skip
    parser.add_argument("--feedback", default=None, help="with --add-experts-to: the feedback store the gate learns from")
    parser.add_argument("--mix-dataset", default=None, metavar="NAME",
                        help="with --add-experts-to: a built-in data set of user photos (its train split) for the gate")  # fmt: skip
    parser.add_argument("--seed", type=int, default=42, help="draws the gate's catalogue sample")
    parser.add_argument("--eval-user-photos", action="store_true",
                        help="also measure the ensemble on the phone photos' validation split, for the card")  # fmt: skip
    parser.add_argument("--push-to-hub", default=None, metavar="ORG/NAME", help="upload the folder to this Hub repo")
    parser.add_argument("--hub-private", action="store_true")
    # What the catalogue and user-photo loaders shared with train.py read (`examples.load_split`).
    parser.add_argument("--data-source", default=None, help="local folder or Hub id of --dataset (default: the loader's)")
    parser.set_defaults(train_split="train", with_brand=False, attributes=None, limit_train=None)
    args = parser.parse_args(argv)
    if args.add_experts_to and not (args.feedback or args.mix_dataset):
        parser.error("--add-experts-to fits the gate on user photos: give --feedback or --mix-dataset")
    return args


def main(argv=None) -> Path:
    args = parse_args(argv)
    started = time.time()
    output_dir = args.output_dir
    command = shlex.join(["python", "train/ensemble.py", *(argv if argv is not None else sys.argv[1:])])
    if args.add_experts_to:
        ensemble, processor, gate = with_added_experts(args)
    else:
        ensemble, processor = combine(args.members, args.mirror_views), FashionTaggerImageProcessor.from_pretrained(args.members[0])
    save(ensemble, processor, output_dir, getattr(torch, args.weights_dtype))

    model = FashionTaggerEnsembleModel.from_pretrained(output_dir).eval()  # measure what was stored
    processor = FashionTaggerImageProcessor.from_pretrained(output_dir)
    eval_set = load_eval_dataset(args.dataset, args.eval_split, model.config.attributes, source=args.data_source)
    if args.limit_eval:
        eval_set = eval_set.select(range(min(args.limit_eval, len(eval_set))))
    metrics = write_evaluation(model, processor, eval_set, output_dir, dataset_name=args.dataset, split=args.eval_split)
    user_photo_metrics = None
    if args.eval_user_photos:
        user_photo_metrics = evaluate_user_photos(output_dir, output_dir.parent / f"{output_dir.name}-user-photos")
    dataset_id = data.PRODUCT_IMAGES_HUB_ID if args.dataset == "fashion-product-images" else args.dataset
    base_models = list(dict.fromkeys(f"timm/{member['encoder_name']}" for member in model.config.members))
    seconds = time.time() - started
    if args.add_experts_to:
        recipe = added_experts_recipe(args, command, seconds, read_recipe(args.add_experts_to), gate, base_models)
    else:
        recipe = combined_ensemble_recipe(args, command, seconds, dataset_id, base_models)
    write_recipe(output_dir, recipe)
    card = build_model_card(output_dir, metrics, recipe, dataset_id=dataset_id, base_model=base_models,
                            repo_id=args.push_to_hub, user_photo_metrics=user_photo_metrics)  # fmt: skip
    card.save(output_dir / "README.md")
    print(f"model folder: {output_dir}")
    if args.push_to_hub:
        print(push_to_hub(output_dir, args.push_to_hub, private=args.hub_private))
    return output_dir


def with_added_experts(args):
    """`--add-experts-to`: that ensemble with the members given as more user-photo experts (or its first) and its
    gate fitted; returns the ensemble, its processor (at the largest member's input size) and the gate's record."""
    base = FashionTaggerEnsembleModel.from_pretrained(args.add_experts_to, dtype=torch.float32).drop_calibration()
    config = base.config
    experts = [base.members[index] for index in config.members_of(USER_PHOTOS_DOMAIN)]  # none in a catalogue ensemble
    experts += [FashionTaggerModel.from_pretrained(folder, dtype=torch.float32) for folder in args.members]
    processor = FashionTaggerImageProcessor.from_pretrained(args.add_experts_to)
    ensemble, gate = combine_with_experts(args, base, config.members_of(config.domains[0]), experts, processor)
    return ensemble, processor, gate


if __name__ == "__main__":
    main()
