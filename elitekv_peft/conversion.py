"""Convert the attention of a Llama/Mistral/Qwen2 causal LM, in place, with any method of `elitekv_peft.methods`.

`convert` orchestrates; it knows no method's internals, only the interface of `elitekv_peft.methods.base.Method`:

1. check the architecture (`check_supported`) and let the method plan the model (`Method.plan_model`: e.g. the cache
   budget; impossible settings fail here, before any data is seen);
2. calibration, if the method asks for it: each layer's attention inputs on calibration tokens (`calibrate`);
3. the method plans every layer and initialises its weights (`Method.convert`), giving a `ConversionPlan`;
4. every new attention module is built from the plan (`elitekv_peft.modeling`) and, only if all succeed, swapped in
   (`install`, all-or-nothing); then the plan fills the config.

A config that already holds a conversion (a saved adapter being loaded) skips 1-3: the modules are rebuilt from its
plan and the checkpoint's weights are loaded over them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .calibration import (
    Calibration,
    calibration_tokens,
    check_weights,
    collect_attention_inputs,
    collect_attention_inputs_layerwise,
)
from .config import EliteKVConfig
from .families import FAMILY_ATTENTION, FAMILY_MODEL_TYPES, check_family, standard_projections
from .methods import get_method
from .modeling.modeling_elitekv import CONVERTED_ATTENTION, build_attention
from .modeling.variants import layer_rope_parameters
from .plan import ConversionPlan
from .quantization import dense_dtype

logger = logging.getLogger(__name__)

SUPPORTED_ATTENTION = {"LlamaAttention", "MistralAttention", "Qwen2Attention"}
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")  # tested in tests/test_families.py
# families with q_norm / k_norm before RoPE (Qwen3 per head, OLMo2 over the whole projection): every method, through
# the attention of modeling/key_norm.py (docs/families.md)
SUPPORTED_ATTENTION |= {"Qwen3Attention", "Olmo2Attention"}
SUPPORTED_MODEL_TYPES += ("qwen3", "olmo2")
# Phi-3 (fused qkv_proj, partial rotary), Granite (attention_multiplier), Gemma 2 (query_pre_attn_scalar, soft-capping,
# sliding-window layers), Gemma 3 (those, q/k norms through modeling/key_norm.py, RoPE parameters per layer type):
# elitekv_peft/families.py, modeling/variants.py (docs/families.md)
SUPPORTED_ATTENTION |= FAMILY_ATTENTION
SUPPORTED_MODEL_TYPES += FAMILY_MODEL_TYPES
SUPPORTED_ROPE_TYPES += ("longrope",)  # Phi-3.5 / Phi-4-mini; tested on Phi-3 in tests/test_families_scaled.py


@dataclass
class ConversionReport:
    """What a conversion did: the cache it achieves and, for EliteKV, its calibration errors per layer."""

    method: str
    kv_ratio: float  # achieved: cached values over the original's, whole model
    values_per_token: list[int] = field(default_factory=list)  # [layer]
    selection_errors: list[list[float | None]] = field(default_factory=list)  # [layer][kv head]: final score error
    lowrank_errors: list[float | None] = field(default_factory=list)  # [layer]: relative output error of K_nope|V


def decoder_of(model: nn.Module) -> nn.Module:
    """The ``*Model`` (with ``.layers`` and ``.rotary_emb``) inside a causal LM."""
    base = getattr(model, "model", None)
    if base is None or not hasattr(base, "layers"):
        raise TypeError(
            f"{type(model).__name__} is not a supported causal LM: EliteKV converts transformers "
            f"{'/'.join(SUPPORTED_MODEL_TYPES)} models (AutoModelForCausalLM) with `model.model.layers`."
        )
    return base


def check_supported(model: nn.Module, method: str | None = None) -> None:
    """Raise a clear error unless ``model`` is a RoPE causal LM of a supported family and RoPE type, with full
    or sliding-window attention; ``method`` names the method in the error of a family it refuses."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise TypeError(
            f"EliteKV supports {', '.join(SUPPORTED_MODEL_TYPES)} models (Llama, Mistral and Qwen2-family "
            f"attention); got model_type={model_type!r}. Convert one of those."
        )
    decoder = decoder_of(model)
    if getattr(decoder, "rotary_emb", None) is None:
        raise TypeError("This model has no rotary position embedding (RoPE); EliteKV only converts RoPE models.")
    # Gemma 3 gives RoPE parameters per layer type (`variants.layer_rope_parameters`): every layer's are checked
    rope_types = {layer_rope_parameters(config, idx).get("rope_type", "default") for idx in range(len(decoder.layers))}
    for rope_type in sorted(rope_types):
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise TypeError(
                f"rope_type={rope_type!r} is not supported: EliteKV converts models with rope_type in "
                f"{SUPPORTED_ROPE_TYPES} (docs/families.md). Convert a model with one of those."
            )
    for idx, layer in enumerate(decoder.layers):
        attn = getattr(layer, "self_attn", None)
        name = type(attn).__name__
        if is_converted_attention(attn):
            raise ValueError(
                "This model's attention is already converted to EliteKV; convert the original model instead."
            )
        if name not in SUPPORTED_ATTENTION:
            raise TypeError(
                f"Layer {idx} uses {name}; EliteKV supports {sorted(SUPPORTED_ATTENTION)} "
                "(eager/sdpa/flash implementations of Llama, Mistral and Qwen2)."
            )
    check_family(model, method)  # scale, soft-capping, windows, partial rotary: what the config must tell


def is_converted_attention(module: nn.Module) -> bool:
    """Whether ``module`` is the attention of any method of this library (EliteKV, KV-Latent, LoRC, GQA)."""
    return isinstance(module, CONVERTED_ATTENTION)


def base_shape(model: nn.Module) -> dict[str, Any]:
    """The attention shape of ``model``, saved with the adapter and checked when it is loaded again."""
    config = model.config
    return {
        "model_type": config.model_type,
        "num_hidden_layers": len(decoder_of(model).layers),
        "hidden_size": config.hidden_size,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": _head_dim(config),
        "vocab_size": config.vocab_size,
    }


def _head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def original_base_name(peft_config: EliteKVConfig) -> str | None:
    """The base model the conversion was made from: ``base_model_name_or_path``, or the name kept in ``report`` when
    `hub.push_to_hub` pointed that field at the repository itself."""
    return (peft_config.report or {}).get("base_model_name_or_path") or peft_config.base_model_name_or_path


def check_base_matches(model: nn.Module, peft_config: EliteKVConfig) -> None:
    """Raise if a converted config (from a checkpoint) was made for a model of another shape."""
    if peft_config.base_shape is None:
        return
    actual = base_shape(model)
    diffs = {k: (v, actual.get(k)) for k, v in peft_config.base_shape.items() if actual.get(k) != v}
    if diffs:
        detail = ", ".join(f"{k}: adapter {a!r} vs model {b!r}" for k, (a, b) in diffs.items())
        raise ValueError(
            f"This EliteKV adapter was converted from a different base model ({detail}). Load it onto the base "
            f"model it was made from ({original_base_name(peft_config) or 'see adapter_config.json'})."
        )


def compute_device(model: nn.Module, peft_config: EliteKVConfig) -> torch.device:
    """Where calibration and factorization run: ``calibration_device``, else the model's device."""
    if peft_config.calibration_device is not None:
        return torch.device(peft_config.calibration_device)
    return next(model.parameters()).device


def use_layerwise(model: nn.Module, peft_config: EliteKVConfig) -> bool:
    """``calibration_layerwise`` if set, else True when the compute device is not the model's device."""
    if peft_config.calibration_layerwise is not None:
        return peft_config.calibration_layerwise
    return compute_device(model, peft_config) != next(model.parameters()).device


def convert(model: nn.Module, peft_config: EliteKVConfig, progress: bool = True) -> ConversionReport | None:
    """Convert ``model``'s attention in place with ``peft_config.method``; fills the config's conversion fields.

    Returns a `ConversionReport`, or None when the config already held a conversion (loading a checkpoint: the
    modules are rebuilt from the saved plan and the checkpoint's weights are loaded over them). The methods read
    ``q_proj`` / ``k_proj`` / ``v_proj`` in the standard layout (`families.standard_projections`: Phi-3's fused
    ``qkv_proj`` split, partial rotary heads reordered).
    """
    with standard_projections(model):
        return _convert(model, peft_config, progress)


def _convert(model: nn.Module, peft_config: EliteKVConfig, progress: bool) -> ConversionReport | None:
    """`convert`, with the projections in the standard layout."""
    check_supported(model, peft_config.method)
    check_weights(model, decoder_of(model).layers)
    method = get_method(peft_config.method)
    shape = base_shape(model)
    if peft_config.is_converted:
        check_base_matches(model, peft_config)
        method.check_saved(peft_config, shape)
        plan = ConversionPlan.from_adapter_config(peft_config, *attention_biases(model))
        install(model, plan, method.rebuild_weights(model, plan), strict=False)
        return None
    model_plan = method.plan_model(model, peft_config, shape)
    calib = None
    if method.needs_calibration(peft_config):
        calib = calibrate(model, peft_config, config_tokens(model, peft_config), progress)
    converted = method.convert(
        model, peft_config, shape, model_plan, calib, compute_device(model, peft_config), progress
    )
    plan = ConversionPlan(
        method=method.name,
        kv_ratio=peft_config.kv_ratio,
        base_shape=shape,
        qkv_bias=attention_biases(model)[0],
        o_bias=attention_biases(model)[1],
        lowrank_init=peft_config.lowrank_init,
        layers=converted.layers,
    )
    install(model, plan, converted.weights)
    plan.fill(peft_config)
    report = ConversionReport(
        method=method.name,
        kv_ratio=plan.achieved_ratio(),
        values_per_token=plan.values_per_token(),
        selection_errors=converted.report.get("selection_errors", []),
        lowrank_errors=converted.report.get("lowrank_errors", []),
    )
    if converted.report:
        peft_config.report = {
            **(peft_config.report or {}),
            "kv_ratio": peft_config.kv_ratio,
            "kv_ratio_achieved": report.kv_ratio,
            **converted.report,
        }
    return report


def config_tokens(model: nn.Module, peft_config: EliteKVConfig) -> torch.Tensor:
    """The calibration token ids ``[N, T]`` the config asks for (given, or sampled from the model)."""
    return calibration_tokens(
        model,
        peft_config.calibration_data,
        peft_config.calibration_samples,
        peft_config.calibration_seq_len,
        peft_config.seed,
    )


def calibrate(model: nn.Module, peft_config: EliteKVConfig, tokens: torch.Tensor, progress: bool) -> Calibration:
    """Every layer's attention inputs on ``tokens``, for every method: whole model, or layer by layer
    (`use_layerwise`: one decoder layer at a time on ``calibration_device``)."""
    hidden = model.config.hidden_size
    if tokens.numel() < hidden:
        raise ValueError(
            f"calibration data has {tokens.numel()} tokens, fewer than hidden_size={hidden}: the "
            "activation statistics would be degenerate. Pass more calibration text."
        )
    decoder = decoder_of(model)
    batch_size = peft_config.calibration_batch_size
    if use_layerwise(model, peft_config):
        device = compute_device(model, peft_config)
        return collect_attention_inputs_layerwise(decoder, tokens, batch_size, device, progress)
    return collect_attention_inputs(model, decoder.layers, tokens, batch_size, progress)


def install(
    model: nn.Module, plan: ConversionPlan, weights: list[dict[str, torch.Tensor]] | None, strict: bool = True
) -> None:
    """Build every layer's new attention module from ``plan`` and ``weights``, then swap them all in.

    With ``strict=False`` (rebuilding a saved adapter) ``weights`` may be partial or None: the parameters they do
    not give start at zero, and the checkpoint's weights are loaded over them.
    """
    decoder = decoder_of(model)
    buffers = ("chunk_index", "key_chunks")  # built from the plan

    def build(layer_idx: int) -> nn.Module:
        module = build_attention(model.config, layer_idx, decoder)
        given = weights[layer_idx] if weights is not None else {}
        if not strict:
            with torch.no_grad():
                for name, param in module.named_parameters():
                    if name not in given:
                        param.zero_()
        missing, unexpected = module.load_state_dict(given, strict=False)
        missing = [k for k in missing if k not in buffers]
        if unexpected or (strict and missing):
            raise RuntimeError(f"layer {layer_idx}: missing {missing}, unexpected {unexpected}")
        return module

    swap_attention(model, plan.model_config(), build)


def attention_biases(model: nn.Module) -> tuple[bool, bool]:
    """``(qkv_bias, o_bias)``: whether the original attention projections have biases."""
    first = decoder_of(model).layers[0].self_attn
    return first.q_proj.bias is not None, first.o_proj.bias is not None


def swap_attention(model: nn.Module, elitekv: dict[str, Any], build: Callable[[int], nn.Module]) -> None:
    """Replace every layer's attention, all or nothing, for every method.

    Sets ``model.config.elitekv`` (which the new modules read), calls ``build(layer_idx)`` for each layer, moves
    each module to the old one's device and dense dtype, and only when all are built swaps them in; if a build
    fails, the model and its config are left as they were.
    """
    decoder = decoder_of(model)
    config = model.config
    config.elitekv = elitekv
    try:
        new_modules = []
        for layer_idx, layer in enumerate(decoder.layers):
            q_proj = layer.self_attn.q_proj
            module = build(layer_idx)
            new_modules.append(module.to(device=q_proj.weight.device, dtype=dense_dtype(q_proj, model)))
    except Exception:
        del config.elitekv
        raise
    for layer, module in zip(decoder.layers, new_modules, strict=True):
        layer.self_attn = module
