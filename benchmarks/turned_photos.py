"""Turned photos through the public pipeline, on photos the upright search's setting was not chosen on.

    python benchmarks/turned_photos.py                       # 200 + 200 held-out photos, seed 2
    python benchmarks/turned_photos.py --photos 20           # a quick look

`config.upright_search` (how unsure of "upright" a photo must be before its quarter turns are tried, and by how much
a turn must look more upright to be taken) was chosen on 200 product and 200 phone validation photos drawn with
numpy's `default_rng(1)` (BENCHMARKS.md, "The heads agree"). This draws `--photos` others of each source with
`--seed`, never those, and tags each through `pipeline("fashion-tagging")` upright and turned by 90, 180 and 270
degrees (reduced first, as `fashion-hf calibrate` turns them, then turned counter-clockwise).

- handled: the turned photo gets the upright photo's subCategory and articleType, or is flagged as not a product
  photo (issue 17 accepts either);
- turned back: the pipeline's `turned_by` undoes the turn;
- upright turned / flagged: upright photos the search turned (it should leave them), and upright photos flagged
  (by the detector, or because a turn looked more upright by over `flag_margin`): on the same photos, and on the
  first 10 x `--photos` photos of the phone photos' train split (not used for the choice either).
"""

import argparse

import numpy as np
from bench_utils import PRODUCT_IMAGES  # noqa: F401  (sets HF_HUB_OFFLINE first)
from transformers import pipeline  # noqa: E402

from fashion_hf import data  # noqa: E402
from fashion_hf.training.calibrate import rotated  # noqa: E402

CHOSEN_ON_SEED, CHOSEN_ON_PHOTOS = 1, 200
TURNS = (90, 180, 270)
COMPARED = ("subCategory", "articleType")


def held_out_rows(size: int, photos: int, seed: int) -> list[int]:
    """`photos` rows drawn with `seed` from those the setting was not chosen on."""
    chosen_on = set(np.random.default_rng(CHOSEN_ON_SEED).choice(size, CHOSEN_ON_PHOTOS, replace=False).tolist())
    others = np.asarray([row for row in range(size) if row not in chosen_on])
    return sorted(np.random.default_rng(seed).choice(others, min(photos, len(others)), replace=False).tolist())


def answers(tagger, dataset, batch_size: int) -> list[dict]:
    return tagger(list(dataset.with_format(None)["image"]), batch_size=batch_size, top_k=1)


def top_labels(result: dict) -> tuple:
    return tuple(result["attributes"][name][0]["label"] for name in COMPARED if name in result["attributes"])


def flagged(results: list[dict]) -> list[bool]:
    return [bool(a["out_of_distribution"] and a["out_of_distribution"]["flagged"]) for a in results]


def turned_photo_rows(tagger, name: str, dataset, batch_size: int) -> tuple[list[dict], dict]:
    upright = answers(tagger, rotated(dataset, 0), batch_size)
    rows = []
    for degrees in TURNS:
        turned = answers(tagger, rotated(dataset, degrees), batch_size)
        same = [top_labels(a) == top_labels(b) for a, b in zip(turned, upright)]
        back = [(a["turned_by"] + degrees) % 360 == 0 for a in turned]
        rows.append({"photos": name, "turned by": degrees, "count": len(turned),
                     "handled": np.mean(np.logical_or(same, flagged(turned))), "same labels": np.mean(same),
                     "flagged": np.mean(flagged(turned)), "turned back": np.mean(back)})  # fmt: skip
    return rows, upright_effects(upright)


def upright_effects(upright: list[dict]) -> dict[str, float]:
    """What the search and the detector did to photos that were upright: turned them, or flagged them."""
    return {"turned": float(np.mean([a["turned_by"] != 0 for a in upright])), "flagged": float(np.mean(flagged(upright)))}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="models/fashion-tagger")
    parser.add_argument("--photos", type=int, default=200, help="held-out photos per source (200)")
    parser.add_argument("--seed", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)
    tagger = pipeline("fashion-tagging", model=args.model)
    sources = {
        "product validation": data.load_fashion_product_images(split="validation"),
        "phone validation": data.load_clothing_user_photos(split="validation"),
    }
    rows, upright = [], {}
    for name, dataset in sources.items():
        sample = dataset.select(held_out_rows(len(dataset), args.photos, args.seed))
        source_rows, upright[f"{name} ({len(sample)})"] = turned_photo_rows(tagger, name, sample, args.batch_size)
        rows += source_rows
    phone_train = data.load_clothing_user_photos(split="train")
    phone_train = phone_train.select(range(min(len(phone_train), 10 * args.photos)))
    upright[f"phone train ({len(phone_train)})"] = upright_effects(answers(tagger, rotated(phone_train, 0), args.batch_size))

    header = list(rows[0])
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(f"{value:.3f}" if isinstance(value, float) else str(value) for value in row.values()) + " |")
    for effect in ("turned", "flagged"):
        shares = ", ".join(f"{name} {effects[effect]:.2%}" for name, effects in upright.items())
        print(f"\nupright photos {effect}: {shares}")


if __name__ == "__main__":
    main()
