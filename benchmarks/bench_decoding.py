"""Batched tag decoding against the one-image-at-a-time loop of fb-model-library's `annotate()`.

Both decode from the same image embeddings with the same weights (`initial_state`, `tag_embeddings`, `decoder`,
`tag_classifier`) and the same rule that a tag is never repeated and an attribute takes one value, so they must
produce the same tag sequences in float32 (checked; the bfloat16 decoder's agreement is counted); what differs is how
the work is laid out:

- batched: `model.generate_tags(image_embeds=..., num_beams=1)`, one decoder step for the whole batch at a time,
  with the recurrent matmuls in float32 and, where the CPU runs bf16 natively, also in bfloat16
  (`decoder_matmul_dtype`, the shipped model's setting);
- one by one: for each image, a Python loop that feeds the previous tag, takes the argmax, reads it with `.item()`
  every step and stops at `<eos>` (or at `max_tag_length`, which the original loop lacked).

Two cases: `<eos>` suppressed through the classifier bias, so every image runs the full `max_tag_length` steps (or
until every other tag is banned, with a vocabulary that small): the per-step cost; and natural stopping. The encoder
is not part of either: decoding starts from the embeddings.

The embeddings are those of the first `--batch-size` validation photos of Fashion Product Images, through the
model's own encoder (an ensemble's: every member on each photo and, with mirroring, its mirror), so a trained model
decodes real tag sequences. Where that split is absent, or with `--random-embeddings`, they are random stand-ins
(uniform in [0, 2), as pooled ReLU6 activations are non-negative); the script prints which it used.

An ensemble (`FashionTaggerEnsembleModel`, loaded like any folder with `AutoModel`) decodes the same way on both
sides: the loop runs every member's `nn.GRU` on its view per step and averages their next-tag probabilities, as
`generate_tags` does.

    python benchmarks/bench_decoding.py --repeats 15
    python benchmarks/bench_decoding.py --repeats 15 --model models/fashion-tagger
"""

import argparse
import statistics
from contextlib import contextmanager

import torch
from bench_utils import (
    PRODUCT_IMAGES,
    interleaved,
    members_of,
    ratio_summary,
    real_size_vocabulary,
    runtime_line,
    validation_photos,
    verdict,
)
from transformers import AutoModel

from fashion_hf import FashionTaggerConfig, FashionTaggerEnsembleModel, FashionTaggerImageProcessor, FashionTaggerModel
from fashion_hf.configuration_fashion_tagger import BOS_TAG_ID, EOS_TAG_ID, PAD_TAG_ID
from fashion_hf.modeling_fashion_tagger import mean_of_probabilities, runs_bfloat16_natively, tag_conflicts
from fashion_hf.runtime import keep_freed_memory

TARGET_SPEED_UP = 10.0


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=64, help="images decoded per call (default 64)")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds per variant and case (default 7)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    parser.add_argument(
        "--vocabulary",
        choices=["real", "default"],
        default="real",
        help="'real': the shipped model's head sizes (309 tags); 'default': FashionTaggerConfig() (38 tags)",
    )
    parser.add_argument("--model", help="a saved model or ensemble folder to decode with instead of an untrained one")
    parser.add_argument("--data-source", default=str(PRODUCT_IMAGES),
                        help="folder with data/validation-*.parquet whose photos give the embeddings "
                             "(default: the shared Fashion Product Images)")  # fmt: skip
    parser.add_argument("--random-embeddings", action="store_true", help="random stand-in embeddings, not photos'")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1, see benchmarks/README.md)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def build_model(args) -> FashionTaggerModel | FashionTaggerEnsembleModel:
    if args.model:
        return AutoModel.from_pretrained(args.model).eval()  # a single tagger or an ensemble, as its config says
    torch.manual_seed(args.seed)
    if args.vocabulary == "real":
        attributes, tags = real_size_vocabulary()
        config = FashionTaggerConfig(attributes=attributes, tags=tags)
    else:
        config = FashionTaggerConfig()
    return FashionTaggerModel(config).eval()


def view_decoders(model) -> list[FashionTaggerModel]:
    """The tagger that decodes each view of an image's embeddings, in order: the model itself, or an ensemble's
    member per view, as the ensemble's own decoding pairs them."""
    return model.view_members() if isinstance(model, FashionTaggerEnsembleModel) else [model]


def image_embeddings(model, args) -> tuple[torch.Tensor, str]:
    """Embeddings of the first `args.batch_size` validation photos through the model's encoder, and what they are;
    random stand-ins (pooled ReLU6 activations are non-negative) where those photos are absent or not wanted."""
    photos = [] if args.random_embeddings else validation_photos(args.batch_size, args.data_source)
    if photos:
        processor = (FashionTaggerImageProcessor.from_pretrained(args.model) if args.model
                     else FashionTaggerImageProcessor.from_model_config(model.config))  # fmt: skip
        with torch.no_grad():
            embeds = model.encode_images(processor(photos, return_tensors="pt")["pixel_values"])
        views = f", {embeds.shape[1]} views per photo (members x mirroring)" if embeds.dim() == 3 else ""
        return embeds, f"embeddings of the first {len(photos)} validation photos in {args.data_source}{views}"
    if not args.random_embeddings:
        print(f"note: no {args.batch_size} validation photos in {args.data_source}; decoding random embeddings instead")
    views, width = len(view_decoders(model)), members_of(model)[0].initial_state.in_features
    embeds = torch.rand(args.batch_size, views, width, generator=torch.Generator().manual_seed(args.seed)) * 2.0
    if not isinstance(model, FashionTaggerEnsembleModel):
        embeds = embeds[:, 0]
    return embeds, "random embeddings (uniform in [0, 2)), not photos'"


@torch.no_grad()
def annotate_one_by_one(model, image_embeds: torch.Tensor, conflicts: torch.Tensor) -> list[list[int]]:
    """fb-model-library's greedy `annotate()` loop, with our length limit and our tag-banning rule added.

    The original ran with autograd on; here it runs under `no_grad` like `generate_tags`, so only the layout of the
    work differs. An ensemble steps every member's `nn.GRU` on its view and takes the argmax of their averaged
    next-tag probabilities. Returns each image's tag ids without the closing `<eos>`.
    """
    decoders = view_decoders(model)
    sequences = []
    for features in image_embeds:
        views = features.view(len(decoders), -1)
        hiddens = [decoder._initial_decoder_state(view[None]) for decoder, view in zip(decoders, views)]
        banned = torch.zeros(model.config.tag_vocab_size, dtype=torch.bool)
        banned[[PAD_TAG_ID, BOS_TAG_ID]] = True
        previous = torch.tensor([BOS_TAG_ID])
        emitted = []
        for _ in range(model.config.max_tag_length):
            log_probs = []
            for index, decoder in enumerate(decoders):
                output, hiddens[index] = decoder.decoder(decoder.tag_embeddings(previous)[None], hiddens[index])
                logits = decoder.tag_classifier(output[0, -1]).float().masked_fill(banned, float("-inf"))
                log_probs.append(logits if len(decoders) == 1 else logits.log_softmax(-1))
            choice = (log_probs[0] if len(decoders) == 1 else mean_of_probabilities(log_probs)).argmax().item()
            if choice == EOS_TAG_ID:
                break
            emitted.append(choice)
            banned |= conflicts[choice]
            previous = torch.tensor([choice])
        sequences.append(emitted)
    return sequences


def decode_batched(model, image_embeds: torch.Tensor, matmul_dtype: str) -> list[list[int]]:
    """`generate_tags` with every decoder's recurrent matmuls in `matmul_dtype` (an ensemble's members each read
    their own config)."""
    configs = [member.config for member in members_of(model)]
    saved = [config.decoder_matmul_dtype for config in configs]
    for config in configs:
        config.decoder_matmul_dtype = matmul_dtype
    try:
        return [hypotheses[0]["tag_ids"] for hypotheses in model.generate_tags(image_embeds=image_embeds, num_beams=1)]
    finally:
        for config, dtype in zip(configs, saved):
            config.decoder_matmul_dtype = dtype


@contextmanager
def eos_suppressed(model):
    """Make `<eos>` unreachable in every decoder, so every sequence runs to `max_tag_length`."""
    biases = [member.tag_classifier.bias for member in members_of(model)]
    saved = [bias[EOS_TAG_ID].item() for bias in biases]
    with torch.no_grad():
        for bias in biases:
            bias[EOS_TAG_ID] = -1e4
    try:
        yield
    finally:
        with torch.no_grad():
            for bias, value in zip(biases, saved):
                bias[EOS_TAG_ID] = value


def decoder_flops(model, rows: int, steps: int) -> float:
    """Matmul FLOPs of `steps` decoder steps over `rows` images, the initial state included, summed over the
    decoders that read a view of each image (one for a single tagger)."""
    total = 0.0
    for decoder in view_decoders(model):
        config = decoder.config
        hidden, layers = config.decoder_hidden_size, config.decoder_num_layers
        gates, states = (4, 2) if config.decoder_type == "lstm" else (3, 1)
        widths = [config.tag_embedding_size] + [hidden] * (layers - 1)
        per_step = sum(gates * hidden * (width + hidden) for width in widths) + hidden * config.tag_vocab_size
        initial = decoder.initial_state.in_features * hidden * layers * states
        total += 2.0 * rows * (initial + steps * per_step)
    return total


def describe_decoders(model) -> str:
    decoders = [
        f"{member.config.decoder_type}, hidden {member.config.decoder_hidden_size}" for member in members_of(model)
    ]
    if not isinstance(model, FashionTaggerEnsembleModel):
        return f"decoder: {decoders[0]}"
    mirrored = ", each on the photo and its mirror" if model.config.mirror_views else ""
    return f"ensemble of {len(decoders)} decoders ({'; '.join(decoders)}){mirrored}, next-tag probabilities averaged"


def run_case(name: str, model, image_embeds, conflicts, dtypes: list[str], args) -> dict:
    one_by_one = annotate_one_by_one(model, image_embeds, conflicts)
    batched = {dtype: decode_batched(model, image_embeds, dtype) for dtype in dtypes}
    if batched["float32"] != one_by_one:
        differing = sum(a != b for a, b in zip(batched["float32"], one_by_one))
        raise SystemExit(f"{name}: the two float32 decoders disagree on {differing} of {len(one_by_one)} images")
    variants = {"one_by_one": lambda: annotate_one_by_one(model, image_embeds, conflicts)}
    for dtype in dtypes:
        variants[dtype] = lambda dtype=dtype: decode_batched(model, image_embeds, dtype)
    seconds = interleaved(variants, repeats=args.repeats, warmup=args.warmup)
    lengths = [len(sequence) for sequence in one_by_one]
    return {
        "case": name,
        "mean_tags": statistics.mean(lengths),
        "max_tags": max(lengths),
        "one_by_one_s": statistics.median(seconds["one_by_one"]),
        "batched_s": {dtype: statistics.median(seconds[dtype]) for dtype in dtypes},
        "speed_up": {dtype: ratio_summary(seconds["one_by_one"], seconds[dtype]) for dtype in dtypes},
        "identical": {dtype: sum(a == b for a, b in zip(batched[dtype], one_by_one)) for dtype in dtypes},
    }


def main(argv=None) -> int:
    keep_freed_memory()
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    model = build_model(args)
    config = model.config
    image_embeds, source = image_embeddings(model, args)
    conflicts = tag_conflicts(config)
    print(runtime_line())
    print(
        f"{describe_decoders(model)}; {len(config.tags)} tags ({len(config.attributes)} heads), max_tag_length "
        f"{config.max_tag_length}; {'model ' + args.model if args.model else 'untrained weights'}; batch "
        f"{args.batch_size}, {args.repeats} interleaved rounds (+{args.warmup} warm-up), medians"
    )
    print(f"decoding from: {source}")

    dtypes = ["float32"] + (["bfloat16"] if runs_bfloat16_natively(image_embeds.device) else [])
    with eos_suppressed(model):
        results = [run_case("full length (<eos> suppressed)", model, image_embeds, conflicts, dtypes, args)]
    results.append(run_case("natural stopping", model, image_embeds, conflicts, dtypes, args))

    print("outputs: the float32 batched decoder and the loop give identical tag sequences in both cases")
    full = results[0]
    steps = full["max_tags"] + (full["max_tags"] < config.max_tag_length)  # the step that emitted <eos> counts too
    flops = decoder_flops(model, args.batch_size, steps)
    rates = ", ".join(f"batched {dtype} at {flops / full['batched_s'][dtype] / 1e9:.1f}" for dtype in dtypes)
    print(
        f"full length: both do {flops / 1e9:.2f} GFLOP of matmuls per batch; {rates} GFLOP/s, one by one at "
        f"{flops / full['one_by_one_s'] / 1e9:.1f} GFLOP/s"
    )
    print()
    print(
        "| case | tags/image (mean, max) | decoder matmuls | batched img/s | one-by-one img/s | speed-up (median, range) "
        f"| fastest vs fastest | same tags as the loop | target >= {TARGET_SPEED_UP:g}x (median) |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|---|")
    for result in results:
        for dtype in dtypes:
            speed_up, low, high, best = result["speed_up"][dtype]
            print(
                f"| {result['case']} | {result['mean_tags']:.1f}, {result['max_tags']} | {dtype} "
                f"| {args.batch_size / result['batched_s'][dtype]:,.0f} | {args.batch_size / result['one_by_one_s']:,.0f} "
                f"| {speed_up:.1f}x ({low:.1f}-{high:.1f}) | {best:.1f}x | {result['identical'][dtype]}/{args.batch_size} "
                f"| {verdict(speed_up >= TARGET_SPEED_UP)} |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
