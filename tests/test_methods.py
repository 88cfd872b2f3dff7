"""The other methods on the same API (issue 4): KV-Latent, LoRC and GQA via `EliteKVConfig(method=...)`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, DynamicCache

from elitekv_peft import EliteKVConfig, cache_nbytes
from elitekv_peft.compat import cache_kwargs
from elitekv_peft.methods import kv_latent, lorc
from elitekv_peft.modeling.attention_lowrank import LowRankKVAttention
from elitekv_peft.modeling.attention_small_heads import SmallHeadAttention

from .tiny import VOCAB, convert, tiny_model

# (method, kv_ratio) pairs every tiny model (2 or 4 KV heads of dim 32) can reach
SETTINGS = [
    ("kv_latent", 0.5),
    ("kv_latent", 0.25),
    ("kv_latent", 0.125),
    ("lorc", 0.5),
    ("lorc", 0.25),
    ("lorc", 0.125),
    ("gqa", 0.5),
]
FAMILIES = ["llama_mha", "llama_gqa"]
ATTENTION = {"kv_latent": SmallHeadAttention, "gqa": SmallHeadAttention, "lorc": LowRankKVAttention}


def ids_of(batch: int, length: int, seed: int = 5) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def cache_bytes(model: torch.nn.Module, ids: torch.Tensor) -> int:
    cache = DynamicCache()
    with torch.no_grad():
        model(ids, **cache_kwargs(cache), use_cache=True)
    return cache_nbytes(cache)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(("method", "ratio"), SETTINGS)
def test_cache_is_within_the_ratio(method, ratio, family):
    ids = ids_of(2, 24)
    original = cache_bytes(tiny_model(family), ids)
    model = convert(tiny_model(family), method=method, kv_ratio=ratio)
    assert all(type(layer.self_attn) is ATTENTION[method] for layer in model.base_model.model.model.layers)
    converted = cache_bytes(model, ids)
    assert 0 < converted <= ratio * original
    assert converted >= 0.9 * ratio * original  # the budget is used, not wasted
    report = model.base_model.conversion_report
    assert report.method == method and report.kv_ratio <= ratio


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(("method", "ratio"), [s for s in SETTINGS if s[1] != 0.125])
def test_incremental_decode_equals_full_forward(method, ratio, family):
    model = convert(tiny_model(family), method=method, kv_ratio=ratio)
    ids = ids_of(2, 20)
    with torch.no_grad():
        full = model(ids).logits
        cache = DynamicCache()
        steps = [model(ids[:, :12], **cache_kwargs(cache), use_cache=True).logits]
        for t in range(12, 20):
            steps.append(model(ids[:, t : t + 1], **cache_kwargs(cache), use_cache=True).logits)
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-4, rtol=1e-4)
    assert cache.get_seq_length() == 20


@pytest.mark.parametrize("family", ["llama_mha", "llama_gqa", "qwen2_gqa"])
@pytest.mark.parametrize("method", ["elitekv", "kv_latent", "lorc", "gqa"])
def test_ratio_one_reproduces_the_original(method, family):
    """``kv_ratio=1.0`` alone (no ``rope_chunks``) compresses nothing, so every method gives the original back."""
    ids = ids_of(2, 20)
    with torch.no_grad():
        expected = tiny_model(family)(ids).logits
        got = convert(tiny_model(family), method=method, kv_ratio=1.0)(ids).logits
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4)


def test_kv_latent_keeps_frequency_spread_chunks_and_factors_values():
    # KV-Latent's re-sampled exponents for a 32-dim head from 64: [n/4, 3n/4) step 2, then [3n/4, n) step 1
    assert kv_latent.frequency_aware_chunks(32, 16) == list(range(8, 24, 2)) + list(range(24, 32))
    assert kv_latent.frequency_aware_chunks(16, 16) == list(range(16))
    chunks = kv_latent.frequency_aware_chunks(32, 5)
    assert len(set(chunks)) == 5 and min(chunks) >= 8  # the fastest quarter is dropped
    assert kv_latent.head_dims(0.25, 64, None) == (16, 16)
    assert kv_latent.head_dims(0.25, 64, 0.25) == (8, 24)  # key_share moves the budget to values
    model = convert(tiny_model("llama_gqa"), method="kv_latent", kv_ratio=0.5, key_share=0.25)
    attn = model.base_model.model.model.layers[0].self_attn
    assert (attn.key_dim, attn.value_dim) == (8, 24)
    assert attn.key_chunks.tolist() == kv_latent.frequency_aware_chunks(16, 4)


def test_kv_latent_scores_are_partial_rope_on_the_kept_chunks():
    base = tiny_model("llama_mha")
    model = convert(tiny_model("llama_mha"), method="kv_latent", kv_ratio=0.5)
    attn = model.base_model.model.model.layers[0].self_attn
    chunks = attn.key_chunks.tolist()
    old = base.model.layers[0].self_attn
    rows = torch.tensor(chunks + [c + 16 for c in chunks])
    assert torch.equal(attn.q_proj.weight.view(4, -1, 64)[1], old.q_proj.weight.view(4, 32, 64)[1][rows])
    assert torch.equal(attn.k_proj.weight.view(4, -1, 64)[2], old.k_proj.weight.view(4, 32, 64)[2][rows])


def test_lorc_schedule_is_progressive_and_within_budget():
    weights = lorc.layer_weights_schedule([2.0, 1.0, 3.0, 0.5])
    assert weights[0] == pytest.approx(1.5) and weights[-1] == pytest.approx(0.5)
    assert all(a >= b for a, b in zip(weights, weights[1:], strict=False))  # shallow layers keep more
    ranks = lorc.allocate(100, weights, 64)
    assert sum(ranks) == 100 and ranks == sorted(ranks, reverse=True) and ranks[0] > ranks[-1]
    assert lorc.allocate(10_000, weights, 64) == [64] * 4  # capped at full rank
    assert lorc.allocate(4, weights, 64) == [1] * 4
    model = convert(tiny_model("llama_gqa", layers=4), method="lorc", kv_ratio=0.25)
    plan = model.peft_config["default"].method_plan
    assert len(plan["key_ranks"]) == 4 and plan["key_ranks"][0] >= plan["key_ranks"][-1]
    assert sum(plan["key_ranks"]) + sum(plan["value_ranks"]) <= 0.25 * 2 * 2 * 32 * 4
    assert len(set(plan["key_ranks"])) > 1  # per-layer sizes differ


def test_lorc_caches_the_latent_before_rope():
    model = convert(tiny_model("llama_gqa"), method="lorc", kv_ratio=0.25)
    plan = model.peft_config["default"].method_plan
    cache = DynamicCache()
    with torch.no_grad():
        model(ids_of(1, 10), **cache_kwargs(cache), use_cache=True)
    keys, values = cache.layers[1].keys, cache.layers[1].values
    assert keys.shape == (1, 1, 10, plan["key_ranks"][1]) and values.shape == (1, 1, 10, plan["value_ranks"][1])


def test_gqa_method_matches_the_mean_pooling_baseline():
    from elitekv_peft.methods import mean_pool_kv_heads

    ids = ids_of(2, 16)
    with torch.no_grad():
        expected = mean_pool_kv_heads(tiny_model("qwen2_gqa"), 1)(ids).logits
        got = convert(tiny_model("qwen2_gqa"), method="gqa", kv_ratio=0.5)(ids).logits
    assert torch.allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("method", ["kv_latent", "lorc", "gqa"])
def test_training_reaches_every_attention_weight(method):
    model = convert(tiny_model("llama_gqa"), method=method, kv_ratio=0.5).train()
    ids = ids_of(2, 16)
    model(input_ids=ids, labels=ids).loss.backward()
    attn = model.base_model.model.model.layers[0].self_attn
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in attn.parameters())


def test_impossible_settings_name_the_fix():
    with pytest.raises(ValueError, match=r"only the ratios 1/2 = 0\.5, 2/2 = 1"):
        convert(tiny_model("llama_gqa"), method="gqa", kv_ratio=0.25)
    with pytest.raises(ValueError, match=r"1/3 = 0\.3333, 3/3 = 1"):
        convert(
            tiny_model("llama_gqa", num_key_value_heads=3, num_attention_heads=3, hidden_size=96),
            method="gqa",
            kv_ratio=0.5,
        )
    with pytest.raises(ValueError, match="kv_ratio >= 0.0469"):
        convert(tiny_model("llama_gqa"), method="kv_latent", kv_ratio=0.03)
    with pytest.raises(ValueError, match="LoRC needs a key and a value rank"):
        convert(tiny_model("llama_gqa"), method="lorc", kv_ratio=0.005)
    with pytest.raises(ValueError, match="key_share applies to method='kv_latent' or 'lorc' only"):
        EliteKVConfig(kv_ratio=0.25, key_share=0.3)
    with pytest.raises(ValueError, match="key_share applies"):
        EliteKVConfig(method="gqa", kv_ratio=0.5, key_share=0.3)
    with pytest.raises(ValueError, match=r"key_share=1\.5 must be in \(0, 1\)"):
        EliteKVConfig(method="lorc", kv_ratio=0.5, key_share=1.5)
    with pytest.raises(ValueError, match="rope_chunks applies to method='elitekv' only"):
        EliteKVConfig(method="lorc", kv_ratio=0.25, rope_chunks=2)
    with pytest.raises(ValueError, match="selection applies to method='elitekv' only"):
        EliteKVConfig(method="kv_latent", kv_ratio=0.25, selection="high")
    with pytest.raises(ValueError, match="lowrank_init does not apply to method='gqa'"):
        EliteKVConfig(method="gqa", kv_ratio=0.5, lowrank_init="weight")
    with pytest.raises(ValueError, match="method='svd' is not supported"):
        EliteKVConfig(method="svd", kv_ratio=0.5)
    assert EliteKVConfig(method="lorc").lowrank_init == "weight"
    assert EliteKVConfig(method="kv_latent").lowrank_init == "activation"
    assert EliteKVConfig().lowrank_init == "activation"


def test_a_converted_model_is_not_converted_twice():
    model = convert(tiny_model("llama_gqa"), method="lorc", kv_ratio=0.5)
    with pytest.raises(ValueError, match="already converted"):
        get_peft_model(model.base_model.model, EliteKVConfig(method="gqa", kv_ratio=0.5))


def generate(model, ids, mask):
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One saved folder per method (uptraining simulated by nudging every weight), with its greedy tokens."""
    ids = ids_of(2, 14, seed=7)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    out = {}
    for method, family, ratio in (
        ("kv_latent", "qwen2_gqa", 0.25),
        ("lorc", "llama_gqa", 0.25),
        ("gqa", "llama_mha", 0.5),
    ):
        path = tmp_path_factory.mktemp(f"saved_{method}")
        model = convert(tiny_model(family, seed=3), method=method, kv_ratio=ratio)
        with torch.no_grad():
            for param in model.parameters():
                param.add_(torch.randn_like(param) * 1e-2)
        expected = generate(model, ids, mask)
        model.save_pretrained(path)
        out[method] = (path, family, expected)
    return out, ids, mask


@pytest.mark.parametrize("method", ["kv_latent", "lorc", "gqa"])
def test_saved_folder_and_both_load_paths_generate_the_same(saved, method):
    folders, ids, mask = saved
    path, family, expected = folders[method]
    config = json.loads((path / "config.json").read_text())
    assert config["elitekv"]["method"] == method
    files = {p.name for p in path.iterdir()}
    assert {"modeling_elitekv.py", "attention_small_heads.py", "attention_lowrank.py"} <= files
    assert f"- {method.replace('_', '-')}" in (path / "README.md").read_text()
    automodel = AutoModelForCausalLM.from_pretrained(path).eval()
    assert torch.equal(generate(automodel, ids, mask), expected)
    adapter = PeftModel.from_pretrained(tiny_model(family, seed=3), path).eval()
    assert adapter.peft_config["default"].method == method
    assert torch.equal(generate(adapter, ids, mask), expected)


def test_remote_code_loads_every_method_without_the_package(saved):
    folders, ids, mask = saved
    paths = {method: str(path) for method, (path, _, _) in folders.items()}
    code = (
        "import sys; sys.modules['elitekv_peft'] = None\n"
        "import json, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        f"ids = torch.tensor({ids.tolist()}); mask = torch.tensor({mask.tolist()})\n"
        "result = {}\n"
        f"for method, path in {paths!r}.items():\n"
        "    m = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()\n"
        "    assert type(m).__module__.startswith('transformers_modules')\n"
        "    out = m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)\n"
        "    result[method] = out.tolist()\n"
        "print(json.dumps(result))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded == {method: expected.tolist() for method, (_, _, expected) in folders.items()}


@pytest.mark.parametrize("method", ["kv_latent", "lorc", "gqa"])
def test_merge_and_unload_gives_the_standalone_model(method):
    model = convert(tiny_model("llama_gqa"), method=method, kv_ratio=0.5)
    ids = ids_of(1, 12)
    with torch.no_grad():
        before = model(ids).logits
        merged = model.merge_and_unload()
        after = merged(ids).logits
    assert type(merged).__name__ == "EliteKVLlamaForCausalLM" and torch.equal(before, after)


def test_lorc_decode_step_computes_the_cache_rotary_tables_once():
    model = convert(tiny_model("llama_gqa", layers=3), method="lorc", kv_ratio=0.25)
    decoder = model.base_model.model.model
    assert len(decoder.layers) > 1
    ids = ids_of(1, 12)
    cache = DynamicCache()
    with torch.no_grad():
        model(input_ids=ids[:, :8], **cache_kwargs(cache), use_cache=True)
        calls = []
        rotary = decoder.rotary_emb
        original_forward = rotary.forward

        def counted(*args, **kwargs):
            positions = args[1] if len(args) > 1 else kwargs["position_ids"]
            calls.append(positions.shape[-1])  # positions per call
            return original_forward(*args, **kwargs)

        rotary.forward = counted
        try:
            model(input_ids=ids[:, 8:9], **cache_kwargs(cache), use_cache=True)
            model(input_ids=ids[:, 9:10], **cache_kwargs(cache), use_cache=True)
        finally:
            del rotary.forward
    # per step: the model's own call for the new token, then one call for all cached positions (not one per layer)
    assert calls == [1, 9, 1, 10]
