"""Combine trained fashion taggers into one ensemble model folder: weights, config, processor, code, metrics, card.

    python train/ensemble.py outputs/fashion-product-images-160/model \
        outputs/fashion-product-images-lite1-finetune/model --output-dir models/fashion-tagger

The members must share their vocabularies and input size (trained on one data set by `train/train.py`). Their
weights are stored in float16 by default, half the size, and the model is loaded and run in float32; the
evaluation written to the folder measures the stored weights, not the members' originals.
"""

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

from .. import (
    FashionTaggerEnsembleConfig,
    FashionTaggerEnsembleModel,
    FashionTaggerImageProcessor,
    FashionTaggerModel,
)
from .. import data
from ..pipeline_fashion_tagging import save_tagger
from .train import previous_stages, push_to_hub


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


def combine(member_folders: list[str], mirror_views: bool = True) -> FashionTaggerEnsembleModel:
    members = [FashionTaggerModel.from_pretrained(folder, dtype=torch.float32) for folder in member_folders]
    return combine_models(members, mirror_views)


def combine_models(members: list[FashionTaggerModel], mirror_views: bool = True, **domain_fields) -> FashionTaggerEnsembleModel:
    """One ensemble of these trained taggers; `domain_fields` as `FashionTaggerEnsembleConfig.from_members` (the
    gate of an ensemble with experts is then still to be fitted: `domain_gate`)."""
    config = FashionTaggerEnsembleConfig.from_members([member.config for member in members], mirror_views, **domain_fields)
    ensemble = FashionTaggerEnsembleModel(config)
    for slot, member in zip(ensemble.members, members):
        slot.load_state_dict(member.state_dict())
    return ensemble.eval()


def save(ensemble: FashionTaggerEnsembleModel, processor, folder: Path, weights_dtype: torch.dtype) -> None:
    # Integer buffers (batch-norm counters) keep their dtype; the config keeps float32, the dtype it loads in.
    state_dict = {
        name: tensor.to(weights_dtype) if tensor.is_floating_point() else tensor
        for name, tensor in ensemble.state_dict().items()
    }
    save_tagger(ensemble, processor, folder, state_dict=state_dict)


def main(argv=None) -> Path:
    from .model_card import build_model_card
    from .evaluate import load_eval_dataset, write_evaluation

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
    recipe = {
        "command": shlex.join(["python", "train/ensemble.py", *(argv if argv is not None else sys.argv[1:])]),
        "wall_time_seconds": round(time.time() - started, 1),
        "hardware": f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "dataset_id": dataset_id,
        "base_model": base_models,
        "members": [{"folder": folder, "stages": previous_stages(folder)} for folder in args.members],
        # Each member's best epoch was chosen on its evaluation split; which members to combine is judged here.
        "selected_on": {"split": args.eval_split, "choices": ["each member's best epoch", "the ensemble's members"]},
        "arguments": vars(args),
    }
    (output_dir / "recipe.json").write_text(json.dumps(recipe, indent=2, default=str))
    card = build_model_card(output_dir, metrics, recipe, dataset_id=dataset_id, base_model=base_models, repo_id=args.push_to_hub)
    card.save(output_dir / "README.md")
    print(f"model folder: {output_dir}")
    if args.push_to_hub:
        print(push_to_hub(output_dir, args.push_to_hub, private=args.hub_private))
    return output_dir


if __name__ == "__main__":
    main()
