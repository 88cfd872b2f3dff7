"""Standalone transformers models with EliteKV attention: what `save_pretrained` writes and `from_pretrained` loads.

For each supported family (Llama, Mistral, Qwen2, Qwen3, OLMo2, Phi-3, Granite, Gemma 2, Gemma 3 text) there is a
config subclass with an extra ``elitekv`` dict (per-layer chunk choices and latent sizes) and a ``*ForCausalLM``
subclass whose decoder layers use `EliteKVAttention`. Importing `elitekv_peft` registers them with
``AutoConfig``/``AutoModelForCausalLM``; saved folders also carry this file and its relative imports, referenced
from ``config.json``'s ``auto_map``, so ``trust_remote_code=True`` loads them without the package.

This file imports only torch, transformers and its sibling files (`attention_base.py`, `attention_elitekv.py`,
`attention_small_heads.py`, `attention_lowrank.py`, `absorbed.py`, `cache.py`, `key_norm.py`). Which attention a
layer gets depends on ``elitekv["method"]`` (`build_attention`, the one factory for every family; families with
q/k norms, Qwen3, OLMo2 and Gemma 3, get the method's variant in `key_norm.py`).
"""

from __future__ import annotations

from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GraniteConfig,
    GraniteForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Olmo2Config,
    Olmo2ForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from .attention_elitekv import EliteKVAttention
from .attention_lowrank import LowRankKVAttention
from .attention_small_heads import SmallHeadAttention
from .cache import EliteKVCache, cache_nbytes, static_cache_init_shape
from .key_norm import KEY_NORM_ATTENTION, key_norm_group

# config.elitekv["method"] -> attention module of that method
ATTENTION_CLASSES: dict[str, type] = {
    "elitekv": EliteKVAttention,
    "kv_latent": SmallHeadAttention,
    "gqa": SmallHeadAttention,
    "lorc": LowRankKVAttention,
}
CONVERTED_ATTENTION: tuple[type, ...] = (EliteKVAttention, SmallHeadAttention, LowRankKVAttention)


def build_attention(config: Any, layer_idx: int, decoder: Any) -> Any:
    """The attention module of layer ``layer_idx`` for the method named in ``config.elitekv`` (default EliteKV)."""
    method = config.elitekv.get("method", "elitekv")
    if method not in ATTENTION_CLASSES:
        raise ValueError(f"unknown method {method!r} in config.elitekv; known: {sorted(ATTENTION_CLASSES)}")
    classes = KEY_NORM_ATTENTION if key_norm_group(config) else ATTENTION_CLASSES  # Qwen3 / OLMo2: `key_norm`
    module = classes[method](config, layer_idx)
    if isinstance(module, LowRankKVAttention):
        module.bind_decoder(decoder)
    return module


def refuse_continuous_batching(*args: Any, **kwargs: Any) -> Any:
    """transformers' continuous batching (``generate_batch``, ``init_continuous_batching``, ``transformers serve
    --continuous-batching``) for a converted model: refused. It stores keys and values per head in its paged cache,
    which holds no latent cache, and it reports a failed request as an empty result."""
    raise NotImplementedError(
        "Continuous batching (generate_batch / init_continuous_batching) uses transformers' paged cache of full keys "
        "and values per head, which cannot hold this model's compressed cache. Use model.generate() on a padded "
        "batch, or `elitekv serve` (transformers' server with the latent cache)."
    )


# Where a converted model differs from its family's class in `generate()`: the standalone classes define these
# (`EliteKVMixin`), and an in-memory conversion sets them on the converted model (`EliteKVModel.inject_adapter`).
GENERATION_OVERRIDES = {
    "_get_static_cache_init_shape": static_cache_init_shape,
    "init_continuous_batching": refuse_continuous_batching,
}


def install_attention(decoder: Any, config: Any) -> None:
    """Replace ``self_attn`` of every decoder layer of ``decoder`` (a ``*Model``) with the converted attention."""
    for layer_idx, layer in enumerate(decoder.layers):
        layer.self_attn = build_attention(config, layer_idx, decoder)


class EliteKVMixin:
    """What the EliteKV causal LM of every family shares: the attention swap at init and cache helpers.

    ``EliteKV<Family>ForCausalLM(EliteKVMixin, <Family>ForCausalLM)`` builds the family's model, then gives every
    decoder layer the attention that ``config.elitekv`` describes (`install_attention`).
    """

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        install_attention(self.model, self.config)
        self.post_init()

    def load_adapter(self, peft_model_id: str | None = None, *args: Any, **kwargs: Any) -> Any:
        """Skip the PEFT adapter saved beside a standalone EliteKV model (a local folder or a Hub repository): its
        weights are already loaded. Returns an empty loading report (``output_loading_info=True`` reads it)."""
        if _saved_adapter_type(peft_model_id, kwargs) == "ELITEKV":
            return _nothing_loaded()
        return super().load_adapter(peft_model_id, *args, **kwargs)

    _get_static_cache_init_shape = staticmethod(static_cache_init_shape)
    init_continuous_batching = staticmethod(refuse_continuous_batching)

    @staticmethod
    def new_cache() -> EliteKVCache:
        """An empty latent cache (the default cache of `generate` becomes one automatically)."""
        return EliteKVCache()

    @staticmethod
    def cache_nbytes(cache: Any) -> int:
        return cache_nbytes(cache)


DOWNLOAD_ARGUMENTS = ("cache_dir", "force_download", "proxies", "local_files_only", "token", "revision", "subfolder")


def _saved_adapter_type(path: str | None, kwargs: dict[str, Any]) -> str | None:
    """``peft_type`` of the adapter config at ``path`` (a folder or a Hub repository, with the download settings
    transformers passes to ``load_adapter``), or None when there is none."""
    import json
    import os

    if path is None:
        return None
    if os.path.isdir(path):
        file = os.path.join(path, "adapter_config.json")
        file = file if os.path.isfile(file) else None
    else:
        from transformers.utils import cached_file

        download = dict(getattr(kwargs.get("load_config"), "download_kwargs", None) or {})
        download.update(kwargs.get("adapter_kwargs") or {})
        if kwargs.get("token") is not None:
            download["token"] = kwargs["token"]
        options = {k: v for k, v in download.items() if k in DOWNLOAD_ARGUMENTS and v is not None}
        file = cached_file(
            path,
            "adapter_config.json",
            _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
            **options,
        )
    if file is None:
        return None
    with open(file, encoding="utf-8") as handle:
        return json.load(handle).get("peft_type")


def _nothing_loaded() -> Any:
    """An empty transformers loading report, where this transformers has one (None otherwise)."""
    try:
        from transformers.utils.loading_report import LoadStateDictInfo
    except ImportError:
        return None
    import dataclasses

    empty = {list: list, dict: dict}
    return LoadStateDictInfo(
        **{f.name: empty.get(getattr(f.type, "__origin__", None), set)() for f in dataclasses.fields(LoadStateDictInfo)}
    )


@strict
class EliteKVLlamaConfig(LlamaConfig):
    model_type = "elitekv_llama"
    elitekv: dict | None = None


class EliteKVLlamaForCausalLM(EliteKVMixin, LlamaForCausalLM):
    config_class = EliteKVLlamaConfig


@strict
class EliteKVMistralConfig(MistralConfig):
    model_type = "elitekv_mistral"
    elitekv: dict | None = None


class EliteKVMistralForCausalLM(EliteKVMixin, MistralForCausalLM):
    config_class = EliteKVMistralConfig


@strict
class EliteKVQwen2Config(Qwen2Config):
    model_type = "elitekv_qwen2"
    elitekv: dict | None = None


class EliteKVQwen2ForCausalLM(EliteKVMixin, Qwen2ForCausalLM):
    config_class = EliteKVQwen2Config


@strict
class EliteKVQwen3Config(Qwen3Config):
    model_type = "elitekv_qwen3"
    elitekv: dict | None = None


class EliteKVQwen3ForCausalLM(EliteKVMixin, Qwen3ForCausalLM):
    config_class = EliteKVQwen3Config


@strict
class EliteKVOlmo2Config(Olmo2Config):
    model_type = "elitekv_olmo2"
    elitekv: dict | None = None


class EliteKVOlmo2ForCausalLM(EliteKVMixin, Olmo2ForCausalLM):
    config_class = EliteKVOlmo2Config


@strict
class EliteKVPhi3Config(Phi3Config):
    model_type = "elitekv_phi3"
    elitekv: dict | None = None


class EliteKVPhi3ForCausalLM(EliteKVMixin, Phi3ForCausalLM):
    config_class = EliteKVPhi3Config


@strict
class EliteKVGraniteConfig(GraniteConfig):
    model_type = "elitekv_granite"
    elitekv: dict | None = None


class EliteKVGraniteForCausalLM(EliteKVMixin, GraniteForCausalLM):
    config_class = EliteKVGraniteConfig


@strict
class EliteKVGemma2Config(Gemma2Config):
    model_type = "elitekv_gemma2"
    elitekv: dict | None = None


class EliteKVGemma2ForCausalLM(EliteKVMixin, Gemma2ForCausalLM):
    config_class = EliteKVGemma2Config


@strict
class EliteKVGemma3TextConfig(Gemma3TextConfig):
    model_type = "elitekv_gemma3_text"
    elitekv: dict | None = None


class EliteKVGemma3ForCausalLM(EliteKVMixin, Gemma3ForCausalLM):
    config_class = EliteKVGemma3TextConfig


# base model_type -> (config class, causal LM class)
ELITEKV_CLASSES: dict[str, tuple[type, type]] = {
    "llama": (EliteKVLlamaConfig, EliteKVLlamaForCausalLM),
    "mistral": (EliteKVMistralConfig, EliteKVMistralForCausalLM),
    "qwen2": (EliteKVQwen2Config, EliteKVQwen2ForCausalLM),
    "qwen3": (EliteKVQwen3Config, EliteKVQwen3ForCausalLM),
    "olmo2": (EliteKVOlmo2Config, EliteKVOlmo2ForCausalLM),
    "phi3": (EliteKVPhi3Config, EliteKVPhi3ForCausalLM),
    "granite": (EliteKVGraniteConfig, EliteKVGraniteForCausalLM),
    "gemma2": (EliteKVGemma2Config, EliteKVGemma2ForCausalLM),
    "gemma3_text": (EliteKVGemma3TextConfig, EliteKVGemma3ForCausalLM),
}
