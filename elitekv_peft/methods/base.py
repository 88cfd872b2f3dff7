"""The one interface every compression method offers the conversion (`elitekv_peft.conversion`).

A method, given the original model, its shape and (when it asks for them) the calibration activations:

* plans the model before any data is seen (`Method.plan_model`: e.g. the cache budget; bad settings fail here), then
  plans the layers and initialises their weights (`Method.convert` -> `Converted`: the per-layer choices that become
  `ConversionPlan.layers`, each new attention module's state dict, and what goes into the saved report);
* says which weights the base model supplies when a saved adapter is rebuilt (`Method.rebuild_weights`) and checks
  a saved conversion against the user's settings (`Method.check_saved`);
* names its attention module (``attention``, built by `elitekv_peft.modeling.modeling_elitekv.build_attention` from
  the plan's ``config.elitekv``, the same code a saved model runs);
* describes its cache: `ConversionPlan.values_per_token` reads the plan's per-layer sizes.

`PlannedMethod` is the shape of the simple methods (``kv_latent``, ``lorc``, ``gqa``): one model-wide ``plan`` and a
``layer_weights`` per layer. EliteKV (`elitekv_peft.methods.elitekv`) plans layer by layer from calibration data.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..calibration import Calibration
from ..progress import progress_bar


@dataclass
class Converted:
    """What a method's conversion produced, before anything is installed.

    layers: the per-layer choices (`ConversionPlan.layers`); weights: per layer, the new attention module's state
    dict; report: entries for the config's saved ``report`` (e.g. calibration errors).
    """

    layers: dict[str, Any]
    weights: list[dict[str, torch.Tensor]]
    report: dict[str, Any] = field(default_factory=dict)


class Method:
    """A KV-cache compression method, as the conversion sees it."""

    name: str = ""
    attention: str = ""  # class name of its attention module in `elitekv_peft.modeling`

    def needs_calibration(self, peft_config: Any) -> bool:
        """Whether `convert` needs the calibration activations."""
        return peft_config.lowrank_init == "activation"

    def plan_model(self, model: nn.Module, peft_config: Any, shape: dict[str, int]) -> Any:
        """The model-wide decisions that need no data (e.g. the cache budget), made before calibration so that
        impossible settings fail fast; raises ``ValueError`` naming the fix."""
        raise NotImplementedError

    def convert(
        self,
        model: nn.Module,
        peft_config: Any,
        shape: dict[str, int],
        model_plan: Any,
        calib: Calibration | None,
        device: torch.device,
        progress: bool,
    ) -> Converted:
        """Plan every layer of ``model`` and initialise the new modules' weights (nothing installed)."""
        raise NotImplementedError

    def check_saved(self, peft_config: Any, shape: dict[str, int]) -> None:
        """Raise if a converted config's settings disagree with its saved choices (no-op by default)."""

    def rebuild_weights(self, model: nn.Module, plan: Any) -> list[dict[str, torch.Tensor]] | None:
        """Weights of the rebuilt modules that the base model supplies (None: all come from the checkpoint)."""
        return None


def gram_of(calib: Calibration | None, layer_idx: int, device: torch.device) -> torch.Tensor | None:
    """``X^T X`` (float64) of layer ``layer_idx``'s calibration inputs ``X [N*T, d]``, or None without calibration."""
    if calib is None:
        return None
    x = calib.inputs[layer_idx].to(device)
    flat = x.reshape(-1, x.shape[-1]).double()
    return flat.T @ flat


class PlannedMethod(Method):
    """A method with one model-wide ``plan`` and per-layer ``layer_weights`` (see `elitekv_peft.methods.kv_latent`).

    ``plan(model, peft_config, shape) -> dict`` and ``layer_weights(attn, layer_idx, plan, lowrank_init, gram) ->
    state dict`` are the method module's functions.
    """

    plan: Callable[..., dict[str, Any]]
    layer_weights: Callable[..., dict[str, torch.Tensor]]

    def plan_model(self, model: nn.Module, peft_config: Any, shape: dict[str, int]) -> dict[str, Any]:
        return self.plan(model, peft_config, shape)

    def convert(self, model, peft_config, shape, model_plan, calib, device, progress) -> Converted:
        weights = []
        decoder_layers = progress_bar(model.model.layers, desc=f"{self.name} conversion", enabled=progress)
        for layer_idx, layer in enumerate(decoder_layers):
            gram = gram_of(calib, layer_idx, next(model.parameters()).device)
            if calib is not None:
                calib.inputs[layer_idx] = None  # used: free it
            lowrank_init = peft_config.lowrank_init
            weights.append(self.layer_weights(layer.self_attn, layer_idx, model_plan, lowrank_init, gram))
        return Converted(layers=model_plan, weights=weights)
