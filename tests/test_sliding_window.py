"""Sliding-window attention layers (issue 20): Mistral with a window, Qwen2 with ``use_sliding_window``, Gemma 2's
local layers. Each converted layer attends to the window the original does, and its cache keeps only that window.

Tiny random models (`tests.test_families_scaled.family_model`) with a window of 8 tokens; every sequence here is longer.

* every method at ``kv_ratio=1``: prefill + one-token steps with the cache give the logits of the *original* model's
  full forward (transformers' own sliding-window mask is the reference);
* at 0.25 (gqa: 0.5): cached greedy ``generate()`` == uncached, prefill + steps == the full forward, and uptrained,
  saved and reloaded models give the same tokens (`check_cached`, `check_save_load` of test_families_scaled);
* the windowed latent layers (`EliteKVSlidingWindowLayer`, `EliteKVStaticSlidingLayer`) hold ``window - 1`` /
  ``min(max_cache_len, window)`` tokens (bytes checked), full layers every token; the pre-allocated cache and the
  absorbed decode path give the dynamic cache's logits.
"""

from __future__ import annotations

import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

from elitekv_peft import EliteKVCache, EliteKVStaticCache, set_attention_path
from elitekv_peft.compat import cache_kwargs
from elitekv_peft.conversion import check_supported
from elitekv_peft.modeling.cache import EliteKVCacheLayer, EliteKVSlidingWindowLayer, EliteKVStaticSlidingLayer

from .family_checks import (
    COMPRESSED,
    EXACT,
    METHODS,
    TOLERANCE,
    check_by_name,
    convert,
    family_test,
    greedy,
    ids_of,
    named_checks,
    stepwise,
)
from .test_families_scaled import FAMILIES, WINDOW, check_cached, check_save_load, family_model

FAMILIES["mistral_window"] = (MistralConfig, MistralForCausalLM, {"sliding_window": WINDOW})
# layer 0 full attention, layer 1 sliding (layers from max_window_layers on use the window)
FAMILIES["qwen2_window"] = (
    Qwen2Config,
    Qwen2ForCausalLM,
    {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1},
)
FAMILIES["phi3_window"] = (*FAMILIES["phi3"][:2], {**FAMILIES["phi3"][2], "sliding_window": WINDOW})
LABELS = {
    "mistral_window": "Mistral, sliding_window 8 (every layer)",
    "qwen2_window": "Qwen2, use_sliding_window (layer 1 of 2)",
}
DEVICES = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]  # the lead runs this file on a GPU too
WINDOWED = {"mistral_window": [True, True], "qwen2_window": [False, True], "gemma2": [True, False]}
UNWINDOWED = {"mistral_window": {"sliding_window": None}, "qwen2_window": {"use_sliding_window": False}}


def check_exact_cached(family: str, method: str) -> None:
    """At ratio 1, prefill (5) + one-token steps with the cache (to 24 tokens) == the original model's full forward."""
    ids = ids_of(2, 24)
    with torch.no_grad():
        expected = family_model(family)(ids).logits
    model = convert(family_model(family), method=method, **EXACT.get(method, {"kv_ratio": 1.0}))
    steps, cache = stepwise(model, ids, prefill=5)
    assert cache.get_seq_length() == ids.shape[1]
    assert torch.allclose(steps, expected, **TOLERANCE), (steps - expected).abs().max().item()


# the checks of the family table for the windowed families ("exact at ratio 1": cached decoding == the original)
CHECKS = named_checks(check_exact_cached, check_cached, check_save_load)
check = check_by_name(CHECKS)  # check(name, family, method): benchmarks/family_table.py runs the table's checks


@pytest.mark.parametrize("family", list(UNWINDOWED))
def test_the_window_changes_the_original(family):
    """The checks mean something: without its window the original model gives other logits on 24 tokens."""
    ids = ids_of(2, 24)
    with torch.no_grad():
        windowed = family_model(family)(ids).logits
        full = family_model(family, **UNWINDOWED[family])(ids).logits
    assert not torch.allclose(windowed, full, atol=1e-3)


test_ratio_one_cached_decoding_reproduces_the_original = family_test(check_exact_cached, [*LABELS, "gemma2"], METHODS)
test_cached_decoding_equals_uncached = family_test(check_cached, LABELS, METHODS)
test_uptrain_save_load_keeps_the_tokens = family_test(check_save_load, LABELS, METHODS)


def layer_bytes(layer) -> int:
    return sum(t.numel() * t.element_size() for t in (layer.keys, layer.values))


@pytest.mark.parametrize("family", list(WINDOWED))
def test_elitekv_cache_keeps_only_the_window(family):
    """After 20 tokens a windowed layer holds the last window - 1 tokens' chunks and latents, a full layer all 20;
    the bytes are exactly those tokens' ``G*2r + d_c`` values."""
    model = convert(family_model(family), kv_ratio=0.25)
    ids = ids_of(2, 20)
    _, cache = stepwise(model, ids, prefill=11)
    for layer_idx, windowed in enumerate(WINDOWED[family]):
        layer = cache.layers[layer_idx]
        spec = model.base_model.model.model.layers[layer_idx].self_attn.spec
        kept = WINDOW - 1 if windowed else ids.shape[1]
        assert type(layer) is (EliteKVSlidingWindowLayer if windowed else EliteKVCacheLayer)
        assert layer.rope_keys.shape == (2, spec.num_kv_heads, kept, spec.rope_dim)
        assert layer.latents.shape == (2, 1, kept, spec.latent_dim)
        assert layer.nbytes() == layer_bytes(layer) == 2 * kept * spec.cache_values_per_token() * 4
        assert layer.get_seq_length() == ids.shape[1]


@pytest.mark.parametrize("method", ["kv_latent", "gqa", "lorc"])
def test_other_methods_cache_only_the_window(method):
    """KV-Latent, GQA and LoRC store their smaller keys / latents in transformers' own sliding layers."""
    model = convert(family_model("mistral_window"), method=method, kv_ratio=COMPRESSED[method])
    _, cache = stepwise(model, ids_of(2, 20), prefill=11)
    assert all(layer.keys.shape[2] == WINDOW - 1 and layer.values.shape[2] == WINDOW - 1 for layer in cache.layers)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", ["mistral_window", "gemma2"])
@pytest.mark.parametrize("path", ["reconstruct", "absorbed"])
def test_static_and_absorbed_equal_the_dynamic_cache(family, path, device):
    """EliteKVStaticCache (windowed layers pre-allocate min(max_cache_len, window) slots) and the absorbed decode path
    give the logits of the dynamic cache on the reconstruct path, past the window, with left padding (valid positions
    compared). On a machine with CUDA also there (the absorbed path then runs the Triton kernel with the window's
    mask)."""
    model = convert(family_model(family), kv_ratio=0.25).to(device)
    ids = ids_of(2, 20).to(device)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0

    def decode(cache):
        with torch.no_grad():
            steps = [model(ids[:, :11], attention_mask=mask[:, :11], **cache_kwargs(cache)).logits]
            for t in range(11, ids.shape[1]):
                out = model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], **cache_kwargs(cache))
                steps.append(out.logits)
        return torch.cat(steps, 1)

    set_attention_path(model, "reconstruct")
    reference = decode(EliteKVCache())
    set_attention_path(model, path)
    static = EliteKVStaticCache(model.config, max_cache_len=32)
    valid = mask.bool()  # the outputs at padding positions are not compared (they attend to nothing real)
    tolerance = TOLERANCE if device == "cpu" else {"atol": 1e-3, "rtol": 1e-3}  # the kernel sums in another order
    assert torch.allclose(decode(static)[valid], reference[valid], **tolerance)
    assert torch.allclose(decode(EliteKVCache())[valid], reference[valid], **tolerance)
    total = 0
    for layer_idx, windowed in enumerate(WINDOWED[family]):
        layer = static.layers[layer_idx]
        spec = model.base_model.model.model.layers[layer_idx].self_attn.spec
        slots = WINDOW if windowed else 32
        assert isinstance(layer, EliteKVStaticSlidingLayer) == windowed
        assert layer.keys.shape[2] == layer.values.shape[2] == slots
        total += 2 * slots * spec.cache_values_per_token() * 4
    assert static.memory_bytes() == total


def test_generate_with_a_windowed_static_cache():
    model = convert(family_model("mistral_window"), kv_ratio=0.25)
    ids = ids_of(2, 10)
    reference = greedy(model, ids, use_cache=True)
    cache = EliteKVStaticCache(model.config, max_cache_len=24)
    with torch.no_grad():
        got = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            **cache_kwargs(cache),
            max_new_tokens=reference.shape[1] - ids.shape[1],
            do_sample=False,
            pad_token_id=0,
        )
    assert torch.equal(got, reference)
    assert cache.get_seq_length() == reference.shape[1] - 1


@pytest.mark.parametrize("method", ["elitekv", "lorc"])
def test_phi3_window_and_partial_rotary(method):
    """Phi-3 with a window on every layer and partial rotary: ratio-1 cached decoding == the original's forward."""
    check_exact_cached("phi3_window", method)


def test_other_layer_types_are_refused_naming_them():
    model = family_model("gemma2")
    model.config.layer_types = ["chunked_attention", "full_attention"]
    with pytest.raises(TypeError, match=r"(?s)chunked_attention.*full_attention.*sliding_attention"):
        check_supported(model, "elitekv")
