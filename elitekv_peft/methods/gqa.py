"""GQA by mean-pooling key/value heads: the baseline of the EliteKV paper, and ``method="gqa"``.

Adjacent key/value heads are averaged into ``num_groups`` heads (their ``k_proj`` / ``v_proj`` rows and biases),
and the query heads that read them are regrouped accordingly. The result is an ordinary transformers model of the
same family with ``num_key_value_heads = num_groups``: its cache is ``num_groups / G`` of the original. It needs
uptraining like any conversion.

``EliteKVConfig(method="gqa", kv_ratio=groups / G)`` does the same pooling inside the library's PEFT flow (the
attention becomes a `SmallHeadAttention` with ``groups`` key/value heads), so the result saves and loads like every
other method; `mean_pool_kv_heads` stays as the plain-transformers baseline.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from ..quantization import dense_weight
from .base import PlannedMethod
from .key_norm import key_norms_of, small_head_weights


def mean_pool_kv_heads(model: nn.Module, num_groups: int) -> nn.Module:
    """A copy of ``model`` whose ``G`` key/value heads are mean-pooled into ``num_groups`` heads.

    Raises ``ValueError`` naming the possible group counts when ``num_groups`` does not divide both the key/value
    and the query heads.
    """
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    G, H = config.num_key_value_heads, config.num_attention_heads
    D = getattr(config, "head_dim", None) or config.hidden_size // H
    possible = [n for n in range(1, G + 1) if G % n == 0 and H % n == 0]
    if num_groups not in possible:
        raise ValueError(
            f"cannot pool {G} key/value heads ({H} query heads) into {num_groups}; possible group counts: {possible}"
        )
    config.num_key_value_heads = num_groups
    reference = next(model.parameters())
    pooled = AutoModelForCausalLM.from_config(
        config, dtype=reference.dtype, attn_implementation=model.config._attn_implementation
    )
    state = model.state_dict()
    for key, value in list(state.items()):
        if key.endswith(("self_attn.k_proj.weight", "self_attn.v_proj.weight")):
            state[key] = value.view(num_groups, G // num_groups, D, -1).mean(1).reshape(num_groups * D, -1)
        elif key.endswith(("self_attn.k_proj.bias", "self_attn.v_proj.bias")):
            state[key] = value.view(num_groups, G // num_groups, D).mean(1).reshape(-1)
    missing, unexpected = pooled.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"GQA pooling left weights unmatched: missing {missing}, unexpected {unexpected}")
    if getattr(config, "tie_word_embeddings", False):
        pooled.tie_weights()
    return pooled.to(reference.device).eval()


def group_count(kv_ratio: float, num_kv_heads: int, num_heads: int) -> int:
    """Pooled key/value heads for ``kv_ratio``: the ratio must be ``groups / G`` for a group count dividing ``G``.

    Raises ``ValueError`` naming the possible ratios (SmolLM2, 3 KV heads: 1/3 and 1.0).
    """
    possible = [n for n in range(1, num_kv_heads + 1) if num_kv_heads % n == 0 and num_heads % n == 0]
    for groups in possible:
        if abs(kv_ratio - groups / num_kv_heads) < 1e-4:
            return groups
    ratios = ", ".join(f"{n}/{num_kv_heads} = {n / num_kv_heads:.4g}" for n in possible)
    raise ValueError(
        f"method='gqa' cannot reach kv_ratio={kv_ratio}: pooling {num_kv_heads} key/value heads gives only the ratios "
        f"{ratios}. Use one of those, or another method (kv_latent, lorc, elitekv) for this ratio."
    )


def plan(model: nn.Module, peft_config: Any, shape: dict[str, int]) -> dict[str, Any]:
    """The saved description of a GQA conversion: pooled head count; every chunk and value dim kept."""
    G, H, D = shape["num_key_value_heads"], shape["num_attention_heads"], shape["head_dim"]
    groups = group_count(peft_config.kv_ratio, G, H)
    layers = shape["num_hidden_layers"]
    first = model.model.layers[0].self_attn
    return {
        "kv_heads": groups,
        "key_chunks": [list(range(D // 2)) for _ in range(layers)],
        "value_dims": [D] * layers,
        "v_bias": first.v_proj.bias is not None,
        "o_bias": first.o_proj.bias is not None,
    }


def layer_weights(
    attn: nn.Module, layer_idx: int, method_plan: dict[str, Any], lowrank_init: str | None, gram: Any
) -> dict[str, torch.Tensor]:
    """State dict of one pooled `SmallHeadAttention`: ``k_proj`` / ``v_proj`` rows averaged over adjacent heads."""
    D = attn.head_dim
    groups = int(method_plan["kv_heads"])
    out = {}
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        for kind in ("weight", "bias"):
            linear = getattr(attn, name)
            tensor = dense_weight(linear) if kind == "weight" else linear.bias
            if tensor is None:
                continue
            tensor = tensor.detach().float()
            if name in ("k_proj", "v_proj"):
                G = tensor.shape[0] // D
                tensor = tensor.reshape(groups, G // groups, D, -1).mean(1).reshape(groups * D, *tensor.shape[1:])
            out[f"{name}.{kind}"] = tensor.cpu().contiguous()
    norms = key_norms_of(attn)
    if norms is not None:  # k_norm: every key head is normalised, then pooled, in the module (key_norm.py)
        out.update(small_head_weights(attn, norms))
    return out


class GQA(PlannedMethod):
    """``method="gqa"``: `plan` for the whole model, `layer_weights` per layer."""

    name = "gqa"
    attention = "SmallHeadAttention"
    plan = staticmethod(plan)
    layer_weights = staticmethod(layer_weights)


METHOD = GQA()
