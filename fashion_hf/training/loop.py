"""One fashion tagger trained and written: the tagger as trained (a frozen trunk whose features can be cached, the
trainable rest), its optimizer, the epoch loop with checkpoints and resumption, and the Hub-ready folder at the end
(weights, evaluation, recipe, card). `train.py` runs it with its flags; `continuation.py` once per ensemble member.
"""

import json
import math
import os
import shutil
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, set_seed
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoConfig, get_cosine_schedule_with_warmup

from .. import FashionTaggerConfig, FashionTaggerImageProcessor, FashionTaggerModel
from .. import data
from ..configuration_fashion_tagger import DETAIL_GROUP, SPECIAL_TAGS
from ..encoder_weights import load_pretrained_encoder
from ..feedback import dataset as feedback_dataset
from ..modeling_fashion_tagger import IGNORE_INDEX
from ..pipeline_fashion_tagging import save_tagger
from ..runtime import cpu_threads_per_process
from .augment import backdrop_patches
from .distillation import distillation_term, load_teachers, start_model_term
from .examples import (
    TaggingExamples,
    append_examples,
    backdrop_photos,
    collate,
    corrected_kinds,
    dataset_attributes,
    default_min_tag_count,
    feedback_repeats,
    feedback_tag_min_contributors,
    feedback_tags_to_keep,
    load_split,
    mix_split,
    replay_sample,
    user_photo_sets,
)
from .feature_cache import CachedFeatures, compute_trunk_features, freeze, split_encoder
from .recipe import model_recipe, push_to_hub, write_recipe

PROGRESS_FILE = "progress.json"
# Photos per batch through the frozen trunk. Its activations, not the cache, set the peak memory: a lite2 trunk at
# 384x288 ran this 24 GiB machine out of memory at 256 photos a batch; the CPU runs no faster for more than a few dozen.
CACHE_BATCH_SIZE = 64


class NoCheckpointError(FileNotFoundError):
    """`--resume` with no checkpoint in the output folder to resume from."""


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


def build_model(args, train_dataset, attributes, keep_detail_tags=()) -> FashionTaggerModel:
    """A new model with the vocabulary of `train_dataset` (plus `keep_detail_tags`), or `--init-from`'s model."""
    if args.init_from:
        model = FashionTaggerModel.from_pretrained(args.init_from).drop_calibration()
        if args.image_size:  # the encoder is convolutional and globally pooled: it runs at any size
            model.config.image_size = list(args.image_size)
        if args.decoder_matmul_dtype:
            model.config.decoder_matmul_dtype = args.decoder_matmul_dtype
        add_detail_tags(model, keep_detail_tags)
        return model
    if args.vocabulary_from:  # a new member for that model's ensemble: the same labels and tags, in the same order
        known = AutoConfig.from_pretrained(args.vocabulary_from)  # a tagger's or an ensemble's: heads in their order
        heads, tags = known.attributes, known.tags
    else:
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
    if args.vocabulary_from:
        add_detail_tags(model, keep_detail_tags)
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
    """Top-1 per head and the loss on the eval loader (cached trunk features or images), gathered across processes:
    the per-epoch check that picks the best epoch. The full figures, tags too, are `fashion_hf.evaluation`'s, run
    once on the written model (`finish`)."""
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
        accelerator.unwrap_model(tagger).trunk.eval()  # frozen batch-norm statistics stay those the cache was computed with
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


def cached_loaders(args, accelerator, tagger, train_set, eval_set, config, processor, backdrops=()):
    """Run the frozen trunk once: `cache_views` views per training image (the first clean), one per eval image."""
    def loader(dataset, augment_strength, view):
        examples = TaggingExamples(dataset, config, processor, args.augment, augment_strength, args.seed, view, backdrops)
        return torch.utils.data.DataLoader(
            examples, batch_size=CACHE_BATCH_SIZE, num_workers=args.num_workers, collate_fn=collate
        )

    total = sum(math.ceil(len(dataset) / CACHE_BATCH_SIZE) for dataset in [train_set] * args.cache_views + [eval_set])
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


def image_loaders(args, train_set, eval_set, config, processor, epoch, backdrops=()):
    train_examples = TaggingExamples(
        train_set, config, processor, args.augment, args.augment_strength, args.seed, 1000 + epoch, backdrops
    )
    train_loader = torch.utils.data.DataLoader(
        train_examples, batch_size=args.batch_size, shuffle=True, num_workers=args.num_workers, collate_fn=collate
    )
    eval_examples = TaggingExamples(eval_set, config, processor)
    eval_loader = torch.utils.data.DataLoader(eval_examples, batch_size=256, num_workers=args.num_workers, collate_fn=collate)
    return train_loader, eval_loader


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
    # Read once for the options that look at them (the training rows of feedback are read with the vocabulary below).
    user_photos = user_photo_sets(args) if args.replay_kinds == "corrected" or args.augment == "phone" else []
    if args.replay_images:
        favoured = corrected_kinds(user_photos) if args.replay_kinds == "corrected" else ()
        train_set = replay_sample(train_set, args.replay_images, args.seed, favoured)
    test_set = load_split(args, args.test_split) if args.test_split else None
    used_splits = [args.train_split, args.eval_split, *([args.test_split] if args.test_split else [])]
    splits = {split: data.describe_split(args.dataset, split, eval_set) for split in used_splits}
    attributes = dataset_attributes(args, train_set)
    typed_tags = []
    if args.feedback:
        feedback = feedback_dataset.load_feedback(args.feedback, attributes)
        train_set = append_examples(train_set, feedback, attributes, feedback_repeats(args, feedback))
        typed_tags = feedback_tags_to_keep(args)
    if args.mix_dataset:
        train_set = append_examples(train_set, mix_split(args), attributes, args.mix_repeats)
    model = build_model(args, train_set, attributes, typed_tags)
    config = model.config
    train_set = data.apply_vocabulary(train_set, config.attributes, config.tags)
    eval_set = data.apply_vocabulary(eval_set, config.attributes, config.tags)
    processor = FashionTaggerImageProcessor.from_model_config(config)
    backdrops = []
    if args.augment == "phone":
        backdrops = backdrop_patches(map(processor.load_image, backdrop_photos(user_photos, args.seed)))
    accelerator.print(f"train {len(train_set)} / eval {len(eval_set)} images; heads {list(config.attributes)}; "
                      f"{len(config.tags)} tags; encoder weights: {getattr(config, 'encoder_weights', 'random')}")
    if typed_tags:
        accelerator.print(f"typed feedback tags in the vocabulary: {typed_tags}")
    if backdrops:
        accelerator.print(f"--augment phone: {len(backdrops)} backdrops cut from the run's user photos")

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
            raise NoCheckpointError(f"--resume: no checkpoint in {checkpoints}")
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
        start = FashionTaggerModel.from_pretrained(args.init_from).drop_calibration()
        start = start.to(accelerator.device).eval().requires_grad_(False)
        start_model = TrainingTagger(start, frozen_stages if cached else 0).to(memory_format=torch.channels_last)
        distill = partial(start_model_term, start_model, args.distill_weight, args.distill_temperature)
    if cached and progress.epoch < args.epochs:
        freeze(inner.trunk)
        cached_train, cached_eval = cached_loaders(
            args, accelerator, inner, train_set, eval_set, config, processor, backdrops
        )
        cached_train, cached_eval = accelerator.prepare(cached_train, cached_eval)

    for epoch in range(progress.epoch, total_epochs):
        epoch_started = time.time()
        frozen_phase = cached and epoch < args.epochs
        if frozen_phase:
            train_loader, eval_loader = cached_train, cached_eval
        else:
            freeze(inner.trunk, False)
            loaders = image_loaders(args, train_set, eval_set, config, processor, epoch, backdrops)
            train_loader, eval_loader = accelerator.prepare(*loaders)
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
        recipe = model_recipe(
            args, command, seconds=seconds_before + time.time() - started,
            devices=f"{accelerator.num_processes} x {accelerator.device.type}", best_epoch=progress.best_epoch,
            images={"train": len(train_set), "eval": len(eval_set), **({"test": len(test_set)} if test_set is not None else {})},
            splits=splits, min_tag_count=None if args.init_from or args.vocabulary_from else default_min_tag_count(args, len(train_set)),
            feedback_tags=typed_tags,
        )  # fmt: skip
        if not final:
            model = FashionTaggerModel.from_pretrained(output_dir / "best", attribute_order=list(config.attributes))
            save_tagger(model, processor, final_dir)
            write_recipe(final_dir, recipe)
            return final_dir
        if test_set is not None:
            test_set = data.apply_vocabulary(test_set, config.attributes, config.tags)
        model = FashionTaggerModel.from_pretrained(output_dir / "best", attribute_order=list(config.attributes)).eval()
        finish(args, model, processor, final_dir, eval_set if test_set is None else test_set, recipe)
    return final_dir


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
    write_recipe(final_dir, recipe)
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
