"""GQA by mean-pooling key/value heads: the baseline of the EliteKV paper.

Adjacent key/value heads are averaged into ``num_groups`` heads (their ``k_proj`` / ``v_proj`` rows and biases),
and the query heads that read them are regrouped accordingly. The result is an ordinary transformers model of the
same family with ``num_key_value_heads = num_groups``: its cache is ``num_groups / G`` of the original. It needs
uptraining like any conversion.
"""

from __future__ import annotations

import copy

from torch import nn


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
