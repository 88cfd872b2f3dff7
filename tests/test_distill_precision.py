"""Distillation runs the teacher in the student's mixed precision and skips the student's unused LM loss.

The teacher is not prepared by accelerate, so without its own autocast it ran in float32 beside a bf16 student.
"""

from __future__ import annotations

import copy

import pytest
import torch

from elitekv_demo.testing import synthetic_windows
from elitekv_peft.training import EliteKVTrainer, lm_dataset, training_arguments

from .tiny import VOCAB, convert, tiny_model


class Recorder(torch.nn.Module):
    """Wraps a model and records, per call, whether CPU autocast was on and whether labels were passed."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.calls: list[tuple[bool, bool]] = []

    def forward(self, **kwargs):  # noqa: ANN003, ANN201
        self.calls.append((torch.is_autocast_enabled("cpu"), kwargs.get("labels") is not None))
        return self.model(**kwargs)


@pytest.mark.parametrize("distill_weight", [1.0, 0.5])
def test_teacher_runs_under_autocast_and_student_loss_only_when_mixed(tmp_path, distill_weight):
    windows = synthetic_windows(VOCAB, 16, 32, seed=0)
    original = tiny_model("llama_gqa")
    teacher = Recorder(copy.deepcopy(original))
    model = convert(original, kv_ratio=0.25, calibration_data=windows[:8])
    model.train()
    student_labels: list[bool] = []
    hook = model.register_forward_pre_hook(
        lambda module, args, kwargs: student_labels.append(kwargs.get("labels") is not None), with_kwargs=True
    )
    args = training_arguments(
        str(tmp_path), max_steps=2, batch_size=4, bf16=True, use_cpu=True, disable_tqdm=True, warmup_ratio=0.0
    )
    trainer = EliteKVTrainer(
        model=model,
        args=args,
        train_dataset=lm_dataset(windows),
        teacher=teacher,
        distill_weight=distill_weight,
    )
    trainer.train()
    hook.remove()
    assert teacher.calls and all(autocast for autocast, _ in teacher.calls)
    assert not any(labels for _, labels in teacher.calls)
    assert student_labels and all(labels == (distill_weight < 1.0) for labels in student_labels)
