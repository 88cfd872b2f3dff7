"""Tiny random models shared by the tests (fast, CPU, float32)."""

from __future__ import annotations

import warnings

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from elitekv_peft.testing import TINY_VOCAB as VOCAB
from elitekv_peft.testing import tiny_tokenizer

__all__ = ["FAMILIES", "VOCAB", "calibration_ids", "convert", "tiny_model", "tiny_tokenizer"]

FAMILIES = {
    # name: (config class, model class, extra kwargs)
    "llama_mha": (LlamaConfig, LlamaForCausalLM, {"num_key_value_heads": 4}),
    "llama_gqa": (LlamaConfig, LlamaForCausalLM, {"num_key_value_heads": 2}),
    "qwen2_gqa": (Qwen2Config, Qwen2ForCausalLM, {"num_key_value_heads": 2}),
    "mistral_gqa": (MistralConfig, MistralForCausalLM, {"num_key_value_heads": 2, "sliding_window": None}),
}


def tiny_model(family: str = "llama_gqa", seed: int = 0, layers: int = 2, **overrides) -> torch.nn.Module:
    """A random tiny causal LM: hidden 64, 4 query heads of dim 32 (16 rotary chunks), 2 layers."""
    config_cls, model_cls, extra = FAMILIES[family]
    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        head_dim=32,
        max_position_embeddings=2048,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    kwargs.update(extra)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = model_cls(config_cls(**kwargs)).eval()
    # random init gives near-uniform attention; sharpen queries/keys so that RoPE choices matter
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(4.0)
            layer.self_attn.k_proj.weight.mul_(4.0)
    return model


def calibration_ids(n: int = 4, seq_len: int = 64, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n, seq_len), generator=generator)


def convert(model: torch.nn.Module, **config_kwargs):
    """`get_peft_model` with an EliteKVConfig (calibration on random ids unless given)."""
    from peft import get_peft_model

    from elitekv_peft import EliteKVConfig

    config_kwargs.setdefault("calibration_data", calibration_ids())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(model, EliteKVConfig(**config_kwargs)).eval()
