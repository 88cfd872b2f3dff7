"""LoRC (Zhang et al., ICLR 2025 submission; arXiv 2410.03111): training-free low-rank keys and values per layer.

Per layer, ``W_k`` and ``W_v`` (all key/value heads together, ``[G*D, d]`` each) are factored by a truncated SVD into
a down-projection to a small latent (cached) and an up-projection (run at attention time). Keys are cached *before*
RoPE and rebuilt and rotated at each step (`elitekv_peft.modeling.attention_lowrank`). Cache per token and layer:
``r_k + r_v`` values against ``2 * G * D``.

Progressive rank schedule (the paper's idea: an error made in a shallow layer passes through, and is amplified by,
every later layer, so shallow layers are compressed less). Our reading, data-free as in the paper:

1. per layer ``l``, ``log kappa_l = log cond(W_k) + log cond(W_v)`` (ratio of the largest to the smallest singular
   value of each weight);
2. cumulative sensitivity ``s_l = sum_{j >= l} log kappa_j`` (the log of the product of the condition numbers the
   error of layer ``l`` goes through), so ``s`` falls with depth;
3. ranks proportional to ``w_l = 1/2 + (s_l - min s) / (max s - min s)`` (from 0.5x the average rank for the least
   sensitive layer to 1.5x for the most), rounded so that the whole model caches at most ``kv_ratio`` of the original
   (``sum_l (r_k + r_v) <= kv_ratio * 2 G D L``), each rank within ``[1, G*D]``.

``key_share`` (default 0.5) is the part of the budget that goes to keys. ``lowrank_init`` defaults to ``"weight"``
(the paper's plain SVD of the weights, no calibration data); ``"activation"`` uses the activation-aware SVD of
`elitekv_peft.factorization` on calibration inputs instead.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..factorization import factorize
from ..quantization import dense_weight
from .base import PlannedMethod
from .key_norm import key_norms_of, norm_weights

DEFAULT_KEY_SHARE = 0.5
SPREAD = 1.0  # weights run from 1 - SPREAD/2 to 1 + SPREAD/2


def log_condition_number(weight: torch.Tensor) -> float:
    """``log(sigma_max / sigma_min)`` of a weight matrix (float64 SVD; sigma_min floored at 1e-12 sigma_max)."""
    values = torch.linalg.svdvals(weight.detach().double())
    top = float(values[0])
    return math.log(top / max(float(values[-1]), 1e-12 * top, 1e-300))


def layer_weights_schedule(log_kappas: list[float]) -> list[float]:
    """Progressive weights ``w_l`` in ``[1 - SPREAD/2, 1 + SPREAD/2]`` from per-layer ``log kappa`` (see module doc)."""
    cumulative = [sum(log_kappas[i:]) for i in range(len(log_kappas))]
    low, high = min(cumulative), max(cumulative)
    if high - low < 1e-12:
        return [1.0] * len(cumulative)
    return [1 - SPREAD / 2 + SPREAD * (s - low) / (high - low) for s in cumulative]


def allocate(total: int, weights: list[float], max_rank: int) -> list[int]:
    """Integer ranks in ``[1, max_rank]`` proportional to ``weights`` with ``sum == min(total, L * max_rank)``."""
    L = len(weights)
    if total < L:
        raise ValueError(f"{total} values for {L} layers: every layer needs a rank of at least 1")
    total = min(total, L * max_rank)
    ranks = [1] * L
    free = list(range(L))
    remaining = total - L
    while remaining > 0 and free:  # water-filling: share what is left among layers below the cap
        weight_sum = sum(weights[i] for i in free)
        ideal = {i: remaining * weights[i] / weight_sum for i in free}
        step = {i: min(max_rank - ranks[i], math.floor(ideal[i])) for i in free}
        if sum(step.values()) == 0:  # hand out single units by largest remainder
            for i in sorted(free, key=lambda i: -(ideal[i] - step[i]))[:remaining]:
                ranks[i] += 1
            remaining = total - sum(ranks)
        else:
            for i, extra in step.items():
                ranks[i] += extra
            remaining = total - sum(ranks)
        free = [i for i in free if ranks[i] < max_rank]
    return ranks


def budget_split(kv_ratio: float, shape: dict[str, int], key_share: float | None) -> tuple[int, int]:
    """``(key values, value values)`` per token summed over layers; raises naming the smallest possible ratio."""
    G, D, L = shape["num_key_value_heads"], shape["head_dim"], shape["num_hidden_layers"]
    full = 2 * G * D * L
    total = math.floor(kv_ratio * full + 1e-9)
    if total < 2 * L:
        raise ValueError(
            f"kv_ratio={kv_ratio} leaves {total} cached values per token for {L} layers; LoRC needs a key and a value "
            f"rank of at least 1 per layer: use kv_ratio >= {2 * L / full:.4f}."
        )
    share = DEFAULT_KEY_SHARE if key_share is None else key_share
    keys = min(max(L, round(share * total)), total - L)
    cap = L * G * D  # a rank above G*D stores nothing more
    keys = min(keys, cap)
    values = min(total - keys, cap)
    return keys, values


def plan(model: nn.Module, peft_config: Any, shape: dict[str, int]) -> dict[str, Any]:
    """The saved description of a LoRC conversion: key and value rank per layer (progressive schedule)."""
    G, D = shape["num_key_value_heads"], shape["head_dim"]
    key_total, value_total = budget_split(peft_config.kv_ratio, shape, peft_config.key_share)
    log_kappas = [
        sum(log_condition_number(dense_weight(getattr(layer.self_attn, name))) for name in ("k_proj", "v_proj"))
        for layer in model.model.layers
    ]
    weights = layer_weights_schedule(log_kappas)
    first = model.model.layers[0].self_attn
    return {
        "key_ranks": allocate(key_total, weights, G * D),
        "value_ranks": allocate(value_total, weights, G * D),
        "log_condition_numbers": [round(x, 4) for x in log_kappas],
        "o_bias": first.o_proj.bias is not None,
    }


def layer_weights(
    attn: nn.Module, layer_idx: int, method_plan: dict[str, Any], lowrank_init: str, gram: torch.Tensor | None
) -> dict[str, torch.Tensor]:
    """State dict of one `LowRankKVAttention` from the original projections (float32, CPU)."""
    out = {"q_proj.weight": dense_weight(attn.q_proj), "o_proj.weight": dense_weight(attn.o_proj)}
    if attn.q_proj.bias is not None:
        out["q_proj.bias"] = attn.q_proj.bias
    if attn.o_proj.bias is not None:
        out["o_proj.bias"] = attn.o_proj.bias
    for part, rank_key in (("k", "key_ranks"), ("v", "value_ranks")):
        proj = getattr(attn, f"{part}_proj")
        rank = int(method_plan[rank_key][layer_idx])
        down, up = factorize(dense_weight(proj).T, rank, gram, lowrank_init)  # [d, r], [r, G*D]
        out[f"{part}_down_proj.weight"] = down.T
        out[f"{part}_up_proj.weight"] = up.T
        if proj.bias is not None:
            out[f"{part}_up_proj.bias"] = proj.bias
    norms = key_norms_of(attn)
    if norms is not None:  # q_norm / k_norm (Qwen3, OLMo2): the rebuilt key is normalised when read
        out.update(norm_weights(norms))
    return {name: tensor.detach().float().cpu().contiguous() for name, tensor in out.items()}


class LoRC(PlannedMethod):
    """``method="lorc"``: `plan` for the whole model, `layer_weights` per layer."""

    name = "lorc"
    attention = "LowRankKVAttention"
    plan = staticmethod(plan)
    layer_weights = staticmethod(layer_weights)


METHOD = LoRC()
