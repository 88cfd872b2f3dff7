"""Model families and RoPE variants (issue 20): Llama 3.x ``rope_scaling`` for every method (Qwen3 / OLMo2:
tests/test_key_norm_families.py).

Tiny random Llama models (transformers' own `LlamaConfig`) with each RoPE type of `ROPE_TYPES`. Every converted
attention takes its rotary frequencies from the model's own rotary module (the ``position_embeddings`` it is
given), so the scaled frequencies and YaRN's attention factor come with them. Checked per RoPE type and method:

* ``kv_ratio=1`` (EliteKV: all chunks kept) reproduces the original logits (``atol = rtol = 1e-4``);
* at 0.25 (GQA: 0.5): cached greedy ``generate()`` == uncached, and prefill + one-token steps == the full forward;
* ``save_pretrained`` -> ``AutoModelForCausalLM.from_pretrained`` keeps the RoPE parameters and the greedy tokens.

YaRN multiplies ``cos`` and ``sin`` by an attention factor, so the original scores carry its square on every dim;
EliteKV's unrotated (NoPE) dims must carry it too (`test_yarn_partial_rope_keeps_the_attention_factor`).

`check` runs one check by name; `benchmarks/family_table.py` runs the same checks to write ``docs/families.md``.
"""

from __future__ import annotations

import tempfile
import warnings

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

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
    tiny,
)

ROPE_TYPES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 4.0},
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 512},
    "llama3": {
        "rope_type": "llama3",
        "rope_theta": 10000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 512,
    },
}


def llama(rope: str, seed: int = 2) -> torch.nn.Module:
    """A tiny random Llama with the RoPE parameters ``ROPE_TYPES[rope]``."""
    return tiny(LlamaConfig, LlamaForCausalLM, seed, rope_parameters=dict(ROPE_TYPES[rope]))


def check_exact(rope: str, method: str) -> None:
    """At ratio 1 the converted model's logits are the original's."""
    ids = ids_of(2, 24)
    with torch.no_grad():
        expected = llama(rope)(ids).logits
        got = convert(llama(rope), method=method, **EXACT.get(method, {"kv_ratio": 1.0}))(ids).logits
    assert torch.allclose(got, expected, **TOLERANCE), (got - expected).abs().max().item()


def check_cached(rope: str, method: str) -> None:
    """Compressed: greedy generate() with the cache == without it, and prefill + one-token steps == full forward."""
    model = convert(llama(rope), method=method, kv_ratio=COMPRESSED[method])
    ids = ids_of(2, 10)
    assert torch.equal(greedy(model, ids, use_cache=True), greedy(model, ids, use_cache=False))
    ids = ids_of(2, 18)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
    steps, cache = stepwise(model, ids, prefill=11)
    assert cache.get_seq_length() == ids.shape[1]
    assert torch.allclose(steps, full, **TOLERANCE)


def check_save_load(rope: str, method: str) -> None:
    """save_pretrained -> AutoModelForCausalLM.from_pretrained: same RoPE parameters, same greedy tokens."""
    model = convert(llama(rope), method=method, kv_ratio=COMPRESSED[method])
    ids = ids_of(2, 10)
    with tempfile.TemporaryDirectory() as folder:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.save_pretrained(folder)
            reloaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert reloaded.config.rope_parameters["rope_type"] == ROPE_TYPES[rope]["rope_type"]
    assert reloaded.model.rotary_emb.attention_scaling == model.base_model.model.model.rotary_emb.attention_scaling
    assert torch.equal(greedy(reloaded, ids, use_cache=True), greedy(model, ids, use_cache=True))


CHECKS = named_checks(check_exact, check_cached, check_save_load)
SAVE_LOAD_ROPES = ["llama3", "yarn"]  # the RoPE types whose save/load runs (the others share its code)
check = check_by_name(CHECKS)  # check(name, rope, method): benchmarks/family_table.py runs the table's checks

test_ratio_one_reproduces_the_original = family_test(check_exact, ROPE_TYPES, METHODS)
test_cached_decoding_equals_uncached = family_test(check_cached, ROPE_TYPES, METHODS)
test_save_load_keeps_the_tokens = family_test(check_save_load, SAVE_LOAD_ROPES, METHODS)


def test_yarn_partial_rope_keeps_the_attention_factor():
    """EliteKV at full latent rank with 8 of 16 chunks rotated == the original YaRN model whose other chunks keep
    YaRN's amplitude (cos = attention factor, sin = 0) without rotating. Fails if the NoPE dims lose the factor."""
    model = convert(llama("yarn"), kv_ratio=None, rope_chunks=8, latent_dim=64, selection="high")
    chunks = model.base_model.model.model.layers[0].self_attn.chunk_index  # [G, r]
    assert all(
        torch.equal(layer.self_attn.chunk_index, chunks[:1].expand_as(chunks))
        for layer in model.base_model.model.model.layers
    )
    reference = llama("yarn")
    factor = reference.model.rotary_emb.attention_scaling
    assert factor > 1.05  # the check below means something only when the factor is not 1
    rotary_forward = reference.model.rotary_emb.forward
    dropped = torch.ones(16, dtype=torch.bool)
    dropped[chunks[0]] = False
    dims = torch.cat((dropped, dropped))  # [D]: the unrotated dims

    def partial_rope(x, position_ids):
        cos, sin = rotary_forward(x, position_ids)
        cos, sin = cos.clone(), sin.clone()
        cos[..., dims], sin[..., dims] = factor, 0.0
        return cos, sin

    reference.model.rotary_emb.forward = partial_rope
    ids = ids_of(2, 24)
    with torch.no_grad():
        expected = reference(ids).logits
        got = model(ids).logits
    assert torch.allclose(got, expected, **TOLERANCE), (got - expected).abs().max().item()
