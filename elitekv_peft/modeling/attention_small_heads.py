"""Attention with smaller key/value heads: the module of the ``kv_latent`` and ``gqa`` methods.

Shapes (per layer): hidden ``d``, query heads ``H``, key/value heads ``g`` (``G`` in the original model, fewer after
GQA pooling), original head dim ``D``, key head dim ``d_k = 2k`` (``k`` rotary chunks kept, each with its original
frequency), value head dim ``d_v``.

Parameters:

* ``q_proj``  ``[H*d_k, d]``   queries: per head, the rows of the kept chunks (first halves, then second halves)
* ``k_proj``  ``[g*d_k, d]``   keys, same rows
* ``v_proj``  ``[g*d_v, d]``   values
* ``o_proj``  ``[d, H*d_v]``   output

The cache holds keys ``[B, g, S, d_k]`` and values ``[B, g, S, d_v]`` in an ordinary `DynamicLayer`: ``g * (d_k +
d_v)`` values per token against the original ``2 * G * D``. Scores keep the original scale (``scaling``), so with the
weights copied from the original model a score is the original one restricted to the kept chunks (partial RoPE).

``kv_latent``: ``g = G``, ``k`` chunks spread over the frequency range, ``d_v < D`` (values factored per head).
``gqa``: ``g < G`` pooled heads, every chunk kept (``d_k = d_v = D``).

This file imports only torch and transformers: it is copied next to saved models (``auto_map``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.cache_utils import Cache

from .attention_base import ConvertedAttention, attend, rotate_half


def chunk_rows(chunks: list[int] | tuple[int, ...], head_dim: int) -> list[int]:
    """Rows of one head (offsets in ``[0, D)``) holding the given rotary chunks: first halves, then second halves."""
    half = head_dim // 2
    return [int(c) for c in chunks] + [int(c) + half for c in chunks]


class SmallHeadAttention(ConvertedAttention):
    """Drop-in replacement of Llama/Mistral/Qwen2 attention with ``g`` key/value heads of dims ``d_k`` / ``d_v``."""

    def __init__(self, config: Any, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        ek = config.elitekv
        d, H = config.hidden_size, config.num_attention_heads
        chunks = [int(c) for c in ek["key_chunks"][layer_idx]]
        self.num_kv_heads = int(ek["kv_heads"])
        self.key_dim = 2 * len(chunks)
        self.value_dim = int(ek["value_dims"][layer_idx])
        self.num_key_value_groups = H // self.num_kv_heads
        qkv_bias = bool(ek.get("qkv_bias", False))
        self.q_proj = nn.Linear(d, H * self.key_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(d, self.num_kv_heads * self.key_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(d, self.num_kv_heads * self.value_dim, bias=bool(ek.get("v_bias", qkv_bias)))
        self.o_proj = nn.Linear(H * self.value_dim, d, bias=bool(ek.get("o_bias", False)))
        # [k] kept chunks; persistent so that loading (which may build the model on the meta device) restores it
        self.register_buffer("key_chunks", torch.tensor(chunks, dtype=torch.long))

    def rotary(self, position_embeddings: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The kept chunks' ``(cos, sin)`` from the model's ``[B, T, D]`` tables: ``[B, 1, T, d_k]`` each."""
        cos, sin = position_embeddings
        index = self.key_chunks.to(cos.device)
        half = self.head_dim // 2
        cos = cos[..., :half][..., index]
        sin = sin[..., :half][..., index]
        return torch.cat((cos, cos), dim=-1).unsqueeze(1), torch.cat((sin, sin), dim=-1).unsqueeze(1)

    def attend_cached(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: Cache | None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """hidden_states ``[B, T, d]`` -> (output ``[B, T, d]``, attention weights or None); the cache holds keys
        ``[B, g, S, d_k]`` and values ``[B, g, S, d_v]``."""
        B, T, _ = hidden_states.shape
        query, key = self.queries(hidden_states), self.keys(hidden_states)
        value = self.v_proj(hidden_states).view(B, T, self.num_kv_heads, self.value_dim).transpose(1, 2)
        cos, sin = self.rotary(position_embeddings)
        cos, sin = cos.to(query.dtype), sin.to(query.dtype)
        query = query * cos + rotate_half(query) * sin
        key = key * cos + rotate_half(key) * sin
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)
        output, weights = attend(self, query, key, value, attention_mask, **kwargs)
        return self.o_proj(output), weights

    def queries(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The queries before RoPE: ``hidden_states [B, T, d]`` -> ``[B, H, T, d_k]``."""
        B, T, _ = hidden_states.shape
        return self.q_proj(hidden_states).view(B, T, self.num_heads, self.key_dim).transpose(1, 2)

    def keys(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The keys before RoPE: ``hidden_states [B, T, d]`` -> ``[B, g, T, d_k]``."""
        B, T, _ = hidden_states.shape
        return self.k_proj(hidden_states).view(B, T, self.num_kv_heads, self.key_dim).transpose(1, 2)
