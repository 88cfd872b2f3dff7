"""`ConversionPlan`: one conversion's decisions, held once.

A conversion decides, for the whole model, what every layer becomes: EliteKV's chosen rotary chunks and latent sizes,
or another method's per-layer choices (kept chunks and value dims, ranks, pooled heads). Those decisions are needed in
three forms, all made here from one typed object:

* the adapter config's filled-in fields (``chunk_indices``, ``latent_dims``, ``key_latent_dims``, ``method_plan``,
  ``base_shape``, ``rope_chunks``, ``latent_dim``), saved in ``adapter_config.json`` (`fill`);
* the saved model config's ``elitekv`` dict, which the attention modules of a saved model read (`model_config`);
* the cache each layer keeps (`values_per_token`), for the model card and reports.

A plan is made by the conversion (`elitekv_peft.conversion`), or read back from a converted adapter config
(`from_adapter_config`) when a saved adapter is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .modeling.key_norm import elitekv_scale_count


@dataclass(frozen=True)
class ConversionPlan:
    """What a conversion decided, for every layer.

    Attributes:
        method: ``"elitekv"``, ``"kv_latent"``, ``"lorc"`` or ``"gqa"``.
        kv_ratio: the requested fraction of the KV cache.
        base_shape: the base model's attention shape (`elitekv_peft.conversion.base_shape`), checked on load.
        qkv_bias, o_bias: whether the original q/k/v and o projections have biases.
        lowrank_init: the factorization's initialisation (None for ``gqa``).
        layers: the method's per-layer choices. EliteKV: ``chunk_indices`` ``[layer][kv_head][r]``, ``latent_dims``
            ``[layer]``, ``key_latent_dims`` ``[layer]`` or None (joint latent), ``rope_chunks``, ``latent_dim``,
            ``selection`` and ``decomposition``. Other methods: their ``plan`` (see `elitekv_peft.methods`).
    """

    method: str
    kv_ratio: float | None
    base_shape: dict[str, Any]
    qkv_bias: bool
    o_bias: bool
    lowrank_init: str | None
    layers: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_adapter_config(cls, peft_config: Any, qkv_bias: bool, o_bias: bool) -> ConversionPlan:
        """The plan a converted `EliteKVConfig` holds (e.g. one loaded with a saved adapter)."""
        if peft_config.method == "elitekv":
            layers = {
                "chunk_indices": peft_config.chunk_indices,
                "latent_dims": peft_config.latent_dims,
                "key_latent_dims": peft_config.key_latent_dims,
                "rope_chunks": peft_config.rope_chunks or len(peft_config.chunk_indices[0][0]),
                "latent_dim": peft_config.latent_dim,
                "selection": peft_config.selection,
                "decomposition": peft_config.decomposition,
            }
        else:
            layers = dict(peft_config.method_plan)
        return cls(
            method=peft_config.method,
            kv_ratio=peft_config.kv_ratio,
            base_shape=dict(peft_config.base_shape or {}),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            lowrank_init=peft_config.lowrank_init,
            layers=layers,
        )

    def fill(self, peft_config: Any) -> None:
        """Write this plan into the filled-in fields of ``peft_config`` (saved in ``adapter_config.json``)."""
        peft_config.base_shape = dict(self.base_shape)
        if self.method == "elitekv":
            peft_config.chunk_indices = self.layers["chunk_indices"]
            peft_config.latent_dims = self.layers["latent_dims"]
            peft_config.key_latent_dims = self.layers["key_latent_dims"]
            peft_config.rope_chunks = self.layers["rope_chunks"]
            peft_config.latent_dim = self.layers["latent_dim"]
        else:
            peft_config.method_plan = dict(self.layers)

    def model_config(self) -> dict[str, Any]:
        """The ``elitekv`` entry of the model config (``config.json``), read by the attention modules."""
        data: dict[str, Any] = {"method": self.method, "kv_ratio": self.kv_ratio}
        if self.method == "elitekv":
            data.update(
                rope_chunks=self.layers["rope_chunks"],
                chunk_indices=self.layers["chunk_indices"],
                latent_dims=self.layers["latent_dims"],
                key_latent_dims=self.layers["key_latent_dims"],
                selection=self.layers["selection"],
                decomposition=self.layers["decomposition"],
                lowrank_init=self.lowrank_init,
                qkv_bias=self.qkv_bias,
                o_bias=self.o_bias,
            )
            return data
        data.update(qkv_bias=self.qkv_bias, o_bias=self.o_bias)
        data.update(self.layers)
        if self.lowrank_init is not None:
            data["lowrank_init"] = self.lowrank_init
        return data

    @property
    def num_layers(self) -> int:
        return int(self.base_shape["num_hidden_layers"])

    def values_per_token(self) -> list[int]:
        """Values each layer caches per token."""
        layers = self.layers
        if self.method == "elitekv":  # r per layer from the chosen chunks (rope_allocation="sensitivity" varies it)
            G, D = self.base_shape["num_key_value_heads"], self.base_shape["head_dim"]
            values = []
            for chunks, d_c in zip(layers["chunk_indices"], layers["latent_dims"], strict=True):
                r = len(chunks[0])
                scales = elitekv_scale_count(self.base_shape["model_type"], G, D, r)  # k_norm's
                values.append(G * 2 * r + int(d_c) + scales)
            return values
        if self.method == "lorc":
            return [int(k) + int(v) for k, v in zip(layers["key_ranks"], layers["value_ranks"], strict=True)]
        heads = int(layers["kv_heads"])
        chunks, value_dims = layers["key_chunks"], layers["value_dims"]
        return [heads * (2 * len(chunks[i]) + int(value_dims[i])) for i in range(self.num_layers)]

    def achieved_ratio(self) -> float:
        """The whole model's cache as a fraction of the original ``2 * G * D`` values per token and layer."""
        full = 2 * self.base_shape["num_key_value_heads"] * self.base_shape["head_dim"] * self.num_layers
        return sum(self.values_per_token()) / full
