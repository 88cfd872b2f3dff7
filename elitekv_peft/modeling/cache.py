"""The latent KV cache of EliteKV attention, built on transformers' `Cache` API.

Per layer and token an EliteKV attention layer stores only

* the rotated key chunks, ``G * 2r`` values (``G`` key/value heads, ``r`` RoPE chunks per head), and
* the shared latent ``c = x @ W_down``, ``d_c`` values,

instead of the ``2 * G * D`` values of full keys and values.

`EliteKVCacheLayer` reuses the bookkeeping of transformers' `DynamicLayer` (growth by concatenation, cropping,
beam reordering, batch selection), with its two tensors holding these two parts:

* ``keys``:   rotated RoPE chunks, shape ``[batch, G, seq, 2r]``
* ``values``: latent,              shape ``[batch, 1, seq, d_c]``

`model.generate()` needs no flag: the first time an EliteKV attention layer sees an empty default layer of the cache
that `generate` (or the model's forward) created, it puts an `EliteKVCacheLayer` in its place (`latent_layer`).
`EliteKVCache` is the same thing made explicitly, for users who build their cache by hand.

`EliteKVStaticCache` (layers `EliteKVStaticLayer`) is the pre-allocated variant, as transformers' `StaticCache` is:
fixed shapes ``[batch, G, max_cache_len, 2r]`` and ``[batch, 1, max_cache_len, d_c]``, written in place, with the
number of filled slots kept in a device tensor, so that decode steps can be captured in a CUDA graph or compiled.

Sliding-window attention layers (Mistral with a window, Gemma 2's local layers, Qwen2 with ``use_sliding_window``)
keep only their window, as transformers' sliding layers do: `EliteKVSlidingWindowLayer` (dynamic, the last
``window - 1`` tokens) and `EliteKVStaticSlidingLayer` (``min(max_cache_len, window)`` slots). `latent_layer` and
`EliteKVStaticCache` pick them from the attention layer's window (`variants.layer_window`).

This file imports only torch, transformers and its sibling `variants.py`: it is copied next to saved models
(``auto_map``).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import (
    Cache,
    CacheLayerMixin,
    DynamicLayer,
    DynamicSlidingWindowLayer,
    StaticLayer,
    StaticSlidingWindowLayer,
)

from .variants import layer_window


class EliteKVCacheLayer(DynamicLayer):
    """One layer of the latent cache: rotated chunks ``[B, G, S, 2r]`` and latent ``[B, 1, S, d_c]``."""

    @property
    def rope_keys(self) -> torch.Tensor | None:
        """The cached rotated key chunks, ``[batch, G, seq, 2r]``."""
        return self.keys

    @property
    def latents(self) -> torch.Tensor | None:
        """The cached latents, ``[batch, 1, seq, d_c]``."""
        return self.values

    def nbytes(self) -> int:
        """Bytes held by this layer's tensors."""
        if not self.is_initialized:
            return 0
        return self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()


class EliteKVSlidingWindowLayer(DynamicSlidingWindowLayer):
    """One layer of the latent cache for a sliding-window attention layer: only the window is kept.

    transformers' `DynamicSlidingWindowLayer` conventions: after each update the layer keeps the last
    ``sliding_window - 1`` tokens' rotated chunks ``[B, G, S, 2r]`` and latents ``[B, 1, S, d_c]`` (a new token sees
    itself and the ``window - 1`` before it), an update returns the kept tokens plus the new ones, and
    ``get_mask_sizes`` tells the model's mask where they sit. ``get_seq_length`` counts every token seen.
    """

    rope_keys = EliteKVCacheLayer.rope_keys
    latents = EliteKVCacheLayer.latents
    nbytes = EliteKVCacheLayer.nbytes


class EliteKVCache(Cache):
    """A cache whose layers are `EliteKVCacheLayer`s (`EliteKVSlidingWindowLayer`s on sliding-window layers), created
    lazily as layers are updated.

    Example::

        cache = EliteKVCache()
        out = model(input_ids, cache=cache, use_cache=True)  # `past_key_values=` before transformers 5.24
        print(cache.memory_bytes())
    """

    def __init__(self) -> None:
        super().__init__(layer_class_to_replicate=EliteKVCacheLayer)

    def memory_bytes(self) -> int:
        """Bytes held by all layers of this cache."""
        return cache_nbytes(self)


class EliteKVStaticLayer(StaticLayer):
    """One pre-allocated layer of the latent cache: rotated chunks and latents written in place.

    Shapes: ``keys`` ``[batch, G, max_cache_len, 2r]``, ``values`` ``[batch, 1, max_cache_len, d_c]``; the first
    ``cumulative_length`` slots (a 0-dim long tensor on the cache's device) hold tokens, the rest are zeros.
    """

    def __init__(self, max_cache_len: int) -> None:
        super().__init__(max_cache_len=max_cache_len)
        self.cumulative_length = torch.zeros((), dtype=torch.long)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Allocate both buffers from the first update's rotated chunks ``[B, G, T, 2r]`` and latents."""
        self.dtype, self.device = key_states.dtype, key_states.device
        self.batch_size, self.num_heads = key_states.shape[:2]
        self.k_head_dim, self.v_head_dim = key_states.shape[-1], value_states.shape[-1]
        batch, length = self.batch_size, self.max_cache_len
        options = {"dtype": self.dtype, "device": self.device}
        self.keys = torch.zeros(batch, self.num_heads, length, self.k_head_dim, **options)
        self.values = torch.zeros(batch, 1, length, self.v_head_dim, **options)
        self.cumulative_length = self.cumulative_length.to(self.device)
        if not torch.compiler.is_compiling():
            for tensor in (self.keys, self.values, self.cumulative_length):
                torch._dynamo.mark_static_address(tensor)
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``T`` new tokens' chunks ``[B, G, T, 2r]`` and latents ``[B, 1, T, d_c]`` after the filled slots.

        Returns the whole buffers (``max_cache_len`` slots); `valid_length` says how many are filled. Writing past
        ``max_cache_len`` raises (on CPU) or is undefined (on CUDA, where checking would need a synchronisation).
        """
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if key_states.shape[0] != self.batch_size:
            raise ValueError(
                f"EliteKVStaticCache was allocated for batch {self.batch_size}, got {key_states.shape[0]}: "
                "make a new cache for another batch size."
            )
        length = key_states.shape[-2]
        positions = self.cumulative_length + torch.arange(length, device=self.device)
        # on CPU reading the position needs no synchronisation; under torch.compile it would break the graph
        # (index_copy_ still refuses out-of-range positions on CPU)
        checked = self.device.type == "cpu" and not torch.compiler.is_compiling()
        if checked and int(positions[-1]) >= self.max_cache_len:
            raise ValueError(
                f"EliteKVStaticCache holds {self.max_cache_len} tokens; writing up to position {int(positions[-1])}. "
                "Make it with a larger max_cache_len."
            )
        self.keys.index_copy_(2, positions, key_states.to(self.dtype))
        self.values.index_copy_(2, positions, value_states.to(self.dtype))
        self.cumulative_length.add_(length)
        return self.keys, self.values

    def valid_length(self) -> torch.Tensor:
        """Filled slots, a 0-dim long tensor on the cache's device."""
        return self.cumulative_length

    def get_seq_length(self) -> torch.Tensor | int:
        """Filled slots (a 0-dim tensor once allocated, so that reading it needs no synchronisation)."""
        return self.cumulative_length if self.is_initialized else 0

    def nbytes(self) -> int:
        """Bytes held by this layer's buffers (all ``max_cache_len`` slots)."""
        if not self.is_initialized:
            return 0
        return self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()


class EliteKVStaticSlidingLayer(StaticSlidingWindowLayer):
    """One pre-allocated layer of the latent cache for a sliding-window attention layer: ``min(max_cache_len,
    sliding_window)`` slots of rotated chunks ``[B, G, ., 2r]`` and latents ``[B, 1, ., d_c]``, written in place and
    rolled once full (transformers' `StaticSlidingWindowLayer` conventions; the model's mask marks the valid slots)."""

    lazy_initialization = EliteKVStaticLayer.lazy_initialization
    nbytes = EliteKVStaticLayer.nbytes

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``T`` new tokens' chunks and latents; returns what the new tokens attend to (see the class)."""
        if self.is_initialized and key_states.shape[0] != self.batch_size:
            raise ValueError(
                f"EliteKVStaticCache was allocated for batch {self.batch_size}, got {key_states.shape[0]}: "
                "make a new cache for another batch size."
            )
        return super().update(key_states, value_states, *args, **kwargs)


class EliteKVStaticCache(Cache):
    """A pre-allocated latent cache for all layers of an EliteKV model (for CUDA graphs and `torch.compile`).

    Example::

        cache = EliteKVStaticCache(model.config, max_cache_len=4096)
        out = model.generate(input_ids, cache=cache, max_new_tokens=64)  # `past_key_values=` before 5.24
    """

    def __init__(self, config: object, max_cache_len: int) -> None:
        text_config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        layers = []
        for layer_idx in range(text_config.num_hidden_layers):  # sliding-window layers keep only their window
            window = layer_window(text_config, layer_idx)
            if window is None:
                layers.append(EliteKVStaticLayer(max_cache_len))
            else:
                layers.append(EliteKVStaticSlidingLayer(max_cache_len, window))
        super().__init__(layers=layers)

    def memory_bytes(self) -> int:
        """Bytes held by all layers (the whole pre-allocated length)."""
        return cache_nbytes(self)


def valid_length(layer: object) -> torch.Tensor | None:
    """Filled slots of a pre-allocated latent layer (device tensor), or None for a dynamic one (all filled)."""
    return layer.valid_length() if isinstance(layer, EliteKVStaticLayer) else None


LATENT_LAYERS = (EliteKVCacheLayer, EliteKVSlidingWindowLayer, EliteKVStaticLayer, EliteKVStaticSlidingLayer)


def latent_layer(cache: Cache, layer_idx: int, sliding_window: int | None = None) -> CacheLayerMixin:
    """Return the latent cache layer for ``layer_idx`` in ``cache``, adopting an empty default layer.

    A fresh `DynamicCache` (what `generate` makes by default) holds empty `DynamicLayer`s (`DynamicSlidingWindowLayer`s
    on sliding-window layers), or none yet; those are replaced by `EliteKVCacheLayer`s, or by
    `EliteKVSlidingWindowLayer`s keeping only the window when ``sliding_window`` (the attention layer's) is given.
    A fresh `StaticCache` (``generate(cache_implementation="static")``) holds empty `StaticLayer`s
    (`StaticSlidingWindowLayer`s): those become `EliteKVStaticLayer`s (`EliteKVStaticSlidingLayer`s) of the same
    length. A layer that already holds full keys/values, or an offloaded or quantized layer, cannot hold the latent
    cache and raises a `TypeError` that says what to pass instead.
    """
    while len(cache.layers) <= layer_idx:
        cache.layers.append(DynamicLayer())  # adopted below, with the window of the layer that uses it
    layer = cache.layers[layer_idx]
    if isinstance(layer, LATENT_LAYERS):
        return layer
    new_layer: CacheLayerMixin | None = None
    if type(layer) in (DynamicLayer, DynamicSlidingWindowLayer) and not layer.is_initialized:
        new_layer = EliteKVCacheLayer() if sliding_window is None else EliteKVSlidingWindowLayer(sliding_window)
    elif type(layer) in (StaticLayer, StaticSlidingWindowLayer) and not layer.is_initialized:
        length = layer.max_cache_len  # a sliding layer's is already min(max_cache_len, window)
        if sliding_window is None:
            new_layer = EliteKVStaticLayer(length)
        else:
            new_layer = EliteKVStaticSlidingLayer(length, sliding_window)
    if new_layer is None:
        raise TypeError(
            f"EliteKV attention (layer {layer_idx}) cannot store its latent cache in a {type(layer).__name__} of a "
            f'{type(cache).__name__}. Use the default cache of `generate()` or `cache_implementation="static"`, '
            "or pass `elitekv_peft.EliteKVCache()` (or `EliteKVStaticCache(config, max_cache_len)`) as the cache."
        )
    if getattr(layer, "record_past", False):  # assisted generation asked the empty layer to keep what it crops
        new_layer.activate_past_recording()
    cache.layers[layer_idx] = new_layer
    return new_layer


def static_cache_init_shape() -> None:
    """transformers' ``_get_static_cache_init_shape`` for a converted model: None, so that a `StaticCache` is left to
    initialize each layer on its first update. transformers initializes it early for chunked prefill
    (``generate(prefill_chunk_size=...)``) with the original's key and value heads; the converted layers store
    other shapes (a latent layer adopts only an empty one), and the early buffers would be the original's size."""
    return None


def cache_nbytes(cache: Cache) -> int:
    """Bytes held by the key/value tensors of any transformers `Cache` (dynamic layers), e.g. for comparisons."""
    total = 0
    for layer in cache.layers:
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total
