"""Conversion and rebuild for the methods other than EliteKV (``kv_latent``, ``lorc``, ``gqa``).

Each method module (`kv_latent`, `lorc`, `gqa`) provides

* ``plan(model, peft_config, shape) -> dict``: the method's choices for the whole model (saved as
  ``EliteKVConfig.method_plan`` and in the ``elitekv`` dict of ``config.json``, so loading needs no calibration);
* ``layer_weights(attn, layer_idx, plan, lowrank_init, gram) -> state dict``: the new attention module's weights
  from one original attention layer.

`convert_method` runs them, `elitekv_peft.conversion.convert` calls it for every method but ``elitekv``, and the
modules are built by `elitekv_peft.modeling_elitekv.build_attention` (the same code the saved model runs).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..modeling_elitekv import build_attention
from ..plan import ConversionPlan
from . import gqa, kv_latent, lorc

logger = logging.getLogger(__name__)

METHOD_MODULES = {"kv_latent": kv_latent, "lorc": lorc, "gqa": gqa}


@dataclass
class MethodReport:
    """What a conversion with another method did: the cache it achieves and its per-layer sizes."""

    method: str
    kv_ratio: float  # achieved: cached values over the original's, whole model
    values_per_token: list[int] = field(default_factory=list)  # [layer]


def convert_method(model: nn.Module, peft_config: Any, progress: bool = True) -> MethodReport | None:
    """Convert ``model``'s attention in place with ``peft_config.method``; fills ``peft_config.method_plan``.

    Returns a `MethodReport`, or None when the config already held a plan (loading a checkpoint: the attention
    modules are built empty and the adapter's weights are loaded over them).
    """
    from ..conversion import attention_biases, base_shape, calibrate, check_base_matches, config_tokens, decoder_of

    module = METHOD_MODULES[peft_config.method]
    if peft_config.method_plan is not None:
        check_base_matches(model, peft_config)
        install(model, ConversionPlan.from_adapter_config(peft_config, *attention_biases(model)), None)
        return None
    shape = base_shape(model)
    method_plan = module.plan(model, peft_config, shape)
    layers = decoder_of(model).layers
    calib = None
    if peft_config.lowrank_init == "activation":
        calib = calibrate(model, peft_config, config_tokens(model, peft_config), progress)
    device = next(model.parameters()).device
    weights = []
    for layer_idx, layer in enumerate(tqdm(layers, desc=f"{peft_config.method} conversion", disable=not progress)):
        gram = None
        if calib is not None:
            flat = calib.inputs[layer_idx].to(device).reshape(-1, model.config.hidden_size).double()
            gram = flat.T @ flat
        weights.append(module.layer_weights(layer.self_attn, layer_idx, method_plan, peft_config.lowrank_init, gram))
    plan = ConversionPlan(
        method=peft_config.method,
        kv_ratio=peft_config.kv_ratio,
        base_shape=shape,
        qkv_bias=attention_biases(model)[0],
        o_bias=attention_biases(model)[1],
        lowrank_init=peft_config.lowrank_init,
        layers=method_plan,
    )
    install(model, plan, weights)
    plan.fill(peft_config)
    return MethodReport(peft_config.method, plan.achieved_ratio(), plan.values_per_token())


def install(model: nn.Module, plan: ConversionPlan, weights: list[dict[str, torch.Tensor]] | None) -> None:
    """Build every new attention module (from ``weights``, or empty to be loaded), then swap them all in."""
    from ..conversion import decoder_of, swap_attention

    decoder = decoder_of(model)

    def build(layer_idx: int) -> nn.Module:
        module = build_attention(model.config, layer_idx, decoder)
        if weights is not None:
            missing, unexpected = module.load_state_dict(weights[layer_idx], strict=False)
            missing = [k for k in missing if k != "key_chunks"]  # built from the config
            if missing or unexpected:
                raise RuntimeError(f"layer {layer_idx}: missing {missing}, unexpected {unexpected}")
        return module

    swap_attention(model, plan.model_config(), build)
