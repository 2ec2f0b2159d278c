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

    python benchmarks/bench_decoding.py --repeats 15
"""

import argparse
import statistics
from contextlib import contextmanager

import torch
from bench_utils import interleaved, ratio_summary, real_size_vocabulary, runtime_line, verdict

from fashion_hf import FashionTaggerConfig, FashionTaggerModel
from fashion_hf.configuration_fashion_tagger import BOS_TAG_ID, EOS_TAG_ID, PAD_TAG_ID
from fashion_hf.modeling_fashion_tagger import runs_bfloat16_natively, tag_conflicts
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
    parser.add_argument("--model", help="a saved model folder to decode with instead of an untrained one")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1, see benchmarks/README.md)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def build_model(args) -> FashionTaggerModel:
    if args.model:
        return FashionTaggerModel.from_pretrained(args.model).eval()
    torch.manual_seed(args.seed)
    if args.vocabulary == "real":
        attributes, tags = real_size_vocabulary()
        config = FashionTaggerConfig(attributes=attributes, tags=tags)
    else:
        config = FashionTaggerConfig()
    return FashionTaggerModel(config).eval()


def image_embeddings(model: FashionTaggerModel, batch_size: int, seed: int) -> torch.Tensor:
    """Stand-in encoder outputs: pooled ReLU6 activations, so non-negative, of the encoder's width."""
    width = model.initial_state.in_features
    return torch.rand(batch_size, width, generator=torch.Generator().manual_seed(seed)) * 2.0


@torch.no_grad()
def annotate_one_by_one(model: FashionTaggerModel, image_embeds: torch.Tensor, conflicts: torch.Tensor) -> list[list[int]]:
    """fb-model-library's greedy `annotate()` loop, with our length limit and our tag-banning rule added.

    The original ran with autograd on; here it runs under `no_grad` like `generate_tags`, so only the layout of the
    work differs. Returns each image's tag ids without the closing `<eos>`.
    """
    sequences = []
    for features in image_embeds:
        hidden = model._initial_decoder_state(features[None])
        banned = torch.zeros(model.config.tag_vocab_size, dtype=torch.bool)
        banned[[PAD_TAG_ID, BOS_TAG_ID]] = True
        previous = torch.tensor([BOS_TAG_ID])
        emitted = []
        for _ in range(model.config.max_tag_length):
            output, hidden = model.decoder(model.tag_embeddings(previous)[None], hidden)
            logits = model.tag_classifier(output[0, -1]).float().masked_fill(banned, float("-inf"))
            choice = logits.argmax().item()
            if choice == EOS_TAG_ID:
                break
            emitted.append(choice)
            banned |= conflicts[choice]
            previous = torch.tensor([choice])
        sequences.append(emitted)
    return sequences


def decode_batched(model: FashionTaggerModel, image_embeds: torch.Tensor, matmul_dtype: str) -> list[list[int]]:
    saved, model.config.decoder_matmul_dtype = model.config.decoder_matmul_dtype, matmul_dtype
    try:
        return [hypotheses[0]["tag_ids"] for hypotheses in model.generate_tags(image_embeds=image_embeds, num_beams=1)]
    finally:
        model.config.decoder_matmul_dtype = saved


@contextmanager
def eos_suppressed(model: FashionTaggerModel):
    """Make `<eos>` unreachable, so every sequence runs to `max_tag_length`."""
    bias = model.tag_classifier.bias
    saved = bias[EOS_TAG_ID].item()
    with torch.no_grad():
        bias[EOS_TAG_ID] = -1e4
    try:
        yield
    finally:
        with torch.no_grad():
            bias[EOS_TAG_ID] = saved


def decoder_flops(model: FashionTaggerModel, rows: int, steps: int) -> float:
    """Matmul FLOPs of `steps` decoder steps over `rows` images, the initial state included."""
    config = model.config
    hidden, layers = config.decoder_hidden_size, config.decoder_num_layers
    gates, states = (4, 2) if config.decoder_type == "lstm" else (3, 1)
    widths = [config.tag_embedding_size] + [hidden] * (layers - 1)
    per_step = sum(gates * hidden * (width + hidden) for width in widths) + hidden * config.tag_vocab_size
    initial = model.initial_state.in_features * hidden * layers * states
    return 2.0 * rows * (initial + steps * per_step)


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
    image_embeds = image_embeddings(model, args.batch_size, args.seed)
    conflicts = tag_conflicts(config)
    print(runtime_line())
    print(
        f"decoder: {config.decoder_type}, hidden {config.decoder_hidden_size}, {len(config.tags)} tags "
        f"({len(config.attributes)} heads), max_tag_length {config.max_tag_length}; "
        f"{'model ' + args.model if args.model else 'untrained weights'}; batch {args.batch_size}, "
        f"{args.repeats} interleaved rounds (+{args.warmup} warm-up), medians"
    )

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
