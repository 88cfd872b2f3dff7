"""KV-Latent (Shi et al. 2025): smaller key and value head dims, initialised from the original weights.

Budget. Per token and layer the original model caches ``2 * G * D`` values; KV-Latent caches ``G * (d_k + d_v)``.
With ``b = floor(kv_ratio * 2D)`` values per head, keys get ``d_k = 2 * round(key_share * b / 2)`` (even: whole
rotary chunks) and values the rest, ``d_v = b - d_k``. ``key_share`` defaults to 0.5, the paper's main setting (the
same reduction for ``qk`` and ``vo``); a lower share keeps more of the values.

Keys: frequency-aware RoPE. A key head of ``d_k = 2k`` dims keeps ``k`` of the ``D/2`` rotary chunks of ``W_q`` /
``W_k``, *with their original frequencies*, so at initialisation a score equals the original score restricted to
those chunks (partial RoPE). Which chunks: the public KV-Latent code re-samples the rotary exponents of the small
head as ``i / n`` for ``i`` in ``[n/4, 3n/4)`` step 2, then ``[3n/4, n)`` step 1 (``n = 2k`` rotary dims): it drops
the fastest quarter of the frequencies (noise on short vectors), spaces the middle ones widely and keeps the slow
ones densely (long-range position decay). `frequency_aware_chunks` picks the original chunks whose exponents
``c / (D/2)`` are nearest to those targets, so the small head keeps the same frequency profile with exact weights.

Values: per key/value head, ``W_v`` is factored to rank ``d_v`` (activation-aware SVD by default, as EliteKV's
J-LRD: the best rank-``d_v`` approximation of the head's values on calibration inputs); the up-projection is folded
into ``o_proj``, so a head's value is ``d_v`` dims and no extra matrix runs at inference. A value bias (Qwen2) is
folded into ``o_proj``'s bias (attention weights sum to one).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..factorization import factorize
from ..modeling.attention_small_heads import chunk_rows
from ..quantization import dense_weight
from .base import PlannedMethod
from .key_norm import key_norms_of, small_head_weights

DEFAULT_KEY_SHARE = 0.5


def head_dims(kv_ratio: float, head_dim: int, key_share: float | None) -> tuple[int, int]:
    """``(d_k, d_v)`` per head for ``kv_ratio``; raises ``ValueError`` naming the smallest possible ratio."""
    D = head_dim
    share = DEFAULT_KEY_SHARE if key_share is None else key_share
    per_head = math.floor(kv_ratio * 2 * D + 1e-9)
    if per_head < 3:
        raise ValueError(
            f"kv_ratio={kv_ratio} leaves {per_head} cached values per key/value head (head dim {D}); KV-Latent needs "
            f"at least 3 (one rotary chunk of 2 dims for keys, 1 value dim): use kv_ratio >= {3 / (2 * D):.4f}."
        )
    chunks = min(D // 2, max(1, round(share * per_head / 2)))
    chunks = min(chunks, (per_head - 1) // 2)  # leave at least one value dim
    value_dim = min(D, per_head - 2 * chunks)
    return 2 * chunks, value_dim


def frequency_aware_chunks(num_chunks: int, keep: int) -> list[int]:
    """``keep`` of the ``num_chunks`` rotary chunks, following KV-Latent's frequency re-sampling (sorted).

    Target exponents (fraction of the way from the fastest to the slowest frequency): ``keep // 2`` evenly spaced in
    ``[1/4, 3/4)``, the rest evenly spaced in ``[3/4, 1)``; each target takes the nearest unused chunk.
    """
    if not 1 <= keep <= num_chunks:
        raise ValueError(f"keep={keep} chunks out of {num_chunks}: choose 1..{num_chunks}")
    if keep == num_chunks:
        return list(range(num_chunks))
    middle, slow = keep // 2, keep - keep // 2
    targets = [0.25 + 0.5 * j / middle for j in range(middle)] + [0.75 + 0.25 * j / slow for j in range(slow)]
    chosen: list[int] = []
    for target in targets:
        free = [c for c in range(num_chunks) if c not in chosen]
        chosen.append(min(free, key=lambda c: (abs(c - target * num_chunks), -c)))
    return sorted(chosen)


def plan(model: nn.Module, peft_config: Any, shape: dict[str, int]) -> dict[str, Any]:
    """The saved description of a KV-Latent conversion: kept chunks and value dims per layer."""
    key_dim, value_dim = head_dims(peft_config.kv_ratio, shape["head_dim"], peft_config.key_share)
    chunks = frequency_aware_chunks(shape["head_dim"] // 2, key_dim // 2)
    layers = shape["num_hidden_layers"]
    first = model.model.layers[0].self_attn
    return {
        "kv_heads": shape["num_key_value_heads"],
        "key_chunks": [list(chunks) for _ in range(layers)],
        "value_dims": [value_dim] * layers,
        "v_bias": False,  # folded into o_proj's bias
        "o_bias": first.o_proj.bias is not None or first.v_proj.bias is not None,
    }


def layer_weights(
    attn: nn.Module, layer_idx: int, method_plan: dict[str, Any], lowrank_init: str, gram: torch.Tensor | None
) -> dict[str, torch.Tensor]:
    """State dict of one `SmallHeadAttention` from the original projections (float32, CPU)."""
    q_w, k_w, v_w, o_w = (dense_weight(getattr(attn, name)) for name in ("q_proj", "k_proj", "v_proj", "o_proj"))
    D = attn.head_dim
    H, G = q_w.shape[0] // D, k_w.shape[0] // D
    rows = torch.tensor(chunk_rows(method_plan["key_chunks"][layer_idx], D), device=q_w.device)
    q_rows = torch.cat([h * D + rows for h in range(H)])
    k_rows = torch.cat([g * D + rows for g in range(G)])
    out = {"q_proj.weight": q_w[q_rows], "k_proj.weight": k_w[k_rows]}
    if attn.q_proj.bias is not None:
        out["q_proj.bias"] = attn.q_proj.bias.detach().float()[q_rows]
        out["k_proj.bias"] = attn.k_proj.bias.detach().float()[k_rows]

    d_v = int(method_plan["value_dims"][layer_idx])
    group = H // G
    v_rows, o_cols = [], []
    o_bias = attn.o_proj.bias.detach().float().clone() if attn.o_proj.bias is not None else torch.zeros(o_w.shape[0])
    o_bias = o_bias.to(o_w.device)
    v_b = attn.v_proj.bias.detach().float() if attn.v_proj.bias is not None else None
    for g in range(G):
        down, up = factorize(v_w[g * D : (g + 1) * D].T, d_v, gram, lowrank_init)  # [d, d_v], [d_v, D]
        v_rows.append(down.T.float())
        for h in range(g * group, (g + 1) * group):
            o_head = o_w[:, h * D : (h + 1) * D]
            o_cols.append(o_head @ up.T.float())
            if v_b is not None:
                o_bias = o_bias + o_head @ v_b[g * D : (g + 1) * D]
    out["v_proj.weight"] = torch.cat(v_rows)
    out["o_proj.weight"] = torch.cat(o_cols, dim=1)
    if attn.o_proj.bias is not None or v_b is not None:
        out["o_proj.bias"] = o_bias
    norms = key_norms_of(attn)
    if norms is not None:  # q_norm / k_norm: full q/k, the module keeps the chunks after the norms (key_norm.py)
        out.update(small_head_weights(attn, norms))
    return {name: tensor.detach().float().cpu().contiguous() for name, tensor in out.items()}


class KVLatent(PlannedMethod):
    """``method="kv_latent"``: `plan` for the whole model, `layer_weights` per layer."""

    name = "kv_latent"
    attention = "SmallHeadAttention"
    plan = staticmethod(plan)
    layer_weights = staticmethod(layer_weights)


METHOD = KVLatent()
