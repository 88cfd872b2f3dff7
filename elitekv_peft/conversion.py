"""Convert the attention of a Llama/Mistral/Qwen2 causal LM to EliteKV attention.

`convert` does the whole job on a transformers model, in place, and all-or-nothing: every new attention module is
built first; only if all succeed are they swapped in. Steps:

1. check the architecture (`check_supported`) and resolve the cache budget (`elitekv_peft.budget`);
2. calibration: record each layer's attention inputs on calibration tokens (skipped when the config already holds
   the chunk choices, e.g. when loading a saved adapter: the weights then come from the checkpoint);
3. per layer: choose rotary chunks (`elitekv_peft.rope_selection`), factor ``[W_k_nope | W_v]``
   (`elitekv_peft.lowrank`), build an `EliteKVAttention`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .attention import EliteKVAttention, head_dim_permutation
from .budget import Budget, allocate_latents, latent_bounds, max_useful_latent, resolve_budget
from .calibration import (
    Calibration,
    calibration_tokens,
    check_weights,
    collect_attention_inputs,
    collect_attention_inputs_layerwise,
)
from .config import EliteKVConfig
from .lowrank import factorize, relative_output_error
from .plan import ConversionPlan
from .quantization import dense_dtype, dense_weight
from .rope_selection import elite_chunks, select_chunks

logger = logging.getLogger(__name__)

SUPPORTED_ATTENTION = {"LlamaAttention", "MistralAttention", "Qwen2Attention"}
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclass
class ConversionReport:
    """What a conversion did, per layer."""

    budget: Budget
    selection_errors: list[list[float]] = field(default_factory=list)  # [layer][kv head]: final score error
    lowrank_errors: list[float] = field(default_factory=list)  # [layer]: relative output error of K_nope|V

    @property
    def kv_ratio(self) -> float:
        """The cache size achieved, as a fraction of the original (the same for every layer)."""
        return self.budget.kv_ratio


def decoder_of(model: nn.Module) -> nn.Module:
    """The ``*Model`` (with ``.layers`` and ``.rotary_emb``) inside a causal LM."""
    base = getattr(model, "model", None)
    if base is None or not hasattr(base, "layers"):
        raise TypeError(
            f"{type(model).__name__} is not a supported causal LM: EliteKV converts transformers "
            f"{'/'.join(SUPPORTED_MODEL_TYPES)} models (AutoModelForCausalLM) with `model.model.layers`."
        )
    return base


def check_supported(model: nn.Module) -> None:
    """Raise a clear error unless ``model`` is a RoPE causal LM of a supported family, with full attention."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise TypeError(
            f"EliteKV supports {', '.join(SUPPORTED_MODEL_TYPES)} models (Llama, Mistral and Qwen2-family "
            f"attention); got model_type={model_type!r}. Convert one of those."
        )
    decoder = decoder_of(model)
    if getattr(decoder, "rotary_emb", None) is None:
        raise TypeError("This model has no rotary position embedding (RoPE); EliteKV only converts RoPE models.")
    for idx, layer in enumerate(decoder.layers):
        attn = getattr(layer, "self_attn", None)
        name = type(attn).__name__
        if is_converted_attention(attn):
            raise ValueError(
                "This model's attention is already converted to EliteKV; convert the original model instead."
            )
        if name not in SUPPORTED_ATTENTION:
            raise TypeError(
                f"Layer {idx} uses {name}; EliteKV supports {sorted(SUPPORTED_ATTENTION)} "
                "(eager/sdpa/flash implementations of Llama, Mistral and Qwen2)."
            )
        window = getattr(attn, "sliding_window", None)
        if model_type == "mistral":  # Mistral's attention reads the window from the config
            window = getattr(config, "sliding_window", None)
        if window is not None:
            raise TypeError(
                f"Layer {idx} uses sliding-window attention (window {window}); EliteKV caches full "
                "attention only. Load the model with `sliding_window=None` (or `use_sliding_window=False`)."
            )


def is_converted_attention(module: nn.Module) -> bool:
    """Whether ``module`` is the attention of any method of this library (EliteKV, KV-Latent, LoRC, GQA)."""
    from .modeling_elitekv import CONVERTED_ATTENTION

    return isinstance(module, CONVERTED_ATTENTION)


def base_shape(model: nn.Module) -> dict[str, Any]:
    """The attention shape of ``model``, saved with the adapter and checked when it is loaded again."""
    config = model.config
    return {
        "model_type": config.model_type,
        "num_hidden_layers": len(decoder_of(model).layers),
        "hidden_size": config.hidden_size,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": _head_dim(config),
        "vocab_size": config.vocab_size,
    }


def _head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def check_base_matches(model: nn.Module, peft_config: EliteKVConfig) -> None:
    """Raise if a converted config (from a checkpoint) was made for a model of another shape."""
    if peft_config.base_shape is None:
        return
    actual = base_shape(model)
    diffs = {k: (v, actual.get(k)) for k, v in peft_config.base_shape.items() if actual.get(k) != v}
    if diffs:
        detail = ", ".join(f"{k}: adapter {a!r} vs model {b!r}" for k, (a, b) in diffs.items())
        raise ValueError(
            f"This EliteKV adapter was converted from a different base model ({detail}). Load it onto the base "
            f"model it was made from ({peft_config.base_model_name_or_path or 'see adapter_config.json'})."
        )


def check_filled_fields(peft_config: EliteKVConfig, num_kv_heads: int, head_dim: int, num_layers: int) -> None:
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
    r = len(chunks[0][0])
    if any(len(head) != num_kv_heads or any(len(c) != r for c in head) for head in chunks):
        raise ValueError(f"chunk_indices must hold {num_kv_heads} key/value heads x {r} chunks per layer. {fix}")
    if peft_config.rope_chunks is not None and peft_config.rope_chunks != r:
        raise ValueError(f"rope_chunks={peft_config.rope_chunks} but the saved chunk choices keep r={r}. {fix}")
    if peft_config.latent_dim is not None:
        if peft_config.latent_allocation == "uniform" and any(d != peft_config.latent_dim for d in latents):
            raise ValueError(f"latent_dim={peft_config.latent_dim} but the saved latent sizes are {latents}. {fix}")
        if sum(latents) != peft_config.latent_dim * num_layers:
            raise ValueError(
                f"latent_dim={peft_config.latent_dim} per layer on average, but the saved latent sizes {latents} "
                f"average {sum(latents) / num_layers:.2f}. {fix}"
            )
    if peft_config.kv_ratio is not None:  # the whole model's cache: layers may differ (latent_allocation="energy")
        achieved = sum(num_kv_heads * 2 * r + d for d in latents) / (2 * num_kv_heads * head_dim * num_layers)
        made_for = (peft_config.report or {}).get("kv_ratio", peft_config.kv_ratio)
        if achieved > peft_config.kv_ratio + 1e-9 or made_for != peft_config.kv_ratio:
            raise ValueError(
                f"kv_ratio={peft_config.kv_ratio} does not match the saved conversion (made for kv_ratio={made_for}, "
                f"caching {achieved:.4f} of the original KV cache). {fix}"
            )


def _finite_or_none(value: float) -> float | None:
    """JSON-friendly error value: None where nothing was measured (NaN)."""
    return None if value != value else float(value)


def compute_device(model: nn.Module, peft_config: EliteKVConfig) -> torch.device:
    """Where calibration and factorization run: ``calibration_device``, else the model's device."""
    if peft_config.calibration_device is not None:
        return torch.device(peft_config.calibration_device)
    return next(model.parameters()).device


def use_layerwise(model: nn.Module, peft_config: EliteKVConfig) -> bool:
    """``calibration_layerwise`` if set, else True when the compute device is not the model's device."""
    if peft_config.calibration_layerwise is not None:
        return peft_config.calibration_layerwise
    return compute_device(model, peft_config) != next(model.parameters()).device


def convert(model: nn.Module, peft_config: EliteKVConfig, progress: bool = True) -> ConversionReport | None:
    """Convert ``model``'s attention in place. Fills ``peft_config``'s chunk choices and latent sizes.

    Returns a `ConversionReport`, or None when the config already held a conversion (loading a checkpoint).
    Methods other than ``"elitekv"`` go to `elitekv_peft.methods.dispatch.convert_method` (a `MethodReport`).
    """
    check_supported(model)
    decoder = decoder_of(model)
    check_weights(model, decoder.layers)
    if peft_config.method != "elitekv":
        from .methods.dispatch import convert_method

        return convert_method(model, peft_config, progress)
    config = model.config
    G, D = config.num_key_value_heads, _head_dim(config)
    if peft_config.is_converted:
        check_base_matches(model, peft_config)
        check_filled_fields(peft_config, G, D, len(decoder.layers))
        return _rebuild(model, peft_config)

    budget = resolve_budget(
        num_kv_heads=G,
        head_dim=D,
        hidden_size=config.hidden_size,
        kv_ratio=peft_config.kv_ratio,
        rope_chunks=peft_config.rope_chunks,
        latent_dim=peft_config.latent_dim,
    )
    useful = max_useful_latent(config.hidden_size, G, D, budget.rope_chunks)
    if budget.latent_dim > useful:
        logger.warning(
            "latent_dim %d exceeds the rank of [W_k_nope | W_v] (%d); %d latent values carry nothing. "
            "A lower kv_ratio loses no quality here.",
            budget.latent_dim,
            useful,
            budget.latent_dim - useful,
        )
    tokens = config_tokens(model, peft_config)
    needs_data = peft_config.selection in ("elite", "norm") or peft_config.lowrank_init == "activation"
    calib = calibrate(model, peft_config, tokens, progress) if needs_data else None

    report = ConversionReport(budget=budget)
    chunk_indices, latent_dims, key_latent_dims = [], [], []
    plans = []
    work_device = compute_device(model, peft_config)
    factor_budget = budget  # with latent_allocation="energy", factor at each layer's highest rank, cut later
    if peft_config.latent_allocation == "energy":
        low, high = latent_bounds(budget.latent_dim, useful)
        factor_budget = replace(budget, latent_dim=high)
    for layer_idx, layer in enumerate(tqdm(decoder.layers, desc="EliteKV RoPElite + SVD", disable=not progress)):
        plan = plan_layer(layer.self_attn, layer_idx, peft_config, factor_budget, calib, work_device)
        if calib is not None:
            calib.inputs[layer_idx] = None  # used: free it (these are [N, T, d] float32 per layer)
        # keep the new weights in the dtype they will have (bf16 halves what waits for the all-or-nothing swap)
        dtype = dense_dtype(layer.self_attn.q_proj, model)
        plan["weights"] = {name: tensor.to(dtype) for name, tensor in plan["weights"].items()}
        chunk_indices.append(plan["chunks"].tolist())
        latent_dims.append(budget.latent_dim)
        key_latent_dims.append(plan["key_latent_dim"])
        report.selection_errors.append(plan["selection_error"])
        report.lowrank_errors.append(plan["lowrank_error"])
        plans.append(plan)
    if peft_config.latent_allocation == "energy":
        latent_dims = allocate_latents(
            [plan["energies"] for plan in plans],
            [plan["total_energy"] for plan in plans],
            budget.latent_dim * len(plans),
            low,
        )
        for plan, rank in zip(plans, latent_dims, strict=True):
            cut_latent(plan, rank)
        report.lowrank_errors = [plan["lowrank_error"] for plan in plans]

    plan = ConversionPlan(
        method="elitekv",
        kv_ratio=peft_config.kv_ratio,
        base_shape=base_shape(model),
        qkv_bias=attention_biases(model)[0],
        o_bias=attention_biases(model)[1],
        lowrank_init=peft_config.lowrank_init,
        layers={
            "chunk_indices": chunk_indices,
            "latent_dims": latent_dims,
            "key_latent_dims": key_latent_dims if peft_config.decomposition == "separate" else None,
            "rope_chunks": budget.rope_chunks,
            "latent_dim": budget.latent_dim,
            "selection": peft_config.selection,
            "decomposition": peft_config.decomposition,
        },
    )
    peft_config.report = {
        **(peft_config.report or {}),
        "kv_ratio": peft_config.kv_ratio,
        "kv_ratio_achieved": budget.kv_ratio,
        "selection_errors": [[_finite_or_none(e) for e in layer] for layer in report.selection_errors],
        "lowrank_errors": [_finite_or_none(e) for e in report.lowrank_errors],
    }
    _install(model, plan, [p["weights"] for p in plans])
    plan.fill(peft_config)
    return report


def config_tokens(model: nn.Module, peft_config: EliteKVConfig) -> torch.Tensor:
    """The calibration token ids ``[N, T]`` the config asks for (given, or sampled from the model)."""
    return calibration_tokens(
        model,
        peft_config.calibration_data,
        peft_config.calibration_samples,
        peft_config.calibration_seq_len,
        peft_config.seed,
    )


def calibrate(model: nn.Module, peft_config: EliteKVConfig, tokens: torch.Tensor, progress: bool) -> Calibration:
    """Every layer's attention inputs on ``tokens``, for every method: whole model, or layer by layer
    (`use_layerwise`: one decoder layer at a time on ``calibration_device``)."""
    hidden = model.config.hidden_size
    if tokens.numel() < hidden:
        raise ValueError(
            f"calibration data has {tokens.numel()} tokens, fewer than hidden_size={hidden}: the "
            "activation statistics would be degenerate. Pass more calibration text."
        )
    decoder = decoder_of(model)
    batch_size = peft_config.calibration_batch_size
    if use_layerwise(model, peft_config):
        device = compute_device(model, peft_config)
        return collect_attention_inputs_layerwise(decoder, tokens, batch_size, device, progress)
    return collect_attention_inputs(model, decoder.layers, tokens, batch_size, progress)


def plan_layer(
    attn: nn.Module,
    layer_idx: int,
    peft_config: EliteKVConfig,
    budget: Budget,
    calib: Calibration | None,
    device: torch.device,
) -> dict[str, Any]:
    """Choose chunks and factor the weights of one layer; returns the new module's weights (nothing installed)."""
    q_w, k_w, v_w = (
        dense_weight(attn.q_proj).to(device),
        dense_weight(attn.k_proj).to(device),
        dense_weight(attn.v_proj).to(device),
    )
    q_b, k_b, v_b = (_bias(attn.q_proj, device), _bias(attn.k_proj, device), _bias(attn.v_proj, device))
    H = q_w.shape[0] // budget.head_dim
    G, D, r = budget.num_kv_heads, budget.head_dim, budget.rope_chunks

    queries = keys = gram = None
    if calib is not None:
        x = calib.inputs[layer_idx].to(device)  # [N, T, d]
        N, T, _ = x.shape
        queries = (x @ q_w.to(device).T + _or_zero(q_b, device)).view(N, T, H, D).transpose(1, 2)
        keys = (x @ k_w.to(device).T + _or_zero(k_b, device)).view(N, T, G, D).transpose(1, 2)
        flat = x.reshape(-1, x.shape[-1]).double()
        gram = flat.T @ flat
    selection_error = [float("nan")] * G
    if peft_config.selection == "elite":
        chunks, errors = elite_chunks(queries, keys, calib.cos.to(device), calib.sin.to(device), r)
        selection_error = errors[:, -1].tolist()
    else:
        chunks = select_chunks(peft_config.selection, r, queries, keys, num_kv_heads=G, head_dim=D)
    weights, lowrank_error = layer_weights(
        chunks, (q_w, k_w, v_w), (q_b, k_b, v_b), attn.o_proj, budget, peft_config, gram
    )
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


def cut_latent(plan: dict[str, Any], rank: int) -> None:
    """Keep the first ``rank`` latent values of a joint plan factored at a higher rank (the factors are nested:
    the top singular directions), and set its ``lowrank_error`` to the relative residual at that rank."""
    weights = plan["weights"]
    weights["kv_down_proj.weight"] = weights["kv_down_proj.weight"][:rank].clone()  # [k, d]
    for name in ("k_up_proj.weight", "v_up_proj.weight"):
        if name in weights:
            weights[name] = weights[name][:, :rank].clone()  # [out, k]
    total = plan["total_energy"]
    kept = float(plan["energies"][:rank].sum())
    plan["lowrank_error"] = (max(total - kept, 0.0) / total) ** 0.5 if total > 0 else 0.0


def permuted_rows(chunks: torch.Tensor, num_heads: int, head_dim: int) -> tuple[torch.Tensor, ...]:
    """Row indices into the original projections for the permuted layout (see `head_dim_permutation`).

    Args:
        chunks: chosen chunks ``[G, r]``.
    Returns:
        ``(q_rows [H*D], rope_rows [G*2r], nope_rows [G*(D-2r)])``: rows of ``q_proj`` in the new head layout, and
        the rows of ``k_proj`` that become ``k_rope_proj`` and the NoPE key part.
    """
    G, r = chunks.shape
    D = head_dim
    perms = [head_dim_permutation(chunks[g].tolist(), D) for g in range(G)]
    q_rows = torch.cat([h * D + perms[h // (num_heads // G)] for h in range(num_heads)])
    rope_rows = torch.cat([g * D + perms[g][: 2 * r] for g in range(G)])
    nope_rows = torch.cat([g * D + perms[g][2 * r :] for g in range(G)])
    return q_rows, rope_rows, nope_rows


def _bias(linear: nn.Linear, device: torch.device | None = None) -> torch.Tensor | None:
    return None if linear.bias is None else linear.bias.detach().to(device).float()


def _or_zero(bias: torch.Tensor | None, device: torch.device) -> torch.Tensor | float:
    return 0.0 if bias is None else bias.to(device)


def layer_weights(
    chunks: torch.Tensor,
    weights: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    biases: tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None],
    o_proj: nn.Linear,
    budget: Budget,
    peft_config: EliteKVConfig,
    gram: torch.Tensor | None,
) -> tuple[dict[str, torch.Tensor], float]:
    """State dict of one `EliteKVAttention` from the original q/k/v/o weights (float32 inputs).

    The factorization runs where the weights are (a GPU makes large SVDs fast); the result is float32 on the CPU.
    """
    q_w, k_w, v_w = weights
    q_b, k_b, v_b = biases
    device = q_w.device
    D = budget.head_dim
    q_rows, rope_rows, nope_rows = (rows.to(device) for rows in permuted_rows(chunks, q_w.shape[0] // D, D))

    out: dict[str, torch.Tensor] = {
        "q_proj.weight": q_w[q_rows],
        "k_rope_proj.weight": k_w[rope_rows],
        "o_proj.weight": dense_weight(o_proj),
    }
    if o_proj.bias is not None:
        out["o_proj.bias"] = o_proj.bias.detach().to(device).float()
    if q_b is not None:
        out["q_proj.bias"] = q_b[q_rows]
        out["k_rope_proj.bias"] = k_b[rope_rows]
        out["v_up_proj.bias"] = v_b
        if nope_rows.numel():
            out["k_up_proj.bias"] = k_b[nope_rows]

    k_nope = k_w[nope_rows].T.double()  # [d, G*(D-2r)]
    v_map = v_w.T.double()  # [d, G*D]
    gram_dev = None if gram is None else gram.to(device)
    init = peft_config.lowrank_init
    d_c = budget.latent_dim
    key_latent_dim = None
    if peft_config.decomposition == "joint" or k_nope.shape[1] == 0:
        joint = torch.cat((k_nope, v_map), dim=1)
        down, up = factorize(joint, d_c, gram_dev, init)
        out["kv_down_proj.weight"] = down.T.float()
        if k_nope.shape[1]:
            out["k_up_proj.weight"] = up[:, : k_nope.shape[1]].T.float()
        out["v_up_proj.weight"] = up[:, k_nope.shape[1] :].T.float()
        approx = (down, up, joint)
        if peft_config.decomposition == "separate":
            key_latent_dim = 0
    else:
        # split the latent in proportion to the ranks the two maps can have
        k_rank, v_rank = min(k_nope.shape), min(v_map.shape)
        key_latent_dim = max(1, min(d_c - 1, round(d_c * k_rank / (k_rank + v_rank))))
        k_down, k_up = factorize(k_nope, key_latent_dim, gram_dev, init)
        v_down, v_up = factorize(v_map, d_c - key_latent_dim, gram_dev, init)
        out["kv_down_proj.weight"] = torch.cat((k_down, v_down), dim=1).T.float()
        out["k_up_proj.weight"] = k_up.T.float()
        out["v_up_proj.weight"] = v_up.T.float()
        down = torch.cat((k_down, v_down), dim=1)
        up = torch.block_diag(k_up, v_up)
        approx = (down, up, torch.cat((k_nope, v_map), dim=1))
    error = float("nan")
    if gram_dev is not None:
        error = relative_output_error(approx[2], approx[0], approx[1], gram_dev)
    out = {name: tensor.detach().float().cpu() for name, tensor in out.items()}
    out["_key_latent_dim"] = key_latent_dim
    if peft_config.latent_allocation == "energy":
        # squared singular values of the factored map (the up factor's rows are S_i * Vh_i) and the map's whole
        # energy, in the norm the factorization minimised: what the budget is spread by
        joint = approx[2]
        out["_energies"] = approx[1].pow(2).sum(dim=1).float().cpu()  # [d_c]
        whole = joint.pow(2).sum() if gram_dev is None or init == "weight" else torch.trace(joint.T @ gram_dev @ joint)
        out["_total_energy"] = float(whole)
    return out, error


def _rebuild(model: nn.Module, peft_config: EliteKVConfig) -> None:
    """Install EliteKV attention from a converted config, initialised from the base weights where it can be.

    Latent projections are left at zero: the checkpoint's weights are loaded over them (PEFT's loading).
    """
    decoder = decoder_of(model)
    weights = []
    for layer_idx, layer in enumerate(decoder.layers):
        attn = layer.self_attn
        chunks = torch.tensor(peft_config.chunk_indices[layer_idx])
        D = _head_dim(model.config)
        q_w = dense_weight(attn.q_proj).cpu()
        q_rows, rope_rows, _ = permuted_rows(chunks, q_w.shape[0] // D, D)
        state = {
            "q_proj.weight": q_w[q_rows],
            "k_rope_proj.weight": dense_weight(attn.k_proj).cpu()[rope_rows],
            "o_proj.weight": dense_weight(attn.o_proj).cpu(),
        }
        weights.append(state)
    _install(model, ConversionPlan.from_adapter_config(peft_config, *attention_biases(model)), weights, strict=False)


def _install(
    model: nn.Module, plan: ConversionPlan, weights: list[dict[str, torch.Tensor]], strict: bool = True
) -> None:
    """Build every `EliteKVAttention` from ``weights`` and swap them all in (see `swap_attention`)."""

    def build(layer_idx: int) -> nn.Module:
        module = EliteKVAttention(model.config, layer_idx)
        if not strict:
            nn.init.zeros_(module.kv_down_proj.weight)
        missing, unexpected = module.load_state_dict(weights[layer_idx], strict=False)
        missing = [k for k in missing if k != "chunk_index"]  # built from the config
        if unexpected or (strict and missing):
            raise RuntimeError(f"layer {layer_idx}: missing {missing}, unexpected {unexpected}")
        return module

    swap_attention(model, plan.model_config(), build)


def attention_biases(model: nn.Module) -> tuple[bool, bool]:
    """``(qkv_bias, o_bias)``: whether the original attention projections have biases."""
    first = decoder_of(model).layers[0].self_attn
    return first.q_proj.bias is not None, first.o_proj.bias is not None


def swap_attention(model: nn.Module, elitekv: dict[str, Any], build: Callable[[int], nn.Module]) -> None:
    """Replace every layer's attention, all or nothing, for every method.

    Sets ``model.config.elitekv`` (which the new modules read), calls ``build(layer_idx)`` for each layer, moves
    each module to the old one's device and dense dtype, and only when all are built swaps them in; if a build
    fails, the model and its config are left as they were.
    """
    decoder = decoder_of(model)
    config = model.config
    config.elitekv = elitekv
    try:
        new_modules = []
        for layer_idx, layer in enumerate(decoder.layers):
            q_proj = layer.self_attn.q_proj
            module = build(layer_idx)
            new_modules.append(module.to(device=q_proj.weight.device, dtype=dense_dtype(q_proj, model)))
    except Exception:
        del config.elitekv
        raise
    for layer, module in zip(decoder.layers, new_modules, strict=True):
        layer.self_attn = module
