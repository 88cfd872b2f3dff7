"""The methods beside EliteKV (issue #4), selected with ``EliteKVConfig(method=...)``.

* `kv_latent`: smaller key/value head dims, frequency-aware choice of rotary chunks, per-head value SVD;
* `lorc`: training-free low-rank keys/values per layer with a progressive (condition-number) rank schedule;
* `gqa`: mean-pooled key/value heads (the EliteKV paper's baseline); `mean_pool_kv_heads` is the plain-transformers
  version of the same pooling.

`dispatch` runs their conversion; their attention modules live in `elitekv_peft.attention_heads` and
`elitekv_peft.attention_lowrank` (flat files, so saved models can carry them as ``auto_map`` code).
"""

from .gqa import mean_pool_kv_heads

__all__ = ["mean_pool_kv_heads"]
