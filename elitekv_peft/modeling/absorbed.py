"""Absorbed EliteKV attention: attend over the cached latent directly, never rebuilding full keys and values.

With latent ``c`` (``[B, S, d_c]``), key up-projection ``W_uk_g`` (``[D-2r, d_kc]`` per key/value head ``g``) and
value up-projection ``W_uv_g`` (``[D, d_vc]``):

* score of query head ``h`` (group ``g``) at key ``s``:
  ``q_rope . k_rope[g, s] + q_nope . (W_uk_g c_k[s] + b_k) = q_rope . k_rope[g, s] + (q_nope W_uk_g) . c_k[s] + const``;
  the key bias adds the same constant to a whole row of scores, which the softmax ignores;
* output of head ``h``: ``sum_s p_s (W_uv_g c_v[s] + b_v) = W_uv_g (sum_s p_s c_v[s]) + b_v``.

So the per-step reads are the rotated chunks (``G*2r`` per token) and the latent (``d_c`` per token), shared by
all heads; the up-projections act once per query instead of once per cached token. The result equals the
reconstruct path up to floating-point rounding (tested).

The attention over the latent (`latent_attention_reference` here, in PyTorch) is the CPU fallback and the reference
of the fused Triton kernel in `elitekv_peft.kernels`. That package registers its dispatch point here when it is
imported (`use_kernel`); `absorbed_attention` then runs it (Triton on CUDA, this reference elsewhere).

This file imports only torch: it is copied next to saved models (``auto_map``); there, without the package, the
PyTorch version is used.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def allowed_keys(
    attention_mask: torch.Tensor | None,
    kv_len: torch.Tensor | None,
    batch: int,
    queries: int,
    cache_len: int,
    device: torch.device,
) -> torch.Tensor | None:
    """Which keys each query may attend to, as a bool ``[B, T, S]`` (True = attend), or None for "all of them".

    Args:
        attention_mask: a transformers mask ``[B, 1, T, S']`` (bool, True = attend; or additive float, 0 = attend),
            aligned on the last ``S`` keys; None means causal over the valid keys.
        kv_len: number of valid cache slots (int tensor with one element, on the cache's device), for a
            pre-allocated cache whose tail is empty; None when every slot is valid.
    """
    if attention_mask is not None:
        mask = attention_mask[:, 0, :, -cache_len:]
        if mask.dtype != torch.bool:
            mask = mask > torch.finfo(mask.dtype).min / 2
        return mask.expand(batch, queries, cache_len)
    if kv_len is None and queries == 1:
        return None
    valid = torch.full((1,), cache_len, device=device) if kv_len is None else kv_len.reshape(-1)[:1].to(device)
    keys = torch.arange(cache_len, device=device)
    last_visible = valid - queries + torch.arange(queries, device=device)  # [T]
    return (keys[None, :] <= last_visible[:, None]).unsqueeze(0).expand(batch, queries, cache_len)


def latent_attention_reference(
    q_rope: torch.Tensor,
    q_latent: torch.Tensor | None,
    rope_keys: torch.Tensor,
    latent: torch.Tensor,
    *,
    key_slice: tuple[int, int],
    value_slice: tuple[int, int],
    scaling: float,
    attention_mask: torch.Tensor | None = None,
    kv_len: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention over the latent cache in PyTorch (the absorbed path's fallback and the fused kernel's reference).

    Query heads ``H`` come in ``G`` groups of ``Hg = H / G`` (one per key/value head), ``T`` new tokens attend to
    ``S`` cached ones. For query row ``(h, t)`` of group ``g`` and cached token ``s``::

        score = (q_rope[h, t] . k_rope[g, s] + q_latent[h, t] . c_k[s]) * scaling
        out[h, t] = sum_s softmax_s(score) c_v[s]

    Args:
        q_rope: rotated query chunks ``[B, H, T, R]``.
        q_latent: absorbed NoPE queries ``[B, H, T, d_kc]``, or None when heads have no NoPE dims.
        rope_keys: cached rotated key chunks ``[B, G, S, R]``.
        latent: cached latents ``[B, 1, S, d_c]``.
        key_slice, value_slice: the ``[start, end)`` of ``c_k`` and ``c_v`` in the latent.
        scaling: softmax scale (``D**-0.5``).
        attention_mask: a transformers mask (see `allowed_keys`); additive float masks are added as they are.
        kv_len: valid cache slots of a pre-allocated cache (see `allowed_keys`).

    Returns:
        ``[B, H, T, d_vc]`` in the latent's dtype.
    """
    B, H, T, R = q_rope.shape
    G, S = rope_keys.shape[1], rope_keys.shape[2]
    c = latent[:, 0]
    q = q_rope.reshape(B, G, H // G, T, R)
    scores = torch.einsum("bgqtr,bgsr->bgqts", q, rope_keys)
    if q_latent is not None:
        c_k = c if key_slice == (0, c.shape[-1]) else c[..., key_slice[0] : key_slice[1]]
        scores = scores + torch.einsum("bgqtc,bsc->bgqts", q_latent.reshape(B, G, H // G, T, -1), c_k)
    scores = scores.float() * scaling
    lowest = torch.finfo(scores.dtype).min  # finite: a fully masked (padding) row stays finite, as in eager
    if attention_mask is not None and attention_mask.dtype != torch.bool:
        scores = scores + attention_mask[:, 0, :, -S:].unsqueeze(1).unsqueeze(1).to(scores.dtype)
        if kv_len is not None:
            scores = scores.masked_fill(~allowed_keys(None, kv_len, B, T, S, scores.device)[:, None, None], lowest)
    else:
        allowed = allowed_keys(attention_mask, kv_len, B, T, S, scores.device)
        if allowed is not None:
            scores = scores.masked_fill(~allowed[:, None, None], lowest)
    probs = torch.softmax(scores, dim=-1).to(c.dtype)
    c_v = c if value_slice == (0, c.shape[-1]) else c[..., value_slice[0] : value_slice[1]]
    out = torch.einsum("bgqts,bsc->bgqtc", probs, c_v)
    return out.reshape(B, H, T, -1)


LatentAttention = Callable[..., torch.Tensor]
_kernel: LatentAttention | None = None  # registered by `elitekv_peft.kernels` (see `use_kernel`)


def use_kernel(kernel: LatentAttention | None) -> None:
    """Run the latent attention of `absorbed_attention` through ``kernel`` (same arguments and result as
    `latent_attention_reference`), or through the reference when None. `elitekv_peft.kernels` registers its
    ``latent_attention`` here when imported, so this file needs no import of it."""
    global _kernel
    _kernel = kernel


def current_kernel() -> LatentAttention:
    """What `absorbed_attention` runs now: the registered kernel, else `latent_attention_reference`."""
    return _kernel if _kernel is not None else latent_attention_reference


def absorbed_attention(
    module: Any,
    query: torch.Tensor,
    rope_keys: torch.Tensor,
    latent: torch.Tensor,
    attention_mask: torch.Tensor | None,
    kv_len: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of an `EliteKVAttention` computed on the latent.

    Args:
        module: the `EliteKVAttention` (its ``spec``, ``scaling``, ``k_up_proj`` and ``v_up_proj`` are used).
        query: ``[B, H, T, D]`` in the permuted layout, chunks already rotated.
        rope_keys: cached rotated chunks ``[B, G, S, 2r]``.
        latent: cached latents ``[B, 1, S, d_c]``.
        attention_mask: as the model passes it (see `allowed_keys`).
        kv_len: valid slots of a pre-allocated cache (one-element int tensor), None when all ``S`` are valid.

    Returns:
        Per-head outputs ``[B, T, H, D]`` (before ``o_proj``), like the attention interfaces return.
    """
    spec = module.spec
    B, H, T, D = query.shape
    G, R = spec.num_kv_heads, spec.rope_dim
    q_latent = None
    if module.k_up_proj is not None:
        w_uk = module.k_up_proj.weight.view(G, spec.nope_dim, -1)  # [G, D-2r, d_kc]
        q_nope = query[..., R:].reshape(B, G, H // G * T, spec.nope_dim)  # each group's query rows
        q_latent = torch.matmul(q_nope, w_uk).view(B, H, T, -1)  # [B, G, Hg*T, d_kc] -> [B, H, T, d_kc]
    # the fused kernel where it runs (`elitekv_peft.kernels`), unless the config asks for the PyTorch reference
    attend = latent_attention_reference if module.attention_path == "absorbed_reference" else current_kernel()
    out_latent = attend(
        query[..., :R],
        q_latent,
        rope_keys,
        latent,
        key_slice=spec.key_latent,
        value_slice=spec.value_latent,
        scaling=module.scaling,
        attention_mask=attention_mask,
        kv_len=kv_len,
    )  # [B, H, T, d_vc]
    w_uv = module.v_up_proj.weight.view(G, D, -1)  # [G, D, d_vc]
    out = torch.matmul(out_latent.reshape(B, G, H // G * T, -1), w_uv.transpose(1, 2))  # [B, G, Hg*T, D]
    if module.v_up_proj.bias is not None:
        out = out + module.v_up_proj.bias.view(G, 1, D)
    return out.view(B, H, T, D).transpose(1, 2)
