"""Knowledge distillation: trained taggers (teachers) whose averaged head probabilities the model learns from too.

Averaging the predictions of two taggers with different encoders beats either one (BENCHMARKS.md, "A larger
encoder"); distilling that average into one model keeps one encoder pass per image. The teachers see the very
augmented batch the model sees, so the soft targets always match the view being trained on.
"""

from pathlib import Path

import torch
import torch.nn.functional as F

from transformers import AutoModel

from ..configuration_fashion_tagger import IGNORE_INDEX


class TeacherMismatchError(ValueError):
    """A teacher whose heads or labels are not the student's."""


def load_teachers(folders: list[str | Path], student_config, device) -> list:
    """Frozen teachers in eval mode, single taggers or ensembles; each must have the student's heads and labels, in
    the same order."""
    teachers = []
    for folder in folders:
        teacher = AutoModel.from_pretrained(folder).drop_calibration().eval().requires_grad_(False)
        if teacher.config.attributes != student_config.attributes:
            raise TeacherMismatchError(f"--distill-from {folder}: its heads or labels differ from the model being trained")
        teachers.append(teacher.to(device))
    return teachers


@torch.no_grad()
def teacher_probabilities(teachers: list, pixel_values: torch.Tensor, temperature: float) -> dict:
    """Per head, the teachers' softmax at `temperature`, averaged over the teachers."""
    outputs = [teacher(pixel_values=pixel_values).attribute_logits for teacher in teachers]
    return {
        name: torch.stack([(logits[name].float() / temperature).softmax(-1) for logits in outputs]).mean(0)
        for name in outputs[0]
    }


def distillation_loss(student_logits: dict, soft_targets: dict, temperature: float) -> torch.Tensor:
    """KL(teachers || student) per head at `temperature`, times temperature² (Hinton et al., 2015), mean over heads."""
    losses = [
        F.kl_div(F.log_softmax(student_logits[name].float() / temperature, -1), targets, reduction="batchmean")
        for name, targets in soft_targets.items()
    ]
    return torch.stack(losses).mean() * temperature**2


def distillation_term(teachers: list, weight: float, temperature: float, attribute_logits: dict, batch: dict):
    """What distillation adds to a batch's loss: `weight` x the KL to the teachers' soft targets on these images."""
    soft_targets = teacher_probabilities(teachers, batch["pixel_values"], temperature)
    return weight * distillation_loss(attribute_logits, soft_targets, temperature)


def start_model_term(start_model, weight: float, temperature: float, attribute_logits: dict, batch: dict):
    """Learning without forgetting (Li & Hoiem, 2016): the model being continued, frozen as it started, gives soft
    targets on the very inputs of the batch (its cached trunk features or images). A head's soft target counts for
    a row unless the row's label disagrees with the starting model's top-1: there the correction must win, and
    elsewhere (heads a correction leaves unlabelled, catalogue rows it already got right) nothing is forgotten."""
    inputs = {key: batch[key] for key in ("pixel_values", "trunk_features") if key in batch}
    with torch.no_grad():
        start_logits = start_model(**inputs).attribute_logits
    losses = []
    for column, (name, logits) in enumerate(attribute_logits.items()):
        labels, targets = batch["attribute_labels"][:, column], start_logits[name].float()
        keep = (labels == IGNORE_INDEX) | (labels == targets.argmax(-1))
        if keep.any():
            soft = (targets[keep] / temperature).softmax(-1)
            student = F.log_softmax(logits[keep].float() / temperature, -1)
            losses.append(F.kl_div(student, soft, reduction="sum") / len(keep))
    return weight * torch.stack(losses).sum() / len(attribute_logits) * temperature**2
