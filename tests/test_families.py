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
from typing import Any

import pytest
import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from elitekv_peft import EliteKVConfig
from elitekv_peft.compat import cache_kwargs, output_cache

VOCAB = 128

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
METHODS = ["elitekv", "lorc", "kv_latent", "gqa"]
COMPRESSED = {"elitekv": 0.25, "lorc": 0.25, "kv_latent": 0.25, "gqa": 0.5}
EXACT = {"elitekv": {"kv_ratio": 1.0, "rope_chunks": 16, "selection": "high"}}  # others: kv_ratio=1.0
TOLERANCE = {"atol": 1e-4, "rtol": 1e-4}
NEW_TOKENS = 8


def ids_of(batch: int, length: int, seed: int = 11) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def tiny(config_cls: Any, model_cls: Any, seed: int = 2, **overrides: Any) -> torch.nn.Module:
    """A tiny random causal LM from transformers' own config class: 2 layers, hidden 64, 4 query heads and 2 KV
    heads of dim 32; queries and keys sharpened (x4) so that attention is not near-uniform."""
    settings: dict[str, Any] = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(seed)
    model = model_cls(config_cls(**{**settings, **overrides})).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(4.0)
            layer.self_attn.k_proj.weight.mul_(4.0)
    return model


def llama(rope: str, seed: int = 2) -> torch.nn.Module:
    """A tiny random Llama with the RoPE parameters ``ROPE_TYPES[rope]``."""
    return tiny(LlamaConfig, LlamaForCausalLM, seed, rope_parameters=dict(ROPE_TYPES[rope]))


def convert(model: torch.nn.Module, **config_kwargs: Any) -> torch.nn.Module:
    """`get_peft_model` with an `EliteKVConfig`, calibrated on random ids ``[4, 64]``."""
    generator = torch.Generator().manual_seed(1)
    config_kwargs.setdefault("calibration_data", torch.randint(3, VOCAB, (4, 64), generator=generator))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(model, EliteKVConfig(**config_kwargs)).eval()


def greedy(model: torch.nn.Module, ids: torch.Tensor, use_cache: bool) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            use_cache=use_cache,
            pad_token_id=0,
        )


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
        out = model(ids[:, :11], use_cache=True)
        cache, steps = output_cache(out), [out.logits]
        for t in range(11, ids.shape[1]):
            out = model(ids[:, t : t + 1], use_cache=True, **cache_kwargs(cache))
            steps.append(out.logits)
    assert cache.get_seq_length() == ids.shape[1]
    assert torch.allclose(torch.cat(steps, dim=1), full, **TOLERANCE)


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


CHECKS = {"converts, exact at ratio 1": check_exact, "cached == uncached": check_cached, "save/load": check_save_load}


def check(name: str, rope: str, method: str) -> None:
    """Run the check ``name`` (a key of `CHECKS`) on a tiny Llama with RoPE ``rope`` converted with ``method``."""
    CHECKS[name](rope, method)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("rope", list(ROPE_TYPES))
def test_ratio_one_reproduces_the_original(rope, method):
    check_exact(rope, method)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("rope", list(ROPE_TYPES))
def test_cached_decoding_equals_uncached(rope, method):
    check_cached(rope, method)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("rope", ["llama3", "yarn"])
def test_save_load_keeps_the_tokens(rope, method):
    check_save_load(rope, method)


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
