"""Absorbed EliteKV attention: attend over the cached latent directly, never rebuilding full keys and values.

With latent ``c`` (``[B, S, d_c]``), key up-projection ``W_uk_g`` (``[D-2r, d_kc]`` per key/value head ``g``) and
value up-projection ``W_uv_g`` (``[D, d_vc]``):

* score of query head ``h`` (group ``g``) at key ``s``:
  ``q_rope . k_rope[g, s] + q_nope . (W_uk_g c_k[s] + b_k) = q_rope . k_rope[g, s] + (q_nope W_uk_g) . c_k[s] + const``;
  the key bias adds the same constant to a whole row of scores, which the softmax ignores;
* output of head ``h``: ``sum_s p_s (W_uv_g c_v[s] + b_v) = W_uv_g (sum_s p_s c_v[s]) + b_v``.

So the per-step reads are the rotated chunks (``G*2r`` per token) and the latent (``d_c`` per token), shared by
all heads; the up-projections act once per query instead of once per cached token. The result equals the
reconstruct path up to floating-point rounding (tested). This PyTorch version is the reference and CPU fallback.

This file imports only torch: it is copied next to saved models (``auto_map``).
"""

from __future__ import annotations

from typing import Any

import torch


def _mask_scores(scores: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Apply a transformers attention mask to scores ``[B, G, Hg, T, S]``.

    ``attention_mask`` is None (plain causal), a bool ``[B, 1, T, S]`` (True = attend) or an additive float mask.
    """
    T, S = scores.shape[-2:]
    lowest = torch.finfo(scores.dtype).min  # finite: a fully masked (padding) row stays finite, as in eager
    if attention_mask is None:
        if T == 1:
            return scores
        rows = torch.arange(T, device=scores.device)[:, None] + (S - T)
        allowed = torch.arange(S, device=scores.device)[None, :] <= rows
        return scores.masked_fill(~allowed, lowest)
    mask = attention_mask[..., -S:].unsqueeze(2)  # [B, 1, 1, T, S]
    if mask.dtype == torch.bool:
        return scores.masked_fill(~mask, lowest)
    return scores + mask.to(scores.dtype)


def absorbed_attention(
    module: Any,
    query: torch.Tensor,
    rope_keys: torch.Tensor,
    latent: torch.Tensor,
    attention_mask: torch.Tensor | None,
) -> torch.Tensor:
    """Attention of an `EliteKVAttention` computed on the latent.

    Args:
        module: the `EliteKVAttention` (its ``spec``, ``scaling``, ``k_up_proj`` and ``v_up_proj`` are used).
        query: ``[B, H, T, D]`` in the permuted layout, chunks already rotated.
        rope_keys: cached rotated chunks ``[B, G, S, 2r]``.
        latent: cached latents ``[B, 1, S, d_c]``.
        attention_mask: as the model passes it (see `_mask_scores`).

    Returns:
        Per-head outputs ``[B, T, H, D]`` (before ``o_proj``), like the attention interfaces return.
    """
    spec = module.spec
    B, H, T, D = query.shape
    G, R = spec.num_kv_heads, spec.rope_dim
    q = query.view(B, G, H // G, T, D)
    c = latent[:, 0]
    scores = torch.einsum("bgqtr,bgsr->bgqts", q[..., :R], rope_keys)
    if module.k_up_proj is not None:
        w_uk = module.k_up_proj.weight.view(G, spec.nope_dim, -1)  # [G, D-2r, d_kc]
        q_latent = torch.einsum("bgqtn,gnc->bgqtc", q[..., R:], w_uk)
        c_k = c[..., spec.key_latent[0] : spec.key_latent[1]]
        scores = scores + torch.einsum("bgqtc,bsc->bgqts", q_latent, c_k)
    scores = _mask_scores(scores.float() * module.scaling, attention_mask)
    probs = torch.softmax(scores, dim=-1).to(c.dtype)
    c_v = c[..., spec.value_latent[0] : spec.value_latent[1]]
    out_latent = torch.einsum("bgqts,bsc->bgqtc", probs, c_v)  # [B, G, Hg, T, d_vc]
    w_uv = module.v_up_proj.weight.view(G, D, -1)  # [G, D, d_vc]
    out = torch.einsum("bgqtc,gdc->bgqtd", out_latent, w_uv)
    if module.v_up_proj.bias is not None:
        out = out + module.v_up_proj.bias.view(G, 1, 1, D)
    return out.reshape(B, H, T, D).transpose(1, 2)
