"""Train a fashion tagger: one CPU, one GPU or many, same script.

    accelerate launch --config_file train/accelerate/one-process.yaml train/train.py \\
        --config train/configs/fashion-product-images.yaml [--flag value ...]

Flags override the YAML config; both use the names below. The run ends with a Hub-ready folder in --output-dir
(weights, config, processor, remote code, model card, plots) that --push-to-hub ORG/NAME uploads.

Fast CPU mode (--frozen-stages N or all): the encoder's stem and first N stages are frozen and run once per image
and augmented view; only the rest of the network trains, on those cached features. --finetune-epochs then trains the
whole network on augmented images.

Splits: the best epoch is chosen on --eval-split, so its figures are optimistic; --test-split, when given, is
evaluated once at the end, with the chosen weights, and is what metrics.json and the model card report.

Your own catalogue (--dataset PATH), one of two layouts:

  shop/                              image folder: load_dataset("imagefolder") with a metadata.csv
    metadata.csv                     file_name (required), one column per attribute, optional:
    img/0001.jpg ...                   productDisplayName (detail tags are mined from it) and split

  catalogue.csv (or .tsv/.parquet)   a table: image (required, a path relative to the table), one column
  photos/0001.jpg ...                per attribute, optional productDisplayName and split

Every other column is an attribute head (or name them: --attributes articleType baseColour); an empty cell is a
missing label, never a class. A catalogue's `split` column (train / validation / test) sets the splits; without
one, validation is a fixed ~10% chosen by the SHA-256 of each image's bytes (the same on every run, recorded in
recipe.json) and train is the rest. Worked example (README, "Your own catalogue"):

  mkdir -p shop/img && cp ~/photos/*.jpg shop/img/
  cat > shop/metadata.csv <<'CSV'
  file_name,articleType,baseColour,productDisplayName
  img/0001.jpg,Shirts,Navy Blue,Acme Men Checked Slim Fit Shirt
  img/0002.jpg,Jeans,,Acme Women Skinny Denim Jeans
  CSV
  accelerate launch --config_file train/accelerate/one-process.yaml train/train.py --dataset shop \\
      --output-dir outputs/shop --epochs 10
  python train/evaluate.py outputs/shop/model --dataset shop --split validation --output outputs/shop/eval

--min-tag-count defaults to 20 for the built-in data sets and, for a catalogue, scales with its training images
(one per 1,000, at least 3, at most 20: a 200-image catalogue keeps detail tags seen on 3 items).
"""

import argparse
import shlex
import sys
from pathlib import Path

import yaml

from ..runtime import keep_freed_memory
from .augment import AUGMENTATIONS
from .continuation import continue_ensemble, is_ensemble
from .distillation import TeacherMismatchError
from .loop import NoCheckpointError, train_model


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file whose keys are these flags (dashes or underscores)")
    add = parser.add_argument
    # Data
    add("--dataset", default="fashion-product-images", help="fashion-product-images, fashion-mnist, or a catalogue path")
    add("--data-source", default=None, help="local folder or Hub id for the dataset (default: the loader's)")
    add("--train-split", default="train")
    add("--eval-split", default="validation", help="split the best epoch is chosen on (its figures are optimistic)")
    add("--test-split", default=None,
        help="split evaluated once at the end, for metrics.json and the card (default: none; --eval-split is reported)")
    add("--attributes", nargs="+", default=None, help="heads to train (default: every attribute of the dataset)")
    add("--with-brand", action="store_true", help="add the brand head mined from product names")
    add("--min-tag-count", type=int, default=None,
        help="fewest training items a mined detail tag needs to join the vocabulary (default: 20; a catalogue: "
        "its training images / 1,000, between 3 and 20)")
    add("--feedback", default=None, help="feedback store folder or Hub dataset whose corrections join the training data")
    add("--feedback-repeats", type=int, default=1,
        help="times each feedback record is seen per epoch (differently augmented): a few thousand corrections "
        "beside tens of thousands of catalogue images would otherwise barely move the model")
    add("--feedback-balance", choices=("none", "sqrt"), default="none",
        help="sqrt: repeat each correction in proportion to 1 / sqrt(corrections of its articleType, else "
        "subCategory), --feedback-repeats times on average, so that rare kinds weigh more")
    add("--mix-dataset", default=None, metavar="NAME",
        help="a second built-in data set whose train split joins the training data (e.g. clothing-user-photos: "
        "phone photos with subCategory and articleType only; the heads it does not label are masked)")
    add("--mix-repeats", type=int, default=1, help="times each --mix-dataset image is seen per epoch")
    add("--replay-images", type=int, default=None,
        help="train on this many images of the train split, drawn with --seed, instead of all of it: with --init-from "
        "and --feedback, the catalogue replayed beside the corrections so that the model forgets nothing")
    add("--replay-kinds", default="all", choices=["all", "corrected"],
        help="all: the replayed images drawn uniformly; corrected: half of them spread evenly over the articleTypes "
        "the corrections (and --mix-dataset) name, so that a kind rare in the catalogue is replayed as often")
    add("--feedback-tag-min-contributors", type=int, default=None,
        help="people who must type a feedback tag for it to join the vocabulary (default: the config's, 3)")
    add("--limit-train", type=int, default=None)
    add("--limit-eval", type=int, default=None)
    # Model
    add("--init-from", default=None,
        help="start from this model folder: a model (keeps its heads and tags; typed feedback tags are added) or an "
        "ensemble (each member continues training in turn, then they are combined again)")
    add("--vocabulary-from", default=None, metavar="MODEL",
        help="a new model with MODEL's head labels and tag vocabulary instead of the data's: a member to join "
        "MODEL's ensemble (train/ensemble.py --add-experts-to), e.g. with another encoder or input size")
    add("--encoder-name", default="tf_efficientnet_lite0")
    add("--image-size", type=int, nargs=2, default=None, metavar=("HEIGHT", "WIDTH"),
        help="input size (default 128 96; with --init-from, the model's own size unless given)")
    add("--pretrained", default="auto", choices=["auto", "timm", "package", "none"])
    add("--decoder-type", default="gru", choices=["gru", "lstm"])
    add("--decoder-hidden-size", type=int, default=512)
    add("--tag-embedding-size", type=int, default=256)
    add("--max-tag-length", type=int, default=16)
    add("--classifier-dropout", type=float, default=0.2)
    add("--label-smoothing", type=float, default=0.1)
    add("--distill-from", nargs="+", default=None, metavar="MODEL",
        help="trained models (same heads) whose averaged head probabilities are soft targets too; needs --frozen-stages 0")
    add("--distill-from-start", action="store_true",
        help="with --init-from: the starting model's head probabilities are soft targets too, wherever no label "
        "contradicts them (learning without forgetting; cheap on cached features)")
    add("--distill-weight", type=float, default=1.0, help="weight of the distillation term added to the loss")
    add("--distill-temperature", type=float, default=2.0)
    add(
        "--decoder-matmul-dtype",
        default=None,
        choices=["float32", "bfloat16"],
        help="the written model's decoder_matmul_dtype (inference only; default float32, or --init-from's)",
    )
    # Optimisation
    add("--frozen-stages", default="4", help="'all' (cache pooled embeddings), N (freeze stem + N stages) or 0")
    add("--cache-views", type=int, default=3, help="augmented views cached per training image (the first is clean)")
    add("--epochs", type=int, default=10, help="epochs with the frozen stages (all epochs when --frozen-stages 0)")
    add("--finetune-epochs", type=int, default=0, help="then epochs of the whole network on augmented images")
    add("--keep-epoch", default="best", choices=["best", "last"],
        help="the epoch written: the best mean top-1 on --eval-split, or the last (when --eval-split does not "
        "measure what the run is for, e.g. corrections of photos unlike the catalogue's)")
    add("--batch-size", type=int, default=128)
    add("--learning-rate", type=float, default=2e-3)
    add("--encoder-lr-scale", type=float, default=0.25, help="encoder learning rate = this x --learning-rate")
    add("--weight-decay", type=float, default=0.05)
    add("--warmup-ratio", type=float, default=0.05)
    add("--gradient-accumulation-steps", type=int, default=1)
    add("--mixed-precision", default="no", choices=["no", "fp16", "bf16"])
    add(
        "--memory-format",
        default="channels_last",
        choices=["channels_last", "contiguous"],
        help="layout of the encoder's feature maps: channels_last trains lite0 ~2x faster on CPU (oneDNN) and suits tensor cores",
    )
    add(
        "--augment",
        default="product",
        choices=sorted(AUGMENTATIONS),
        help="product: backdrops, zoom, crops; phone: also a camera angle, drape, room light and backdrops cut from the "
        "run's user photos (--feedback, --mix-dataset); geometric: flip, crop",
    )
    add("--augment-strength", type=float, default=1.0)
    add("--num-workers", type=int, default=2)
    add("--seed", type=int, default=42)
    add(
        "--cpu-threads",
        type=int,
        default=None,
        help="torch threads per process when training on CPU (default: this machine's cores shared among its "
        "processes; `accelerate launch` alone sets OMP_NUM_THREADS=1, which leaves all but one core idle)",
    )
    # Output
    add("--output-dir", default="outputs/fashion-tagger")
    add("--resume", action="store_true", help="continue from the latest checkpoint in --output-dir")
    add("--eval-user-photos", action="store_true",
        help="also measure the written model on the phone photos' validation split (clothing-user-photos), for "
        "metrics-user-photos.json and the card's real-photo column")
    add("--push-to-hub", default=None, metavar="ORG/NAME")
    add("--hub-private", action="store_true")

    known, _ = parser.parse_known_args(argv)
    if known.config:
        settings = yaml.safe_load(Path(known.config).read_text()) or {}
        valid = {action.dest for action in parser._actions}
        unknown = {key.replace("-", "_") for key in settings} - valid
        if unknown:
            parser.error(f"unknown keys in {known.config}: {sorted(unknown)}")
        parser.set_defaults(**{key.replace("-", "_"): value for key, value in settings.items()})
    args = parser.parse_args(argv)
    if args.frozen_stages not in ("all",) and not str(args.frozen_stages).isdigit():
        parser.error("--frozen-stages takes 'all' or a number of stages")
    if args.distill_from and str(args.frozen_stages) != "0":
        parser.error("--distill-from needs images, not cached features: use it with --frozen-stages 0")
    if args.distill_from and args.distill_from_start:
        parser.error("use one of --distill-from and --distill-from-start")
    if args.vocabulary_from and args.init_from:
        parser.error("--init-from keeps its model's vocabulary: use one of --init-from and --vocabulary-from")
    if args.distill_from_start and not args.init_from:
        parser.error("--distill-from-start needs --init-from: the model to start from")
    return args


def main(argv=None) -> Path:
    """Train as the flags say; returns the written model folder."""
    args = parse_args(argv)
    keep_freed_memory()
    command = "accelerate launch train/train.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    try:
        if args.init_from and is_ensemble(args.init_from):
            return continue_ensemble(args, command)
        return train_model(args, command)
    except (NoCheckpointError, TeacherMismatchError) as error:  # a flag that names what is not there or does not fit
        raise SystemExit(str(error)) from None


if __name__ == "__main__":
    main()
