"""The pre-allocated latent cache (`EliteKVStaticCache`): same results as the dynamic one, fixed shapes."""

from __future__ import annotations

import pytest
import torch

from elitekv_peft import EliteKVCache, EliteKVStaticCache, set_attention_path

from .tiny import VOCAB, convert, tiny_model


@pytest.fixture(scope="module")
def model():
    return convert(tiny_model("llama_gqa"), kv_ratio=0.25)


def decode(model, cache, ids, mask, prefill):
    """Prefill ``prefill`` tokens, then one token per step; logits of every step ``[B, T, vocab]``."""
    with torch.no_grad():
        steps = [model(ids[:, :prefill], attention_mask=mask[:, :prefill], past_key_values=cache).logits]
        for t in range(prefill, ids.shape[1]):
            steps.append(model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], past_key_values=cache).logits)
    return torch.cat(steps, 1)


@pytest.mark.parametrize("path", ["reconstruct", "absorbed", "auto"])
def test_static_decode_equals_dynamic_decode(model, path):
    set_attention_path(model, path)
    ids = torch.randint(3, VOCAB, (2, 18), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    dynamic = decode(model, EliteKVCache(), ids, mask, prefill=10)
    cache = EliteKVStaticCache(model.config, max_cache_len=24)
    static = decode(model, cache, ids, mask, prefill=10)
    valid = mask.bool()
    assert (static - dynamic)[valid].abs().max().item() < 1e-4
    layer = cache.layers[0]
    assert layer.keys.shape[2] == 24 and layer.values.shape[:3] == (2, 1, 24)
    assert int(layer.get_seq_length()) == 18
    assert torch.count_nonzero(layer.values[:, :, 18:]) == 0  # the tail was never written


def test_generate_with_static_cache(model):
    set_attention_path(model, "auto")
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(5))
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    reference = model.generate(input_ids=ids, **kwargs)
    cache = EliteKVStaticCache(model.config, max_cache_len=20)
    assert torch.equal(model.generate(input_ids=ids, past_key_values=cache, **kwargs), reference)
    spec = model.base_model.model.model.layers[0].self_attn.spec
    per_token = spec.cache_values_per_token() * 4  # float32
    assert cache.memory_bytes() == 2 * 20 * per_token * len(cache.layers)


def test_static_cache_bad_use_raises(model):
    set_attention_path(model, "absorbed")
    cache = EliteKVStaticCache(model.config, max_cache_len=6)
    ids = torch.randint(3, VOCAB, (1, 5))
    with torch.no_grad():
        model(ids, past_key_values=cache)
        with pytest.raises(ValueError, match="larger max_cache_len"):
            model(ids[:, :2], past_key_values=cache)
        with pytest.raises(ValueError, match="new cache for another batch size"):
            model(torch.cat([ids, ids])[:, :1], past_key_values=cache)
