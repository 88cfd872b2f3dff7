"""Every KV-cache compression method, one file each, behind one interface (`base.Method`).

* `elitekv`: RoPElite chunk selection + a low-rank latent for NoPE keys and values (the default);
* `kv_latent`: smaller key/value head dims, frequency-aware choice of rotary chunks, per-head value SVD;
* `lorc`: training-free low-rank keys/values per layer with a progressive (condition-number) rank schedule;
* `gqa`: mean-pooled key/value heads (the EliteKV paper's baseline); `mean_pool_kv_heads` is the plain-transformers
  version of the same pooling.

`elitekv_peft.conversion` runs them through `get_method`; their attention modules live in `elitekv_peft.modeling`
(flat files, so saved models can carry them as ``auto_map`` code).
"""

from __future__ import annotations

from . import elitekv, gqa, kv_latent, lorc
from .base import Converted, Method
from .gqa import mean_pool_kv_heads

METHODS: dict[str, Method] = {m.name: m for m in (elitekv.METHOD, kv_latent.METHOD, lorc.METHOD, gqa.METHOD)}


def get_method(name: str) -> Method:
    """The method called ``name``; raises ``ValueError`` naming the known ones."""
    if name not in METHODS:
        raise ValueError(f"method={name!r} is not supported; choose one of {tuple(METHODS)}.")
    return METHODS[name]


__all__ = ["METHODS", "Converted", "Method", "get_method", "mean_pool_kv_heads"]
