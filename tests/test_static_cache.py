"""The pre-allocated latent cache (`EliteKVStaticCache`): same results as the dynamic one, fixed shapes."""

from __future__ import annotations

import pytest
import torch

from elitekv_peft import EliteKVCache, EliteKVStaticCache, set_attention_path
from elitekv_peft.compat import cache_kwargs

from .tiny import VOCAB, convert, tiny_model


@pytest.fixture(scope="module")
def model():
    return convert(tiny_model("llama_gqa"), kv_ratio=0.25)


def decode(model, cache, ids, mask, prefill):
    """Prefill ``prefill`` tokens, then one token per step; logits of every step ``[B, T, vocab]``."""
    with torch.no_grad():
        steps = [model(ids[:, :prefill], attention_mask=mask[:, :prefill], **cache_kwargs(cache)).logits]
        for t in range(prefill, ids.shape[1]):
            steps.append(model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], **cache_kwargs(cache)).logits)
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
    assert torch.equal(model.generate(input_ids=ids, **cache_kwargs(cache), **kwargs), reference)
    spec = model.base_model.model.model.layers[0].self_attn.spec
    per_token = spec.cache_values_per_token() * 4  # float32
    assert cache.memory_bytes() == 2 * 20 * per_token * len(cache.layers)


def test_static_cache_bad_use_raises(model):
    set_attention_path(model, "absorbed")
    cache = EliteKVStaticCache(model.config, max_cache_len=6)
    ids = torch.randint(3, VOCAB, (1, 5))
    with torch.no_grad():
        model(ids, **cache_kwargs(cache))
        with pytest.raises(ValueError, match="larger max_cache_len"):
            model(ids[:, :2], **cache_kwargs(cache))
        with pytest.raises(ValueError, match="new cache for another batch size"):
            model(torch.cat([ids, ids])[:, :1], **cache_kwargs(cache))


def _decode_steps(model, step, ids, prefill: int) -> torch.Tensor:
    """Eager prefill into a fresh static cache, then one-token steps through ``step``; logits ``[B, T, vocab]``."""
    cache = EliteKVStaticCache(model.config, max_cache_len=ids.shape[1] + 2)
    with torch.no_grad():
        logits = [model(ids[:, :prefill], **cache_kwargs(cache)).logits]
        for t in range(prefill, ids.shape[1]):
            position = torch.full((ids.shape[0], 1), t)
            out = step(input_ids=ids[:, t : t + 1], **cache_kwargs(cache), position_ids=position, use_cache=True)
            logits.append(out.logits)
    return torch.cat(logits, 1)


def _compiled_equals_eager(model, backend) -> int:
    """Compile the absorbed decode step over `EliteKVStaticCache` (whole graph); check it equals eager; graphs made."""
    set_attention_path(model, "absorbed_reference")  # the PyTorch reference on the latent, in any environment
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.lookup_backend(backend)(gm, example_inputs)

    try:
        ids = torch.randint(3, VOCAB, (2, 13), generator=torch.Generator().manual_seed(6))
        eager = _decode_steps(model, model, ids, prefill=8)
        torch._dynamo.reset()
        compiled = torch.compile(model.forward, backend=counting, fullgraph=True, dynamic=False)
        out = _decode_steps(model, compiled, ids, prefill=8)
    finally:
        torch._dynamo.reset()
    assert (out - eager).abs().max().item() < 1e-5
    return len(graphs)


def test_compiled_static_decode_equals_eager(model):
    """`torch.compile(fullgraph=True)` traces the absorbed step with the static latent cache: no graph break, one
    graph for all steps (the filled length is a tensor, so nothing recompiles), same logits as eager."""
    assert _compiled_equals_eager(model, "aot_eager") == 1


@pytest.mark.slow
def test_inductor_static_decode_equals_eager(model):
    """The same with Inductor (CPU code generation; ~30 s)."""
    assert _compiled_equals_eager(model, "inductor") == 1
