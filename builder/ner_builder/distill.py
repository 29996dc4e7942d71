"""Knowledge distillation into a smaller student: fewer layers of the teacher, same tokenizer and labels.

The student is the teacher with K of its layers (evenly spaced, first and last kept: the copied head reads
the last layer's output), so it starts close to the teacher rather than from scratch (as DistilBERT did).
It is trained on ``(1 - weight) * hard-label loss + weight * T^2 * KL(teacher || student)`` over the
temperature-softened token distributions of every real token (Hinton et al., 2015). The result is an
ordinary checkpoint of the teacher's architecture.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_LAYER_INDEX = re.compile(r"(?<=\.layer\.)(\d+)(?=\.)")  # encoder.layer.N. (BERT, XLM-R, DistilBERT, ...)


class DistillError(ValueError):
    """The teacher cannot be cut into the requested student."""


@dataclass(frozen=True)
class DistillOptions:
    teacher: Path
    student_layers: int
    temperature: float = 2.0
    weight: float = 0.5  # share of the KL term; the hard labels get the rest


def student_layer_ids(teacher_layers: int, student_layers: int) -> list[int]:
    """Evenly spaced teacher layers, first and last included (6 -> 3: 0, 3, 5)."""
    if not 1 <= student_layers < teacher_layers:
        raise DistillError(f"a student needs 1 to {teacher_layers - 1} layers of a {teacher_layers}-layer teacher, "
                           f"got {student_layers}")
    if student_layers == 1:
        return [teacher_layers - 1]
    step = (teacher_layers - 1) / (student_layers - 1)
    return [int(i * step + 0.5) for i in range(student_layers)]


def make_student(teacher: Any, student_layers: int) -> Any:
    """A copy of ``teacher`` keeping only ``student_layer_ids`` of its encoder layers (weights copied)."""
    total = teacher.config.num_hidden_layers
    keep = student_layer_ids(total, student_layers)
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = student_layers
    student = type(teacher)(config)
    state = {}
    for key, value in teacher.state_dict().items():
        match = _LAYER_INDEX.search(key)
        if match is None:
            state[key] = value
        elif int(match.group(1)) in keep:
            state[_LAYER_INDEX.sub(str(keep.index(int(match.group(1)))), key, count=1)] = value
    missing, unexpected = student.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise DistillError(f"cannot map the layers of {type(teacher).__name__} onto a student "
                           f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return student


class DistillationLoss:
    """The ``NerTrainer`` extra loss: the teacher runs on the same batch, without gradients."""

    def __init__(self, teacher: Any, temperature: float, weight: float) -> None:
        if temperature <= 0 or not 0 <= weight <= 1:
            raise DistillError(f"temperature must be > 0 and weight in [0, 1], got {temperature} and {weight}")
        self.teacher = teacher.eval()
        self.teacher.requires_grad_(False)
        self.temperature = temperature
        self.weight = weight

    def __call__(self, hard_loss: Any, logits: Any, inputs: dict[str, Any]) -> Any:
        import torch

        with torch.no_grad():
            teacher_logits = self.teacher(**{k: v for k, v in inputs.items() if k != "labels"}).logits
        real = inputs["attention_mask"].bool()
        t = self.temperature
        student = torch.log_softmax(logits[real] / t, dim=-1)
        target = torch.softmax(teacher_logits[real] / t, dim=-1)
        soft = torch.nn.functional.kl_div(student, target, reduction="batchmean") * t * t  # mean over tokens
        return (1 - self.weight) * hard_loss + self.weight * soft
