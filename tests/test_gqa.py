"""The GQA mean-pooling baseline (elitekv_peft.methods.gqa)."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from elitekv_peft import cache_nbytes
from elitekv_peft.compat import cache_kwargs
from elitekv_peft.methods import mean_pool_kv_heads

from .tiny import VOCAB, tiny_model


def test_pooling_to_the_same_head_count_is_exact():
    model = tiny_model("qwen2_gqa")
    ids = torch.randint(3, VOCAB, (2, 24))
    with torch.no_grad():
        assert torch.allclose(mean_pool_kv_heads(model, 2)(ids).logits, model(ids).logits, atol=1e-5)


def test_pooled_cache_is_smaller_by_the_group_ratio_and_heads_are_means():
    model = tiny_model("llama_mha")  # 4 KV heads
    pooled = mean_pool_kv_heads(model, 2)
    ids = torch.randint(3, VOCAB, (1, 64))
    sizes = []
    for m in (model, pooled):
        cache = DynamicCache(config=m.config)
        with torch.no_grad():
            m(ids, **cache_kwargs(cache), use_cache=True)
        sizes.append(cache_nbytes(cache))
    assert sizes[1] * 2 == sizes[0]
    k = model.model.layers[0].self_attn.k_proj.weight.view(4, 32, -1)
    assert torch.allclose(pooled.model.layers[0].self_attn.k_proj.weight.view(2, 32, -1)[1], (k[2] + k[3]) / 2)


def test_impossible_group_count_names_the_possible_ones():
    with pytest.raises(ValueError, match=r"possible group counts: \[1, 2\]"):
        mean_pool_kv_heads(tiny_model("llama_gqa"), 3)
