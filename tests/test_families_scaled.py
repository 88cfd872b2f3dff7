"""Families whose attention differs from Llama's beyond its weights (issue 20): Phi-3, Granite, Gemma 2.

Tiny random models from transformers' own config classes, each with the detail that matters set away from Llama's:

* ``phi3``: fused ``qkv_proj`` and ``partial_rotary_factor=0.5`` (16 of 32 head dims rotated, as Phi-3.5 / Phi-4-mini
  rotate part of each head);
* ``granite``: ``attention_multiplier=0.05`` as the softmax scale (not ``head_dim ** -0.5``), and Granite's
  embedding / residual / logits multipliers;
* ``gemma2``: ``query_pre_attn_scalar=24``, ``attn_logit_softcapping=20`` and alternating sliding-window (8) / global
  layers.

For every method: ``kv_ratio=1`` reproduces the original logits (``atol = rtol = 1e-4``); at 0.25 (gqa: 0.5) cached
greedy ``generate()`` == uncached and prefill + one-token steps == the full forward, on sequences longer than the
window; after two uptraining steps, ``save_pretrained`` -> ``AutoModelForCausalLM.from_pretrained``,
``PeftModel.from_pretrained`` and the saved ``trust_remote_code`` files without the package give the same tokens.

`check` runs one check by family and method; `benchmarks/family_table.py` runs the same checks for docs/families.md.
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
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    GraniteConfig,
    GraniteForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
)

from elitekv_demo.testing import synthetic_windows
from elitekv_peft.conversion import check_supported
from elitekv_peft.training import lm_dataset, training_arguments, uptrain

from .family_checks import (
    COMPRESSED,
    EXACT,
    METHODS,
    TOLERANCE,
    VOCAB,
    check_by_name,
    convert,
    family_test,
    greedy,
    ids_of,
    named_checks,
    stepwise,
    tiny,
)

FAMILIES: dict[str, tuple[type, type, dict[str, Any]]] = {
    # name: (config class, model class, settings that differ from Llama's); head dim 32 everywhere
    "phi3": (Phi3Config, Phi3ForCausalLM, {"hidden_size": 128, "partial_rotary_factor": 0.5}),
    "granite": (
        GraniteConfig,
        GraniteForCausalLM,
        {"attention_multiplier": 0.05, "embedding_multiplier": 2.0, "residual_multiplier": 0.5, "logits_scaling": 2.0},
    ),
    "gemma2": (
        Gemma2Config,
        Gemma2ForCausalLM,
        {"query_pre_attn_scalar": 24, "attn_logit_softcapping": 20.0, "sliding_window": 8},
    ),
}
WINDOW = 8  # every windowed family's window: the sequences of the checks are longer
LABELS = {
    "phi3": "Phi-3 (fused qkv_proj, partial_rotary_factor 0.5)",
    "granite": "Granite (attention_multiplier)",
    "gemma2": "Gemma 2 (query_pre_attn_scalar, soft-capping, sliding / global layers)",
}


def family_model(family: str, seed: int = 2, **overrides: Any) -> torch.nn.Module:
    """A tiny random model of ``family`` (a key of `FAMILIES`, or of ``FAMILIES`` after another test module added
    to it), queries and keys sharpened (x4) so that attention is not near-uniform (`family_checks.tiny`)."""
    config_cls, model_cls, extra = FAMILIES[family]
    return tiny(config_cls, model_cls, seed, **{**extra, **overrides})


def check_exact(family: str, method: str) -> None:
    """At ratio 1 the converted model's logits are the original's (24 tokens: beyond any window)."""
    ids = ids_of(2, 24)
    with torch.no_grad():
        expected = family_model(family)(ids).logits
        model = convert(family_model(family), method=method, **EXACT.get(method, {"kv_ratio": 1.0}))
        got = model(ids).logits
    assert torch.allclose(got, expected, **TOLERANCE), (got - expected).abs().max().item()


def check_cached(family: str, method: str) -> None:
    """Compressed: greedy generate() with the cache == without it (10 + 8 tokens), and prefill (11) + one-token steps
    == the full forward (20 tokens)."""
    model = convert(family_model(family), method=method, kv_ratio=COMPRESSED[method])
    ids = ids_of(2, 10)
    assert torch.equal(greedy(model, ids, use_cache=True), greedy(model, ids, use_cache=False))
    ids = ids_of(2, 20)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
    steps, cache = stepwise(model, ids, prefill=11)
    assert cache.get_seq_length() == ids.shape[1]
    assert torch.allclose(steps, full, **TOLERANCE), (steps - full).abs().max().item()


def uptrained(family: str, method: str, folder: str) -> torch.nn.Module:
    """Converted at the compressed ratio, then two uptraining steps (LM loss): the trained weights must travel."""
    model = convert(family_model(family), method=method, kv_ratio=COMPRESSED[method])
    before = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    args = training_arguments(
        folder, max_steps=2, batch_size=4, learning_rate=3e-3, logging_steps=1, warmup_ratio=0.0, disable_tqdm=True
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = uptrain(model.train(), lm_dataset(synthetic_windows(VOCAB, 8, 16, seed=0)), args)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses and all(loss == loss and loss < 1e4 for loss in losses), losses
    moved = [name for name, p in model.named_parameters() if name in before and not torch.equal(p, before[name])]
    assert moved, "uptraining changed no weight"
    return model.eval()


def check_save_load(family: str, method: str) -> None:
    """Uptrained, saved, reloaded with AutoModelForCausalLM and with PeftModel.from_pretrained: the same tokens."""
    ids = ids_of(2, 10)
    with tempfile.TemporaryDirectory() as folder:
        model = uptrained(family, method, f"{folder}/train")
        expected = greedy(model, ids, use_cache=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.save_pretrained(f"{folder}/saved")
            reloaded = AutoModelForCausalLM.from_pretrained(f"{folder}/saved").eval()
            adapter = PeftModel.from_pretrained(family_model(family), f"{folder}/saved").eval()
    assert type(reloaded).__name__.startswith("EliteKV")
    assert torch.equal(greedy(reloaded, ids, use_cache=True), expected)
    assert torch.equal(greedy(adapter, ids, use_cache=True), expected)


def check_remote_code(family: str, methods: list[str]) -> None:
    """Every method's saved folder loads with ``trust_remote_code=True`` in a process where ``elitekv_peft`` cannot
    be imported, and generates the tokens of the model that was saved."""
    ids = ids_of(2, 10)
    with tempfile.TemporaryDirectory() as folder:
        expected = {}
        for method in methods:
            model = convert(family_model(family), method=method, kv_ratio=COMPRESSED[method])
            expected[method] = greedy(model, ids, use_cache=True).tolist()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model.save_pretrained(f"{folder}/{method}")
        code = (
            "import sys, json; sys.modules['elitekv_peft'] = None\n"
            "import torch\n"
            "from transformers import AutoModelForCausalLM\n"
            f"ids = torch.tensor({ids.tolist()}); out = {{}}\n"
            f"for method in {methods!r}:\n"
            f"    m = AutoModelForCausalLM.from_pretrained({folder!r} + '/' + method, trust_remote_code=True).eval()\n"
            "    assert type(m).__module__.startswith('transformers_modules'), type(m).__module__\n"
            "    out[method] = m.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,\n"
            "                             do_sample=False, pad_token_id=0).tolist()\n"
            "print(json.dumps(out))\n"
        )
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    import json

    assert json.loads(result.stdout.strip().splitlines()[-1]) == expected


CHECKS = named_checks(check_exact, check_cached, check_save_load)
check = check_by_name(CHECKS)  # check(name, family, method): benchmarks/family_table.py runs the table's checks

test_ratio_one_reproduces_the_original = family_test(check_exact, LABELS, METHODS)
test_cached_decoding_equals_uncached = family_test(check_cached, LABELS, METHODS)
test_uptrain_save_load_keeps_the_tokens = family_test(check_save_load, LABELS, METHODS)


@pytest.mark.parametrize("family", list(LABELS))
def test_remote_code_loads_every_method_without_the_package(family):
    check_remote_code(family, METHODS)


@pytest.mark.parametrize(
    "family, changed",
    [
        ("granite", {"attention_multiplier": 32**-0.5}),
        ("gemma2", {"query_pre_attn_scalar": 32}),
        ("gemma2", {"attn_logit_softcapping": None}),
        ("phi3", {"partial_rotary_factor": 1.0}),
    ],
)
def test_the_family_detail_changes_the_original(family, changed):
    """The checks above mean something: each detail, set back to Llama's, changes the original model's logits (eager
    attention: transformers 5.17's SDPA path skips Gemma 2's soft-capping, the original's and ours alike)."""
    ids = ids_of(2, 24)
    eager = {"attn_implementation": "eager"}
    with torch.no_grad():
        original = family_model(family, **eager)(ids).logits
        assert not torch.allclose(original, family_model(family, **eager, **changed)(ids).logits)


def test_a_failed_phi3_conversion_leaves_no_split_projections_behind():
    """The split ``q_proj`` / ``k_proj`` / ``v_proj`` exist only during a conversion: a failed one leaves Phi-3's
    attention as it was."""
    model = family_model("phi3")
    with pytest.raises(ValueError, match="kv_ratio"):
        convert(model, method="gqa", kv_ratio=0.3)
    attn = model.model.layers[0].self_attn
    assert type(attn).__name__ == "Phi3Attention" and not hasattr(attn, "q_proj") and hasattr(attn, "qkv_proj")


def longrope(partial: float) -> dict[str, Any]:
    """Phi-3.5 / Phi-4-mini's LongRoPE parameters (per-chunk frequency factors, an attention factor > 1 for
    ``max_position_embeddings`` 2048 over ``original_max_position_embeddings`` 512), on ``partial`` of each head."""
    half = int(32 * partial) // 2
    return {
        "rope_type": "longrope",
        "rope_theta": 10000.0,
        "partial_rotary_factor": partial,
        "short_factor": [1.0 + 0.1 * i for i in range(half)],
        "long_factor": [2.0 + 0.5 * i for i in range(half)],
    }


@pytest.mark.parametrize("partial", [0.5, 1.0])
def test_phi3_longrope_converts_exactly_and_elitekv_refuses_a_partial_head(partial):
    """LongRoPE (positions below original_max_position_embeddings: the short factors): every method reproduces the
    original at ratio 1, except EliteKV on a partial rotary head, refused naming why and what to use: the dims the
    original never rotates do not carry LongRoPE's attention factor, the rotary chunks EliteKV leaves unrotated do."""
    from elitekv_peft.modeling.attention_elitekv import rope_attention_factor

    settings = {"rope_parameters": longrope(partial), "original_max_position_embeddings": 512}
    original = family_model("phi3", **settings)
    factor = original.model.rotary_emb.attention_scaling
    assert factor > 1.05 and rope_attention_factor(original.config) == pytest.approx(factor)
    ids = ids_of(2, 24)
    with torch.no_grad():
        expected = original(ids).logits
    for method in METHODS:
        if method == "elitekv" and partial < 1:
            with pytest.raises(TypeError, match=r"(?s)method='elitekv'.*attention factor.*kv_latent"):
                convert(family_model("phi3", **settings), method=method, kv_ratio=0.25)
            continue
        model = convert(family_model("phi3", **settings), method=method, **EXACT.get(method, {"kv_ratio": 1.0}))
        with torch.no_grad():
            got = model(ids).logits
        assert torch.allclose(got, expected, **TOLERANCE), (method, (got - expected).abs().max().item())


def test_a_scale_the_config_does_not_give_is_refused():
    """The converted attention reads its scale from the config; an attention module that scales otherwise is refused
    before anything is converted."""
    model = family_model("granite")
    model.model.layers[1].self_attn.scaling = 0.125
    with pytest.raises(TypeError, match=r"(?s)Layer 1.*0.125.*config"):
        check_supported(model, "elitekv")


def test_elitekv_rotates_real_rotary_chunks_of_a_partial_rotary_head():
    """Phi-3's unrotated dims become chunks of frequency zero (8..15 here); rotating one reduces no score error, so
    RoPElite keeps rotary chunks (0..7)."""
    model = convert(family_model("phi3"), kv_ratio=0.25)
    for layer in model.base_model.model.model.layers:
        assert int(layer.self_attn.chunk_index.max()) < 8, layer.self_attn.chunk_index
