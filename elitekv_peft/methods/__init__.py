"""Other KV-cache reduction methods measured beside EliteKV (issue #4; so far the GQA baseline)."""

from .gqa import mean_pool_kv_heads

__all__ = ["mean_pool_kv_heads"]
