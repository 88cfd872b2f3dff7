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

from elitekv_demo.testing import TINY_VOCAB as VOCAB
from elitekv_demo.testing import tiny_model as build_tiny_model
from elitekv_demo.testing import tiny_tokenizer

__all__ = ["FAMILIES", "VOCAB", "calibration_ids", "convert", "decode_logits", "tiny_model", "tiny_tokenizer"]

FAMILIES = {
    # name: (config class, model class, extra kwargs)
    "llama_mha": (LlamaConfig, LlamaForCausalLM, {"num_key_value_heads": 4}),
    "llama_gqa": (LlamaConfig, LlamaForCausalLM, {"num_key_value_heads": 2}),
    "qwen2_gqa": (Qwen2Config, Qwen2ForCausalLM, {"num_key_value_heads": 2}),
    "mistral_gqa": (MistralConfig, MistralForCausalLM, {"num_key_value_heads": 2, "sliding_window": None}),
}


def tiny_model(family: str = "llama_gqa", seed: int = 0, layers: int = 2, **overrides) -> torch.nn.Module:
    """A random tiny causal LM of ``family`` (`elitekv_demo.testing.tiny_model`): 4 query heads of dim 32."""
    config_cls, model_cls, extra = FAMILIES[family]
    return build_tiny_model(seed, config_cls, model_cls, num_hidden_layers=layers, **{**extra, **overrides})


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


def decode_logits(model: torch.nn.Module, cache, ids: torch.Tensor, prefill: int) -> torch.Tensor:
    """Prefill ``ids[:, :prefill]`` into ``cache``, then decode the rest one token a step: logits ``[B, T, vocab]``."""
    from elitekv_peft.compat import cache_kwargs

    with torch.no_grad():
        steps = [model(ids[:, :prefill], **cache_kwargs(cache), use_cache=True).logits]
        for t in range(prefill, ids.shape[1]):
            steps.append(model(ids[:, t : t + 1], **cache_kwargs(cache), use_cache=True).logits)
    return torch.cat(steps, 1)
