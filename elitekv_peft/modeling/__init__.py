"""Exactly the files a saved EliteKV model carries (``auto_map``): they import only torch, transformers and each other.

* `modeling_elitekv`: the ``EliteKV*Config`` / ``EliteKV*ForCausalLM`` classes of each family and the one factory
  (`build_attention`) that gives a layer the attention of the method named in ``config.elitekv``;
* `attention_base`: `ConvertedAttention`, the base of every method's attention (settings, forward prologue, the
  cache taken under the installed transformers' name), and the plain functions they share;
* `attention_elitekv`, `attention_small_heads` (``kv_latent``, ``gqa``), `attention_lowrank` (``lorc``);
* `absorbed`: EliteKV attention computed on the latent (decode steps), with its PyTorch reference;
* `cache`: the latent caches (dynamic and pre-allocated).
"""

from .attention_base import ConvertedAttention
from .attention_elitekv import EliteKVAttention
from .attention_lowrank import LowRankKVAttention
from .attention_small_heads import SmallHeadAttention
from .cache import EliteKVCache, EliteKVCacheLayer, EliteKVStaticCache, EliteKVStaticLayer, cache_nbytes
from .modeling_elitekv import ATTENTION_CLASSES, CONVERTED_ATTENTION, ELITEKV_CLASSES, build_attention

__all__ = [
    "ATTENTION_CLASSES",
    "CONVERTED_ATTENTION",
    "ELITEKV_CLASSES",
    "ConvertedAttention",
    "EliteKVAttention",
    "EliteKVCache",
    "EliteKVCacheLayer",
    "EliteKVStaticCache",
    "EliteKVStaticLayer",
    "LowRankKVAttention",
    "SmallHeadAttention",
    "build_attention",
    "cache_nbytes",
]
