"""Distillation: the soft-target loss, the teachers' average, and train.py learning from teachers end to end."""

import json
import sys

import pytest
import torch
from helpers import TINY_FLAGS, run_training, tiny_model
from safetensors.torch import load_file

from fashion_hf.training.distillation import distillation_loss, teacher_probabilities
from fashion_hf.training.train import parse_args


def test_loss_is_zero_on_the_teachers_own_logits_and_pulls_a_student_towards_them():
    torch.manual_seed(0)
    teacher = {"articleType": torch.randn(4, 5), "baseColour": torch.randn(4, 3)}
    targets = {name: (logits / 2.0).softmax(-1) for name, logits in teacher.items()}
    assert distillation_loss(teacher, targets, 2.0).item() == pytest.approx(0.0, abs=1e-6)

    student = {name: torch.zeros_like(logits, requires_grad=True) for name, logits in teacher.items()}
    before = distillation_loss(student, targets, 2.0)
    assert before.item() > 0.01
    before.backward()
    with torch.no_grad():
        stepped = {name: logits - 1.0 * logits.grad for name, logits in student.items()}
    assert distillation_loss(stepped, targets, 2.0).item() < before.item()


def test_soft_targets_average_the_teachers_probabilities():
    class Teacher(torch.nn.Module):
        def __init__(self, logits):
            super().__init__()
            self.logits = logits

        def forward(self, pixel_values):
            return type("Output", (), {"attribute_logits": {"gender": self.logits}})()

    first, second = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 4.0]])
    targets = teacher_probabilities([Teacher(first), Teacher(second)], torch.zeros(1, 3, 8, 8), temperature=2.0)
    expected = ((first / 2).softmax(-1) + (second / 2).softmax(-1)) / 2
    assert torch.allclose(targets["gender"], expected)


def test_distillation_needs_images_not_cached_features():
    with pytest.raises(SystemExit):
        parse_args(["--distill-from", "some/model", "--frozen-stages", "2"])
    assert parse_args(["--distill-from", "a", "b", "--frozen-stages", "0"]).distill_from == ["a", "b"]


@pytest.mark.slow
def test_a_run_with_a_teacher_trains_differently_and_records_it(trained, tiny_catalogue, tmp_path):
    """Same seed, data and start: only the distillation term differs, so the trained weights must too."""
    first_stage = trained[0] / "model"
    flags = ["--data-source", str(tiny_catalogue), *TINY_FLAGS, "--frozen-stages", "0", "--epochs", "1",
             "--init-from", str(first_stage)]  # fmt: skip
    run_training([*flags, "--output-dir", str(tmp_path / "plain")], launcher=(sys.executable,))
    log = run_training([*flags, "--output-dir", str(tmp_path / "distilled"), "--distill-from", str(first_stage),
                        "--distill-weight", "5"], launcher=(sys.executable,))  # fmt: skip
    assert "distilling from 1 teacher(s)" in log
    recipe = json.loads((tmp_path / "distilled" / "model" / "recipe.json").read_text())
    assert recipe["arguments"]["distill_from"] == [str(first_stage)]
    plain = load_file(tmp_path / "plain" / "model" / "model.safetensors")
    distilled = load_file(tmp_path / "distilled" / "model" / "model.safetensors")
    assert plain.keys() == distilled.keys()
    assert any(not torch.equal(plain[key], distilled[key]) for key in plain if key.startswith("heads."))


@pytest.mark.slow
def test_a_teacher_with_other_heads_is_refused(tiny_catalogue, tmp_path):
    other = tiny_model(attributes={"gender": ["Men", "Women"]}, tags=[["Men", "gender"], ["Women", "gender"]])
    other.save_pretrained(tmp_path / "teacher")
    flags = ["--data-source", str(tiny_catalogue), *TINY_FLAGS, "--frozen-stages", "0", "--epochs", "1",
             "--output-dir", str(tmp_path / "run"), "--distill-from", str(tmp_path / "teacher")]  # fmt: skip
    with pytest.raises(AssertionError, match="heads or labels differ"):
        run_training(flags, launcher=(sys.executable,))
