"""Attention of every method for families that normalise queries and keys before RoPE (Qwen3, OLMo2, Gemma 3).

Qwen3 and Gemma 3 apply an RMSNorm to each query head and each key head over its ``D`` dims (``q_norm`` / ``k_norm``,
group ``"head"``); OLMo2 normalises the whole query projection ``[H*D]`` and the whole key projection ``[G*D]`` at once
(group ``"all"``). With ``s = rsqrt(mean(k^2) + eps)`` over a group, the key the model attends with is
``RoPE(w * s * k)``, ``k = x W_k`` the pre-norm key and ``w`` the norm's weight.

Queries are not cached: every variant applies ``q_norm`` as it is. Keys, per method:

* ``elitekv`` (`NormedEliteKVAttention`): the rotated chunks are cached *after* the norm (``RoPE(w s k)`` on the
  chosen chunks, exact). The NoPE dims come from the latent, which factors the pre-norm keys with ``w`` folded into
  ``k_up_proj``; the scale ``s`` (one value per token and key/value head for ``"head"``, one per token for
  ``"all"``) is computed from the full pre-norm key when the token is written (``k_nope_proj`` holds the NoPE rows
  of ``W_k`` for that) and cached as extra columns after the latent: the latent cache is ``[B, 1, S, d_c + n_s]``.
  Read: NoPE keys ``= s * k_up_proj(c)``. With every chunk rotated nothing is cached for ``s`` (``n_s = 0``). The
  absorbed decode path does not apply ``s``, so these layers always rebuild keys (``reconstruct``).
* ``lorc`` (`NormedLowRankKVAttention`): it rebuilds every key dim from its latent at each step, so the rebuilt
  pre-norm key is normalised as the original does (``k_norm`` on ``k_up_proj(c_k)``), nothing extra is cached.
  Exact at full rank. Below it, this was measured better than caching the exact scale as EliteKV does
  (benchmarks/results/key_norm_error.md, ``whole_key`` layout, ``read_norm`` vs ``cached_scale``).
* ``kv_latent`` and ``gqa`` (`NormedSmallHeadAttention`): they cache key dims, not a latent, so the full
  projections are kept, both norms applied as the original does, and the kept chunks selected (``kv_latent``) or
  the normalised key heads mean-pooled (``gqa``) before RoPE. Nothing extra is cached.

A family is recognised by its ``model_type`` (`KEY_NORM_FAMILIES`; ``elitekv_<type>`` for saved models). The
modules hold the norms' *effective* weights (``1 + weight`` for Gemma-style norms is folded at conversion), so they
need nothing family-specific. This file imports only torch, transformers and its sibling files (``auto_map``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .attention_base import rotate_half
from .attention_elitekv import EliteKVAttention, rotate_query_chunks
from .attention_lowrank import LowRankKVAttention
from .attention_small_heads import SmallHeadAttention

KEY_NORM_FAMILIES: dict[str, str] = {"qwen3": "head", "olmo2": "all", "gemma3_text": "head"}
"""Base ``model_type`` -> over what its ``q_norm`` / ``k_norm`` normalise: each head (``"head"``) or the whole
projection (``"all"``)."""


def key_norm_group(config_or_type: Any) -> str | None:
    """``"head"``, ``"all"`` or None (no q/k norms) for a config or a ``model_type`` (``elitekv_`` prefix allowed)."""
    model_type = config_or_type if isinstance(config_or_type, str) else getattr(config_or_type, "model_type", "")
    return KEY_NORM_FAMILIES.get(str(model_type).removeprefix("elitekv_"))


def scale_count(group: str | None, num_kv_heads: int) -> int:
    """``n_s``: scale values cached per token: one per key/value head (``"head"``), one (``"all"``), or none."""
    if group is None:
        return 0
    return num_kv_heads if group == "head" else 1


def elitekv_scale_count(model_type: str, num_kv_heads: int, head_dim: int, rope_chunks: int) -> int:
    """``n_s`` of an EliteKV layer: none when every chunk is rotated (the cached keys are already normalised)."""
    return 0 if 2 * rope_chunks >= head_dim else scale_count(key_norm_group(model_type), num_kv_heads)


def rms_scale(states: torch.Tensor, group: str, eps: float) -> torch.Tensor:
    """``s = rsqrt(mean(x^2) + eps)`` in float32: states ``[..., heads, D]`` -> ``[..., heads]`` (``"head"``) or
    ``[..., 1]`` (``"all"``: over every head's dims together)."""
    squares = states.float().pow(2)
    if group == "all":
        return torch.rsqrt(squares.flatten(-2).mean(-1, keepdim=True) + eps)
    return torch.rsqrt(squares.mean(-1) + eps)


def normalise(states: torch.Tensor, weight: torch.Tensor, group: str, eps: float) -> torch.Tensor:
    """RMSNorm of ``states [..., heads, D]`` per head or over all heads, times ``weight [heads, D]`` (any dtype)."""
    scale = rms_scale(states, group, eps).unsqueeze(-1)
    return ((states.float() * scale).to(states.dtype) * weight.view(states.shape[-2:])).to(states.dtype)


class NormedEliteKVAttention(EliteKVAttention):
    """EliteKV attention with ``q_norm`` and a cached per-token key scale (see the module docstring).

    Extra parameters: ``q_norm_weight [H*D]`` and ``k_rope_norm_weight [G*2r]`` (permuted layout), ``k_nope_proj``
    ``[G*(D-2r), d]`` (the pre-norm NoPE key rows, used only for ``s``; absent when ``2r = D``).
    """

    def __init__(self, config: Any, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        spec = self.spec
        self.norm_group = key_norm_group(config)
        self.norm_eps = float(config.rms_norm_eps)
        self.scale_values = elitekv_scale_count(config.model_type, spec.num_kv_heads, spec.head_dim, spec.rope_chunks)
        d, H, G, D = spec.hidden_size, spec.num_heads, spec.num_kv_heads, spec.head_dim
        self.q_norm_weight = nn.Parameter(torch.ones(H * D))
        self.k_rope_norm_weight = nn.Parameter(torch.ones(G * spec.rope_dim))
        self.k_nope_proj = nn.Linear(d, G * spec.nope_dim, bias=spec.qkv_bias) if spec.nope_dim else None

    def use_absorbed(self, query_length: int) -> bool:
        """The absorbed path does not apply the cached key scale: layers that cache one always reconstruct."""
        return self.scale_values == 0 and super().use_absorbed(query_length)

    def project(
        self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Hidden ``[B, T, d]`` -> queries ``[B, H, T, D]``, normalised rotated chunks ``[B, G, T, 2r]`` and the
        latent with the key scales after it ``[B, 1, T, d_c + n_s]``."""
        B, T, _ = hidden_states.shape
        spec, group = self.spec, self.norm_group
        H, G, D, R = spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.rope_dim
        query = self.q_proj(hidden_states).view(B, T, H, D)
        query = normalise(query, self.q_norm_weight.view(H, D), group, self.norm_eps).transpose(1, 2)
        rope_keys = self.k_rope_proj(hidden_states).view(B, T, G, R)
        whole = rope_keys
        if self.k_nope_proj is not None:
            whole = torch.cat((rope_keys, self.k_nope_proj(hidden_states).view(B, T, G, spec.nope_dim)), dim=-1)
        scale = rms_scale(whole, group, self.norm_eps)  # [B, T, G] or [B, T, 1]
        rope_keys = (rope_keys.float() * scale.unsqueeze(-1)).to(rope_keys.dtype)
        rope_keys = (rope_keys * self.k_rope_norm_weight.view(G, R)).transpose(1, 2)
        latent = self.kv_down_proj(hidden_states)
        if self.scale_values:
            latent = torch.cat((latent, scale.to(latent.dtype)), dim=-1)
        latent = latent.unsqueeze(1)

        cos, sin = self.chunk_cos_sin(position_embeddings)
        cos, sin = cos.to(query.dtype), sin.to(query.dtype)
        rope_keys = rope_keys * cos + rotate_half(rope_keys) * sin
        q_rope = rotate_query_chunks(query[..., :R], cos, sin)
        q_nope = query[..., R:]
        if self.nope_query_scale != 1.0:
            q_nope = q_nope * self.nope_query_scale
        return torch.cat((q_rope, q_nope), dim=-1), rope_keys, latent

    def reconstruct(self, rope_keys: torch.Tensor, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[B, G, S, D]`` from chunks ``[B, G, S, 2r]`` and ``[c | s]`` ``[B, 1, S, d_c + n_s]``:
        the NoPE keys are ``s * k_up_proj(c)``."""
        if not self.scale_values:
            return super().reconstruct(rope_keys, latent)
        d_c = self.spec.latent_dim
        key, value = super().reconstruct(rope_keys, latent[..., :d_c])
        scale = latent[:, 0, :, d_c:].transpose(1, 2).unsqueeze(-1)  # [B, n_s, S, 1]
        R = self.spec.rope_dim
        nope = (key[..., R:].float() * scale.float()).to(key.dtype)
        return torch.cat((key[..., :R], nope), dim=-1), value


class NormedLowRankKVAttention(LowRankKVAttention):
    """LoRC attention with ``q_norm`` and ``k_norm`` on the rebuilt key (``q_norm_weight [H*D]``, ``k_norm_weight
    [G*D]``; see the module docstring). The cache is LoRC's: ``[B, 1, S, r_k]`` and ``[B, 1, S, r_v]``."""

    def __init__(self, config: Any, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        self.norm_group = key_norm_group(config)
        self.norm_eps = float(config.rms_norm_eps)
        self.q_norm_weight = nn.Parameter(torch.ones(self.num_heads * self.head_dim))
        self.k_norm_weight = nn.Parameter(torch.ones(self.num_kv_heads * self.head_dim))

    def queries(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The queries after ``q_norm``, before RoPE: ``[B, T, d]`` -> ``[B, H, T, D]``."""
        B, T, _ = hidden_states.shape
        query = self.q_proj(hidden_states).view(B, T, self.num_heads, self.head_dim)
        weight = self.q_norm_weight.view(self.num_heads, self.head_dim)
        return normalise(query, weight, self.norm_group, self.norm_eps).transpose(1, 2)

    def keys(self, key_latent: torch.Tensor) -> torch.Tensor:
        """The rebuilt keys after ``k_norm``, before RoPE: ``key_latent [B, S, r_k]`` -> ``[B, G, S, D]``."""
        B, S, _ = key_latent.shape
        key = self.k_up_proj(key_latent).view(B, S, self.num_kv_heads, self.head_dim)
        weight = self.k_norm_weight.view(self.num_kv_heads, self.head_dim)
        return normalise(key, weight, self.norm_group, self.norm_eps).transpose(1, 2)


class NormedSmallHeadAttention(SmallHeadAttention):
    """KV-Latent / GQA attention with ``q_norm`` and ``k_norm`` (see the module docstring).

    ``q_proj [H*D, d]`` and ``k_proj [G*D, d]`` are the original (all dims, all ``G`` key heads); both norms
    (``q_norm_weight [H*D]``, ``k_norm_weight [G*D]``) run on them, then each head keeps the rows of the kept
    chunks and the ``G`` key heads are mean-pooled into ``g``. Values and output as in `SmallHeadAttention`.
    """

    def __init__(self, config: Any, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        self.norm_group = key_norm_group(config)
        self.norm_eps = float(config.rms_norm_eps)
        d, H, G, D = config.hidden_size, self.num_heads, config.num_key_value_heads, self.head_dim
        self.original_kv_heads = G
        qkv_bias = bool(config.elitekv.get("qkv_bias", False))
        self.q_proj = nn.Linear(d, H * D, bias=qkv_bias)
        self.k_proj = nn.Linear(d, G * D, bias=qkv_bias)
        self.q_norm_weight = nn.Parameter(torch.ones(H * D))
        self.k_norm_weight = nn.Parameter(torch.ones(G * D))

    def kept_rows(self) -> torch.Tensor:
        """The kept chunks' dims of a head (`chunk_rows`)."""
        return torch.cat((self.key_chunks, self.key_chunks + self.head_dim // 2))

    def queries(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The queries after ``q_norm``, kept dims, before RoPE: ``[B, T, d]`` -> ``[B, H, T, d_k]``."""
        B, T, _ = hidden_states.shape
        H, D = self.num_heads, self.head_dim
        query = self.q_proj(hidden_states).view(B, T, H, D)
        query = normalise(query, self.q_norm_weight.view(H, D), self.norm_group, self.norm_eps)
        return query[..., self.kept_rows()].transpose(1, 2)

    def keys(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The keys after ``k_norm``, kept dims, the ``G`` heads pooled into ``g``, before RoPE: ``[B, T, d]`` ->
        ``[B, g, T, d_k]``."""
        B, T, _ = hidden_states.shape
        G, g, D = self.original_kv_heads, self.num_kv_heads, self.head_dim
        key = self.k_proj(hidden_states).view(B, T, G, D)
        key = normalise(key, self.k_norm_weight.view(G, D), self.norm_group, self.norm_eps)[..., self.kept_rows()]
        return key.view(B, T, g, G // g, self.key_dim).mean(3).transpose(1, 2)


KEY_NORM_ATTENTION: dict[str, type] = {
    "elitekv": NormedEliteKVAttention,
    "kv_latent": NormedSmallHeadAttention,
    "gqa": NormedSmallHeadAttention,
    "lorc": NormedLowRankKVAttention,
}
"""Method -> its attention for families with q/k norms (`build_attention` picks it by `key_norm_group`)."""

__all__ = [
    "KEY_NORM_ATTENTION",
    "KEY_NORM_FAMILIES",
    "NormedEliteKVAttention",
    "NormedLowRankKVAttention",
    "NormedSmallHeadAttention",
    "elitekv_scale_count",
    "key_norm_group",
    "normalise",
    "rms_scale",
    "scale_count",
]
