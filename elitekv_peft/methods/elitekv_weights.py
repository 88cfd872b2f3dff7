"""EliteKV's new attention weights from the original ones: the permuted head layout (rotated chunks first) and the
J-LRD / S-LRD factorization of ``[W_k_nope | W_v]`` into ``kv_down_proj`` and the up projections.

Used by `elitekv_peft.methods.elitekv`, which chooses the chunks and the latent size.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..budget import Budget
from ..factorization import factorize, relative_output_error
from ..modeling.attention_elitekv import head_dim_permutation
from ..quantization import dense_weight


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


def bias_of(linear: nn.Linear, device: torch.device | None = None) -> torch.Tensor | None:
    return None if linear.bias is None else linear.bias.detach().to(device).float()


def layer_weights(
    chunks: torch.Tensor,
    weights: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    biases: tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None],
    o_proj: nn.Linear,
    budget: Budget,
    peft_config: Any,
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
        out["o_proj.bias"] = bias_of(o_proj, device)
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
