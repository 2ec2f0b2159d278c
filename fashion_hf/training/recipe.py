"""recipe.json: how a model folder was made, read and written in one place; and the folder's upload to the Hub.

A recipe holds the command, its wall time and hardware, the data and splits, and every flag (`arguments`). A model
trained in stages (`--init-from` an earlier run) lists the earlier runs in `previous_stages`, first first, each
`{"command", "wall_time_seconds", "hardware"}` (and `wall_time_note` where a time needs explaining); an ensemble
lists its `members`, each with the `stages` that trained it. The model card (`model_card.py`) renders all of this.

Each key has one spelling, the one written here. Older spellings are still read (`read_key`): `wall_time_s`,
`train_examples` and `hyperparameters`, from recipes written by hand to the card's first documented schema.
"""

import json
import platform
from pathlib import Path

import torch

from ..configuration_fashion_tagger import USER_PHOTOS_DOMAIN

RECIPE_FILE = "recipe.json"
WALL_TIME = "wall_time_seconds"
TRAIN_IMAGES = "train_images"
ARGUMENTS = "arguments"
# A member added to an ensemble (`ensemble.py --add-experts-to`) continues, in later `--init-from` runs, with the
# encoder freezing it was trained with, not the run's: a frozen ImageNet encoder at a larger input stays frozen.
CONTINUE_WITH = "continue_with"
ENCODER_FLAGS = ("frozen_stages", "cache_views")
OLD_SPELLINGS = {WALL_TIME: ("wall_time_s",), TRAIN_IMAGES: ("train_examples",), ARGUMENTS: ("hyperparameters",)}
STAGE_KEYS = ("command", WALL_TIME, "hardware", "wall_time_note")  # what a run says about itself in a later history


def spellings(key: str) -> tuple[str, ...]:
    """`key` as written today, then its older spellings."""
    return (key, *OLD_SPELLINGS.get(key, ()))


def read_key(recipe: dict, key: str):
    """`recipe[key]`, else its value under an older spelling of `key`; None when neither holds one."""
    return next((recipe[name] for name in spellings(key) if recipe.get(name) is not None), None)


def read_recipe(model_folder) -> dict:
    """The recipe.json of `model_folder`; empty when it has none."""
    path = Path(model_folder) / RECIPE_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def write_recipe(model_folder: Path, recipe: dict) -> None:
    (Path(model_folder) / RECIPE_FILE).write_text(json.dumps(recipe, indent=2, default=str))


def stage_of(recipe: dict) -> dict:
    """The fields of a recipe.json that describe its own run, as one stage of a later model's history."""
    stage = {}
    for key in STAGE_KEYS:
        name = next((name for name in spellings(key) if name in recipe), None)
        if name is not None:
            stage[key] = recipe[name]
    return stage


def stages_of(recipe: dict) -> list[dict]:
    """Every run that made the model of `recipe`, first first: its previous stages, then its own."""
    return [*recipe.get("previous_stages", []), stage_of(recipe)]


def stages_recipe(stages: list[dict]) -> dict:
    """A recipe whose `stages_of` are `stages` (an ensemble member's own history, written beside its weights)."""
    return {**stages[-1], "previous_stages": stages[:-1]}


def previous_stages(model_folder: str | None) -> list[dict]:
    """The runs that trained the model in `model_folder` (an `--init-from` start, an ensemble member), first first,
    from its recipe.json; none without one."""
    earlier = read_recipe(model_folder) if model_folder else {}
    if not earlier or "members" in earlier:  # an ensemble's history is per member (continuation.py)
        return []
    return stages_of(earlier)


def dataset_name(dataset: str) -> str:
    """How metrics.json and the card name the data: a built-in data set's name, a catalogue's name (not its path)."""
    from .. import data  # here, not above: the model card reads recipes without loading the data sets' code

    return dataset if dataset in data.BUILT_IN_DATASETS else data.catalogue_name(dataset)


def hardware(devices: str) -> str:
    """`devices` (`"1 x cpu"`, `"cpu"`) with this machine's processor and torch's threads."""
    return f"{devices} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def feedback_lineage(args) -> dict:
    """Where the corrections came from: the store, its revision, how many records and fields were learned from."""
    from ..feedback import dataset as feedback_dataset

    summary = feedback_dataset.feedback_summary(args.feedback)
    return {
        "source": str(args.feedback),
        "revision": summary["revision"],
        "records_used": summary["records"],
        "attributes": summary["attributes"],
        "init_from": args.init_from,
    }


def model_recipe(args, command: str, seconds: float, devices: str, best_epoch: int, images: dict[str, int],
                 splits: dict, min_tag_count: int | None, feedback_tags: list[str]) -> dict:  # fmt: skip
    """The recipe of one model trained by `train.py` with `args`; `images`: the train, eval and (if any) test
    split's number of images."""
    return {
        "command": command,
        WALL_TIME: round(seconds, 1),
        "hardware": hardware(devices),
        "best_epoch": best_epoch,
        TRAIN_IMAGES: images["train"],
        "eval_images": images["eval"],
        **({"test_images": images["test"]} if "test" in images else {}),
        "dataset_name": dataset_name(args.dataset),
        "splits": splits,
        "selected_on": {"split": args.eval_split, "choices": ["the best epoch (mean top-1 over the heads)"]}
        if args.keep_epoch == "best" else None,
        "min_tag_count": min_tag_count,
        "feedback_tags": feedback_tags or None,
        ARGUMENTS: vars(args),
        "previous_stages": previous_stages(args.init_from),
        **({"feedback": feedback_lineage(args)} if args.feedback else {}),
    }


def continued_ensemble_recipe(args, command: str, seconds: float, member_recipes: list[dict], earlier: dict,
                              members: list[dict], eval_images: int, gate: dict | None) -> dict:  # fmt: skip
    """The recipe of an ensemble whose members continued training (`train.py --init-from` an ensemble): the data
    and settings of its trained members (`member_recipes`), `earlier` the recipe it started from, `members` the
    lineage of every member."""
    first = member_recipes[0]
    return {
        "command": command,
        WALL_TIME: round(seconds, 1),
        "hardware": first["hardware"],
        TRAIN_IMAGES: first[TRAIN_IMAGES],
        "eval_images": eval_images,
        "dataset_name": dataset_name(args.dataset),
        "splits": first["splits"],
        "selected_on": first["selected_on"] and {"split": args.eval_split, "choices": ["each member's best epoch"]},
        "feedback_tags": first["feedback_tags"],
        ARGUMENTS: vars(args),
        "init_from": args.init_from,
        "base_model": earlier.get("base_model"),
        "members": members,
        **({"gate": gate} if gate else {}),
        **({"feedback": {**first["feedback"], "init_from": args.init_from}} if args.feedback else {}),
    }


def combined_ensemble_recipe(args, command: str, seconds: float, dataset_id: str, base_models: list[str]) -> dict:
    """The recipe of an ensemble combined from trained members by `ensemble.py` with `args`."""
    return {
        "command": command,
        WALL_TIME: round(seconds, 1),
        "hardware": hardware("cpu"),
        "dataset_id": dataset_id,
        "base_model": base_models,
        "members": [{"folder": folder, "stages": previous_stages(folder)} for folder in args.members],
        # Each member's best epoch was chosen on its evaluation split; which members to combine is judged here.
        "selected_on": {"split": args.eval_split, "choices": ["each member's best epoch", "the ensemble's members"]},
        ARGUMENTS: vars(args),
    }


def keep_continue_with(member: dict) -> dict:
    """The `CONTINUE_WITH` entry of a member's lineage, to pass on to the next one."""
    return {CONTINUE_WITH: member[CONTINUE_WITH]} if CONTINUE_WITH in member else {}


def added_experts_recipe(args, command: str, seconds: float, earlier: dict, gate: dict, base_models: list[str]) -> dict:
    """The recipe of an ensemble that `ensemble.py --add-experts-to` gave more user-photo experts: `earlier`, the
    recipe of the ensemble it added them to, with the added members' lineage, the new gate and the time they took."""
    added = [
        {"folder": folder, "stages": previous_stages(folder), "domain": USER_PHOTOS_DOMAIN,
         CONTINUE_WITH: {flag: read_recipe(folder)[ARGUMENTS][flag] for flag in ENCODER_FLAGS}}
        for folder in args.members
    ]  # fmt: skip
    added_seconds = sum(read_key(stage, WALL_TIME) or 0 for member in added for stage in member["stages"][-1:])
    return {
        **earlier,
        "command": command,
        WALL_TIME: round(added_seconds + seconds, 1),  # from the ensemble it started from, as a continued one counts
        "base_model": base_models,
        "members": [*earlier.get("members", []), *added],
        "added_experts": {"to": args.add_experts_to, "members": args.members, "seconds": round(seconds, 1), ARGUMENTS: vars(args)},
        "gate": gate,
    }


def push_to_hub(folder: Path, repo_id: str, private: bool = False, api=None) -> str:
    """Upload the finished folder as one commit; returns the commit URL. `api` is injectable for tests."""
    from huggingface_hub import HfApi

    api = api or HfApi()
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    commit = api.upload_folder(
        repo_id=repo_id, repo_type="model", folder_path=str(folder), commit_message="Upload fashion tagger trained with fashion-hf"
    )
    return str(getattr(commit, "commit_url", commit))
