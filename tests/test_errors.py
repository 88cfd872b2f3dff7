"""Error behaviour beyond single bad inputs (those are the table in tests/test_bad_inputs.py): budget arithmetic,
a refused setting leaves the model untouched, and data-free calibration warns and leaves the user's RNG alone."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

from elitekv_peft import EliteKVConfig, resolve_budget
from elitekv_peft.modeling import EliteKVAttention

from .tiny import calibration_ids, tiny_model


def test_impossible_ratio_leaves_the_model_untouched():
    model = tiny_model("llama_gqa")
    with pytest.raises(ValueError, match="use kv_ratio >="):
        get_peft_model(model, EliteKVConfig(kv_ratio=0.01, calibration_data=calibration_ids()))
    assert not any(isinstance(m, EliteKVAttention) for m in model.modules())


def test_budget_arithmetic():
    b = resolve_budget(num_kv_heads=3, head_dim=64, hidden_size=576, kv_ratio=0.25)
    assert (b.rope_chunks, b.latent_dim, b.values_per_token) == (4, 72, 96)
    assert b.kv_ratio == 0.25
    b = resolve_budget(num_kv_heads=3, head_dim=64, hidden_size=576, kv_ratio=0.125)
    assert (b.rope_chunks, b.latent_dim) == (2, 36)
    b = resolve_budget(num_kv_heads=32, head_dim=128, hidden_size=4096, kv_ratio=0.5)
    assert (b.rope_chunks, b.latent_dim) == (16, 3072)


def test_without_calibration_data_the_model_samples_its_own_and_warns():
    model = tiny_model("llama_gqa")
    config = EliteKVConfig(kv_ratio=0.25, calibration_samples=4, calibration_seq_len=32, selection="norm")
    with pytest.warns(UserWarning, match="sampling calibration text from the model itself"):
        converted = get_peft_model(model, config)
    assert converted.peft_config["default"].is_converted
    rng_state = torch.random.get_rng_state()
    get_peft_model(
        tiny_model("llama_gqa"),
        EliteKVConfig(kv_ratio=0.25, calibration_samples=4, calibration_seq_len=32, selection="norm"),
    )
    assert torch.equal(rng_state, torch.random.get_rng_state())  # the user's RNG stream is left alone
