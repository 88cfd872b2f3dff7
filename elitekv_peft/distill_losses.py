"""The distillation losses of `elitekv_peft.training.EliteKVTrainer`: KL to the teacher's next-token distribution,
and the relative error of each layer's hidden states, both over the positions a mask selects."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


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


def hidden_state_loss(student: tuple[torch.Tensor, ...], teacher: tuple[torch.Tensor, ...], mask: torch.Tensor):
    """Mean over layers of ``||h_s - h_t||^2 / ||h_t||^2`` at the masked positions (the embeddings skipped).

    Args:
        student, teacher: ``output_hidden_states`` of the two models, each a tuple of ``L + 1`` tensors ``[B, T, d]``.
        mask: ``[B, T]`` bool, the positions that count.
    """
    if len(student) != len(teacher):
        raise ValueError(
            f"hidden-state distillation needs a teacher of the student's depth: {len(student) - 1} layers against "
            f"{len(teacher) - 1}; use the model the student was converted from (or set hidden_weight=0)."
        )
    terms = []
    for s, t in zip(student[1:], teacher[1:], strict=True):
        s, t = s[mask].float(), t[mask].detach().float()  # [N, d]
        terms.append((s - t).pow(2).sum() / t.pow(2).sum().clamp_min(1e-12))
    return torch.stack(terms).mean()
