"""Small random models and synthetic data: for the examples' ``--tiny`` mode and for the tests.

Nothing here is needed for real use; it lets everything run end to end on a CPU in seconds.
"""

from __future__ import annotations

import math
from typing import Any

import torch

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


def synthetic_windows(vocab_size: int, n: int, seq_len: int, seed: int = 0, *, branching: int = 4) -> torch.Tensor:
    """Sample token sequences from a small random Markov chain (learnable, unlike uniform noise).

    Each token ``v`` has ``branching`` random successors ``succ[v]`` (repeats allowed) with random
    probabilities
    ``p[v]`` (a sharp Dirichlet-like draw), so the entropy rate is at most ``log(branching)``
    nats per token, far below ``log(vocab_size)``: a tiny model's loss can go down quickly.
    The chain itself and the samples are both fixed by ``seed``.

    Args:
        vocab_size: tokens are in ``[0, vocab_size)``.
        n: number of sequences.
        seq_len: tokens per sequence.
        seed: seed of a private ``torch.Generator`` (the global RNG is untouched).
        branching: successors per token (at least 1).

    Returns:
        LongTensor ``[n, seq_len]``.
    """
    if vocab_size < 2 or n < 0 or seq_len < 1 or branching < 1:
        raise ValueError(f"bad arguments: vocab_size={vocab_size} n={n} seq_len={seq_len} branching={branching}")
    g = torch.Generator().manual_seed(seed)
    k = min(branching, vocab_size)
    succ = torch.randint(0, vocab_size, (vocab_size, k), generator=g)  # [V, k] successors
    weights = torch.rand(vocab_size, k, generator=g) ** 3 + 1e-3  # [V, k], uneven
    probs = weights / weights.sum(dim=1, keepdim=True)
    out = torch.empty(n, seq_len, dtype=torch.long)
    if n == 0:
        return out
    cur = torch.randint(0, vocab_size, (n,), generator=g)
    out[:, 0] = cur
    for t in range(1, seq_len):
        choice = torch.multinomial(probs[cur], 1, generator=g).squeeze(1)  # [n]
        cur = succ[cur, choice]
        out[:, t] = cur
    return out
