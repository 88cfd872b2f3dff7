"""rope_allocation="sensitivity" (issue 18's per-layer budgets): rotary chunks spread over layers by the RoPElite
search's errors, the cache size unchanged; layers of different ``r`` decode, save and load like uniform ones."""

from __future__ import annotations

import itertools

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from elitekv_peft import EliteKVCache, EliteKVConfig, EliteKVStaticCache, cache_nbytes, set_attention_path
from elitekv_peft.budget import allocate_rope_chunks, rope_chunk_bounds

from .tiny import VOCAB, convert, decode_logits, tiny_model

LAYERS = 4


def test_allocate_rope_chunks_matches_brute_force():
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):  # convex error curves (falling by less each round), as the greedy search's are
        drops = [sorted(torch.rand(5, generator=generator).tolist(), reverse=True) for _ in range(3)]
        errors = [[sum(d[k + 1 :]) for k in range(5)] for d in drops]  # error after 1..5 chunks
        counts = allocate_rope_chunks(errors, total=9, low=1)
        assert sum(counts) == 9 and all(1 <= k <= 5 for k in counts)
        best = min(
            sum(e[k - 1] for e, k in zip(errors, combo, strict=True))
            for combo in itertools.product(range(1, 6), repeat=3)
            if sum(combo) == 9
        )
        assert sum(e[k - 1] for e, k in zip(errors, counts, strict=True)) == pytest.approx(best)
    with pytest.raises(ValueError, match="cannot spread"):
        allocate_rope_chunks([[1.0, 0.5], [1.0, 0.5]], total=5, low=1)
    assert rope_chunk_bounds(4, 64) == (2, 8) and rope_chunk_bounds(1, 64) == (1, 2)
    assert rope_chunk_bounds(16, 32) == (8, 16)


def sensitive_model(seed: int = 0):
    """A tiny GQA Llama whose first layer's queries are 4x larger: dropping RoPE changes its scores most."""
    model = tiny_model("llama_gqa", seed=seed, layers=LAYERS)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight.mul_(4.0)
    return model


@pytest.fixture(scope="module")
def pair():
    ids = torch.randint(3, VOCAB, (8, 64), generator=torch.Generator().manual_seed(2))
    uniform = convert(sensitive_model(), kv_ratio=0.25, calibration_data=ids)
    spread = convert(sensitive_model(), kv_ratio=0.25, calibration_data=ids, rope_allocation="sensitivity")
    return uniform, spread


def test_sensitivity_spreads_the_chunks_and_keeps_the_cache(pair):
    uniform, spread = pair
    u_cfg, s_cfg = uniform.peft_config["default"], spread.peft_config["default"]
    r = u_cfg.rope_chunks
    counts = [len(layer[0]) for layer in s_cfg.chunk_indices]
    low, high = rope_chunk_bounds(r, 32)
    assert sum(counts) == r * LAYERS and all(low <= k <= high for k in counts)
    assert counts[0] == high  # the layer whose scores RoPE moves most keeps the most chunks
    assert s_cfg.rope_chunks == r and s_cfg.latent_dims == u_cfg.latent_dims
    modules = [layer.self_attn for layer in spread.base_model.model.model.layers]
    assert [m.spec.rope_chunks for m in modules] == counts
    ids = torch.randint(3, VOCAB, (1, 10))
    with torch.no_grad():
        sizes = [cache_nbytes(m(ids, use_cache=True).past_key_values) for m in (uniform, spread)]
    assert sizes[0] == sizes[1]  # the same cache in total
    assert spread.peft_config["default"].report["kv_ratio_achieved"] == pytest.approx(0.25)


def test_sensitivity_is_refused_where_it_does_not_apply():
    with pytest.raises(ValueError, match="selection='elite'"):
        EliteKVConfig(kv_ratio=0.25, rope_allocation="sensitivity", selection="high")
    with pytest.raises(ValueError, match="latent_allocation='uniform'"):
        EliteKVConfig(kv_ratio=0.25, rope_allocation="sensitivity", latent_allocation="energy")
    with pytest.raises(ValueError, match="rope_allocation applies to method='elitekv'"):
        EliteKVConfig(kv_ratio=0.25, rope_allocation="sensitivity", method="lorc")


@pytest.mark.parametrize("path", ["reconstruct", "absorbed"])
def test_layers_of_different_r_decode_like_the_full_forward(pair, path):
    _, model = pair
    set_attention_path(model, path)
    ids = torch.randint(3, VOCAB, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(ids).logits
    assert (decode_logits(model, EliteKVCache(), ids, 12) - full).abs().max().item() < 1e-4
    static = EliteKVStaticCache(model.base_model.model.config, max_cache_len=24)
    assert (decode_logits(model, static, ids, 12) - full).abs().max().item() < 1e-4
    rotated = [layer.keys.shape[-1] for layer in static.layers]
    assert rotated == [2 * len(layer[0]) for layer in model.peft_config["default"].chunk_indices]
    set_attention_path(model, "auto")


def test_sensitivity_allocated_model_reloads(pair, tmp_path):
    _, model = pair
    with torch.no_grad():  # as uptraining would: loading must restore every weight
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 1e-2)
    ids = torch.randint(3, VOCAB, (2, 16), generator=torch.Generator().manual_seed(7))
    kwargs = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    expected = model.generate(input_ids=ids, **kwargs)
    model.save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    counts = [len(layer[0]) for layer in model.peft_config["default"].chunk_indices]
    assert f"| rotary chunks kept per head (r) | {min(counts)}-{max(counts)} per layer, 2 on average |" in card
    assert "| rotary chunks over layers | sensitivity |" in card and "achieved cache size | 0.2500" in card
    auto = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(auto.generate(input_ids=ids, **kwargs), expected)
    peft = PeftModel.from_pretrained(sensitive_model(), tmp_path).eval()
    assert torch.equal(peft.generate(input_ids=ids, **kwargs), expected)
    assert peft.peft_config["default"].chunk_indices == model.peft_config["default"].chunk_indices


def family_builders():
    from . import test_families, test_families_scaled, test_key_norm_families

    return {
        "qwen3": lambda: test_key_norm_families.family_model("qwen3"),  # key norms: the search on normalised scores
        "olmo2": lambda: test_key_norm_families.family_model("olmo2"),
        "phi3": lambda: test_families_scaled.family_model("phi3"),  # partial rotary, fused qkv_proj
        "llama-yarn": lambda: test_families.llama("yarn"),  # the attention factor on the NoPE dims
    }


@pytest.mark.parametrize("family", ["qwen3", "olmo2", "phi3", "llama-yarn"])
def test_sensitivity_on_other_families_decodes_and_reloads(family, tmp_path):
    build = family_builders()[family]
    ids = torch.randint(3, VOCAB, (2, 20), generator=torch.Generator().manual_seed(3))
    model = convert(build(), kv_ratio=0.25, rope_allocation="sensitivity")
    counts = [len(layer[0]) for layer in model.peft_config["default"].chunk_indices]
    assert sum(counts) == model.peft_config["default"].rope_chunks * len(counts)
    with torch.no_grad():
        full = model(ids).logits
    assert (decode_logits(model, EliteKVCache(), ids, 12) - full).abs().max().item() < 1e-4
    model.save_pretrained(tmp_path)
    auto = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.allclose(auto(ids).logits, full, atol=1e-5, rtol=1e-5)
