"""What the family test modules share: tiny random models from transformers' own config classes, greedy and
step-by-step decoding, and the three checks of the table in docs/families.md.

tests/test_families.py (Llama RoPE types), test_families_scaled.py (Phi-3, Granite, Gemma 2),
test_key_norm_families.py (Qwen3, OLMo2), test_sliding_window.py and test_gemma3.py each write their own check
functions ``check_...(family, method)`` (which assert) and register three of them here:

* `named_checks`: the module's ``CHECKS``, the three checks keyed by the table's columns (`COLUMNS`);
* `check_by_name`: the module's ``check(name, family, method)``, which benchmarks/family_table.py calls;
* `family_test`: a test that pytest runs for every family and method (test ids ``family-method``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import pytest
import torch

from elitekv_peft.compat import cache_kwargs, output_cache

from .tiny import VOCAB, convert

__all__ = [
    "COLUMNS",
    "COMPRESSED",
    "EXACT",
    "METHODS",
    "NEW_TOKENS",
    "TOLERANCE",
    "VOCAB",
    "check_by_name",
    "convert",
    "family_test",
    "greedy",
    "ids_of",
    "named_checks",
    "stepwise",
    "tiny",
]

METHODS = ["elitekv", "lorc", "kv_latent", "gqa"]
COMPRESSED = {"elitekv": 0.25, "lorc": 0.25, "kv_latent": 0.25, "gqa": 0.5}
EXACT = {"elitekv": {"kv_ratio": 1.0, "rope_chunks": 16, "selection": "high"}}  # others: kv_ratio=1.0
TOLERANCE = {"atol": 1e-4, "rtol": 1e-4}
NEW_TOKENS = 8
COLUMNS = ("converts, exact at ratio 1", "cached == uncached", "save/load")  # the table's check columns

Check = Callable[[str, str], None]  # check(family, method): returns if the check passed, raises if not


def ids_of(batch: int, length: int, seed: int = 11) -> torch.Tensor:
    """Random token ids ``[batch, length]`` (none of the special ids 0, 1, 2)."""
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def tiny(config_cls: Any, model_cls: Any, seed: int = 2, **overrides: Any) -> torch.nn.Module:
    """A tiny random causal LM from transformers' own config class: 2 layers, hidden 64, 4 query heads and 2 KV
    heads of dim 32 (``overrides`` change any setting); queries and keys sharpened (x4) so that attention is not
    near-uniform. ``model_cls`` is called with the config (a class or a function that builds the model)."""
    settings: dict[str, Any] = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(seed)
    model = model_cls(config_cls(**{**settings, **overrides})).eval()
    config = model.config
    with torch.no_grad():
        for layer in model.model.layers:
            attn = layer.self_attn
            if hasattr(attn, "qkv_proj"):  # Phi-3: rows [queries | keys | values]
                heads = config.num_attention_heads + config.num_key_value_heads
                attn.qkv_proj.weight[: heads * attn.head_dim].mul_(4.0)
            else:
                attn.q_proj.weight.mul_(4.0)
                attn.k_proj.weight.mul_(4.0)
    return model


def greedy(model: torch.nn.Module, ids: torch.Tensor, use_cache: bool) -> torch.Tensor:
    """Greedy ``generate()`` of `NEW_TOKENS` tokens after ``ids`` ``[B, T]``: ``[B, T + NEW_TOKENS]``."""
    with torch.no_grad():
        return model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            use_cache=use_cache,
            pad_token_id=0,
        )


def stepwise(model: torch.nn.Module, ids: torch.Tensor, prefill: int) -> tuple[torch.Tensor, Any]:
    """Logits ``[B, T, V]`` of a prefill of ``prefill`` tokens then one-token steps with the cache, and the cache."""
    with torch.no_grad():
        out = model(ids[:, :prefill], use_cache=True)
        cache, steps = output_cache(out), [out.logits]
        for t in range(prefill, ids.shape[1]):
            out = model(ids[:, t : t + 1], use_cache=True, **cache_kwargs(cache))
            steps.append(out.logits)
    return torch.cat(steps, dim=1), cache


def named_checks(exact: Check, cached: Check, save_load: Check) -> dict[str, Check]:
    """A family module's ``CHECKS``: its three checks keyed by the table's columns, in the columns' order."""
    return dict(zip(COLUMNS, (exact, cached, save_load), strict=True))


def check_by_name(checks: dict[str, Check]) -> Callable[[str, str, str], None]:
    """A family module's ``check(name, family, method)``: runs ``checks[name](family, method)``."""

    def check(name: str, family: str, method: str) -> None:
        checks[name](family, method)

    return check


def family_test(check: Check, families: str | Iterable[str], methods: Iterable[str]) -> Callable:
    """A test running ``check(family, method)`` for every family of ``families`` and method of ``methods`` (test ids
    ``family-method``), or, when ``families`` is one family's name, for every method (test ids ``method``).
    Assign it to a ``test_...`` name of the test module: pytest collects it under that name."""
    if isinstance(families, str):
        family = families

        @pytest.mark.parametrize("method", list(methods))
        def test_one_family(method: str) -> None:
            check(family, method)

        test_one_family.__doc__ = check.__doc__
        return test_one_family

    @pytest.mark.parametrize("method", list(methods))
    @pytest.mark.parametrize("family", list(families))
    def test(family: str, method: str) -> None:
        check(family, method)

    test.__doc__ = check.__doc__
    return test
