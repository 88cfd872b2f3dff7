"""FSDP launch settings that fail with an EliteKV model, refused before training starts, each naming the fix; and
the check that every process of a distributed run made the same conversion (`check_same_conversion`).

`accelerate launch --use_fsdp` passes its settings to every process in environment variables
(``ACCELERATE_USE_FSDP``, ``FSDP_VERSION``, ``FSDP_CPU_RAM_EFFICIENT_LOADING``); these are read here, so the check
costs nothing and runs before the model is wrapped. What was run on 2 H200s (accelerate 1.15, torch 2.11,
TRL 1.16; ``benchmarks/results/multigpu.md``):

- FSDP2 with ``--fsdp_cpu_ram_efficient_loading false``: Trainer and SFTTrainer, tiny Llama and SmolLM2. Works.
- The FSDP1 runs all had accelerate's default CPU-RAM-efficient loading on (FSDP1 with it off was not run):
  tiny Llama (untied embeddings) with the Trainer works; SmolLM2 (``tie_word_embeddings``) fails at the first step
  in ``lm_head`` with a size mismatch (the tied weight is still a shard there); TRL's `SFTTrainer`, whose fused LM
  head reads ``lm_head.weight`` directly, gets the flat shard ("mat2 must be a matrix") even on the untied tiny
  model.
- FSDP2 with CPU-RAM-efficient loading: accelerate expects every state-dict entry to be sharded, and the EliteKV
  attention's index buffers are not ("'Tensor' object has no attribute 'device_mesh'").
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

FSDP2_FLAGS = "--use_fsdp --fsdp_version 2 --fsdp_cpu_ram_efficient_loading false"


def _flag(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "y", "on"}


def fsdp_launch(environ: Mapping[str, str] | None = None) -> tuple[int, bool] | None:
    """``(FSDP version, CPU-RAM-efficient loading)`` of this process's FSDP launch, or None without FSDP."""
    env = os.environ if environ is None else environ
    if not _flag(env.get("ACCELERATE_USE_FSDP")):
        return None
    return int(env.get("FSDP_VERSION", "1") or 1), _flag(env.get("FSDP_CPU_RAM_EFFICIENT_LOADING"))


def check_fsdp_launch(
    model: nn.Module, *, fused_lm_head: bool = False, environ: Mapping[str, str] | None = None
) -> None:
    """Raise a `ValueError` naming the fix if this process was launched with FSDP settings that fail.

    Args:
        model: the model about to be trained (converted or not; only its config's ``tie_word_embeddings`` is read).
        fused_lm_head: the trainer computes the loss from ``lm_head.weight`` directly (TRL's `SFTTrainer`).
        environ: the environment to read (default ``os.environ``).
    """
    launch = fsdp_launch(environ)
    if launch is None:
        return
    version, ram_efficient_loading = launch
    fix = f"launch with FSDP2 instead: `accelerate launch {FSDP2_FLAGS} ...`"
    if version == 1 and fused_lm_head:
        raise ValueError(f"TRL's SFTTrainer reads lm_head.weight outside FSDP1's gathered forward; {fix}.")
    tied = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
    if version == 1 and tied and ram_efficient_loading:
        raise ValueError(
            "FSDP1 with CPU-RAM-efficient loading (accelerate's default) fails on a model whose lm_head is tied to "
            f"its input embeddings (tie_word_embeddings=True): the tied weight is still a shard in lm_head; {fix}."
        )
    if version == 2 and ram_efficient_loading:
        raise ValueError(
            "FSDP2 with CPU-RAM-efficient loading (accelerate's default) fails on EliteKV's index buffers; "
            "add `--fsdp_cpu_ram_efficient_loading false` to `accelerate launch`."
        )


def check_same_conversion(peft_config: Any, gather: Callable[[Any], list[Any]] | None = None) -> None:
    """Raise when the processes of a distributed run converted differently (calibration text or seed per rank).

    DDP would broadcast rank 0's weights and index buffers and train one model while the other ranks' configs (and
    what they would save) describe another, or fail on the first mismatched shape without saying why. ``gather``
    collects one object per rank (default: `torch.distributed.all_gather_object`, when a process group is up).
    """
    if gather is None:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return
        gather = _all_gather
    choices = gather(peft_config.conversion_choices())
    differ = [rank for rank, other in enumerate(choices) if other != choices[0]]
    if differ:
        raise ValueError(
            f"The processes of this distributed run converted the model differently (ranks {differ} against rank 0): "
            "give every process the same calibration_data and seed (calibration text sampled per rank differs), or "
            "convert once, save, and load the folder with PeftModel.from_pretrained(base, folder) on every rank."
        )


def _all_gather(obj: Any) -> list[Any]:
    import torch.distributed as dist

    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
