"""Progressive conversion: the converted attention comes into the model a few layers at a time during uptraining.

Every layer is converted (and calibrated) up front, as `get_peft_model` does; what changes is when each converted
layer starts to run. Until its turn, a layer's attention forward is the original model's (a frozen copy, taken from
the distillation teacher), so the rest of the network (and the layers already converted) adapt to a few new
layers at a time instead of all of them at once. Layers come in ``stages`` equal groups, first to last: group
``k`` (0-based) starts at step ``floor(k * share * max_steps / (stages - 1))``, so every layer runs converted from
``share * max_steps`` on. When training ends, every layer runs converted again, whatever step it stopped at.

The module tree never changes (only the unconverted layers' ``forward`` is redirected), so the optimizer, the
checkpoints and `save_pretrained` see the converted model throughout. The original attention runs without a cache:
training does not decode.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

from torch import nn
from transformers import TrainerCallback

from .conversion import decoder_of, is_converted_attention


def check_stages(stages: int, num_layers: int) -> None:
    """Raise ``ValueError`` naming the range unless ``1 <= stages <= num_layers``."""
    if stages < 1 or stages > num_layers:
        raise ValueError(f"progressive_stages={stages}: the model has {num_layers} layers; choose 1 to {num_layers}.")


def stage_starts(num_layers: int, stages: int, share: float, max_steps: int) -> list[int]:
    """The step at which each layer starts to run converted (a list of ``num_layers`` ints, first layer first).

    ``stages`` groups of layers (the first ``num_layers % stages`` one layer larger), group ``k`` starting at
    ``floor(k * share * max_steps / (stages - 1))``; one stage: every layer at step 0.
    """
    check_stages(stages, num_layers)
    if not 0.0 <= share < 1.0:
        raise ValueError(f"progressive_share={share} must be in [0, 1): the share of training before every layer runs.")
    base, extra = divmod(num_layers, stages)
    starts: list[int] = []
    for k in range(stages):
        start = 0 if stages == 1 else math.floor(k * share * max_steps / (stages - 1))
        starts += [start] * (base + (1 if k < extra else 0))
    return starts


def _without_cache(forward: Callable[..., Any]) -> Callable[..., Any]:
    """``forward`` of an original attention module, called without the cache (training keeps none)."""

    def run(*args: Any, **kwargs: Any) -> Any:
        kwargs.pop("cache", None)
        kwargs.pop("past_key_values", None)
        return forward(*args, **kwargs)

    return run


class ProgressiveConversion(TrainerCallback):
    """A `TrainerCallback` that switches the converted layers on in stages (module docstring).

    Args:
        model: the converted model being trained (a `PeftModel` or the model it wraps).
        original: the model before conversion (the distillation teacher): its attention modules are copied, frozen,
            to run the layers whose turn has not come.
        stages: groups of layers switched on one after the other (1: every layer converted from the start).
        share: part of the training steps before the last group is switched on.
    """

    def __init__(self, model: nn.Module, original: nn.Module, stages: int, share: float = 0.5) -> None:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PeftModel's own model
        self.layers = list(decoder_of(base).layers)
        original_layers = list(decoder_of(original).layers)
        if len(original_layers) != len(self.layers):
            raise ValueError(
                f"progressive conversion needs the original model of the same depth ({len(original_layers)} layers "
                f"against {len(self.layers)}): pass the model the student was converted from as teacher."
            )
        if not all(is_converted_attention(layer.self_attn) for layer in self.layers):
            raise ValueError("progressive conversion trains a converted model: convert it with get_peft_model first.")
        stage_starts(len(self.layers), stages, share, 1)  # checks the settings now, not at the first step
        self.stages, self.share = stages, share
        self.originals = [copy.deepcopy(layer.self_attn).requires_grad_(False) for layer in original_layers]
        self.starts: list[int] = []
        self.redirected: set[int] = set()

    def converted_layers(self) -> int:
        """How many layers (the first ones) run converted now."""
        return len(self.layers) - len(self.redirected)

    def apply(self, step: int, max_steps: int) -> None:
        """Run each layer converted from its start step on, the original attention before it."""
        if not self.starts:
            self.starts = stage_starts(len(self.layers), self.stages, self.share, max_steps)
        for idx, (layer, start) in enumerate(zip(self.layers, self.starts, strict=True)):
            attention = layer.self_attn
            if step < start and idx not in self.redirected:
                original = self.originals[idx]
                weight = next(attention.parameters())
                original.to(device=weight.device, dtype=weight.dtype).train(attention.training)
                attention.forward = _without_cache(original.forward)
                self.redirected.add(idx)
            elif step >= start and idx in self.redirected:
                del attention.forward
                self.redirected.discard(idx)

    def restore(self) -> None:
        """Every layer runs converted again."""
        for idx in sorted(self.redirected):
            del self.layers[idx].self_attn.forward
        self.redirected.clear()

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.apply(state.global_step, state.max_steps)

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.apply(state.global_step, state.max_steps)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.restore()
