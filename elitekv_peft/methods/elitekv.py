"""EliteKV (RoPElite + J-LRD / S-LRD): the method's planning and weight initialisation.

Per layer, on calibration activations: choose ``r`` rotary chunks per key/value head (`elitekv_peft.rope_selection`),
then factor ``[W_k_nope | W_v]`` into one latent (`elitekv_peft.factorization`); the attention module is
`elitekv_peft.modeling.attention_elitekv.EliteKVAttention`. With ``latent_allocation="energy"`` every layer is
factored at its highest allowed rank first and cut once the budget is spread (`elitekv_peft.budget.allocate_latents`).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from ..budget import (
    Budget,
    allocate_latents,
    allocate_rope_chunks,
    latent_bounds,
    max_useful_latent,
    resolve_budget,
    rope_chunk_bounds,
)
from ..calibration import Calibration
from ..modeling.attention_elitekv import rope_attention_factor
from ..modeling.variants import full_rotary
from ..progress import progress_bar
from ..quantization import dense_dtype, dense_weight
from ..rope_selection import elite_order, select_chunks
from .base import Converted, Method
from .elitekv_weights import bias_of, cut_latent, layer_weights, permuted_rows
from .key_norm import elitekv_budget, elitekv_finish, elitekv_prescale, head_scale, key_norms_of

logger = logging.getLogger(__name__)


class EliteKV(Method):
    """RoPElite chunk selection + a low-rank latent for the NoPE keys and the values."""

    name = "elitekv"
    attention = "EliteKVAttention"

    def needs_calibration(self, peft_config: Any) -> bool:
        return peft_config.selection in ("elite", "norm") or peft_config.lowrank_init == "activation"

    def plan_model(self, model: nn.Module, peft_config: Any, shape: dict[str, int]) -> Budget:
        """The cache budget (``r`` and ``d_c``); raises naming the fix for impossible settings."""
        G, D = shape["num_key_value_heads"], shape["head_dim"]
        budget = resolve_budget(
            num_kv_heads=G,
            head_dim=D,
            hidden_size=shape["hidden_size"],
            kv_ratio=peft_config.kv_ratio,
            rope_chunks=peft_config.rope_chunks,
            latent_dim=peft_config.latent_dim,
        )
        # q/k-norm families (Qwen3, OLMo2) cache the key scales too (methods/key_norm.py)
        budget = elitekv_budget(budget, shape["model_type"], peft_config.kv_ratio, peft_config.latent_dim is not None)
        useful = max_useful_latent(shape["hidden_size"], G, D, budget.rope_chunks)
        if budget.latent_dim > useful:
            logger.warning(
                "latent_dim %d exceeds the rank of [W_k_nope | W_v] (%d); %d latent values carry nothing. "
                "A lower kv_ratio loses no quality here.",
                budget.latent_dim,
                useful,
                budget.latent_dim - useful,
            )
        return budget

    def convert(
        self,
        model: nn.Module,
        peft_config: Any,
        shape: dict[str, int],
        budget: Budget,
        calib: Calibration | None,
        device: torch.device,
        progress: bool,
    ) -> Converted:
        useful = max_useful_latent(shape["hidden_size"], budget.num_kv_heads, budget.head_dim, budget.rope_chunks)
        factor_budget = budget  # with latent_allocation="energy", factor at each layer's highest rank, cut later
        if peft_config.latent_allocation == "energy":
            low, high = latent_bounds(budget.latent_dim, useful)
            factor_budget = replace(budget, latent_dim=high)
        plans = []
        layers = model.model.layers
        searches: list[Any] = [None] * len(layers)
        rope_counts = [budget.rope_chunks] * len(layers)
        if peft_config.rope_allocation == "sensitivity":
            searches, rope_counts = spread_rope_chunks(
                layers, budget, calib, device, progress, peft_config.selection_objective
            )
        for layer_idx, layer in enumerate(progress_bar(layers, desc="EliteKV RoPElite + SVD", enabled=progress)):
            layer_budget = replace(factor_budget, rope_chunks=rope_counts[layer_idx])
            plan = plan_layer(
                layer.self_attn, layer_idx, peft_config, layer_budget, calib, device, search=searches[layer_idx]
            )
            if calib is not None:
                calib.inputs[layer_idx] = None  # used: free it (these are [N, T, d] float32 per layer)
            # keep the new weights in the dtype they will have (bf16 halves what waits for the all-or-nothing swap)
            dtype = dense_dtype(layer.self_attn.q_proj, model)
            plan["weights"] = {name: tensor.to(dtype) for name, tensor in plan["weights"].items()}
            plans.append(plan)
        latent_dims = [budget.latent_dim] * len(plans)
        if peft_config.latent_allocation == "energy":
            latent_dims = allocate_latents(
                [plan["energies"] for plan in plans],
                [plan["total_energy"] for plan in plans],
                budget.latent_dim * len(plans),
                low,
            )
            for plan, rank in zip(plans, latent_dims, strict=True):
                cut_latent(plan, rank)
        separate = peft_config.decomposition == "separate"
        return Converted(
            layers={
                "chunk_indices": [plan["chunks"].tolist() for plan in plans],
                "latent_dims": latent_dims,
                "key_latent_dims": [plan["key_latent_dim"] for plan in plans] if separate else None,
                "rope_chunks": budget.rope_chunks,
                "latent_dim": budget.latent_dim,
                "selection": peft_config.selection,
                "decomposition": peft_config.decomposition,
            },
            weights=[plan["weights"] for plan in plans],
            report={
                "selection_errors": [[_finite_or_none(e) for e in plan["selection_error"]] for plan in plans],
                "selection_objective": peft_config.selection_objective,  # the selection errors' unit
                "lowrank_errors": [_finite_or_none(plan["lowrank_error"]) for plan in plans],
            },
        )

    def check_saved(self, peft_config: Any, shape: dict[str, int]) -> None:
        check_filled_fields(peft_config, shape["num_key_value_heads"], shape["head_dim"], shape["num_hidden_layers"])

    def rebuild_weights(self, model: nn.Module, plan: Any) -> list[dict[str, torch.Tensor]]:
        """The rotated parts come from the base weights (``q_proj``, ``k_rope_proj``, ``o_proj``); the latent
        projections are left to the checkpoint."""
        weights = []
        D = plan.base_shape["head_dim"]
        for layer_idx, layer in enumerate(model.model.layers):
            attn = layer.self_attn
            chunks = torch.tensor(plan.layers["chunk_indices"][layer_idx])
            q_w = dense_weight(attn.q_proj).cpu()
            q_rows, rope_rows, _ = permuted_rows(chunks, q_w.shape[0] // D, D)
            weights.append(
                {
                    "q_proj.weight": q_w[q_rows],
                    "k_rope_proj.weight": dense_weight(attn.k_proj).cpu()[rope_rows],
                    "o_proj.weight": dense_weight(attn.o_proj).cpu(),
                }
            )
        return weights


METHOD = EliteKV()


def check_filled_fields(peft_config: Any, num_kv_heads: int, head_dim: int, num_layers: int) -> None:
    """Raise if a converted config's settings disagree with its filled-in fields (e.g. ``kv_ratio`` edited later)."""
    chunks, latents = peft_config.chunk_indices, peft_config.latent_dims
    fix = (
        "The conversion is fixed by the saved chunk choices and latent sizes: load the adapter with its own "
        "adapter_config.json, or convert the base model again with the new setting."
    )
    if len(chunks) != num_layers or len(latents) != num_layers:
        raise ValueError(
            f"chunk_indices/latent_dims cover {len(chunks)}/{len(latents)} layers, not {num_layers}. {fix}"
        )
    counts = [len(layer[0]) for layer in chunks]  # r per layer: equal unless rope_allocation="sensitivity"
    shapes_ok = all(
        len(layer) == num_kv_heads and all(len(c) == r for c in layer) for layer, r in zip(chunks, counts, strict=True)
    )
    if not shapes_ok:
        raise ValueError(f"chunk_indices must hold {num_kv_heads} key/value heads x r chunks per layer. {fix}")
    r = counts[0]
    if getattr(peft_config, "rope_allocation", "uniform") == "uniform":
        if any(c != r for c in counts):
            raise ValueError(f"the saved chunk choices keep {counts} chunks per layer, not one r. {fix}")
        if peft_config.rope_chunks is not None and peft_config.rope_chunks != r:
            raise ValueError(f"rope_chunks={peft_config.rope_chunks} but the saved chunk choices keep r={r}. {fix}")
    elif peft_config.rope_chunks is not None and sum(counts) != peft_config.rope_chunks * num_layers:
        raise ValueError(
            f"rope_chunks={peft_config.rope_chunks} per layer on average, but the saved chunk choices keep {counts}. "
            f"{fix}"
        )
    if peft_config.latent_dim is not None:
        if peft_config.latent_allocation == "uniform" and any(d != peft_config.latent_dim for d in latents):
            raise ValueError(f"latent_dim={peft_config.latent_dim} but the saved latent sizes are {latents}. {fix}")
        if sum(latents) != peft_config.latent_dim * num_layers:
            raise ValueError(
                f"latent_dim={peft_config.latent_dim} per layer on average, but the saved latent sizes {latents} "
                f"average {sum(latents) / num_layers:.2f}. {fix}"
            )
    if peft_config.kv_ratio is not None:  # the whole model's cache: layers may differ (latent_allocation="energy")
        cached = sum(num_kv_heads * 2 * r + d for r, d in zip(counts, latents, strict=True))
        achieved = cached / (2 * num_kv_heads * head_dim * num_layers)
        made_for = (peft_config.report or {}).get("kv_ratio", peft_config.kv_ratio)
        if achieved > peft_config.kv_ratio + 1e-9 or made_for != peft_config.kv_ratio:
            raise ValueError(
                f"kv_ratio={peft_config.kv_ratio} does not match the saved conversion (made for kv_ratio={made_for}, "
                f"caching {achieved:.4f} of the original KV cache). {fix}"
            )


def _finite_or_none(value: float) -> float | None:
    """JSON-friendly error value: None where nothing was measured (NaN)."""
    return None if value != value else float(value)


def spread_rope_chunks(
    layers: Any, budget: Budget, calib: Calibration, device: torch.device, progress: bool, objective: str = "scores"
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[int]]:
    """``rope_allocation="sensitivity"``: every layer's RoPElite search run to its highest ``r``
    (`budget.rope_chunk_bounds`), then ``num_layers * r`` chunks per head spread by the searches' errors
    (`budget.allocate_rope_chunks`, each layer's error summed over its heads). Returns the searches (each layer keeps
    its first picks) and ``r`` per layer."""
    low, high = rope_chunk_bounds(budget.rope_chunks, budget.head_dim)
    deep = replace(budget, rope_chunks=high)
    searches = [
        layer_search(layer.self_attn, idx, deep, calib, device, objective)
        for idx, layer in enumerate(progress_bar(layers, desc="RoPElite per-layer search", enabled=progress))
    ]
    errors = [search[1].sum(dim=0).tolist() for search in searches]
    return searches, allocate_rope_chunks(errors, budget.rope_chunks * len(layers), low)


def _layer_inputs(
    attn: nn.Module, layer_idx: int, budget: Budget, calib: Calibration | None, device: torch.device
) -> dict[str, Any]:
    """One layer's original weights (float32, on ``device``) and, with calibration, its pre-RoPE queries
    ``[N, H, T, D]`` and keys ``[N, G, T, D]`` (normalised where the family has q/k norms), the input Gram matrix
    ``[d, d]`` and the key norms' data (`methods.key_norm`)."""
    q_w, k_w, v_w = (dense_weight(getattr(attn, name)).to(device) for name in ("q_proj", "k_proj", "v_proj"))
    q_b, k_b, v_b = (bias_of(attn.q_proj, device), bias_of(attn.k_proj, device), bias_of(attn.v_proj, device))
    H = q_w.shape[0] // budget.head_dim
    G, D = budget.num_kv_heads, budget.head_dim
    queries = keys = gram = None
    if calib is not None:
        x = calib.inputs[layer_idx].to(device)  # [N, T, d]
        N, T, _ = x.shape
        queries = (x @ q_w.T + _or_zero(q_b, device)).view(N, T, H, D).transpose(1, 2)
        keys = (x @ k_w.T + _or_zero(k_b, device)).view(N, T, G, D).transpose(1, 2)
        flat = x.reshape(-1, x.shape[-1]).double()
        gram = flat.T @ flat
    norms = key_norms_of(attn)  # q_norm / k_norm (Qwen3, OLMo2): search on the normalised scores, as the model's
    s_bar = None
    if norms is not None:
        s_bar = head_scale(norms, G, keys, k_w)
        if keys is not None:
            queries, keys = norms.normalise_heads(queries, norms.query), norms.normalise_heads(keys, norms.key)
    return {
        "weights": (q_w, k_w, v_w),
        "biases": (q_b, k_b, v_b),
        "num_heads": H,
        "queries": queries,
        "keys": keys,
        "gram": gram,
        "norms": norms,
        "s_bar": s_bar,
    }


def _elite_search(
    attn: nn.Module,
    layer_idx: int,
    inputs: dict[str, Any],
    calib: Calibration,
    r: int,
    device: torch.device,
    objective: str = "scores",
) -> tuple[torch.Tensor, torch.Tensor]:
    """`rope_selection.elite_order` on one layer's calibration scores: (order ``[G, r]``, errors ``[G, r]``)."""
    cos, sin = full_rotary(calib.rotary(layer_idx), inputs["queries"].shape[-1])  # partial rotary: `variants`
    cos, sin = cos.to(device), sin.to(device)
    # YaRN's rotary tables carry an attention factor a, and so do the original scores on every dim (a^2); the
    # converted model gives the NoPE query dims a^2 too (the same `rope_attention_factor`): search on those scores
    queries = inputs["queries"]
    factor = rope_attention_factor(attn.config, layer_idx)
    if factor != 1.0:
        queries, cos, sin = queries * factor**2, cos / factor, sin / factor
    return elite_order(queries, inputs["keys"], cos, sin, r, objective=objective)


def layer_search(
    attn: nn.Module, layer_idx: int, budget: Budget, calib: Calibration, device: torch.device, objective: str = "scores"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The RoPElite search of one layer up to ``budget.rope_chunks`` chunks per head, for
    ``rope_allocation="sensitivity"``: (picking order ``[G, r]``, error after each round ``[G, r]``)."""
    inputs = _layer_inputs(attn, layer_idx, budget, calib, device)
    return _elite_search(attn, layer_idx, inputs, calib, budget.rope_chunks, device, objective)


def plan_layer(
    attn: nn.Module,
    layer_idx: int,
    peft_config: Any,
    budget: Budget,
    calib: Calibration | None,
    device: torch.device,
    search: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Choose chunks and factor the weights of one layer; returns the new module's weights (nothing installed).

    ``search``: the layer's RoPElite search already run to at least ``budget.rope_chunks`` chunks (`layer_search`);
    its first ``r`` picks are the choice."""
    inputs = _layer_inputs(attn, layer_idx, budget, calib, device)
    (q_w, k_w, v_w), (q_b, k_b, v_b) = inputs["weights"], inputs["biases"]
    H, G, D, r = inputs["num_heads"], budget.num_kv_heads, budget.head_dim, budget.rope_chunks
    norms, s_bar = inputs["norms"], inputs["s_bar"]
    selection_error = [float("nan")] * G
    if peft_config.selection == "elite":
        if search is None:
            search = _elite_search(attn, layer_idx, inputs, calib, r, device, peft_config.selection_objective)
        order, errors = search
        chunks = order[:, :r].sort(dim=1).values
        selection_error = errors[:, r - 1].tolist()
    else:
        chunks = select_chunks(peft_config.selection, r, inputs["queries"], inputs["keys"], num_kv_heads=G, head_dim=D)
    k_w_in, k_b_in = k_w, k_b
    if norms is not None:  # factor the NoPE keys in post-norm units
        rows = tuple(r.to(device) for r in permuted_rows(chunks, H, D))
        k_w_in, k_b_in, nope_bar = elitekv_prescale(norms, k_w, k_b, rows[2], s_bar)
    weights, lowrank_error = layer_weights(
        chunks, (q_w, k_w_in, v_w), (q_b, k_b_in, v_b), attn.o_proj, budget, peft_config, inputs["gram"]
    )
    if norms is not None:  # k_rope_proj keeps the pre-norm rows (row scale 1): the module normalises them
        elitekv_finish(weights, norms, k_w, k_b, rows, nope_bar)
    key_latent_dim = weights.pop("_key_latent_dim")
    return {
        "chunks": chunks,
        "weights": weights,
        "key_latent_dim": key_latent_dim,
        "selection_error": selection_error,
        "lowrank_error": lowrank_error,
        "energies": weights.pop("_energies", None),  # latent_allocation="energy" only
        "total_energy": weights.pop("_total_energy", None),
    }


def _or_zero(bias: torch.Tensor | None, device: torch.device) -> torch.Tensor | float:
    return 0.0 if bias is None else bias.to(device)
