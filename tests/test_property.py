"""Property: for random small configs and ratios, conversion then incremental decoding equals the full forward."""

from __future__ import annotations

import warnings

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peft import get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from elitekv_peft import EliteKVCache, EliteKVConfig, set_attention_path
from elitekv_peft.compat import cache_kwargs

VOCAB = 64


@st.composite
def small_setups(draw):
    kv_heads = draw(st.sampled_from([1, 2, 4]))
    groups = draw(st.sampled_from([1, 2]))
    head_dim = draw(st.sampled_from([8, 16, 32]))
    return {
        "family": draw(st.sampled_from(["llama", "qwen2"])),
        "kv_heads": kv_heads,
        "heads": kv_heads * groups,
        "head_dim": head_dim,
        "hidden": draw(st.sampled_from([32, 64])),
        "layers": draw(st.integers(1, 2)),
        "kv_ratio": draw(st.sampled_from([1.0, 0.5, 0.25])),
        "selection": draw(st.sampled_from(["elite", "norm", "high"])),
        "decomposition": draw(st.sampled_from(["joint", "separate"])),
        "path": draw(st.sampled_from(["reconstruct", "absorbed"])),
        "prefill": draw(st.integers(1, 12)),
        "seed": draw(st.integers(0, 1000)),
    }


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(small_setups())
def test_incremental_decode_equals_full_forward(setup):
    config_cls, model_cls = (
        (LlamaConfig, LlamaForCausalLM) if setup["family"] == "llama" else (Qwen2Config, Qwen2ForCausalLM)
    )
    torch.manual_seed(setup["seed"])
    model = model_cls(
        config_cls(
            vocab_size=VOCAB,
            hidden_size=setup["hidden"],
            intermediate_size=2 * setup["hidden"],
            num_hidden_layers=setup["layers"],
            num_attention_heads=setup["heads"],
            num_key_value_heads=setup["kv_heads"],
            head_dim=setup["head_dim"],
            max_position_embeddings=256,
        )
    ).eval()
    G, D = setup["kv_heads"], setup["head_dim"]
    minimum = (2 * G + 1) / (2 * G * D)
    kv_ratio = max(setup["kv_ratio"], minimum)
    calibration = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(setup["seed"]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = get_peft_model(
            model,
            EliteKVConfig(
                kv_ratio=kv_ratio,
                selection=setup["selection"],
                decomposition=setup["decomposition"],
                calibration_data=calibration,
            ),
        ).eval()
    set_attention_path(converted, setup["path"])
    ids = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(setup["seed"] + 1))
    with torch.no_grad():
        full = converted(ids).logits
        cache = EliteKVCache()
        steps = [converted(ids[:, : setup["prefill"]], **cache_kwargs(cache), use_cache=True).logits]
        for t in range(setup["prefill"], ids.shape[1]):
            steps.append(converted(ids[:, t : t + 1], **cache_kwargs(cache), use_cache=True).logits)
    assert (torch.cat(steps, dim=1) - full).abs().max().item() < 1e-4
