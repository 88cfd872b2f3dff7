"""Conversion of families with ``q_norm`` / ``k_norm`` before RoPE (Qwen3, OLMo2, Gemma 3): what every method adds.

The attention modules and the design are in `elitekv_peft.modeling.key_norm`. Here, from the original attention:

* `key_norms_of`: the norms' effective weights (``w``, or ``1 + w`` for Gemma-style norms), group and epsilon;
* EliteKV: the chunk search scores normalised queries and keys; the NoPE key rows are factored in post-norm units
  (columns times ``w * s_bar``, ``s_bar`` the root-mean-square scale of each key/value head on calibration data) and
  ``s_bar`` is divided out of ``k_up_proj`` again, which keeps ``w``; the cache budget makes room for the scales;
* LoRC: the norms' weights (it factors the pre-norm keys as for Llama and normalises the rebuilt key when read);
* KV-Latent / GQA: the full ``q_proj`` / ``k_proj`` and the norms' weights (the modules select and pool after them).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from ..budget import Budget
from ..modeling.key_norm import elitekv_scale_count, key_norm_group, normalise, rms_scale
from ..quantization import dense_weight


@dataclass(frozen=True)
class KeyNorms:
    """The q/k norms of one original attention layer.

    group: ``"head"`` or ``"all"``; eps: the norms' epsilon; query ``[H*D]`` and key ``[G*D]``: effective weights
    (float32), one per projection row.
    """

    group: str
    eps: float
    query: torch.Tensor
    key: torch.Tensor

    def normalise_heads(self, states: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Normalise ``states [N, heads, T, D]`` as the original does (``weight``: ``query`` or ``key``)."""
        heads, D = states.shape[1], states.shape[-1]
        out = normalise(states.transpose(1, 2), weight.to(states.device).view(heads, D), self.group, self.eps)
        return out.transpose(1, 2)


def norm_weight(module: nn.Module) -> torch.Tensor:
    """The factor an RMSNorm multiplies by: ``weight``, or ``1 + weight`` for Gemma's norms (float32)."""
    weight = module.weight.detach().float()
    return 1.0 + weight if type(module).__name__.startswith("Gemma") else weight


def key_norms_of(attn: nn.Module) -> KeyNorms | None:
    """The `KeyNorms` of an original attention layer, or None when it has no ``k_norm``."""
    group = key_norm_group(attn.config)
    if group is None or getattr(attn, "k_norm", None) is None:
        return None
    H = attn.config.num_attention_heads
    G = attn.config.num_key_value_heads
    query, key = norm_weight(attn.q_norm), norm_weight(attn.k_norm)
    if group == "head":  # one weight of D values shared by every head
        query, key = query.repeat(H), key.repeat(G)
    eps = getattr(attn.k_norm, "variance_epsilon", getattr(attn.k_norm, "eps", None))
    return KeyNorms(group, float(attn.config.rms_norm_eps if eps is None else eps), query, key)


def head_scale(norms: KeyNorms, num_kv_heads: int, keys: torch.Tensor | None, k_w: torch.Tensor) -> torch.Tensor:
    """``s_bar [G]``: root mean square of the key scale ``s`` per key/value head, on pre-norm calibration keys
    ``[N, G, T, D]``; without them, estimated from ``k_w [G*D, d]`` for inputs of unit RMS."""
    G = num_kv_heads
    if keys is not None:
        scale = rms_scale(keys.transpose(1, 2), norms.group, norms.eps)  # [N, T, G or 1]
        return scale.pow(2).mean(dim=(0, 1)).sqrt().expand(G).float()
    rows = k_w.float().view(G, -1, k_w.shape[-1])
    per_head = rows.pow(2).sum(dim=(1, 2)) / rows.shape[1]  # mean square of a key dim, per head
    if norms.group == "all":
        per_head = per_head.mean().expand(G)
    return torch.rsqrt(per_head + norms.eps)


def elitekv_budget(budget: Budget, model_type: str, kv_ratio: float | None, latent_given: bool) -> Budget:
    """The EliteKV budget with room for the cached key scales (``n_s`` values per token, none if every chunk is
    rotated): a latent sized from ``kv_ratio`` gives them its last values; raises if a given size leaves none."""
    G, D = budget.num_kv_heads, budget.head_dim
    extra = elitekv_scale_count(model_type, G, D, budget.rope_chunks)
    if not extra or kv_ratio is None:
        return budget
    allowed = int(kv_ratio * 2 * G * D + 1e-9)
    if budget.values_per_token + extra <= allowed:
        return budget
    if latent_given or budget.latent_dim - extra < 1:
        raise ValueError(
            f"kv_ratio={kv_ratio} allows {allowed} cached values per token; the rotated chunks and latent take "
            f"{budget.values_per_token} and this model's k_norm needs {extra} more (the key scales, "
            "docs/families.md). Lower latent_dim or rope_chunks, or raise kv_ratio."
        )
    return replace(budget, latent_dim=budget.latent_dim - extra)


def elitekv_prescale(
    norms: KeyNorms, k_w: torch.Tensor, k_b: torch.Tensor | None, nope_rows: torch.Tensor, s_bar: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """``k_w`` / ``k_b`` with the NoPE rows times ``w * s_bar`` (post-norm units for the factorization); returns
    them and the per-row ``s_bar [G*(D-2r)]`` to divide out of ``k_up_proj`` afterwards."""
    D = k_w.shape[0] // s_bar.numel()
    row_scale = torch.ones(k_w.shape[0], device=k_w.device, dtype=k_w.dtype)
    head_bar = s_bar.to(k_w.device).repeat_interleave(D)
    row_scale[nope_rows] = (norms.key.to(k_w.device) * head_bar)[nope_rows].to(k_w.dtype)
    scaled_b = None if k_b is None else k_b * row_scale
    return k_w * row_scale[:, None], scaled_b, head_bar[nope_rows]


def elitekv_finish(
    out: dict[str, torch.Tensor],
    norms: KeyNorms,
    k_w: torch.Tensor,
    k_b: torch.Tensor | None,
    rows: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    nope_bar: torch.Tensor,
) -> None:
    """Complete an EliteKV layer's state dict for `NormedEliteKVAttention` (in place): the norms' weights in the
    permuted layout, ``k_nope_proj`` (the pre-norm NoPE rows) and ``s_bar`` divided out of ``k_up_proj``."""
    q_rows, rope_rows, nope_rows = (r.cpu() for r in rows)
    out["q_norm_weight"] = norms.query.cpu()[q_rows]
    out["k_rope_norm_weight"] = norms.key.cpu()[rope_rows]
    if nope_rows.numel():
        bar = nope_bar.float().cpu()
        out["k_up_proj.weight"] = out["k_up_proj.weight"] / bar[:, None]
        if "k_up_proj.bias" in out:
            out["k_up_proj.bias"] = out["k_up_proj.bias"] / bar
        out["k_nope_proj.weight"] = k_w.float().cpu()[nope_rows]
        if k_b is not None:
            out["k_nope_proj.bias"] = k_b.float().cpu()[nope_rows]


def norm_weights(norms: KeyNorms) -> dict[str, torch.Tensor]:
    """The norms' weights for `NormedLowRankKVAttention` (LoRC: the rebuilt pre-norm key is normalised on read)."""
    return {"q_norm_weight": norms.query.cpu(), "k_norm_weight": norms.key.cpu()}


def small_head_weights(attn: nn.Module, norms: KeyNorms) -> dict[str, torch.Tensor]:
    """The full ``q_proj`` / ``k_proj`` and the norms' weights for `NormedSmallHeadAttention` (KV-Latent, GQA)."""
    out = {
        "q_proj.weight": dense_weight(attn.q_proj),
        "k_proj.weight": dense_weight(attn.k_proj),
        "q_norm_weight": norms.query,
        "k_norm_weight": norms.key,
    }
    for name in ("q_proj", "k_proj"):
        bias = getattr(attn, name).bias
        if bias is not None:
            out[f"{name}.bias"] = bias.detach()
    return {name: tensor.detach().float().cpu().contiguous() for name, tensor in out.items()}


__all__ = [
    "KeyNorms",
    "elitekv_budget",
    "elitekv_finish",
    "elitekv_prescale",
    "head_scale",
    "key_norms_of",
    "norm_weight",
    "norm_weights",
    "small_head_weights",
]
