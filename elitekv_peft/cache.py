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

This file imports only torch and transformers: it is copied next to saved models (``auto_map``).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer


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


class EliteKVCache(Cache):
    """A cache whose layers are all `EliteKVCacheLayer`, created lazily as layers are updated.

    Example::

        cache = EliteKVCache()
        out = model(input_ids, past_key_values=cache, use_cache=True)
        print(cache.memory_bytes())
    """

    def __init__(self) -> None:
        super().__init__(layer_class_to_replicate=EliteKVCacheLayer)

    def memory_bytes(self) -> int:
        """Bytes held by all layers of this cache."""
        return cache_nbytes(self)


def latent_layer(cache: Cache, layer_idx: int) -> EliteKVCacheLayer:
    """Return the `EliteKVCacheLayer` for ``layer_idx`` in ``cache``, adopting an empty default layer.

    A fresh `DynamicCache` (what `generate` makes by default) holds empty `DynamicLayer`s, or none yet; those are
    replaced by `EliteKVCacheLayer`s. A layer that already holds full keys/values, or a static or quantized
    layer, cannot hold the latent cache and raises a `TypeError` that says what to pass instead.
    """
    while len(cache.layers) <= layer_idx:
        cache.layers.append(EliteKVCacheLayer())
    layer = cache.layers[layer_idx]
    if isinstance(layer, EliteKVCacheLayer):
        return layer
    if type(layer) is DynamicLayer and not layer.is_initialized:
        new_layer = EliteKVCacheLayer()
        cache.layers[layer_idx] = new_layer
        return new_layer
    raise TypeError(
        f"EliteKV attention (layer {layer_idx}) cannot store its latent cache in a {type(layer).__name__} of a "
        f"{type(cache).__name__}. Use the default cache of `generate()` (leave `cache_implementation` unset), "
        "or pass `past_key_values=elitekv_peft.EliteKVCache()`."
    )


def cache_nbytes(cache: Cache) -> int:
    """Bytes held by the key/value tensors of any transformers `Cache` (dynamic layers), e.g. for comparisons."""
    total = 0
    for layer in cache.layers:
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total
