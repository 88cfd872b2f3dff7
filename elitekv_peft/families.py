"""The conversion side of the families whose attention differs from Llama's in more than its weights: Phi-3
(fused ``qkv_proj``, partial rotary), Granite (``attention_multiplier``), Gemma 2 (``query_pre_attn_scalar``,
``attn_logit_softcapping``, alternating sliding-window / global layers), and sliding windows in any supported family.

The converted attention reads every such detail from the config (`elitekv_peft.modeling.variants`); here:

* `check_family` checks, before anything is converted, that what the converted attention will read from the config
  is what the original attention modules do (their ``scaling``, a causal mask, rotary tables that
  `variants.full_rotary` can widen), and refuses what a method cannot convert, naming why and what to use instead;
* `standard_projections` gives the original attention modules the ``q_proj`` / ``k_proj`` / ``v_proj`` every method
  reads, for the duration of a conversion: Phi-3's fused ``qkv_proj`` split, and the query / key rows of a partial
  rotary model put in the standard layout (`variants.standard_head_order`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import nn

from .modeling.attention_elitekv import rope_attention_factor
from .modeling.variants import attention_scaling, head_dim_of, standard_head_order
from .quantization import dense_dtype, dense_weight, is_quantized

FAMILY_ATTENTION = {"Phi3Attention", "GraniteAttention", "Gemma2Attention", "Gemma3Attention"}
FAMILY_MODEL_TYPES = ("phi3", "granite", "gemma2", "gemma3_text")


def rotary_dim(model: nn.Module) -> int:
    """``R``: the head dims the model's rotary module rotates (``D * partial_rotary_factor``), from its frequencies."""
    inv_freq = getattr(model.model.rotary_emb, "inv_freq", None)
    if inv_freq is None:
        return head_dim_of(model.config)
    return 2 * inv_freq.numel()


def check_family(model: nn.Module, method: str | None) -> None:
    """Raise a `TypeError` naming why and what to do when the converted attention would not compute what the
    original one does, or when ``method`` cannot convert this model."""
    config = model.config
    layers = model.model.layers
    scale = attention_scaling(config)
    for idx, layer in enumerate(layers):
        original = getattr(layer.self_attn, "scaling", scale)
        if not math.isclose(float(original), scale, rel_tol=1e-6):
            raise TypeError(
                f"Layer {idx}'s attention scales its scores by {float(original)}, but the config gives {scale} (the "
                "scale the converted attention reads: attention_multiplier, query_pre_attn_scalar ** -0.5 or "
                "head_dim ** -0.5). Load the model with its own config unchanged."
            )
    if getattr(config, "use_bidirectional_attention", False):
        raise TypeError(
            "This model attends bidirectionally (use_bidirectional_attention=True, an embedding model); EliteKV "
            "caches causal attention only. Convert a causal LM (use_bidirectional_attention=False)."
        )
    if any(kind not in ("full_attention", "sliding_attention") for kind in getattr(config, "layer_types", None) or ()):
        raise TypeError(
            f"layer_types {sorted(set(config.layer_types))}: EliteKV converts full and sliding-window attention "
            "layers only. Convert a model whose layers are all 'full_attention' or 'sliding_attention'."
        )
    R, D = rotary_dim(model), head_dim_of(config)
    if R % 2 or R > D:
        raise TypeError(f"The rotary module rotates {R} of {D} head dims; EliteKV needs an even count <= head_dim.")
    if R < D and method == "elitekv" and rope_attention_factor(config) != 1.0:
        raise TypeError(
            f"method='elitekv' cannot convert this model: it rotates only {R} of {D} head dims "
            "(partial_rotary_factor) and its rope_type scales the rotated dims by an attention factor, which the "
            "dims it never rotates do not carry, while EliteKV's unrotated dims are one group with one scale. Use "
            "method='kv_latent', 'lorc' or 'gqa' for this model, or a rope_type without an attention factor."
        )


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """A frozen `nn.Linear` holding ``weight`` ``[out, in]`` (and ``bias``) as they are (dtype, device)."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias, requires_grad=False)
    return linear


def _rows(linear: nn.Module, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A projection's weight (dequantized into the model's dtype if quantized) and bias, detached."""
    weight = linear.weight.detach()
    if is_quantized(linear):
        weight = dense_weight(linear).to(dense_dtype(linear, model))
    bias = None if linear.bias is None else linear.bias.detach()
    return weight, bias


def _split(attn: nn.Module, model: nn.Module, order: torch.Tensor | None) -> dict[str, nn.Linear]:
    """``q_proj`` / ``k_proj`` / ``v_proj`` of one attention module in the standard layout (``order`` permutes the
    query and key dims of every head; None keeps them)."""
    config = model.config
    H, G, D = config.num_attention_heads, config.num_key_value_heads, head_dim_of(config)
    if hasattr(attn, "qkv_proj"):  # Phi-3: rows [queries H*D | keys G*D | values G*D]
        weight, bias = _rows(attn.qkv_proj, model)
        bounds = {"q_proj": (0, H * D), "k_proj": (H * D, (H + G) * D), "v_proj": ((H + G) * D, (H + 2 * G) * D)}
        parts = {name: (weight[a:b], None if bias is None else bias[a:b]) for name, (a, b) in bounds.items()}
    else:
        parts = {name: _rows(getattr(attn, name), model) for name in ("q_proj", "k_proj", "v_proj")}
    if order is not None:
        for name, heads in (("q_proj", H), ("k_proj", G)):
            rows = torch.cat([h * D + order for h in range(heads)]).to(parts[name][0].device)
            weight, bias = parts[name]
            parts[name] = (weight[rows], None if bias is None else bias[rows])
    return {name: _linear(weight, bias) for name, (weight, bias) in parts.items()}


@contextlib.contextmanager
def standard_projections(model: nn.Module) -> Iterator[None]:
    """While converting ``model``: Phi-3's attention modules get ``q_proj`` / ``k_proj`` / ``v_proj`` split from
    ``qkv_proj``, and a partial rotary model's query and key rows are read in the standard layout
    (`variants.standard_head_order`). Every other model is left untouched. The added projections are removed on exit
    (from the original modules, which a successful conversion has replaced)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None or getattr(model.model, "rotary_emb", None) is None:
        yield
        return
    D = head_dim_of(model.config)
    R = rotary_dim(model)
    order = standard_head_order(R, D) if R < D else None
    fused = any(hasattr(layer.self_attn, "qkv_proj") for layer in layers)
    if order is None and not fused:
        yield
        return
    saved = []
    for layer in layers:
        attn = layer.self_attn
        if not hasattr(attn, "qkv_proj") and not hasattr(attn, "q_proj"):
            continue  # not an attention this module knows; check_supported names it
        originals = {name: attn._modules.get(name) for name in ("q_proj", "k_proj", "v_proj")}
        for name, linear in _split(attn, model, order).items():
            setattr(attn, name, linear)
        saved.append((attn, originals))
    try:
        yield
    finally:
        for attn, originals in saved:
            for name, linear in originals.items():
                if linear is None:
                    delattr(attn, name)
                else:
                    setattr(attn, name, linear)
