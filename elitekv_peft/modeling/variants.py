"""What the attention of each supported family does beyond Llama's, read from the model config.

Every converted attention (`attention_base.ConvertedAttention`) takes these from its config, so a saved model
rebuilds them without the package:

* the softmax scale (`attention_scaling`): Granite's ``attention_multiplier``, Gemma 2's
  ``query_pre_attn_scalar ** -0.5``, else ``head_dim ** -0.5``;
* the logit soft-capping (`logit_softcap`): Gemma 2's ``attn_logit_softcapping`` (``cap * tanh(scores / cap)``);
* the RoPE parameters of a layer (`layer_rope_parameters`): Gemma 3 gives them per layer type (its local layers
  rotate with ``rope_local_base_freq``, through tables its rotary module computes per layer type);
* the sliding window of a layer (`layer_window`): Mistral's ``sliding_window`` on every layer, or the layers that
  ``layer_types`` marks ``"sliding_attention"`` (Gemma 2's local layers, Qwen2 with ``use_sliding_window``);
* partial rotary embeddings (Phi-3.5, Phi-4-mini: ``partial_rotary_factor < 1``): the model's rotary tables cover
  only the first ``R < D`` dims of a head. The conversion stores every head in the *standard layout* instead (the
  ``R/2`` rotary chunks first, then the ``(D - R)/2`` unrotated pairs as chunks of frequency zero, pairs ``(i,
  i + D/2)`` as in Llama; `standard_head_order`), and `full_rotary` widens the tables to ``D`` with ``cos = 1``,
  ``sin = 0`` on those chunks. Rotating a zero-frequency chunk changes nothing, so every method sees a Llama-shaped
  head and its scores are the original ones.

This file imports only torch: it is copied next to saved models (``auto_map``).
"""

from __future__ import annotations

from typing import Any

import torch


def head_dim_of(config: Any) -> int:
    """``D`` of the original model."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def attention_scaling(config: Any) -> float:
    """The softmax scale of the family's attention: Granite's ``attention_multiplier``, Gemma 2's
    ``query_pre_attn_scalar ** -0.5``, else ``head_dim ** -0.5``."""
    multiplier = getattr(config, "attention_multiplier", None)
    if multiplier is not None:
        return float(multiplier)
    scalar = getattr(config, "query_pre_attn_scalar", None)
    if scalar is not None:
        return float(scalar) ** -0.5
    return head_dim_of(config) ** -0.5


def logit_softcap(config: Any) -> float | None:
    """Gemma 2's attention logit soft-capping ``cap`` (scores become ``cap * tanh(scores / cap)``), or None."""
    cap = getattr(config, "attn_logit_softcapping", None)
    return None if cap is None else float(cap)


def layer_window(config: Any, layer_idx: int) -> int | None:
    """The sliding window of layer ``layer_idx`` (keys within the last ``window`` positions), or None for full
    attention: ``config.sliding_window`` on the layers ``config.layer_types`` marks ``"sliding_attention"``, on
    every layer when the config has no ``layer_types`` (Mistral, Phi-3)."""
    window = getattr(config, "sliding_window", None)
    if window is None:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is None:
        return int(window)
    return int(window) if layer_types[layer_idx] == "sliding_attention" else None


def layer_rope_type(config: Any, layer_idx: int) -> str | None:
    """The key of ``config.rope_parameters`` that layer ``layer_idx`` uses when the config gives RoPE parameters per
    layer type (Gemma 3: ``{"sliding_attention": {...}, "full_attention": {...}}``, local layers with their own
    ``rope_theta``), else None (one set of parameters for every layer)."""
    params = getattr(config, "rope_parameters", None)
    layer_types = getattr(config, "layer_types", None)
    if not isinstance(params, dict) or layer_types is None or "rope_type" in params:
        return None
    kind = layer_types[layer_idx]
    return kind if isinstance(params.get(kind), dict) else None


def layer_rope_parameters(config: Any, layer_idx: int) -> dict[str, Any]:
    """The RoPE parameters of layer ``layer_idx`` (its layer type's for Gemma 3, `layer_rope_type`), or ``{}``."""
    params = getattr(config, "rope_parameters", None)
    if not isinstance(params, dict):
        return {}
    kind = layer_rope_type(config, layer_idx)
    return dict(params[kind]) if kind is not None else params


def standard_head_order(rotary_dim: int, head_dim: int) -> torch.Tensor:
    """Order of one head's dims in the standard layout, for a model that rotates only its first ``R`` dims.

    The original head pairs dims ``(c, c + R/2)`` for the rotary chunks ``c < R/2`` and leaves dims ``R..D-1``
    unrotated. In the standard layout chunk ``j`` pairs dims ``(j, j + D/2)``: chunks ``j < R/2`` are the rotary
    ones, the others pair the unrotated dims ``R + (j - R/2)`` and ``R + (D - R)/2 + (j - R/2)``.

    Returns a LongTensor ``[D]``: standard dim ``j`` takes original dim ``order[j]`` (identity when ``R = D``).
    """
    half_r, extra = rotary_dim // 2, (head_dim - rotary_dim) // 2
    first = list(range(half_r)) + [rotary_dim + i for i in range(extra)]
    second = [half_r + i for i in range(half_r)] + [rotary_dim + extra + i for i in range(extra)]
    return torch.tensor(first + second, dtype=torch.long)


def full_rotary(
    position_embeddings: tuple[torch.Tensor, torch.Tensor], head_dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary tables ``[B, T, R]`` widened to ``[B, T, D]`` for the standard layout (`standard_head_order`):
    ``cos = 1``, ``sin = 0`` on the ``(D - R)/2`` unrotated chunks. Tables already ``D`` wide come back as they are."""
    cos, sin = position_embeddings
    rotary_dim = cos.shape[-1]
    if rotary_dim >= head_dim:
        return cos, sin
    pad = (head_dim - rotary_dim) // 2
    half = rotary_dim // 2
    cos_half = torch.cat((cos[..., :half], cos.new_ones(*cos.shape[:-1], pad)), dim=-1)
    sin_half = torch.cat((sin[..., :half], sin.new_zeros(*sin.shape[:-1], pad)), dim=-1)
    return torch.cat((cos_half, cos_half), dim=-1), torch.cat((sin_half, sin_half), dim=-1)
