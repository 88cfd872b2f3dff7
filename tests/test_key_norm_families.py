"""Families with q/k norms before RoPE (issue 20): Qwen3 (per head) and OLMo2 (whole projection), every method.

Tiny random models from transformers' own `Qwen3Config` / `Olmo2Config` (2 layers, 4 query / 2 KV heads of dim 32),
with the norms' weights drawn away from 1 so that a weight folded in the wrong place shows. Checked per family and
method (`elitekv_peft.modeling.key_norm` for the design):

* ``kv_ratio=1`` (EliteKV: all chunks rotated) reproduces the original logits (``atol = rtol = 1e-4``);
* EliteKV's cached key scale: at full latent rank with 8 of 16 chunks rotated, the model equals the original whose
  other chunks are left unrotated (partial RoPE): the NoPE keys come from the latent times the cached scale;
* at 0.25 (GQA: 0.5): cached greedy ``generate()`` == uncached, prefill + one-token steps == the full forward, and
  the cache holds what the method says (EliteKV: ``d_c + n_s`` latent columns);
* ``save_pretrained`` -> ``AutoModelForCausalLM``, ``PeftModel.from_pretrained`` and ``trust_remote_code`` without
  the package give the same greedy tokens; one training step changes the converted attention and nothing breaks.

`check` runs one check by name; `benchmarks/family_table.py` runs the same checks for docs/families.md.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import warnings
from typing import Any

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, Olmo2Config, Olmo2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

from elitekv_peft.compat import cache_kwargs, output_cache
from tests.family_checks import (
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

FAMILIES = {"qwen3": (Qwen3Config, Qwen3ForCausalLM), "olmo2": (Olmo2Config, Olmo2ForCausalLM)}
LABELS = {"qwen3": "Qwen3 (q_norm / k_norm per head)", "olmo2": "OLMo2 (q_norm / k_norm over all heads)"}


def family_model(family: str, seed: int = 2) -> torch.nn.Module:
    """A tiny random model of ``family`` whose q/k norm weights are drawn from [0.5, 2)."""
    model = tiny(*FAMILIES[family], seed=seed)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for layer in model.model.layers:
            for norm in (layer.self_attn.q_norm, layer.self_attn.k_norm):
                norm.weight.copy_(0.5 + 1.5 * torch.rand(norm.weight.shape, generator=generator))
    return model


def attention_of(model: torch.nn.Module, layer: int = 0) -> torch.nn.Module:
    return model.base_model.model.model.layers[layer].self_attn


def check_exact(family: str, method: str) -> None:
    """At ratio 1 the converted model's logits are the original's."""
    ids = ids_of(2, 24)
    with torch.no_grad():
        expected = family_model(family)(ids).logits
        model = convert(family_model(family), method=method, **EXACT.get(method, {"kv_ratio": 1.0}))
        got = model(ids).logits
    assert type(attention_of(model)).__name__.startswith("Normed")
    assert torch.allclose(got, expected, **TOLERANCE), (got - expected).abs().max().item()


def check_cached(family: str, method: str) -> None:
    """Compressed: greedy generate() with the cache == without it, and prefill + one-token steps == full forward."""
    model = convert(family_model(family), method=method, kv_ratio=COMPRESSED[method])
    ids = ids_of(2, 10)
    assert torch.equal(greedy(model, ids, use_cache=True), greedy(model, ids, use_cache=False))
    ids = ids_of(2, 18)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
    steps, cache = stepwise(model, ids, prefill=11)
    assert cache.get_seq_length() == ids.shape[1]
    assert torch.allclose(steps, full, **TOLERANCE), (steps - full).abs().max()
    if method == "elitekv":  # the latent cache holds the key scales after the latent
        attn = attention_of(model)
        assert attn.scale_values == (2 if family == "qwen3" else 1)
        assert cache.layers[0].values.shape[-1] == attn.spec.latent_dim + attn.scale_values


def check_save_load(family: str, method: str) -> None:
    """Train one step, save; AutoModelForCausalLM, PeftModel.from_pretrained and remote code give the same tokens."""
    model = convert(family_model(family), method=method, kv_ratio=COMPRESSED[method])
    before = {k: v.clone() for k, v in attention_of(model).state_dict().items()}
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = ids_of(2, 16, seed=3)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    model.eval()
    changed = [k for k, v in attention_of(model).state_dict().items() if not torch.equal(v, before[k])]
    assert changed and torch.isfinite(loss)
    ids = ids_of(2, 10)
    expected = greedy(model, ids, use_cache=True)
    with tempfile.TemporaryDirectory() as folder:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.save_pretrained(folder)
            reloaded = AutoModelForCausalLM.from_pretrained(folder).eval()
            adapter = PeftModel.from_pretrained(family_model(family), folder).eval()
        assert type(reloaded).__name__ == f"EliteKV{FAMILIES[family][1].__name__}"
        assert torch.equal(greedy(reloaded, ids, use_cache=True), expected)
        assert torch.equal(greedy(adapter, ids, use_cache=True), expected)
        code = (
            "import sys; sys.modules['elitekv_peft'] = None\n"
            "import torch\n"
            "from transformers import AutoModelForCausalLM\n"
            f"m = AutoModelForCausalLM.from_pretrained({folder!r}, trust_remote_code=True).eval()\n"
            f"ids = torch.tensor({ids.tolist()})\n"
            "out = m.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False, "
            "pad_token_id=0)\n"
            "print(type(m).__module__.startswith('transformers_modules'), out.tolist())\n"
        )
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == f"True {expected.tolist()}"


CHECKS = named_checks(check_exact, check_cached, check_save_load)
check = check_by_name(CHECKS)  # check(name, family, method): benchmarks/family_table.py runs the table's checks

test_ratio_one_reproduces_the_original = family_test(check_exact, FAMILIES, METHODS)
test_cached_decoding_equals_uncached = family_test(check_cached, FAMILIES, METHODS)
test_save_load_keeps_the_tokens = family_test(check_save_load, FAMILIES, METHODS)


def partial_rope_reference(family: str, chunks: torch.Tensor) -> torch.nn.Module:
    """The original model whose rotary chunks outside ``chunks`` (the same for every head) are left unrotated."""
    reference = family_model(family)
    rotary_forward = reference.model.rotary_emb.forward
    dropped = torch.ones(16, dtype=torch.bool)
    dropped[chunks] = False
    dims = torch.cat((dropped, dropped))

    def partial_rope(x: torch.Tensor, position_ids: torch.Tensor) -> Any:
        cos, sin = rotary_forward(x, position_ids)
        cos, sin = cos.clone(), sin.clone()
        cos[..., dims], sin[..., dims] = 1.0, 0.0
        return cos, sin

    reference.model.rotary_emb.forward = partial_rope
    return reference


@pytest.mark.parametrize("family", list(FAMILIES))
def test_elitekv_cached_key_scale_is_exact_at_full_latent_rank(family):
    """8 of 16 chunks rotated, latent of full rank (hidden 64): the NoPE keys are ``s * k_up(c)`` with the scale
    computed from the whole pre-norm key and cached; the model equals the original with partial RoPE. Fails if the
    scale, the norm's weight or the key scales' cache columns are wrong."""
    model = convert(family_model(family), kv_ratio=None, rope_chunks=8, latent_dim=64, selection="high")
    chunks = attention_of(model).chunk_index[0]
    assert attention_of(model).scale_values > 0
    ids = ids_of(2, 24)
    with torch.no_grad():
        expected = partial_rope_reference(family, chunks)(ids).logits
        got = model(ids).logits
        cached = model(ids[:, :20], use_cache=True)
        step = model(ids[:, 20:21], use_cache=True, **cache_kwargs(output_cache(cached))).logits
    assert torch.allclose(got, expected, **TOLERANCE), (got - expected).abs().max().item()
    assert torch.allclose(step[:, -1], expected[:, 20], **TOLERANCE)


def test_elitekv_budget_makes_room_for_the_key_scales():
    """At kv_ratio 0.25 the Qwen3 conversion caches G*2r + d_c + G values per token, within the ratio."""
    model = convert(family_model("qwen3"), kv_ratio=0.25)
    config = model.peft_config["default"]
    G, D = 2, 32
    r, d_c = config.rope_chunks, config.latent_dims[0]
    assert G * 2 * r + d_c + G <= 0.25 * 2 * G * D
    assert d_c == int(0.25 * 2 * G * D) - G * 2 * r - G
    assert config.report["kv_ratio_achieved"] == pytest.approx((G * 2 * r + d_c + G) / (2 * G * D))


def test_lorc_caches_its_ranks_only():
    """LoRC normalises the rebuilt key when it reads it: its cache holds ``r_k`` and ``r_v`` values per token, as for
    Llama, and the plan counts nothing more."""
    model = convert(family_model("olmo2"), method="lorc", kv_ratio=0.25)
    plan = model.peft_config["default"].method_plan
    with torch.no_grad():
        cache = output_cache(model(ids_of(1, 12), use_cache=True))
    assert cache.layers[0].keys.shape[-1] == plan["key_ranks"][0]
    assert cache.layers[0].values.shape[-1] == plan["value_ranks"][0]
    assert "key_scales" not in plan
