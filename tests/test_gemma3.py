"""Gemma 3 text models (issue 20): q/k norms with Gemma's ``1 + weight``, ``query_pre_attn_scalar``, alternating
sliding-window / global layers, and two rotary bases (local layers rotate with ``rope_local_base_freq``: transformers'
``Gemma3TextModel`` passes each layer the tables of its layer type).

A tiny random model from transformers' own `Gemma3TextConfig` / `Gemma3ForCausalLM` (2 layers: a sliding-window (8)
layer then a global one, local base 10,000 and global base 1,000,000, ``query_pre_attn_scalar=24``), q/k norm
weights drawn so that the effective ``1 + w`` lies in [0.5, 2). Every method goes through the attention of
`elitekv_peft.modeling.key_norm` (``gemma3_text`` normalises per head) with the checks of
`tests.test_families_scaled`: ``kv_ratio=1`` reproduces the original logits (EliteKV: every chunk rotated); at 0.25
(GQA: 0.5) cached greedy ``generate()`` == uncached and prefill + one-token steps == the full forward, on 20 tokens
(beyond the window); after two uptraining steps ``save_pretrained`` -> ``AutoModelForCausalLM``,
``PeftModel.from_pretrained`` and ``trust_remote_code`` without the package give the same tokens.

`check` runs one check by name; `benchmarks/family_table.py` runs the same checks for docs/families.md.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig

from elitekv_peft.calibration import collect_attention_inputs
from elitekv_peft.compat import output_cache
from elitekv_peft.modeling.cache import EliteKVCacheLayer, EliteKVSlidingWindowLayer

from . import test_families_scaled as scaled
from .family_checks import COMPRESSED, EXACT, METHODS, TOLERANCE, check_by_name, convert, family_test, ids_of

WINDOW = scaled.WINDOW
LOCAL_BASE, GLOBAL_BASE = 10_000.0, 1_000_000.0


def gemma3_model(config: Gemma3TextConfig) -> Gemma3ForCausalLM:
    """`Gemma3ForCausalLM` with its q/k norm weights drawn from [-0.5, 1) (effective ``1 + w`` in [0.5, 2))."""
    model = Gemma3ForCausalLM(config)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for layer in model.model.layers:
            for norm in (layer.self_attn.q_norm, layer.self_attn.k_norm):
                norm.weight.copy_(-0.5 + 1.5 * torch.rand(norm.weight.shape, generator=generator))
    return model


GEMMA3: dict[str, Any] = {
    "query_pre_attn_scalar": 24,
    "sliding_window": WINDOW,
    "layer_types": ["sliding_attention", "full_attention"],
    "rope_parameters": {
        "sliding_attention": {"rope_type": "default", "rope_theta": LOCAL_BASE},
        "full_attention": {"rope_type": "default", "rope_theta": GLOBAL_BASE},
    },
}
# registered with the shared checks (`scaled.family_model` builds every family from this table)
scaled.FAMILIES["gemma3"] = (Gemma3TextConfig, gemma3_model, GEMMA3)
GEMMA3_TYPES = ("sliding_attention", "full_attention")
LABELS = {"gemma3": "Gemma 3 (q/k norms, query_pre_attn_scalar, local / global layers, two rotary bases)"}
CHECKS = scaled.CHECKS
check = check_by_name(CHECKS)  # check(name, "gemma3", method): benchmarks/family_table.py runs the table's checks


def family_model(seed: int = 2, **overrides: Any) -> torch.nn.Module:
    return scaled.family_model("gemma3", seed, **overrides)


def attention_of(model: torch.nn.Module, layer: int) -> torch.nn.Module:
    return model.base_model.model.model.layers[layer].self_attn


test_ratio_one_reproduces_the_original = family_test(scaled.check_exact, "gemma3", METHODS)
test_cached_decoding_equals_uncached = family_test(scaled.check_cached, "gemma3", METHODS)
test_uptrain_save_load_keeps_the_tokens = family_test(scaled.check_save_load, "gemma3", METHODS)


def test_remote_code_loads_every_method_without_the_package():
    scaled.check_remote_code("gemma3", METHODS)


@pytest.mark.parametrize(
    "changed",
    [
        {"rope_parameters": {kind: {"rope_type": "default", "rope_theta": GLOBAL_BASE} for kind in GEMMA3_TYPES}},
        {"query_pre_attn_scalar": 32},
        {"sliding_window": 64},
    ],
    ids=["one_rotary_base", "head_dim_scale", "no_window"],
)
def test_the_family_detail_changes_the_original(changed):
    """The checks above mean something: the local rotary base, the scale and the window each change the logits."""
    ids = ids_of(2, 24)
    with torch.no_grad():
        assert not torch.allclose(family_model()(ids).logits, family_model(**changed)(ids).logits, atol=1e-3)


def test_the_norm_weights_change_the_original():
    """Gemma's ``1 + weight``: the drawn norm weights (not zero, the initial value) change the logits."""
    model, ids = family_model(), ids_of(2, 24)
    with torch.no_grad():
        drawn = model(ids).logits
        for layer in model.model.layers:
            layer.self_attn.q_norm.weight.zero_()
            layer.self_attn.k_norm.weight.zero_()
        assert not torch.allclose(drawn, model(ids).logits, atol=1e-3)


@pytest.mark.parametrize("method", METHODS)
def test_every_layer_gets_the_normed_attention_and_its_window(method):
    model = convert(family_model(), method=method, kv_ratio=COMPRESSED[method])
    for layer, window in enumerate([WINDOW, None]):
        attn = attention_of(model, layer)
        assert type(attn).__name__.startswith("Normed"), type(attn).__name__
        assert attn.sliding_window == window and attn.scaling == pytest.approx(24**-0.5)


def test_elitekv_cache_keeps_the_window_and_the_key_scales():
    """After 20 tokens the local layer holds the last window - 1 tokens, the global one all 20; both hold the latent
    then one key scale per KV head (not every chunk is rotated at 0.25)."""
    model = convert(family_model(), method="elitekv", kv_ratio=0.25)
    with torch.no_grad():
        cache = output_cache(model(ids_of(2, 20), use_cache=True))
    for layer, (kind, kept) in enumerate([(EliteKVSlidingWindowLayer, WINDOW - 1), (EliteKVCacheLayer, 20)]):
        attn = attention_of(model, layer)
        assert type(cache.layers[layer]) is kind
        assert attn.scale_values == 2
        assert cache.layers[layer].values.shape == (2, 1, kept, attn.spec.latent_dim + 2)


def rotary_tables(base: float, length: int, head_dim: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos``, ``sin`` ``[length, head_dim]`` of default RoPE with ``base``, computed here from the definition."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim)
    angles = torch.arange(length, dtype=torch.float)[:, None] * inv_freq
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def test_calibration_records_each_layers_rotary_tables():
    """EliteKV's chunk search scores each layer with the tables the model gave it: the local base on the sliding
    layer, the global base on the other; layer by layer calibration (sliding mask, per-type tables) records the same
    inputs and tables as the whole-model pass, on sequences longer than the window."""
    model, tokens = family_model(), ids_of(3, 24)
    calib = collect_attention_inputs(model, model.model.layers, tokens, batch_size=2, progress=False)
    for layer, base in enumerate([LOCAL_BASE, GLOBAL_BASE]):
        for got, expected in zip(calib.rotary(layer), rotary_tables(base, 24), strict=True):
            assert torch.allclose(got, expected, atol=1e-5)
    from elitekv_peft.calibration import collect_attention_inputs_layerwise

    layerwise = collect_attention_inputs_layerwise(model.model, tokens, 2, "cpu", progress=False)
    for layer in range(2):
        assert torch.allclose(layerwise.inputs[layer], calib.inputs[layer], atol=1e-5)
        for got, expected in zip(layerwise.rotary(layer), calib.rotary(layer), strict=True):
            assert torch.equal(got, expected)


@pytest.mark.parametrize("method", METHODS)
def test_linear_scaling_on_the_global_layers_is_exact_at_ratio_one(method):
    """Gemma 3 (4B and larger) scales the global layers' RoPE linearly (factor 8) and not the local ones."""
    rope = {
        "sliding_attention": {"rope_type": "default", "rope_theta": LOCAL_BASE},
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": GLOBAL_BASE},
    }
    ids = ids_of(2, 24)
    with torch.no_grad():
        expected = family_model(rope_parameters=rope)(ids).logits
        model = convert(family_model(rope_parameters=rope), method=method, **EXACT.get(method, {"kv_ratio": 1.0}))
        got = model(ids).logits
    assert torch.allclose(got, expected, **TOLERANCE), (got - expected).abs().max().item()
