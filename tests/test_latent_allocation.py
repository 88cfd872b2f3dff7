"""``latent_allocation="energy"``: the latent budget spread over layers by their factorizations' energy, the same
cache in total, saved and reloaded like the uniform layout, decoded by every path and cache."""

from __future__ import annotations

import itertools

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from elitekv_peft import EliteKVCache, EliteKVConfig, EliteKVStaticCache, set_attention_path
from elitekv_peft.budget import allocate_latents, latent_bounds

from .tiny import VOCAB, convert, decode_logits, tiny_model

LAYERS = 4


def residual(energies, totals, ranks) -> float:
    return sum((t - sum(e[:k])) / t for e, t, k in zip(energies, totals, ranks, strict=True))


def test_allocate_latents_matches_brute_force():
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        energies = [sorted((torch.rand(6, generator=generator) ** 3).tolist(), reverse=True) for _ in range(3)]
        totals = [sum(e) * 1.1 for e in energies]
        low, total = 1, 9
        ranks = allocate_latents(energies, totals, total, low)
        assert sum(ranks) == total and all(low <= k <= 6 for k in ranks)
        best = min(
            residual(energies, totals, combo)
            for combo in itertools.product(range(low, 7), repeat=3)
            if sum(combo) == total
        )
        assert residual(energies, totals, ranks) == pytest.approx(best)


def test_allocate_latents_refuses_an_impossible_budget():
    with pytest.raises(ValueError, match="cannot spread"):
        allocate_latents([[1.0, 0.5], [1.0, 0.5]], [2.0, 2.0], total=5, low=1)
    with pytest.raises(ValueError, match="cannot spread"):
        allocate_latents([[1.0, 0.5], [1.0, 0.5]], [2.0, 2.0], total=1, low=1)


def skewed_model(seed: int = 0):
    """A tiny GQA Llama whose first layer's keys and values are rank 2: that layer needs little latent."""
    model = tiny_model("llama_gqa", seed=seed, layers=LAYERS)
    attn = model.model.layers[0].self_attn
    with torch.no_grad():
        for proj in (attn.k_proj, attn.v_proj):
            U, S, Vh = torch.linalg.svd(proj.weight, full_matrices=False)
            proj.weight.copy_((U[:, :2] * S[:2]) @ Vh[:2])
    return model


@pytest.fixture(scope="module")
def pair():
    ids = torch.randint(3, VOCAB, (8, 64), generator=torch.Generator().manual_seed(2))
    uniform = convert(skewed_model(), kv_ratio=0.25, calibration_data=ids)
    energy = convert(skewed_model(), kv_ratio=0.25, calibration_data=ids, latent_allocation="energy")
    return uniform, energy


def test_energy_allocation_keeps_the_cache_and_lowers_the_error(pair):
    uniform, energy = pair
    u_cfg, e_cfg = uniform.peft_config["default"], energy.peft_config["default"]
    d_c = u_cfg.latent_dim
    assert u_cfg.latent_dims == [d_c] * LAYERS
    assert sum(e_cfg.latent_dims) == d_c * LAYERS  # the same cache in total
    low, high = latent_bounds(d_c, useful=10**9)
    assert all(low <= d <= high for d in e_cfg.latent_dims)
    assert e_cfg.latent_dims[0] == low  # the rank-2 layer gives its budget away
    u_err = sum(e**2 for e in u_cfg.report["lowrank_errors"])
    e_err = sum(e**2 for e in e_cfg.report["lowrank_errors"])
    assert e_err < u_err
    # each layer's module and the config agree
    widths = [layer.self_attn.kv_down_proj.out_features for layer in energy.base_model.model.model.layers]
    assert widths == e_cfg.latent_dims


def test_energy_allocation_is_refused_where_it_does_not_apply():
    with pytest.raises(ValueError, match="decomposition='joint'"):
        EliteKVConfig(kv_ratio=0.25, latent_allocation="energy", decomposition="separate")
    with pytest.raises(ValueError, match="latent_allocation"):
        EliteKVConfig(kv_ratio=0.25, latent_allocation="energy", method="lorc")
    with pytest.raises(ValueError, match="uniform"):
        EliteKVConfig(kv_ratio=0.25, latent_allocation="per-layer")


@pytest.mark.parametrize("path", ["reconstruct", "absorbed"])
def test_layers_of_different_widths_decode_like_the_full_forward(pair, path):
    _, model = pair
    set_attention_path(model, path)
    ids = torch.randint(3, VOCAB, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(ids).logits
    assert (decode_logits(model, EliteKVCache(), ids, 12) - full).abs().max().item() < 1e-4
    static = EliteKVStaticCache(model.base_model.model.config, max_cache_len=24)
    assert (decode_logits(model, static, ids, 12) - full).abs().max().item() < 1e-4
    widths = [layer.values.shape[-1] for layer in static.layers]
    assert widths == model.peft_config["default"].latent_dims
    set_attention_path(model, "auto")


def test_energy_allocated_model_reloads(pair, tmp_path):
    _, model = pair
    with torch.no_grad():  # as uptraining would: loading must restore every weight
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 1e-2)
    ids = torch.randint(3, VOCAB, (2, 16), generator=torch.Generator().manual_seed(7))
    kwargs = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    expected = model.generate(input_ids=ids, **kwargs)
    model.save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    assert "| latent allocation over layers | energy |" in card and "achieved cache size | 0.2500" in card
    assert "per layer, 32 on average (original 128)" in card
    auto = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(auto.generate(input_ids=ids, **kwargs), expected)
    peft = PeftModel.from_pretrained(skewed_model(), tmp_path).eval()
    assert torch.equal(peft.generate(input_ids=ids, **kwargs), expected)
    assert peft.peft_config["default"].latent_dims == model.peft_config["default"].latent_dims
