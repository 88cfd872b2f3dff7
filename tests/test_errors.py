"""Bad input gets an exception that says what was wrong and what to do (issue 2, 'Bad input')."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel

from elitekv_peft import EliteKVConfig, resolve_budget
from elitekv_peft.attention import EliteKVAttention

from .tiny import VOCAB, calibration_ids, convert, tiny_model


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"kv_ratio": 0.0}, ValueError, r"must be in \(0, 1\]"),
        ({"kv_ratio": 1.5}, ValueError, r"must be in \(0, 1\]"),
        ({"kv_ratio": "0.25"}, TypeError, "must be a float"),
        ({"kv_ratio": None}, ValueError, "both `rope_chunks` and `latent_dim`"),
        ({"rope_chunks": 0}, ValueError, "positive integer"),
        ({"latent_dim": -3}, ValueError, "positive integer"),
        ({"selection": "best"}, ValueError, "choose one of"),
        ({"decomposition": "svd"}, ValueError, "choose one of"),
        ({"lowrank_init": "random"}, ValueError, "choose one of"),
        ({"trainable": "mlp"}, ValueError, "choose one of"),
        ({"calibration_samples": 0}, ValueError, "positive integer"),
    ],
)
def test_config_rejects_bad_values(kwargs, error, match):
    with pytest.raises(error, match=match):
        EliteKVConfig(**kwargs)


def test_impossible_ratio_for_the_model_names_the_minimum():
    with pytest.raises(ValueError, match=r"use kv_ratio >= 0\.0\d+"):
        resolve_budget(num_kv_heads=2, head_dim=32, hidden_size=64, kv_ratio=0.01)
    with pytest.raises(ValueError, match="rotary chunks; choose 1..16"):
        resolve_budget(num_kv_heads=2, head_dim=32, hidden_size=64, kv_ratio=0.5, rope_chunks=17)
    with pytest.raises(ValueError, match="more than kv_ratio"):
        resolve_budget(num_kv_heads=2, head_dim=32, hidden_size=64, kv_ratio=0.25, rope_chunks=4, latent_dim=100)
    # the model-level path raises the same, before touching the model
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


def test_model_without_rope_is_refused():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=VOCAB))
    with pytest.raises(TypeError, match="supports llama, mistral, qwen2"):
        get_peft_model(model, EliteKVConfig(kv_ratio=0.25, calibration_data=calibration_ids()))


def test_sliding_window_model_is_refused_with_the_fix():
    model = tiny_model("mistral_gqa", sliding_window=16)
    with pytest.raises(TypeError, match="sliding_window=None"):
        get_peft_model(model, EliteKVConfig(kv_ratio=0.25, calibration_data=calibration_ids()))


@pytest.mark.parametrize(
    ("data", "error", "match"),
    [
        (torch.randint(3, VOCAB, (2, 4)), ValueError, "at least 8 are needed"),
        (torch.empty(0, 0, dtype=torch.long), ValueError, "shape"),
        (torch.rand(2, 32), TypeError, "integer token ids"),
        (["some text", "more text"], TypeError, "tokenize them first"),
        (torch.randint(3, VOCAB, (1, 16)), ValueError, "fewer than hidden_size"),
        (torch.full((2, 32), VOCAB), ValueError, "outside the model's vocabulary"),
    ],
)
def test_bad_calibration_data(data, error, match):
    with pytest.raises(error, match=match):
        get_peft_model(tiny_model("llama_gqa"), EliteKVConfig(kv_ratio=0.25, calibration_data=data))


def test_converting_twice_is_refused():
    model = convert(tiny_model("llama_gqa"), kv_ratio=0.25)
    with pytest.raises(ValueError, match="already converted"):
        get_peft_model(model.base_model.model, EliteKVConfig(kv_ratio=0.25, calibration_data=calibration_ids()))


def test_second_adapter_is_refused():
    model = convert(tiny_model("llama_gqa"), kv_ratio=0.25)
    with pytest.raises(ValueError, match="only one EliteKV adapter"):
        model.add_adapter("other", EliteKVConfig(kv_ratio=0.5, calibration_data=calibration_ids()))


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
