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
import json
import math
import os
import platform
import shlex
import shutil
import sys
import time
from functools import partial
from pathlib import Path

import datasets
import numpy as np
import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, set_seed
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedConfig, get_cosine_schedule_with_warmup

from .. import (
    FashionTaggerConfig,
    FashionTaggerEnsembleConfig,
    FashionTaggerEnsembleModel,
    FashionTaggerImageProcessor,
    FashionTaggerModel,
)
from .. import data
from ..configuration_fashion_tagger import (
    BOS_TAG_ID,
    DEFAULT_FEEDBACK_TAG_MIN_CONTRIBUTORS,
    DETAIL_GROUP,
    PAD_TAG_ID,
    SPECIAL_TAGS,
    USER_PHOTOS_DOMAIN,
)
from ..encoder_weights import load_pretrained_encoder
from ..modeling_fashion_tagger import IGNORE_INDEX
from ..pipeline_fashion_tagging import save_tagger
from ..runtime import cpu_threads_per_process, keep_freed_memory
from .augment import AUGMENTATIONS
from . import domain_gate
from .distillation import distillation_term, load_teachers, start_model_term
from .feature_cache import CachedFeatures, compute_trunk_features, freeze, split_encoder


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
    add("--mix-dataset", default=None, metavar="NAME",
        help="a second built-in data set whose train split joins the training data (e.g. clothing-user-photos: "
        "phone photos with subCategory and articleType only; the heads it does not label are masked)")
    add("--mix-repeats", type=int, default=1, help="times each --mix-dataset image is seen per epoch")
    add("--replay-images", type=int, default=None,
        help="train on this many images of the train split, drawn with --seed, instead of all of it: with --init-from "
        "and --feedback, the catalogue replayed beside the corrections so that the model forgets nothing")
    add("--feedback-tag-min-contributors", type=int, default=None,
        help="people who must type a feedback tag for it to join the vocabulary (default: the config's, 3)")
    add("--limit-train", type=int, default=None)
    add("--limit-eval", type=int, default=None)
    # Model
    add("--init-from", default=None,
        help="start from this model folder: a model (keeps its heads and tags; typed feedback tags are added) or an "
        "ensemble (each member continues training in turn, then they are combined again)")
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
    add("--augment", default="product", choices=sorted(AUGMENTATIONS), help="product: backdrops, zoom, crops; geometric: flip, crop")
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
    if args.distill_from_start and not args.init_from:
        parser.error("--distill-from-start needs --init-from: the model to start from")
    return args


# --- data --------------------------------------------------------------------------------------------------------


def load_split(args, split: str):
    if args.dataset == "fashion-product-images":
        dataset = data.load_fashion_product_images(args.data_source, split=split, with_brand=args.with_brand)
    elif args.dataset == "fashion-mnist":
        dataset = data.load_fashion_mnist(args.data_source, split=split)
    elif args.dataset == data.CLOTHING_USER_PHOTOS:
        dataset = data.load_clothing_user_photos(args.data_source, split=split)
    else:  # a catalogue: its own split column, else the hash hold-out (data.HOLDOUT_DEFINITION)
        dataset = data.load_catalogue(args.dataset, attributes=args.attributes, split=split)
    limit = args.limit_train if split == args.train_split else args.limit_eval
    return dataset.select(range(min(limit, len(dataset)))) if limit else dataset


def default_min_tag_count(args, train_images: int) -> int:
    """--min-tag-count, else 20 (the built-in data sets), or for a catalogue one per 1,000 training images, 3-20."""
    if args.min_tag_count is not None:
        return args.min_tag_count
    if args.dataset in data.BUILT_IN_DATASETS:
        return 20
    return min(20, max(3, math.ceil(train_images / 1000)))


def replay_sample(dataset, images: int, seed: int):
    """`images` rows drawn at random with `seed` (the same rows on every run and in every ensemble member)."""
    if images >= len(dataset):
        return dataset
    rows = np.random.default_rng(seed).choice(len(dataset), images, replace=False)
    return dataset.select(sorted(rows.tolist()))


def append_examples(train_set, extra, attributes, repeats: int = 1):
    """Append `extra` rows (annotators' corrections, a second data set) `repeats` times, each copy augmented
    differently. Heads `extra` does not label are missing labels, masked in the loss; rows that do not label every
    head have `tags_known` False (`data.load_feedback`), and their tag sequences stay out of the decoder's loss.
    """
    columns = ["image", *attributes, data.TAGS_COLUMN, data.TAGS_KNOWN_COLUMN]
    train_set = with_tags_known(train_set)
    for attribute in attributes:
        if attribute not in extra.column_names:
            extra = extra.add_column(attribute, [None] * len(extra), feature=datasets.Value("string"))
    extra = with_tags_known(extra).select_columns(columns).cast(train_set.select_columns(columns).features)
    return datasets.concatenate_datasets([train_set.select_columns(columns), *[extra] * repeats])


def with_tags_known(dataset):
    """The dataset with a `tags_known` column (True where it has none: catalogue rows carry whole tag sequences)."""
    if data.TAGS_KNOWN_COLUMN in dataset.column_names:
        return dataset
    return dataset.add_column(data.TAGS_KNOWN_COLUMN, [True] * len(dataset), feature=datasets.Value("bool"))


def dataset_attributes(args, dataset) -> list[str]:
    if args.attributes:
        return list(args.attributes)
    candidates = list(data.PRODUCT_ATTRIBUTES) + ([data.BRAND] if args.with_brand else [])
    return [column for column in candidates if column in dataset.column_names]


class TaggingExamples(torch.utils.data.Dataset):
    """Rows of a tagging dataset -> model inputs. Augmentation is seeded per (seed, view, index): reruns repeat."""

    def __init__(self, dataset, config, processor, augment="product", augment_strength=0.0, seed=0, view=0):
        self.dataset, self.config, self.processor = dataset, config, processor
        self.augment, self.augment_strength, self.seed, self.view = AUGMENTATIONS[augment], augment_strength, seed, view
        self.tag_vocabulary = config.tag_to_id()

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        row = self.dataset[index]
        image = self.processor.load_image(row["image"])
        if self.augment_strength > 0:
            rng = np.random.default_rng([self.seed, self.view, index])
            image = self.augment(image, rng, self.augment_strength)
        # An unknown sequence is `<bos> <pad>`: one step for the decoder to run, no target for its loss.
        known = row.get(data.TAGS_KNOWN_COLUMN, True)
        tags = self.config.tag_sequence_ids(row["tags"], self.tag_vocabulary) if known else [BOS_TAG_ID, PAD_TAG_ID]
        return {
            "pixel_values": self.processor.pixel_values_of(image),
            "attribute_labels": torch.tensor(self.config.attribute_label_ids(row)),
            "tag_ids": torch.tensor(tags),
        }


def collate(examples):
    batch = {key: torch.stack([e[key] for e in examples]) for key in examples[0] if key != "tag_ids"}
    batch["tag_ids"] = nn.utils.rnn.pad_sequence([e["tag_ids"] for e in examples], batch_first=True)  # <pad> is 0
    return batch


# --- model -------------------------------------------------------------------------------------------------------


class TrainingTagger(nn.Module):
    """The tagger as trained here: frozen trunk, trainable top of the encoder, heads and decoder.

    The trunk and top are views into `model.encoder`, kept out of this module's registry so that its state dict
    is exactly the model's and checkpoints load across phases.
    """

    def __init__(self, model: FashionTaggerModel, frozen_stages):
        super().__init__()
        self.model = model
        self.__dict__["trunk"], self.__dict__["top"] = split_encoder(model.encoder, frozen_stages)

    def forward(self, pixel_values=None, trunk_features=None, attribute_labels=None, tag_ids=None):
        if trunk_features is None:
            trunk_features = self.trunk(pixel_values)
        return self.model(image_embeds=self.top(trunk_features), attribute_labels=attribute_labels, tag_ids=tag_ids)


def feedback_tags_to_keep(args, contributors=None) -> list[str]:
    """Typed feedback tags with at least `--feedback-tag-min-contributors` contributors (the config's default: 3)."""
    if not args.feedback:
        return []
    contributors = data.feedback_tag_contributors(args.feedback) if contributors is None else contributors
    return sorted(tag for tag, people in contributors.items() if people >= feedback_tag_min_contributors(args))


def feedback_tag_min_contributors(args) -> int:
    if args.feedback_tag_min_contributors is not None:
        return args.feedback_tag_min_contributors
    return DEFAULT_FEEDBACK_TAG_MIN_CONTRIBUTORS


def build_model(args, train_dataset, attributes, keep_detail_tags=()) -> FashionTaggerModel:
    """A new model with the vocabulary of `train_dataset` (plus `keep_detail_tags`), or `--init-from`'s model."""
    if args.init_from:
        model = FashionTaggerModel.from_pretrained(args.init_from)
        if args.image_size:  # the encoder is convolutional and globally pooled: it runs at any size
            model.config.image_size = list(args.image_size)
        if args.decoder_matmul_dtype:
            model.config.decoder_matmul_dtype = args.decoder_matmul_dtype
        add_detail_tags(model, keep_detail_tags)
        return model
    min_tag_count = default_min_tag_count(args, len(train_dataset))
    heads, tags = data.build_vocabulary(train_dataset, attributes, min_tag_count=min_tag_count,
                                        keep_detail_tags=keep_detail_tags)  # fmt: skip
    size = {"image_size": list(args.image_size)} if args.image_size else {}  # else the configuration's default
    config = FashionTaggerConfig(
        encoder_name=args.encoder_name,
        **size,
        attributes=heads,
        tags=tags,
        decoder_type=args.decoder_type,
        decoder_hidden_size=args.decoder_hidden_size,
        tag_embedding_size=args.tag_embedding_size,
        max_tag_length=args.max_tag_length,
        classifier_dropout=args.classifier_dropout,
        label_smoothing=args.label_smoothing,
        decoder_matmul_dtype=args.decoder_matmul_dtype or "float32",
        feedback_tag_min_contributors=feedback_tag_min_contributors(args),
    )
    model = FashionTaggerModel(config)
    if args.pretrained != "none":
        model.config.encoder_weights = load_pretrained_encoder(model, args.pretrained)
    return model


def add_detail_tags(model: FashionTaggerModel, tags) -> list[str]:
    """Append the detail tags the model's vocabulary lacks as new decoder rows and return them.

    The old rows keep their ids and weights, so the model tags as before; a new tag starts as unlikely as the
    least likely old one and is learned from the records that carry it.
    """
    known = {text for text, group in model.config.tags if group == DETAIL_GROUP}
    added = [tag for tag in tags if tag not in known]
    if not added:
        return []
    old_size = model.config.tag_vocab_size
    model.config.tags = [*model.config.tags, *([tag, DETAIL_GROUP] for tag in added)]
    embeddings, classifier = model.tag_embeddings, model.tag_classifier
    grown_embeddings = nn.Embedding(model.config.tag_vocab_size, embeddings.embedding_dim, padding_idx=embeddings.padding_idx)
    grown_classifier = nn.Linear(classifier.in_features, model.config.tag_vocab_size)
    with torch.no_grad():
        grown_embeddings.weight[:old_size] = embeddings.weight
        grown_embeddings.weight[old_size:].normal_(0.0, embeddings.weight[len(SPECIAL_TAGS):].std().item())
        grown_classifier.weight[:old_size] = classifier.weight
        grown_classifier.weight[old_size:] = 0.0
        grown_classifier.bias[:old_size] = classifier.bias
        grown_classifier.bias[old_size:] = classifier.bias[len(SPECIAL_TAGS):].min()
    model.tag_embeddings, model.tag_classifier = grown_embeddings, grown_classifier
    model._input_gates_cache = None  # it caches rows of the old embedding table
    return added


def parameter_groups(model: FashionTaggerModel, args):
    decay, no_decay, encoder = [], [], []
    for name, parameter in model.named_parameters():
        if name.startswith("encoder."):
            encoder.append(parameter)
        elif parameter.ndim < 2:
            no_decay.append(parameter)
        else:
            decay.append(parameter)
    return [
        {"params": encoder, "lr": args.learning_rate * args.encoder_lr_scale, "weight_decay": args.weight_decay},
        {"params": decay, "lr": args.learning_rate, "weight_decay": args.weight_decay},
        {"params": no_decay, "lr": args.learning_rate, "weight_decay": 0.0},
    ]


PROGRESS_FILE = "progress.json"
GATE_CATALOGUE_PHOTOS = 2000  # catalogue photos the gate of user-photo experts is fitted on, beside every user photo


class Progress:
    """What a checkpoint must remember besides weights and optimizer: where the run is and its best score."""

    def __init__(self):
        self.epoch, self.best_score, self.best_epoch, self.seconds = 0, -math.inf, -1, 0.0

    def state_dict(self):
        return {"epoch": self.epoch, "best_score": self.best_score, "best_epoch": self.best_epoch, "seconds": self.seconds}

    def load_state_dict(self, state):
        self.epoch, self.best_score, self.best_epoch = state["epoch"], state["best_score"], state["best_epoch"]
        self.seconds = state.get("seconds", 0.0)


# --- loop --------------------------------------------------------------------------------------------------------


def validate(tagger, loader, accelerator, attributes) -> dict[str, float]:
    tagger.eval()
    correct, counted, losses = torch.zeros(len(attributes)), torch.zeros(len(attributes)), []
    with torch.inference_mode():
        for batch in loader:
            output = tagger(**batch)
            predictions = torch.stack([output.attribute_logits[name].argmax(-1) for name in attributes], 1)
            predictions, labels, loss = accelerator.gather_for_metrics(
                (predictions, batch["attribute_labels"], output.loss.detach()[None])
            )
            present = labels != IGNORE_INDEX
            correct += ((predictions == labels) & present).sum(0).cpu().float()
            counted += present.sum(0).cpu().float()
            losses.append(loss.float().mean().item())
    top1 = correct / counted.clamp(min=1)
    metrics = {f"val/{name}_top1": top1[i].item() for i, name in enumerate(attributes)}
    metrics["val/mean_top1"] = top1.mean().item()
    metrics["val/loss"] = float(np.mean(losses))
    return metrics


def train_epoch(tagger, loader, optimizer, scheduler, accelerator, epoch, frozen_trunk: bool, distill=None):
    """One epoch; `distill(attribute_logits, batch)`, when given, is added to each batch's loss."""
    tagger.train()
    if frozen_trunk:
        tagger.trunk.eval()  # frozen batch-norm statistics stay those the cache was computed with
    losses = []
    bar = tqdm(loader, desc=f"epoch {epoch + 1}", disable=not accelerator.is_local_main_process, leave=False)
    for batch in bar:
        with accelerator.accumulate(tagger):
            output = tagger(**batch)
            loss = output.loss
            if distill is not None:
                loss = loss + distill(output.attribute_logits, batch)
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(tagger.parameters(), 5.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}")
    return {"train/loss": float(np.mean(losses)), "train/lr": scheduler.get_last_lr()[1]}


def cached_loaders(args, accelerator, tagger, train_set, eval_set, config, processor):
    """Run the frozen trunk once: `cache_views` views per training image (the first clean), one per eval image."""
    def loader(dataset, augment_strength, view):
        examples = TaggingExamples(dataset, config, processor, args.augment, augment_strength, args.seed, view)
        return torch.utils.data.DataLoader(examples, batch_size=256, num_workers=args.num_workers, collate_fn=collate)

    total = args.cache_views * math.ceil(len(train_set) / 256) + math.ceil(len(eval_set) / 256)
    bar = tqdm(total=total, desc="caching trunk features", disable=not accelerator.is_local_main_process)
    views = []
    for view in range(args.cache_views):
        strength = 0.0 if view == 0 else args.augment_strength
        features, labels, tag_ids = compute_trunk_features(tagger.trunk, loader(train_set, strength, view), accelerator.device, progress=bar)
        views.append(features)
    eval_cache = compute_trunk_features(tagger.trunk, loader(eval_set, 0.0, 0), accelerator.device, progress=bar)
    bar.close()

    train_loader = torch.utils.data.DataLoader(
        CachedFeatures(views, labels, tag_ids, args.seed), batch_size=args.batch_size, shuffle=True, num_workers=0
    )
    eval_loader = torch.utils.data.DataLoader(
        CachedFeatures([eval_cache[0]], eval_cache[1], eval_cache[2], args.seed), batch_size=256, num_workers=0
    )
    return train_loader, eval_loader


def image_loaders(args, train_set, eval_set, config, processor, epoch):
    train_examples = TaggingExamples(train_set, config, processor, args.augment, args.augment_strength, args.seed, 1000 + epoch)
    train_loader = torch.utils.data.DataLoader(
        train_examples, batch_size=args.batch_size, shuffle=True, num_workers=args.num_workers, collate_fn=collate
    )
    eval_examples = TaggingExamples(eval_set, config, processor)
    eval_loader = torch.utils.data.DataLoader(eval_examples, batch_size=256, num_workers=args.num_workers, collate_fn=collate)
    return train_loader, eval_loader


def main(argv=None) -> Path:
    """Train as the flags say; returns the written model folder."""
    args = parse_args(argv)
    keep_freed_memory()
    command = "accelerate launch train/train.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    if args.init_from and is_ensemble(args.init_from):
        return continue_ensemble(args, command)
    return train_model(args, command)


def train_model(args, command: str, final: bool = True) -> Path:
    """One model trained and written to `<output_dir>/model`; `final=False` (an ensemble member) skips its
    evaluation, card and push, which the ensemble does once for all members."""
    started = time.time()
    output_dir = Path(args.output_dir)
    accelerator = Accelerator(
        # The frozen trunk gets no gradients in the cached phase and gets them in the fine-tuning phase.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=args.frozen_stages != "0")],
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with="tensorboard",
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / "logs"), automatic_checkpoint_naming=True, total_limit=2
        ),
    )
    set_seed(args.seed)
    if accelerator.device.type == "cpu":
        local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
        torch.set_num_threads(args.cpu_threads or cpu_threads_per_process(local_processes))

    train_set, eval_set = load_split(args, args.train_split), load_split(args, args.eval_split)
    if args.replay_images:
        train_set = replay_sample(train_set, args.replay_images, args.seed)
    test_set = load_split(args, args.test_split) if args.test_split else None
    used_splits = [args.train_split, args.eval_split, *([args.test_split] if args.test_split else [])]
    splits = {split: data.describe_split(args.dataset, split, eval_set) for split in used_splits}
    attributes = dataset_attributes(args, train_set)
    typed_tags = []
    if args.feedback:
        feedback = data.load_feedback(args.feedback, attributes)
        train_set = append_examples(train_set, feedback, attributes, args.feedback_repeats)
        typed_tags = feedback_tags_to_keep(args)
    if args.mix_dataset:
        mixed = load_split(argparse.Namespace(**{**vars(args), "dataset": args.mix_dataset, "data_source": None}), "train")
        train_set = append_examples(train_set, mixed, attributes, args.mix_repeats)
    model = build_model(args, train_set, attributes, typed_tags)
    config = model.config
    train_set = data.apply_vocabulary(train_set, config.attributes, config.tags)
    eval_set = data.apply_vocabulary(eval_set, config.attributes, config.tags)
    processor = FashionTaggerImageProcessor.from_model_config(config)
    accelerator.print(f"train {len(train_set)} / eval {len(eval_set)} images; heads {list(config.attributes)}; "
                      f"{len(config.tags)} tags; encoder weights: {getattr(config, 'encoder_weights', 'random')}")
    if typed_tags:
        accelerator.print(f"typed feedback tags in the vocabulary: {typed_tags}")

    frozen_stages = args.frozen_stages if args.frozen_stages == "all" else int(args.frozen_stages)
    cached = frozen_stages == "all" or frozen_stages > 0
    tagger = TrainingTagger(model, frozen_stages if cached else 0)
    if args.memory_format == "channels_last":
        tagger.to(memory_format=torch.channels_last)  # convolutions then keep their activations channels-last too
    total_epochs = args.epochs + (args.finetune_epochs if cached else 0)
    steps_per_epoch = math.ceil(len(train_set) / args.batch_size / args.gradient_accumulation_steps)
    optimizer = torch.optim.AdamW(parameter_groups(model, args))
    scheduler = get_cosine_schedule_with_warmup(
        optimizer, int(args.warmup_ratio * steps_per_epoch * total_epochs), steps_per_epoch * total_epochs
    )
    progress = Progress()  # kept as JSON beside each checkpoint: accelerate would pickle a registered object
    tagger, optimizer, scheduler = accelerator.prepare(tagger, optimizer, scheduler)
    accelerator.init_trackers("fashion-tagger", config={k: str(v) for k, v in vars(args).items()})

    checkpoints = output_dir / "checkpoints"
    if args.resume:
        latest = max(checkpoints.glob("checkpoint_*"), key=lambda p: int(p.name.split("_")[-1]), default=None)
        if latest is None:
            raise SystemExit(f"--resume: no checkpoint in {checkpoints}")
        accelerator.load_state(str(latest))
        progress.load_state_dict(json.loads((latest / PROGRESS_FILE).read_text()))
        accelerator.project_configuration.iteration = int(latest.name.split("_")[-1]) + 1
        accelerator.print(f"resumed from {latest} at epoch {progress.epoch}")
    seconds_before = progress.seconds  # wall time of earlier sessions of this run, so the card reports the total

    inner = accelerator.unwrap_model(tagger)
    distill = None
    if args.distill_from:
        teachers = load_teachers(args.distill_from, config, accelerator.device)
        accelerator.print(f"distilling from {len(teachers)} teacher(s): {', '.join(args.distill_from)}")
        distill = partial(distillation_term, teachers, args.distill_weight, args.distill_temperature)
    elif args.distill_from_start:
        # From its folder, not a copy of the weights now: a resumed run must still compare with where it started.
        start = FashionTaggerModel.from_pretrained(args.init_from).to(accelerator.device).eval().requires_grad_(False)
        start_model = TrainingTagger(start, frozen_stages if cached else 0).to(memory_format=torch.channels_last)
        distill = partial(start_model_term, start_model, args.distill_weight, args.distill_temperature)
    if cached and progress.epoch < args.epochs:
        freeze(inner.trunk)
        cached_train, cached_eval = cached_loaders(args, accelerator, inner, train_set, eval_set, config, processor)
        cached_train, cached_eval = accelerator.prepare(cached_train, cached_eval)

    for epoch in range(progress.epoch, total_epochs):
        epoch_started = time.time()
        frozen_phase = cached and epoch < args.epochs
        if frozen_phase:
            train_loader, eval_loader = cached_train, cached_eval
        else:
            freeze(inner.trunk, False)
            train_loader, eval_loader = accelerator.prepare(*image_loaders(args, train_set, eval_set, config, processor, epoch))
        metrics = train_epoch(tagger, train_loader, optimizer, scheduler, accelerator, epoch, frozen_phase, distill)
        metrics |= validate(tagger, eval_loader, accelerator, list(config.attributes))
        metrics["epoch_seconds"] = time.time() - epoch_started
        accelerator.log(metrics, step=epoch + 1)
        accelerator.print(f"epoch {epoch + 1}/{total_epochs}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))

        progress.epoch = epoch + 1
        progress.seconds = seconds_before + time.time() - started
        if metrics["val/mean_top1"] > progress.best_score or args.keep_epoch == "last":
            progress.best_score, progress.best_epoch = metrics["val/mean_top1"], epoch + 1
            accelerator.wait_for_everyone()
            inner.model.save_pretrained(output_dir / "best", is_main_process=accelerator.is_main_process, save_function=accelerator.save)
        checkpoint = Path(accelerator.save_state())
        if accelerator.is_main_process:
            (checkpoint / PROGRESS_FILE).write_text(json.dumps(progress.state_dict()))

    accelerator.wait_for_everyone()
    accelerator.end_training()
    final_dir = output_dir / "model"
    if accelerator.is_main_process:
        recipe = {
            "command": command,
            "wall_time_seconds": round(seconds_before + time.time() - started, 1),
            "hardware": f"{accelerator.num_processes} x {accelerator.device.type} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
            "best_epoch": progress.best_epoch,
            "train_images": len(train_set),
            "eval_images": len(eval_set),
            **({"test_images": len(test_set)} if test_set is not None else {}),
            "dataset_name": dataset_name(args.dataset),
            "splits": splits,
            "selected_on": {"split": args.eval_split, "choices": ["the best epoch (mean top-1 over the heads)"]}
            if args.keep_epoch == "best" else None,
            "min_tag_count": default_min_tag_count(args, len(train_set)) if not args.init_from else None,
            "feedback_tags": typed_tags or None,
            "arguments": vars(args),
            "previous_stages": previous_stages(args.init_from),
            **({"feedback": feedback_lineage(args)} if args.feedback else {}),
        }
        if not final:
            model = FashionTaggerModel.from_pretrained(output_dir / "best", attribute_order=list(config.attributes))
            save_tagger(model, processor, final_dir)
            (final_dir / "recipe.json").write_text(json.dumps(recipe, indent=2, default=str))
            return final_dir
        if test_set is not None:
            test_set = data.apply_vocabulary(test_set, config.attributes, config.tags)
        model = FashionTaggerModel.from_pretrained(output_dir / "best", attribute_order=list(config.attributes)).eval()
        finish(args, model, processor, final_dir, eval_set if test_set is None else test_set, recipe)
    return final_dir


def is_ensemble(model_folder: str) -> bool:
    config, _ = PreTrainedConfig.get_config_dict(model_folder)
    return config.get("model_type") == FashionTaggerEnsembleConfig.model_type


def continue_ensemble(args, command: str) -> Path:
    """--init-from an ensemble. With photos that are not the catalogue's (--feedback, --mix-dataset), its catalogue
    members stay as they are and user-photo experts learn from those photos: the ensemble's own experts if it has
    them, else copies of its catalogue members. The new ensemble has both, and a gate fitted to tell a user's photo
    from a catalogue photo, so catalogue photos are tagged exactly as before. Without such photos, every member
    continues on the catalogue. Each trained member starts from its own start folder (a killed run resumes at the
    member it was training); the result is stored as the ensemble was (float16), measured and written like any
    trained model."""
    from .ensemble import combine, save as save_ensemble

    output_dir = Path(args.output_dir)
    ensemble = FashionTaggerEnsembleModel.from_pretrained(args.init_from, dtype=torch.float32)
    processor = FashionTaggerImageProcessor.from_pretrained(args.init_from)
    config = ensemble.config
    earlier = read_recipe(args.init_from)
    earlier_members = earlier.get("members") or [{}] * len(ensemble.members)
    learns_user_photos = bool(args.feedback or args.mix_dataset)
    general = config.members_of(config.domains[0]) if learns_user_photos else []
    if not learns_user_photos:
        trained = list(range(len(ensemble.members)))
    elif USER_PHOTOS_DOMAIN in config.domains:
        trained = config.members_of(USER_PHOTOS_DOMAIN)
    else:
        trained = general
    member_folders = [train_member(args, command, ensemble, processor, earlier_members, index) for index in trained]

    combining_started = time.time()  # the members' recipes hold their own training time, resumed sessions included
    member_recipes = [read_recipe(folder) for folder in member_folders]
    members_lineage = [
        {"folder": str(folder), "stages": [*r["previous_stages"], stage_of(r)]} for folder, r in zip(member_folders, member_recipes)
    ]
    gate = None
    if learns_user_photos:
        combined, gate = combine_with_experts(args, ensemble, general, member_folders, processor)
        members_lineage = [
            *({"folder": f"{args.init_from} (member {index + 1}, unchanged)", "stages": earlier_members[index].get("stages", []),
               "domain": config.domains[0]} for index in general),
            *({**lineage, "domain": USER_PHOTOS_DOMAIN} for lineage in members_lineage),
        ]  # fmt: skip
    else:
        combined = combine([str(folder) for folder in member_folders], config.mirror_views)
    final_dir = output_dir / "model"
    save_ensemble(combined, processor, final_dir, torch.float16)
    model = FashionTaggerEnsembleModel.from_pretrained(final_dir).eval()  # measure what was stored
    eval_split = args.test_split or args.eval_split
    eval_set = data.apply_vocabulary(load_split(args, eval_split), model.config.attributes, model.config.tags)
    recipe = {
        "command": command,
        "wall_time_seconds": round(time.time() - combining_started + sum(r["wall_time_seconds"] for r in member_recipes), 1),
        "hardware": member_recipes[0]["hardware"],
        "train_images": member_recipes[0]["train_images"],
        "eval_images": len(eval_set),
        "dataset_name": dataset_name(args.dataset),
        "splits": member_recipes[0]["splits"],
        "selected_on": member_recipes[0]["selected_on"] and {"split": args.eval_split, "choices": ["each member's best epoch"]},
        "feedback_tags": member_recipes[0]["feedback_tags"],
        "arguments": vars(args),
        "init_from": args.init_from,
        "base_model": earlier.get("base_model"),
        "members": members_lineage,
        **({"gate": gate} if gate else {}),
        **({"feedback": {**member_recipes[0]["feedback"], "init_from": args.init_from}} if args.feedback else {}),
    }
    finish(args, model, None, final_dir, eval_set, recipe, save=False)
    return final_dir


def train_member(args, command: str, ensemble, processor, earlier_members: list[dict], index: int) -> Path:
    """Continue member `index` of `ensemble` in `<output_dir>/members/<index>` (skipped when its model is there)."""
    member_dir = Path(args.output_dir) / "members" / str(index)
    if not (member_dir / "model" / "config.json").is_file():
        start = member_dir / "start"
        save_tagger(ensemble.members[index], processor, start)
        stages = earlier_members[index].get("stages", [])
        if stages:  # the member's own history, for the lineage in recipe.json
            (start / "recipe.json").write_text(json.dumps({**stages[-1], "previous_stages": stages[:-1]}, indent=2))
        resume = args.resume and any((member_dir / "checkpoints").glob("checkpoint_*"))
        overrides = {"init_from": str(start), "output_dir": str(member_dir), "push_to_hub": None, "resume": resume}
        train_model(argparse.Namespace(**{**vars(args), **overrides}), command, final=False)
    return member_dir / "model"


def combine_with_experts(args, ensemble, general: list[int], expert_folders: list[Path], processor):
    """`ensemble`'s `general` members unchanged, the trained experts beside them, and the gate fitted on the
    run's user photos against a seeded catalogue sample. Returns the ensemble and the gate's record for the recipe."""
    from .ensemble import combine_models

    experts = [FashionTaggerModel.from_pretrained(folder, dtype=torch.float32) for folder in expert_folders]
    general_members = [ensemble.members[index] for index in general]
    new_tags = [text for text, group in experts[0].config.tags if [text, group] not in general_members[0].config.tags]
    for member in general_members:  # typed feedback tags the experts learned; the catalogue members rank them last
        add_detail_tags(member, new_tags)
    combined = combine_models(
        [*general_members, *experts], ensemble.config.mirror_views,
        domains=[ensemble.config.domains[0], USER_PHOTOS_DOMAIN],
        member_domains=[ensemble.config.domains[0]] * len(general_members) + [USER_PHOTOS_DOMAIN] * len(experts),
        expert_min_weight=ensemble.config.expert_min_weight,
    )  # fmt: skip
    catalogue = replay_sample(load_split(args, args.train_split), GATE_CATALOGUE_PHOTOS, args.seed)
    inputs = [domain_gate.gate_inputs(combined, processor, catalogue)]
    inputs += [domain_gate.gate_inputs(combined, processor, photos) for photos in user_photo_sets(args)]
    domains = torch.cat([torch.full((len(part),), int(number > 0)) for number, part in enumerate(inputs)])
    inputs = torch.cat(inputs)
    domain_gate.set_gate(combined, *domain_gate.fit_gate(inputs, domains, num_domains=2))
    gate = {
        "fitted_on": {combined.config.domains[0]: len(catalogue), USER_PHOTOS_DOMAIN: int(domains.sum())},
        "routing_on_fitting_photos": domain_gate.routing_rates(combined, inputs, domains),
    }
    print(f"gate: {gate}")
    return combined, gate


def user_photo_sets(args) -> list:
    """The run's photos that are not the catalogue's: the feedback store's and --mix-dataset's train split."""
    sets = []
    if args.feedback:
        sets.append(data.load_feedback(args.feedback))
    if args.mix_dataset:
        sets.append(load_split(argparse.Namespace(**{**vars(args), "dataset": args.mix_dataset, "data_source": None}), "train"))
    return sets


def read_recipe(model_folder) -> dict:
    path = Path(model_folder) / "recipe.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def feedback_lineage(args) -> dict:
    """Where the corrections came from: the store, its revision, how many records and fields were learned from."""
    summary = data.feedback_summary(args.feedback)
    return {
        "source": str(args.feedback),
        "revision": summary["revision"],
        "records_used": summary["records"],
        "attributes": summary["attributes"],
        "init_from": args.init_from,
    }


def stage_of(recipe: dict) -> dict:
    """The fields of a recipe.json that describe its own run, as one stage of a later model's history."""
    return {key: recipe[key] for key in ("command", "wall_time_seconds", "hardware", "wall_time_note") if key in recipe}


def previous_stages(model_folder: str | None) -> list[dict]:
    """The runs that trained the model in `model_folder` (an `--init-from` start, an ensemble member), first first,
    from its recipe.json; none without one."""
    earlier = read_recipe(model_folder) if model_folder else {}
    if not earlier or "members" in earlier:  # an ensemble's history is per member (continue_ensemble)
        return []
    return [*earlier.get("previous_stages", []), stage_of(earlier)]


def dataset_name(dataset: str) -> str:
    """How metrics.json and the card name the data: a built-in data set's name, a catalogue's name (not its path)."""
    return dataset if dataset in data.BUILT_IN_DATASETS else data.catalogue_name(dataset)


def finish(args, model, processor, final_dir: Path, eval_set, recipe, save: bool = True):
    """Write the Hub-ready folder (unless `save` is False: already written), measure it on `eval_set` (the test
    split when the run has one, else the selection split), write its card, push if asked."""
    from .model_card import build_model_card
    from .evaluate import write_evaluation

    if save:
        save_tagger(model, processor, final_dir)
    processor = FashionTaggerImageProcessor.from_pretrained(final_dir)
    split = args.test_split or args.eval_split
    metrics = write_evaluation(
        model, processor, eval_set, final_dir, logs_dir=Path(args.output_dir) / "logs",
        dataset_name=recipe["dataset_name"], split=split, extra={"split_definition": recipe["splits"][split]},
    )  # fmt: skip
    (final_dir / "recipe.json").write_text(json.dumps(recipe, indent=2, default=str))
    user_photo_metrics = evaluate_user_photos(final_dir, Path(args.output_dir) / "user-photos") if args.eval_user_photos else None
    dataset_id = data.PRODUCT_IMAGES_HUB_ID if args.dataset == "fashion-product-images" else recipe["dataset_name"]
    title = args.push_to_hub.split("/")[-1] if args.push_to_hub else f"fashion-tagger-{recipe['dataset_name']}"
    base_model = recipe.get("base_model") or f"timm/{args.encoder_name}"
    card = build_model_card(final_dir, metrics, recipe, dataset_id=dataset_id, base_model=base_model,
                            repo_id=args.push_to_hub, title=title, user_photo_metrics=user_photo_metrics)  # fmt: skip
    card.save(final_dir / "README.md")
    print(f"model folder: {final_dir}")
    if args.push_to_hub:
        print(push_to_hub(final_dir, args.push_to_hub, private=args.hub_private))


def evaluate_user_photos(model_folder: Path, work_dir: Path) -> dict:
    """The written model on the phone photos' validation split, as `train/evaluate.py --dataset
    clothing-user-photos` measures it; its metrics.json goes into the model folder as metrics-user-photos.json."""
    from .evaluate import main as evaluate
    from .model_card import USER_PHOTO_METRICS_FILE

    argv = [str(model_folder), "--dataset", data.CLOTHING_USER_PHOTOS, "--split", "validation", "--output", str(work_dir)]
    metrics = evaluate([*argv, "--no-progress"])
    shutil.copyfile(work_dir / "metrics.json", model_folder / USER_PHOTO_METRICS_FILE)
    return metrics


def push_to_hub(folder: Path, repo_id: str, private: bool = False, api=None) -> str:
    """Upload the finished folder as one commit; returns the commit URL. `api` is injectable for tests."""
    from huggingface_hub import HfApi

    api = api or HfApi()
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    commit = api.upload_folder(
        repo_id=repo_id, repo_type="model", folder_path=str(folder), commit_message="Upload fashion tagger trained with fashion-hf"
    )
    return str(getattr(commit, "commit_url", commit))


if __name__ == "__main__":
    main()
