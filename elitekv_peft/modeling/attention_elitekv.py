"""EliteKV attention: RoPE on a few chosen chunks per head, keys' NoPE part and values from one latent.

Shapes (per layer): hidden ``d``, query heads ``H``, key/value heads ``G``, head dim ``D``, ``r`` rotary chunks
kept per key/value head, latent ``d_c``.

Head dims of the queries and keys are stored *permuted* per key/value head: first the ``2r`` dims of the chosen
chunks (the ``r`` first halves, then the ``r`` second halves, so HF's ``rotate_half`` pairs them correctly), then the
``D - 2r`` NoPE dims. ``q . k`` is unchanged by a permutation applied to both, so nothing else needs to know.

Parameters:

* ``q_proj``       ``[H*D, d]``          queries, rows permuted per head
* ``k_rope_proj``  ``[G*2r, d]``         the rotated key chunks
* ``kv_down_proj`` ``[d_c, d]``          the latent ``c = x W_down^T``
* ``k_up_proj``    ``[G*(D-2r), d_kc]``  NoPE keys from the key part of the latent (absent when ``2r = D``)
* ``v_up_proj``    ``[G*D, d_vc]``       values from the value part of the latent
* ``o_proj``       ``[d, H*D]``          unchanged

With J-LRD the key and value parts of the latent are the whole latent (``d_kc = d_vc = d_c``); with S-LRD the
latent is ``[c_k | c_v]``.

This file imports only torch, transformers and its sibling files: it is copied next to saved models (``auto_map``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import Cache
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from .absorbed import absorbed_attention
from .attention_base import (
    ConvertedAttention,
    attend,
    attention_weights_requested,
    original_head_dim,
    rotate_half,
)
from .cache import latent_layer, valid_length
from .variants import layer_rope_parameters, layer_rope_type

ATTENTION_PATHS = ("reconstruct", "absorbed", "auto", "absorbed_reference")


def default_attention_path(device: torch.device) -> str:
    """The path of a layer whose config sets none: ``"auto"`` on CUDA (absorbed decode steps on the fused kernel,
    so that plain ``generate()`` takes the fast path), ``"reconstruct"`` elsewhere."""
    return "auto" if device.type == "cuda" else "reconstruct"


@dataclass(frozen=True)
class LayerSpec:
    """Shapes of one converted attention layer, read from ``config.elitekv``."""

    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    chunk_indices: tuple[tuple[int, ...], ...]  # [G][r], each sorted, in [0, D/2)
    latent_dim: int  # d_c
    key_latent: tuple[int, int]  # slice of the latent read by k_up_proj
    value_latent: tuple[int, int]  # slice of the latent read by v_up_proj
    qkv_bias: bool
    o_bias: bool

    @property
    def rope_chunks(self) -> int:
        return len(self.chunk_indices[0])

    @property
    def rope_dim(self) -> int:
        """``2r``: rotated dims per key/value head."""
        return 2 * self.rope_chunks

    @property
    def nope_dim(self) -> int:
        """``D - 2r``: unrotated dims per key/value head."""
        return self.head_dim - self.rope_dim

    def cache_values_per_token(self) -> int:
        """Values this layer caches per token: ``G*2r + d_c``."""
        return self.num_kv_heads * self.rope_dim + self.latent_dim


def layer_spec(config: Any, layer_idx: int) -> LayerSpec:
    """Build the `LayerSpec` of layer ``layer_idx`` from a model config that carries an ``elitekv`` dict."""
    ek = config.elitekv
    head_dim = original_head_dim(config)
    latent_dim = int(ek["latent_dims"][layer_idx])
    key_dims = ek.get("key_latent_dims")
    if key_dims is None:  # joint (J-LRD): keys and values read the whole latent
        key_latent, value_latent = (0, latent_dim), (0, latent_dim)
    else:  # separate (S-LRD): latent = [c_k | c_v]
        split = int(key_dims[layer_idx])
        key_latent, value_latent = (0, split), (split, latent_dim)
    return LayerSpec(
        hidden_size=config.hidden_size,
        num_heads=config.num_attention_heads,
        num_kv_heads=config.num_key_value_heads,
        head_dim=head_dim,
        chunk_indices=tuple(tuple(int(i) for i in head) for head in ek["chunk_indices"][layer_idx]),
        latent_dim=latent_dim,
        key_latent=tuple(key_latent),
        value_latent=tuple(value_latent),
        qkv_bias=bool(ek.get("qkv_bias", False)),
        o_bias=bool(ek.get("o_bias", False)),
    )


def rope_attention_factor(config: Any, layer_idx: int = 0) -> float:
    """The factor the model's rotary module multiplies ``cos`` and ``sin`` by (YaRN's / LongRoPE's attention factor;
    1 for ``default``, ``linear``, ``dynamic`` and ``llama3``), computed from the config as transformers does, for
    layer ``layer_idx`` (its layer type's parameters where the config gives them per type: Gemma 3).

    The original scores carry its square on every dim; EliteKV's NoPE dims are not rotated, so their query part is
    multiplied by it (`EliteKVAttention.project`).
    """
    rope_type = layer_rope_parameters(config, layer_idx).get("rope_type", "default")
    init = ROPE_INIT_FUNCTIONS.get(rope_type)
    if init is None:
        return 1.0
    kind = layer_rope_type(config, layer_idx)
    with torch.device("cpu"):  # models are built on the meta device when loaded; the factor is a plain number
        return float((init(config, "cpu") if kind is None else init(config, "cpu", layer_type=kind))[1])


def latent_part(latent: torch.Tensor, part: tuple[int, int]) -> torch.Tensor:
    """``latent[..., start:end]`` for ``part = (start, end)``; the latent itself when the part is all of it (J-LRD),
    one operator less per call on the decode path."""
    start, end = part
    return latent if start == 0 and end == latent.shape[-1] else latent[..., start:end]


def rotate_query_chunks(q_rope: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the query chunks ``[B, H, T, 2r]`` with their key/value head's ``cos``/``sin`` ``[B, G, T, 2r]``.

    Query head ``h`` belongs to key/value head ``h // (H / G)``: the heads are viewed as ``[B, G, H / G, T, 2r]`` so
    the tables broadcast over each group instead of being repeated for every query head."""
    B, H, T, R = q_rope.shape
    G = cos.shape[1]
    grouped = q_rope.view(B, G, H // G, T, R)
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    return (grouped * cos + rotate_half(grouped) * sin).reshape(B, H, T, R)


def head_dim_permutation(chunks: tuple[int, ...] | list[int], head_dim: int) -> torch.Tensor:
    """New order of one head's dims: chosen chunks' first halves, their second halves, then the rest.

    Returns a LongTensor ``[D]``: ``new_dim j`` takes ``old_dim perm[j]``.
    """
    half = head_dim // 2
    chosen = sorted(int(c) for c in chunks)
    rest = [i for i in range(half) if i not in set(chosen)]
    order = chosen + [c + half for c in chosen] + rest + [c + half for c in rest]
    return torch.tensor(order, dtype=torch.long)


class EliteKVAttention(ConvertedAttention):
    """Drop-in replacement of Llama/Mistral/Qwen2 attention that caches rotated chunks and a latent."""

    def __init__(self, config: Any, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        spec = layer_spec(config, layer_idx)
        self.spec = spec
        self.num_key_value_groups = spec.num_heads // spec.num_kv_heads
        # "reconstruct": rebuild K/V from the latent; "absorbed": attend on the latent (`absorbed`: the fused kernel
        # on CUDA); "absorbed_reference": the same in PyTorch (comparisons); "auto": absorbed for one-token decode
        # steps, reconstruct otherwise (prefill, training). Unset (None): "auto" on CUDA, "reconstruct" elsewhere.
        self.attention_path = config.elitekv.get("attention_path")
        # the rotary tables' amplitude squared, which the unrotated (NoPE) dims of the original scores also carry
        self.nope_query_scale = rope_attention_factor(config, layer_idx) ** 2

        d, H, G, D = spec.hidden_size, spec.num_heads, spec.num_kv_heads, spec.head_dim
        self.q_proj = nn.Linear(d, H * D, bias=spec.qkv_bias)
        self.k_rope_proj = nn.Linear(d, G * spec.rope_dim, bias=spec.qkv_bias)
        self.kv_down_proj = nn.Linear(d, spec.latent_dim, bias=False)
        key_width = spec.key_latent[1] - spec.key_latent[0]
        value_width = spec.value_latent[1] - spec.value_latent[0]
        self.k_up_proj = nn.Linear(key_width, G * spec.nope_dim, bias=spec.qkv_bias) if spec.nope_dim else None
        self.v_up_proj = nn.Linear(value_width, G * D, bias=spec.qkv_bias)
        self.o_proj = nn.Linear(H * D, d, bias=spec.o_bias)
        # [G, r]; persistent so that loading (which may build the model on the meta device) restores it
        self.register_buffer("chunk_index", torch.tensor(spec.chunk_indices, dtype=torch.long))

    def chunk_cos_sin(
        self, position_embeddings: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pick each head's chunk frequencies from the model's ``(cos, sin)`` ``[B, T, D]``.

        Returns ``(cos, sin)`` of shape ``[B, G, T, 2r]`` in the permuted layout.
        """
        cos, sin = position_embeddings
        B, T, _ = cos.shape
        index = self.chunk_index.to(cos.device)  # [G, r], each < D/2: the first half's frequencies
        # each head's chunk frequencies twice (the rotate_half layout), one gather for all heads: [G * 2r]
        gather = torch.cat((index, index), dim=-1).view(-1)
        shape = (B, T, self.spec.num_kv_heads, self.spec.rope_dim)
        # [B, T, D] -> [B, T, G * 2r] -> [B, T, G, 2r] -> [B, G, T, 2r]
        cos = cos.index_select(-1, gather).view(shape).transpose(1, 2)
        sin = sin.index_select(-1, gather).view(shape).transpose(1, 2)
        return cos, sin

    def project(
        self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Project hidden ``[B, T, d]`` and rotate.

        Returns queries ``[B, H, T, D]``, rotated key chunks ``[B, G, T, 2r]`` and the latent ``[B, 1, T, d_c]``.
        """
        B, T, _ = hidden_states.shape
        spec = self.spec
        query = self.q_proj(hidden_states).view(B, T, spec.num_heads, spec.head_dim).transpose(1, 2)
        rope_keys = self.k_rope_proj(hidden_states).view(B, T, spec.num_kv_heads, spec.rope_dim).transpose(1, 2)
        latent = self.kv_down_proj(hidden_states).unsqueeze(1)

        cos, sin = self.chunk_cos_sin(position_embeddings)
        if cos.dtype != query.dtype:
            cos, sin = cos.to(query.dtype), sin.to(query.dtype)
        rope_keys = rope_keys * cos + rotate_half(rope_keys) * sin
        q_rope = rotate_query_chunks(query[..., : spec.rope_dim], cos, sin)
        q_nope = query[..., spec.rope_dim :]
        if self.nope_query_scale != 1.0:
            q_nope = q_nope * self.nope_query_scale
        query = torch.cat((q_rope, q_nope), dim=-1)
        return query, rope_keys, latent

    def reconstruct(self, rope_keys: torch.Tensor, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Full keys and values ``[B, G, S, D]`` from chunks ``[B, G, S, 2r]`` and latents ``[B, 1, S, d_c]``."""
        spec = self.spec
        B, _, S, _ = latent.shape
        c = latent[:, 0]
        value = self.v_up_proj(latent_part(c, spec.value_latent))
        value = value.view(B, S, spec.num_kv_heads, spec.head_dim).transpose(1, 2)
        if self.k_up_proj is None:
            return rope_keys, value
        nope_keys = self.k_up_proj(latent_part(c, spec.key_latent))
        nope_keys = nope_keys.view(B, S, spec.num_kv_heads, spec.nope_dim).transpose(1, 2)
        return torch.cat((rope_keys, nope_keys), dim=-1), value

    def use_absorbed(self, query_length: int) -> bool:
        """Whether this call attends on the latent (see ``attention_path``)."""
        path = self.attention_path or default_attention_path(self.q_proj.weight.device)
        if self.training or path == "reconstruct" or self.softcap is not None:
            return False  # the latent kernel has no soft-capping (Gemma 2): those layers rebuild keys and values
        if attention_weights_requested():
            return False  # the latent kernel returns no weights; `output_attentions=True` gets them rebuilt
        return path != "auto" or query_length == 1

    def attend_cached(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: Cache | None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """hidden_states ``[B, T, d]`` -> (output ``[B, T, d]``, attention weights or None); the cache holds the
        rotated chunks and the latent (`cache.latent_layer`)."""
        input_shape = hidden_states.shape[:-1]
        query, rope_keys, latent = self.project(hidden_states, position_embeddings)
        kv_len = None  # filled slots of a pre-allocated cache
        if cache is not None:
            layer = latent_layer(cache, self.layer_idx, self.sliding_window)
            # through the cache, as transformers' attention does: an offloading cache moves layers in and out there
            rope_keys, latent = cache.update(rope_keys, latent, self.layer_idx)
            kv_len = valid_length(layer)
        if self.use_absorbed(query.shape[2]):
            attn_output = absorbed_attention(self, query, rope_keys, latent, attention_mask, kv_len)
            attn_output = attn_output.reshape(*input_shape, -1).contiguous()
            return self.o_proj(attn_output), None
        key, value = self.reconstruct(rope_keys, latent)
        attn_output, attn_weights = attend(self, query, key, value, attention_mask, **kwargs)
        return self.o_proj(attn_output), attn_weights
