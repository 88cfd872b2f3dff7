"""Uptraining with the Hugging Face `Trainer`: plain LM loss, or self-distillation from the original model.

`EliteKVTrainer` is a `transformers.Trainer` whose loss can add a KL term to a frozen teacher (the model before
conversion). The KL is computed in chunks of tokens under activation checkpointing, so the float32 softmaxes of a
``[tokens, vocab]`` batch are never all alive at once. Everything else (optimizer, schedule, mixed precision,
checkpoints and resuming, DDP/FSDP through ``accelerate launch``) is the Trainer's own.

`uptrain` builds the `TrainingArguments` for a token budget and runs it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import Trainer, TrainingArguments, default_data_collator

from .distributed import check_fsdp_launch

IGNORE_INDEX = -100


def chunked_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    temperature: float = 1.0,
    chunk_tokens: int = 2048,
) -> torch.Tensor:
    """Mean over masked tokens of ``KL(teacher || student)`` at ``temperature``.

    Args:
        student_logits, teacher_logits: ``[B, T, V]``.
        mask: ``[B, T]`` bool, the positions that count.
        chunk_tokens: tokens per chunk; each chunk's softmaxes are recomputed in the backward pass.
    """
    student = student_logits[mask]  # [N, V]
    teacher = teacher_logits[mask].detach()
    total = student.new_zeros((), dtype=torch.float32)
    count = student.shape[0]
    if count == 0:
        return total

    def piece(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        log_p_s = F.log_softmax(s.float() / temperature, dim=-1)
        log_p_t = F.log_softmax(t.float() / temperature, dim=-1)
        return (log_p_t.exp() * (log_p_t - log_p_s)).sum()

    for start in range(0, count, chunk_tokens):
        s, t = student[start : start + chunk_tokens], teacher[start : start + chunk_tokens]
        if s.requires_grad:
            total = total + checkpoint(piece, s, t, use_reentrant=False)
        else:
            total = total + piece(s, t)
    return total * (temperature**2) / count


class EliteKVTrainer(Trainer):
    """A `Trainer` with optional self-distillation.

    Args:
        teacher: frozen model giving target logits (e.g. the model before conversion), or None for LM loss only.
        distill_weight: loss = ``distill_weight * KL + (1 - distill_weight) * LM`` when a teacher is given.
        temperature: distillation temperature.
    """

    def __init__(
        self,
        *args: Any,
        teacher: nn.Module | None = None,
        distill_weight: float = 1.0,
        temperature: float = 1.0,
        **kwargs: Any,
    ) -> None:
        check_fsdp_launch(kwargs.get("model", args[0] if args else None))
        super().__init__(*args, **kwargs)
        if not 0.0 <= distill_weight <= 1.0:
            raise ValueError(f"distill_weight={distill_weight} must be in [0, 1].")
        self.teacher = teacher
        self.distill_weight = distill_weight
        self.temperature = temperature
        if teacher is not None:
            teacher.eval()
            teacher.requires_grad_(False)

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ):
        if self.teacher is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        labels = inputs["labels"]
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"), labels=labels)
        device = outputs.logits.device
        if next(self.teacher.parameters()).device != device:
            self.teacher.to(device)
        with torch.no_grad():
            teacher_logits = self.teacher(
                input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask")
            ).logits
        # logits at position t predict token t+1: count the positions whose next-token label is real
        mask = torch.zeros_like(labels, dtype=torch.bool)
        mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX
        kl = chunked_kl(outputs.logits, teacher_logits, mask, self.temperature)
        loss = self.distill_weight * kl
        if self.distill_weight < 1.0:
            loss = loss + (1.0 - self.distill_weight) * outputs.loss
        return (loss, outputs) if return_outputs else loss


@dataclass
class UptrainPlan:
    """Steps and tokens of a run for a token budget."""

    max_steps: int
    tokens_per_step: int

    @property
    def tokens(self) -> int:
        return self.max_steps * self.tokens_per_step


def plan_steps(
    train_tokens: int, batch_size: int, seq_len: int, grad_accum: int = 1, world_size: int = 1
) -> UptrainPlan:
    """Optimizer steps needed to see ``train_tokens`` tokens (rounded up)."""
    per_step = batch_size * seq_len * grad_accum * world_size
    return UptrainPlan(max(1, math.ceil(train_tokens / per_step)), per_step)


def training_arguments(
    output_dir: str,
    *,
    max_steps: int,
    batch_size: int,
    learning_rate: float = 1e-4,
    grad_accum: int = 1,
    warmup_ratio: float = 0.03,
    seed: int = 0,
    save_steps: int | None = None,
    logging_steps: int = 10,
    bf16: bool | None = None,
    report_to: str = "none",
    **overrides: Any,
) -> TrainingArguments:
    """`TrainingArguments` for uptraining: cosine schedule, AdamW, bf16 where the device supports it."""
    if bf16 is None:
        bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    settings: dict[str, Any] = dict(
        output_dir=output_dir,
        max_steps=max_steps,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=grad_accum,
        learning_rate=learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=max(1 if max_steps > 1 and warmup_ratio > 0 else 0, round(warmup_ratio * max_steps)),
        weight_decay=0.0,
        logging_steps=logging_steps,
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or max_steps,
        seed=seed,
        bf16=bf16,
        report_to=report_to,
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        remove_unused_columns=False,
        disable_tqdm=False,
    )
    settings.update(overrides)
    return TrainingArguments(**settings)


def uptrain(
    model: nn.Module,
    train_dataset: Any,
    args: TrainingArguments,
    *,
    teacher: nn.Module | None = None,
    distill_weight: float = 1.0,
    resume_from_checkpoint: str | bool | None = None,
) -> EliteKVTrainer:
    """Train ``model`` on ``train_dataset`` (``input_ids``/``labels`` columns) and return the trainer."""
    trainer = EliteKVTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        data_collator=default_data_collator,
        teacher=teacher,
        distill_weight=distill_weight,
    )
    trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    return trainer
