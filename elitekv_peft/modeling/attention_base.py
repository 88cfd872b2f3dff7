"""What the converted attention of every method shares (`ConvertedAttention`) and the plain functions it uses.

Modules built on `ConvertedAttention`: `attention_elitekv.EliteKVAttention`, `attention_small_heads.SmallHeadAttention`
(``kv_latent``, ``gqa``) and `attention_lowrank.LowRankKVAttention` (``lorc``). The base holds the layer's settings
(``config``, ``layer_idx``, ``head_dim`` ``D`` of the original model, the family's ``scaling``, ``softcap`` and
``sliding_window`` from `variants`, dropout) and the forward
prologue: it checks the rotary tables and takes the cache from the keyword arguments under whichever name the
installed transformers used (`take_cache`), then hands over to the method's `ConvertedAttention.attend_cached`.

This file imports only torch and transformers: it is copied next to saved models (``auto_map``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import transformers
from torch import nn
from transformers.cache_utils import Cache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .variants import attention_scaling, full_rotary, layer_window, logit_softcap

try:  # transformers 5.x collects `output_attentions` with forward hooks (`record_attention_weights`)
    from transformers.utils import output_capturing as OUTPUT_CAPTURING
except ImportError:
    OUTPUT_CAPTURING = None

CACHE_ARGUMENT_NAMES = ("cache", "past_key_values", "past_key_value")
"""Names under which transformers has handed the cache to attention modules (``cache`` since 5.24)."""


def take_cache(kwargs: dict[str, Any], layer_idx: int) -> Cache | None:
    """Pop the cache from an attention call's keyword arguments, under whichever name the installed transformers used.

    Every name in `CACHE_ARGUMENT_NAMES` is removed from ``kwargs`` (so none reaches the attention function). When the
    call asks to cache (``use_cache=True``) and no `Cache` came under any name, decoding would silently run without
    context: that raises instead, naming the installed transformers version.
    """
    found = [kwargs.pop(name) for name in CACHE_ARGUMENT_NAMES if name in kwargs]
    cache = next((value for value in found if value is not None), None)
    if cache is None and kwargs.get("use_cache"):
        raise RuntimeError(
            f"EliteKV attention (layer {layer_idx}) was asked to cache (use_cache=True) but received no cache under "
            f"any of the names {', '.join(CACHE_ARGUMENT_NAMES)} from transformers {transformers.__version__}. This "
            "transformers version passes the cache in a way this elitekv-peft does not know, and decoding would run "
            "without context. Install a transformers version that pyproject.toml of elitekv-peft allows, or upgrade "
            "elitekv-peft."
        )
    return cache


def original_head_dim(config: Any) -> int:
    """``D`` of the original model."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """HF's ``rotate_half`` on the last dim: ``[x1, x2] -> [-x2, x1]``."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)  # two slices: fewer operators than chunk's


def eager_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    softcap: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain attention: query ``[B, H, T, D]``, key/value ``[B, G, S, D]`` -> output ``[B, T, H, D]``; scores
    soft-capped to ``softcap * tanh(scores / softcap)`` when ``softcap`` is given (Gemma 2)."""
    n_rep = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(n_rep, dim=1)
    value = value.repeat_interleave(n_rep, dim=1)
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if softcap is not None:
        weights = torch.tanh(weights / softcap) * softcap
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = nn.functional.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    output = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return output, weights


def record_attention_weights(module: nn.Module) -> None:
    """transformers collects ``output_attentions`` with forward hooks it installs on its own attention classes only
    (their ``_can_record_outputs``); give a converted attention module the same hook (weights: its second output)."""
    install = getattr(OUTPUT_CAPTURING, "install_output_capuring_hook", None)  # transformers' spelling
    if install is not None:
        install(module, "attentions", 1)


def attention_weights_requested() -> bool:
    """Whether the running forward collects attention weights (``output_attentions=True``)."""
    collector = getattr(OUTPUT_CAPTURING, "_active_collector", None)
    collected = collector.get() if collector is not None else None
    return collected is not None and "attentions" in collected


def context_length(cache: Cache | None, layer_idx: int, new_tokens: int) -> int | None:
    """Tokens attended after this call: cached (every token seen, also by a sliding-window layer that keeps only its
    window) plus ``new_tokens``. None where reading it would synchronise with the device (a pre-allocated cache on an
    accelerator) or break a compiled graph."""
    if cache is None:
        return new_tokens
    if torch.compiler.is_compiling():
        return None
    seen = cache.get_seq_length(layer_idx)
    if isinstance(seen, torch.Tensor):
        if seen.device.type != "cpu":
            return None
        seen = int(seen)
    return seen + new_tokens


def check_context_length(config: Any, length: int | None) -> None:
    """Raise if the attended context (``length`` cached + new tokens) exceeds ``config.max_position_embeddings``."""
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and length is not None and length > limit:
        raise ValueError(
            f"The context holds {length} tokens, more than max_position_embeddings={limit} that this model's RoPE was "
            "trained for. Shorten the prompt or `max_new_tokens`, or crop the cache; to run longer contexts "
            "deliberately, raise `model.config.max_position_embeddings` (with a RoPE scaling the model supports)."
        )


def attend(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention through the model's implementation (eager, SDPA, flash...) as transformers' modeling files call it.

    Args:
        module: the attention module (``config``, ``scaling``, ``attention_dropout``, ``training``).
        query: ``[B, H, T, Dk]``; key: ``[B, G, S, Dk]``; value: ``[B, G, S, Dv]``.
    Returns:
        ``(output [B, T, H*Dv], attention weights or None)``.
    """
    attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
        module.config._attn_implementation, eager_attention
    )
    if module.softcap is not None:  # only passed when set: sdpa refuses any softcap, as for the original model
        kwargs["softcap"] = module.softcap
    output, weights = attention_interface(
        module,
        query,
        key,
        value,
        attention_mask,
        dropout=0.0 if not module.training else module.attention_dropout,
        scaling=module.scaling,
        sliding_window=module.sliding_window,
        **kwargs,
    )
    return output.reshape(*output.shape[:2], -1).contiguous(), weights


class ConvertedAttention(nn.Module):
    """Base of the attention modules of every method: the layer's settings and the forward prologue."""

    def __init__(self, config: Any, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = original_head_dim(config)
        self.scaling = attention_scaling(config)  # the family's scale (`variants`), not always head_dim**-0.5
        self.softcap = logit_softcap(config)
        self.sliding_window = layer_window(config, layer_idx)
        self.attention_dropout = float(getattr(config, "attention_dropout", 0.0) or 0.0)
        self.is_causal = True
        record_attention_weights(self)  # `output_attentions=True` sees this module as it sees the original's

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """hidden_states ``[B, T, d]`` -> (output ``[B, T, d]``, attention weights or None).

        The cache comes in ``kwargs`` under the name the installed transformers uses (`take_cache`).
        """
        if position_embeddings is None:
            raise ValueError(f"{type(self).__name__} needs the model's rotary `position_embeddings` (cos, sin).")
        cache = take_cache(kwargs, self.layer_idx)
        kwargs.pop("sliding_window", None)  # the layer's own window is passed to the attention function
        position_embeddings = full_rotary(position_embeddings, self.head_dim)  # partial rotary: `variants`
        if self.layer_idx == 0:  # every method's RoPE holds only up to max_position_embeddings
            check_context_length(self.config, context_length(cache, 0, hidden_states.shape[1]))
        return self.attend_cached(hidden_states, position_embeddings, attention_mask, cache, **kwargs)

    def attend_cached(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: Cache | None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The method's attention of ``hidden_states`` ``[B, T, d]`` with ``cache`` (None: no caching)."""
        raise NotImplementedError
