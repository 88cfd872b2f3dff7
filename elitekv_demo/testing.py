"""Small random models and synthetic data: for the examples' ``--tiny`` mode and for the tests.

Nothing here is needed for real use; it lets everything run end to end on a CPU in seconds.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .data import synthetic_windows

TINY_VOCAB = 128


def tiny_model(seed: int = 0, config_cls: Any = None, model_cls: Any = None, **overrides: Any) -> torch.nn.Module:
    """A random tiny causal LM: hidden 64, 4 query / 2 key-value heads of dim 32, 2 layers, vocabulary 128.

    Llama by default; pass another family's ``config_cls`` / ``model_cls`` and any config ``overrides``.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config_cls = config_cls or LlamaConfig
    model_cls = model_cls or LlamaForCausalLM
    settings: dict[str, Any] = dict(
        vocab_size=TINY_VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=2048,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    settings.update(overrides)
    torch.manual_seed(seed)
    model = model_cls(config_cls(**settings)).eval()
    # random init gives near-uniform attention; sharpen queries/keys so that the RoPE choices matter
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(4.0)
            layer.self_attn.k_proj.weight.mul_(4.0)
    return model


def tiny_tokenizer() -> Any:
    """A word-level tokenizer over the tiny vocabulary ``t0 .. t127`` (pad 0, bos 1, eos 2)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(TINY_VOCAB)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t3"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="t0", bos_token="t1", eos_token="t2", unk_token="t3"
    )


def tiny_data(train_tokens: int, seq_len: int, eval_windows: int, calib_samples: int) -> dict[str, torch.Tensor]:
    """Synthetic windows of one Markov chain: ``train`` (enough for the budget), held-out ``eval``, ``calib``."""
    n_train = max(64, min(4096, math.ceil(train_tokens / seq_len)))
    windows = synthetic_windows(TINY_VOCAB, n_train + eval_windows, seq_len, seed=0)
    train, held_out = windows[:n_train], windows[n_train:]
    return {"train": train, "eval": held_out, "calib": train[:calib_samples]}
