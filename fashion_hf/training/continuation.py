"""`train.py --init-from` an ensemble: each member continues training as a model of its own (`loop.py`), then the
members are combined again (`combine.py`), behind a gate where experts learned from user photos (`domain_gate.py`).
"""

import argparse
import time
from pathlib import Path

import torch
from transformers import PreTrainedConfig

from .. import FashionTaggerEnsembleConfig, FashionTaggerEnsembleModel, FashionTaggerImageProcessor, FashionTaggerModel
from .. import data
from ..configuration_fashion_tagger import USER_PHOTOS_DOMAIN
from ..pipeline_fashion_tagging import save_tagger
from . import domain_gate
from .combine import combine, combine_models, save as save_ensemble
from .examples import load_split, replay_sample, user_photo_sets
from .loop import add_detail_tags, finish, train_model
from .recipe import (
    CONTINUE_WITH,
    WALL_TIME,
    keep_continue_with,
    continued_ensemble_recipe,
    read_key,
    read_recipe,
    stages_of,
    stages_recipe,
    write_recipe,
)

GATE_CATALOGUE_PHOTOS = 2000  # catalogue photos the gate of user-photo experts is fitted on, beside every user photo


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
    output_dir = Path(args.output_dir)
    ensemble = FashionTaggerEnsembleModel.from_pretrained(args.init_from, dtype=torch.float32).drop_calibration()
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
        {"folder": str(folder), "stages": stages_of(r), **keep_continue_with(earlier_members[index])}
        for index, folder, r in zip(trained, member_folders, member_recipes)
    ]
    gate = None
    if learns_user_photos:
        experts = [FashionTaggerModel.from_pretrained(folder, dtype=torch.float32) for folder in member_folders]
        combined, gate = combine_with_experts(args, ensemble, general, experts, processor)
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
    seconds = time.time() - combining_started + sum(read_key(r, WALL_TIME) for r in member_recipes)
    recipe = continued_ensemble_recipe(args, command, seconds, member_recipes, earlier, members_lineage, len(eval_set), gate)
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
            write_recipe(start, stages_recipe(stages))
        resume = args.resume and any((member_dir / "checkpoints").glob("checkpoint_*"))
        overrides = {"init_from": str(start), "output_dir": str(member_dir), "push_to_hub": None, "resume": resume,
                     **earlier_members[index].get(CONTINUE_WITH, {})}  # fmt: skip
        train_model(argparse.Namespace(**{**vars(args), **overrides}), command, final=False)
    return member_dir / "model"


def combine_with_experts(args, ensemble, general: list[int], experts: list[FashionTaggerModel], processor):
    """`ensemble`'s `general` members unchanged, the trained `experts` beside them, and the gate fitted on the
    run's user photos (`--feedback`, `--mix-dataset`) against a seeded catalogue sample. Returns the ensemble and
    the gate's record for the recipe. `processor` is set to the combined input size (the largest member's)."""
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
    processor.size = dict(zip(("height", "width"), combined.config.image_size))
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

