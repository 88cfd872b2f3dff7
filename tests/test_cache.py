"""Issue 2, items 1 and 3: cache bytes against DynamicCache; incremental decoding equals a full forward."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from elitekv_peft import EliteKVCache, EliteKVCacheLayer, cache_nbytes
from elitekv_peft.compat import cache_kwargs, output_cache

from .tiny import VOCAB, convert, tiny_model


def dynamic_cache_bytes(model, ids):
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, **cache_kwargs(cache), use_cache=True)
    return cache_nbytes(cache)


@pytest.mark.parametrize("kv_ratio", [0.5, 0.25, 0.125])
def test_separate_latent_caches_the_same_bytes_as_the_joint_one(kv_ratio):
    """S-LRD splits the latent between keys and values; per token it stores what J-LRD stores, so the largest batch
    measured for J-LRD holds for it too."""
    ids = torch.randint(3, VOCAB, (2, 64), generator=torch.Generator().manual_seed(0))
    stored = {}
    for layout in ("joint", "separate"):
        model = convert(tiny_model("llama_gqa"), kv_ratio=kv_ratio, decomposition=layout)
        with torch.no_grad():
            stored[layout] = cache_nbytes(model(ids, use_cache=True).past_key_values)
    assert stored["separate"] == stored["joint"] > 0


@pytest.mark.parametrize("family", ["llama_mha", "llama_gqa"])
@pytest.mark.parametrize("kv_ratio", [0.5, 0.25, 0.125])
def test_cache_bytes_within_ratio(family, kv_ratio):
    ids = torch.randint(3, VOCAB, (2, 512), generator=torch.Generator().manual_seed(0))
    full = dynamic_cache_bytes(tiny_model(family), ids)
    model = convert(tiny_model(family), kv_ratio=kv_ratio)
    with torch.no_grad():
        out = model(ids, use_cache=True)
    cache = out.past_key_values
    assert all(isinstance(layer, EliteKVCacheLayer) for layer in cache.layers)
    measured = cache_nbytes(cache) / full
    config = model.base_model.model.config
    G, D = config.num_key_value_heads, config.head_dim
    one_chunk = 2 / (2 * G * D)  # one rotated chunk of one head, as a fraction of the full cache
    assert measured <= kv_ratio + 1e-12
    assert measured >= kv_ratio - one_chunk
    # what is stored really is the rotated chunks and the latent
    layer = cache.layers[0]
    r = len(config.elitekv["chunk_indices"][0][0])
    assert layer.rope_keys.shape == (2, G, 512, 2 * r)
    assert layer.latents.shape == (2, 1, 512, config.elitekv["latent_dims"][0])


@pytest.mark.parametrize("family", ["llama_mha", "llama_gqa", "qwen2_gqa", "mistral_gqa"])
def test_incremental_decode_matches_full_forward(family):
    model = convert(tiny_model(family), kv_ratio=0.25)
    ids = torch.randint(3, VOCAB, (2, 48), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids).logits
        cache = EliteKVCache()
        step = model(ids[:, :32], **cache_kwargs(cache), use_cache=True)
        logits = [step.logits]
        for t in range(32, 48):
            step = model(ids[:, t : t + 1], **cache_kwargs(cache), use_cache=True)
            logits.append(step.logits)
    incremental = torch.cat(logits, dim=1)
    assert (incremental - full).abs().max().item() < 1e-4
    assert cache.get_seq_length() == 48
    assert cache.memory_bytes() == cache_nbytes(cache) > 0


def test_incremental_decode_with_left_padding():
    model = convert(tiny_model("llama_gqa"), kv_ratio=0.25)
    ids = torch.randint(3, VOCAB, (2, 40), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[0, :7] = 0  # row 0 is left-padded by 7 tokens
    ids = ids.masked_fill(mask == 0, 0)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        full = model(ids, attention_mask=mask, position_ids=positions).logits
        cache = EliteKVCache()
        step = model(
            ids[:, :24],
            attention_mask=mask[:, :24],
            position_ids=positions[:, :24],
            **cache_kwargs(cache),
            use_cache=True,
        )
        logits = [step.logits]
        for t in range(24, 40):
            step = model(
                ids[:, t : t + 1],
                attention_mask=mask[:, : t + 1],
                position_ids=positions[:, t : t + 1],
                **cache_kwargs(cache),
                use_cache=True,
            )
            logits.append(step.logits)
    incremental = torch.cat(logits, dim=1)
    valid = mask.bool()
    assert (incremental - full)[valid].abs().max().item() < 1e-4


def test_generate_uses_latent_cache_and_matches_no_cache():
    model = convert(tiny_model("llama_gqa"), kv_ratio=0.125)
    ids = torch.randint(3, VOCAB, (2, 16), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    kwargs = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    cached = model.generate(input_ids=ids, use_cache=True, return_dict_in_generate=True, **kwargs)
    uncached = model.generate(input_ids=ids, use_cache=False, **kwargs)
    assert torch.equal(cached.sequences, uncached)
    assert all(isinstance(layer, EliteKVCacheLayer) for layer in cached.past_key_values.layers)


@pytest.mark.parametrize("family, window", [("llama_gqa", None), ("mistral_gqa", 6)])
def test_cache_implementation_static_gives_the_latent_static_cache(family, window):
    """``generate(cache_implementation="static")`` (transformers' `StaticCache`, with which it compiles the decode
    step on CUDA): its empty layers become pre-allocated latent layers of the same length, same tokens."""
    from elitekv_peft.modeling.cache import EliteKVStaticLayer, EliteKVStaticSlidingLayer

    overrides = {} if window is None else {"sliding_window": window}
    model = convert(tiny_model(family, **overrides), kv_ratio=0.25)
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    dynamic = model.generate(input_ids=ids, **kwargs)
    static = model.generate(input_ids=ids, cache_implementation="static", **kwargs)
    assert torch.equal(static.sequences, dynamic.sequences)
    kind = EliteKVStaticLayer if window is None else EliteKVStaticSlidingLayer
    layers = output_cache(static).layers
    assert all(type(layer) is kind for layer in layers)
    assert layers[0].values.shape[2] == (16 if window is None else window)  # generate sizes it 9 + 8 - 1, or the window


def test_a_cache_layer_holding_full_keys_is_refused_with_a_clear_message():
    from transformers import StaticCache

    model = convert(tiny_model("llama_gqa"), kv_ratio=0.25)
    ids = torch.randint(3, VOCAB, (1, 8))
    cache = StaticCache(config=model.base_model.model.config, max_cache_len=32)
    cache.layers[0].lazy_initialization(torch.zeros(1, 2, 1, 32), torch.zeros(1, 2, 1, 32))  # full keys/values
    with pytest.raises(TypeError, match="EliteKVCache"):
        model(ids, **cache_kwargs(cache), use_cache=True)


class _NoStream:
    """Stands in for a CUDA stream on the CPU: transformers' offloading cache only orders streams with it."""

    def wait_stream(self, other: object) -> None:
        pass

    def __enter__(self) -> _NoStream:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


@pytest.mark.parametrize("method", ["elitekv", "lorc"])
def test_an_offloading_cache_offloads_every_layer(monkeypatch, method):
    """``generate(cache_implementation="offloaded")`` moves each layer to the CPU after its update (CUDA only, so
    the streams are stubbed here). The latent layers were written past the cache, so they stayed on the GPU."""
    model = convert(tiny_model("llama_gqa"), method=method, kv_ratio=0.25)
    monkeypatch.setattr(torch.cuda, "default_stream", lambda device=None: _NoStream())
    cache = DynamicCache(config=model.config, offloading=True)
    cache.prefetch_stream = _NoStream()
    offloaded = []
    monkeypatch.setattr(type(cache), "offload", lambda self, idx, only_non_sliding=True: offloaded.append(idx))
    ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids).logits
        model(ids[:, :5], **cache_kwargs(cache), use_cache=True)
        last = model(ids[:, 5:], **cache_kwargs(cache), use_cache=True).logits
    assert offloaded == [0, 1, 0, 1]
    torch.testing.assert_close(last[:, -1], full[:, -1], rtol=1e-4, atol=1e-4)
