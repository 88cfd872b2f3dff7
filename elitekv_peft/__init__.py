"""elitekv-peft: cut the KV cache of RoPE language models (EliteKV: RoPElite + J-LRD), the PEFT way.

Importing this package registers the ``ELITEKV`` method with PEFT (`get_peft_model`, `PeftModel.from_pretrained`)
and the EliteKV model classes with transformers' ``AutoConfig`` / ``AutoModelForCausalLM``.
"""

from . import kernels  # noqa: F401 - registers the fused decode kernels with the absorbed attention
from .budget import Budget, resolve_budget
from .config import EliteKVConfig
from .distributed import check_fsdp_launch
from .hub import push_to_hub
from .modeling.cache import EliteKVCache, EliteKVCacheLayer, EliteKVStaticCache, EliteKVStaticLayer, cache_nbytes
from .modeling.modeling_elitekv import (
    EliteKVLlamaConfig,
    EliteKVLlamaForCausalLM,
    EliteKVMistralConfig,
    EliteKVMistralForCausalLM,
    EliteKVQwen2Config,
    EliteKVQwen2ForCausalLM,
)
from .registration import register_with_peft, register_with_transformers
from .tuner import EliteKVModel, record_evaluation, record_training, set_attention_path, to_standalone

__version__ = "0.1.0"

register_with_peft()
register_with_transformers()

__all__ = [
    "Budget",
    "EliteKVCache",
    "EliteKVCacheLayer",
    "EliteKVConfig",
    "EliteKVLlamaConfig",
    "EliteKVLlamaForCausalLM",
    "EliteKVMistralConfig",
    "EliteKVMistralForCausalLM",
    "EliteKVModel",
    "EliteKVQwen2Config",
    "EliteKVQwen2ForCausalLM",
    "EliteKVStaticCache",
    "EliteKVStaticLayer",
    "cache_nbytes",
    "check_fsdp_launch",
    "push_to_hub",
    "record_evaluation",
    "record_training",
    "resolve_budget",
    "set_attention_path",
    "to_standalone",
]
