"""PyTorch reference of latent decode attention: the CPU fallback and the oracle of the Triton kernel's tests.

Shapes: batch ``B``, query heads ``H`` in ``G`` groups of ``Hg = H / G`` (one group per key/value head), ``T`` new
query tokens, ``S`` cached tokens, ``R = 2r`` rotated dims per group, latent ``c`` of ``d_c`` values per token whose
key part ``c_k`` (``d_kc`` values) and value part ``c_v`` (``d_vc`` values) are slices of it.

For query row ``(h, t)`` of group ``g = h // Hg`` and cached token ``s``::

    score = (q_rope[h, t] . k_rope[g, s] + q_latent[h, t] . c_k[s]) * scaling
    out[h, t] = sum_s softmax_s(score) c_v[s]

``q_latent`` is the NoPE query already multiplied by the key up-projection (weight absorption); ``out`` is in latent
space, before the value up-projection.
"""

from __future__ import annotations

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
    """Attention over the latent cache in PyTorch.

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
        c_k = c[..., key_slice[0] : key_slice[1]]
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
    out = torch.einsum("bgqts,bsc->bgqtc", probs, c[..., value_slice[0] : value_slice[1]])
    return out.reshape(B, H, T, -1)
