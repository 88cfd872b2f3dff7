"""Attention with low-rank keys and values: the module of the ``lorc`` method.

Shapes (per layer): hidden ``d``, query heads ``H``, key/value heads ``G``, head dim ``D``, key rank ``r_k`` and
value rank ``r_v`` (per layer: LoRC's progressive schedule gives each layer its own).

Parameters:

* ``q_proj``       ``[H*D, d]``    unchanged
* ``k_down_proj``  ``[r_k, d]``    key latent ``c_k = x W_kd^T`` (cached, *before* RoPE)
* ``k_up_proj``    ``[G*D, r_k]``  keys from the latent (with the original key bias)
* ``v_down_proj``  ``[r_v, d]``    value latent ``c_v`` (cached)
* ``v_up_proj``    ``[G*D, r_v]``  values from the latent (with the original value bias)
* ``o_proj``       ``[d, H*D]``    unchanged

The cache holds ``c_k`` ``[B, 1, S, r_k]`` and ``c_v`` ``[B, 1, S, r_v]`` in an ordinary `DynamicLayer` (or a
pre-allocated `StaticLayer`): ``r_k + r_v`` values per token. RoPE cannot be folded into a low-rank key (it depends on
the position), so every step rebuilds the keys from the cached latents and rotates them (as LoRC does for RoPE
models). With a cache, keys are rotated at their *cache slot* (positions ``0..S-1``) and queries at their tokens'
slots (`query_rotary`), with the model's own rotary module; scores depend only on position differences, so this
equals the model's positions when they are ``0..S-1`` and also under left padding (every token of a row is shifted
alike). Without a cache (training, scoring) the model's positions are used.

This file imports only torch and transformers: it is copied next to saved models (``auto_map``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.cache_utils import Cache

from .attention_base import ConvertedAttention, attend, rotate_half
from .variants import full_rotary, layer_rope_type


def query_rotary(
    key_cos: torch.Tensor, key_sin: torch.Tensor, filled: int | torch.Tensor, length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``(cos, sin)`` ``[B, T, D]`` of the ``T = length`` new queries, taken from the tables of the ``S`` slots the
    cache returned (``key_cos``/``key_sin`` ``[B, S, D]``, slot ``i`` rotated as position ``i``).

    The new tokens sit in the last ``T`` filled slots. ``filled`` is the layer's ``get_seq_length()`` after the update:
    a dynamic layer returns exactly its filled slots (``filled >= S``: the last ``T`` slots), a pre-allocated
    `StaticLayer` returns all ``max_cache_len`` slots, of which the first ``filled`` (a 0-dim tensor, read without
    synchronising) hold tokens. Taking the last ``T`` of all ``S`` slots there would rotate the queries at the end of
    the buffer instead of at their tokens.
    """
    S = key_cos.shape[1]
    if not isinstance(filled, torch.Tensor):
        start = min(int(filled), S) - length
        return key_cos[:, start : start + length], key_sin[:, start : start + length]
    positions = torch.arange(length, device=key_cos.device) + (filled.to(key_cos.device).clamp(max=S) - length)
    return key_cos.index_select(1, positions), key_sin.index_select(1, positions)


class LowRankKVAttention(ConvertedAttention):
    """Drop-in replacement of Llama/Mistral/Qwen2 attention that caches low-rank key and value latents."""

    def __init__(self, config: Any, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        ek = config.elitekv
        d, H, G, D = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, self.head_dim
        self.num_kv_heads = G
        self.key_rank = int(ek["key_ranks"][layer_idx])
        self.value_rank = int(ek["value_ranks"][layer_idx])
        self.num_key_value_groups = H // G
        qkv_bias = bool(ek.get("qkv_bias", False))
        self.q_proj = nn.Linear(d, H * D, bias=qkv_bias)
        self.k_down_proj = nn.Linear(d, self.key_rank, bias=False)
        self.k_up_proj = nn.Linear(self.key_rank, G * D, bias=qkv_bias)
        self.v_down_proj = nn.Linear(d, self.value_rank, bias=False)
        self.v_up_proj = nn.Linear(self.value_rank, G * D, bias=qkv_bias)
        self.o_proj = nn.Linear(H * D, d, bias=bool(ek.get("o_bias", False)))
        self._decoder: list[nn.Module] = []  # the decoder whose `rotary_emb` rotates cached keys (not a submodule)

    def bind_decoder(self, decoder: nn.Module) -> None:
        """Remember the decoder (``*Model``) whose ``rotary_emb`` gives ``(cos, sin)`` at any position."""
        self._decoder = [decoder]

    def cache_rotary(
        self, hidden_states: torch.Tensor, length: int, step: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)`` ``[B, length, D]`` for positions ``0..length-1``, from the model's rotary module.

        ``step`` is the ``cos`` of the forward call's ``position_embeddings``, one tensor object shared by every layer
        of that call (of one layer type for Gemma 3, whose local and global layers rotate with different tables, kept
        apart: `variants.layer_rope_type`): the first layer of each cached length (sliding-window and full layers
        differ) computes the tables and the others reuse them (kept on the decoder, with a reference to ``step``,
        until the next call).
        Tables of partial rotary models are widened to ``D`` (`variants.full_rotary`).
        """
        if not self._decoder:
            raise RuntimeError("LowRankKVAttention is not bound to a decoder; build it through install_attention.")
        decoder = self._decoder[0]
        if getattr(decoder, "_lorc_cache_rotary", None) is None:
            decoder._lorc_cache_rotary = {}
        kind = layer_rope_type(self.config, self.layer_idx)  # Gemma 3: each layer type has its own tables
        kept = decoder._lorc_cache_rotary.get(kind)
        if kept is None or kept[0] is not step:
            kept = decoder._lorc_cache_rotary[kind] = (step, {})
        if length not in kept[1]:
            B = hidden_states.shape[0]
            positions = torch.arange(length, device=hidden_states.device).unsqueeze(0).expand(B, -1)
            extra = () if kind is None else (kind,)  # Gemma 3's rotary module takes the layer type
            kept[1][length] = full_rotary(decoder.rotary_emb(hidden_states, positions, *extra), self.head_dim)
        return kept[1][length]

    def attend_cached(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: Cache | None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """hidden_states ``[B, T, d]`` -> (output ``[B, T, d]``, attention weights or None); the cache holds the key
        and value latents ``[B, 1, S, r_k]`` and ``[B, 1, S, r_v]``."""
        B, T, _ = hidden_states.shape
        query = self.queries(hidden_states)
        key_latent = self.k_down_proj(hidden_states).unsqueeze(1)  # [B, 1, T, r_k]
        value_latent = self.v_down_proj(hidden_states).unsqueeze(1)  # [B, 1, T, r_v]
        if cache is not None:
            key_latent, value_latent = cache.update(key_latent, value_latent, self.layer_idx)
            S = key_latent.shape[2]
            key_cos, key_sin = self.cache_rotary(hidden_states, S, position_embeddings[0])
            query_cos, query_sin = query_rotary(key_cos, key_sin, cache.layers[self.layer_idx].get_seq_length(), T)
        else:
            S = T
            key_cos, key_sin = query_cos, query_sin = position_embeddings
        key = self.keys(key_latent[:, 0])
        value = self.v_up_proj(value_latent[:, 0]).view(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)
        query = self.rotate(query, query_cos, query_sin)
        key = self.rotate(key, key_cos, key_sin)
        output, weights = attend(self, query, key, value, attention_mask, **kwargs)
        return self.o_proj(output), weights

    def queries(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The queries before RoPE: ``hidden_states [B, T, d]`` -> ``[B, H, T, D]``."""
        B, T, _ = hidden_states.shape
        return self.q_proj(hidden_states).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)

    def keys(self, key_latent: torch.Tensor) -> torch.Tensor:
        """The keys rebuilt from their latent, before RoPE: ``key_latent [B, S, r_k]`` -> ``[B, G, S, D]``."""
        B, S, _ = key_latent.shape
        return self.k_up_proj(key_latent).view(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)

    @staticmethod
    def rotate(states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """RoPE on ``states [B, heads, S, D]`` with ``cos``/``sin`` ``[B, S, D]``."""
        cos = cos.unsqueeze(1).to(states.dtype)
        sin = sin.unsqueeze(1).to(states.dtype)
        return states * cos + rotate_half(states) * sin
