"""RoPElite: choose, per key/value head, the ``r`` rotary chunks that keep RoPE.

Chunk ``i`` of a head of dim ``D`` is the pair of dims ``(i, i + D/2)`` (HF's ``rotate_half`` layout), rotating at
frequency ``theta_i = base^(-2i/D)``: chunk 0 is the fastest.

Strategies (`select_chunks`):

* ``"elite"``: greedy search on calibration data. With the chunks chosen so far rotated and all others not, try
  each remaining chunk rotated too and measure the mean absolute difference of the head's pre-softmax causal
  scores from the full-RoPE scores (summed over the query heads of a GQA group and over the calibration
  sequences); keep the best; repeat ``r`` times. Scores are a sum over chunks, so with
  ``delta_c = nope_c - rot_c`` (the change of chunk ``c``'s score when it loses RoPE) the error of a selection is
  ``sum_{c not chosen} delta_c``, and all candidates of a round are scored in one batched pass.
* ``"high"`` / ``"low"``: the ``r`` highest- / lowest-frequency chunks.
* ``"uniform"``: ``r`` chunks evenly spread over the frequency range.
* ``"norm"``: the ``r`` chunks with the largest mean query norm x mean key norm.
"""

from __future__ import annotations

import torch

from .modeling.attention_base import rotate_half

STRATEGIES = ("elite", "high", "low", "uniform", "norm")


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Full RoPE on ``x [..., T, D]`` with ``cos``/``sin`` ``[T, D]``."""
    return x * cos + rotate_half(x) * sin


def _pairs(x: torch.Tensor) -> torch.Tensor:
    """``[..., D]`` -> ``[..., D/2, 2]``: chunk ``i`` holds dims ``(i, i + D/2)``."""
    half = x.shape[-1] // 2
    return torch.stack((x[..., :half], x[..., half:]), dim=-1)


def fixed_chunks(strategy: str, num_kv_heads: int, head_dim: int, r: int) -> torch.Tensor:
    """Data-free strategies ``high`` / ``low`` / ``uniform``: LongTensor ``[G, r]``."""
    num_chunks = head_dim // 2
    if strategy == "high":
        chunks = torch.arange(r)
    elif strategy == "low":
        chunks = torch.arange(num_chunks - r, num_chunks)
    elif strategy == "uniform":
        chunks = torch.linspace(0, num_chunks - 1, r).round().long().unique()
        if chunks.numel() < r:  # rounding collided: fill with the lowest unused indices
            unused = [i for i in range(num_chunks) if i not in set(chunks.tolist())]
            chunks = torch.cat((chunks, torch.tensor(unused[: r - chunks.numel()]))).sort().values
    else:
        raise ValueError(f"{strategy!r} is not a data-free strategy")
    return chunks.unsqueeze(0).expand(num_kv_heads, r).clone()


def norm_chunks(queries: torch.Tensor, keys: torch.Tensor, r: int) -> torch.Tensor:
    """``"norm"``: queries ``[N, H, T, D]``, keys ``[N, G, T, D]`` -> LongTensor ``[G, r]``."""
    G = keys.shape[1]
    H = queries.shape[1]
    q_norm = _pairs(queries).norm(dim=-1).mean(dim=(0, 2))  # [H, C]
    k_norm = _pairs(keys).norm(dim=-1).mean(dim=(0, 2))  # [G, C]
    score = q_norm.view(G, H // G, -1).mean(1) * k_norm  # [G, C]
    return score.topk(r, dim=-1).indices.sort(dim=-1).values


def elite_chunks(
    queries: torch.Tensor,
    keys: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    r: int,
    max_block_elements: int = 1 << 25,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy RoPElite search: `elite_order` with each head's ``r`` chunks sorted.

    Returns:
        ``(chunks, errors)``: LongTensor ``[G, r]`` (sorted), and the mean absolute score error ``[G, r]`` after each
        round (non-increasing as chunks are added).
    """
    order, errors = elite_order(queries, keys, cos, sin, r, max_block_elements)
    return order.sort(dim=1).values, errors


def elite_order(
    queries: torch.Tensor,
    keys: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    r: int,
    max_block_elements: int = 1 << 25,
    objective: str = "scores",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy RoPElite search, the chunks in the order they were picked (the first ``k`` are the search's choice
    for ``k`` chunks, since each round only adds one).

    Args:
        queries: pre-RoPE queries ``[N, H, T, D]`` of one layer on calibration data.
        keys: pre-RoPE keys ``[N, G, T, D]``.
        cos, sin: the model's rotary tables for positions ``0..T-1``, ``[T, D]``.
        r: chunks to choose per key/value head.
        max_block_elements: memory bound of one batched pass (query rows are processed in blocks).
        objective: what a pick minimises: ``"scores"`` (the mean absolute error of the pre-softmax causal scores, the
            paper's) or ``"attention"`` (the mean total-variation distance between each query's causal attention row
            and the original's, scores scaled by ``1 / sqrt(D)``: errors count where attention goes).

    Returns:
        ``(order, errors)``: LongTensor ``[G, r]`` (picking order), and the mean error ``[G, r]`` after each round
        (per causal score pair for ``"scores"``, per query row for ``"attention"``).
    """
    if objective not in ("scores", "attention"):
        raise ValueError(f"objective={objective!r}: choose 'scores' or 'attention'.")
    N, H, T, D = queries.shape
    G = keys.shape[1]
    Hg, C = H // G, D // 2
    device = queries.device
    q_rot = apply_rope(queries, cos, sin)
    k_rot = apply_rope(keys, cos, sin)
    block = max(1, min(T, max_block_elements // max(1, G * C * Hg * T)))
    chosen = torch.zeros(G, C, dtype=torch.bool, device=device)
    order: list[torch.Tensor] = []
    errors: list[torch.Tensor] = []
    terms = N * Hg * T * (T + 1) / 2 if objective == "scores" else N * Hg * T  # causal score pairs or query rows
    for _ in range(r):
        scores = torch.zeros(G, C, dtype=torch.float64, device=device)
        keep = (~chosen).to(queries.dtype)  # [G, C]: chunks still unrotated before this round's pick
        for n in range(N):
            k_pairs = _pairs(keys[n])  # [G, T, C, 2]
            kr_pairs = _pairs(k_rot[n])
            for t0 in range(0, T, block):
                t1 = min(T, t0 + block)
                q_pairs = _pairs(queries[n, :, t0:t1]).view(G, Hg, t1 - t0, C, 2)
                qr_pairs = _pairs(q_rot[n, :, t0:t1]).view(G, Hg, t1 - t0, C, 2)
                nope = torch.einsum("ghtcj,gscj->gchts", q_pairs, k_pairs[:, :t1])
                rot = torch.einsum("ghtcj,gscj->gchts", qr_pairs, kr_pairs[:, :t1])
                delta = nope - rot  # [G, C, Hg, tb, S]: score change when chunk c loses RoPE
                causal = (torch.arange(t0, t1, device=device)[:, None] >= torch.arange(t1, device=device)[None, :]).to(
                    delta.dtype
                )  # [tb, S]
                error = torch.einsum("gchts,gc->ghts", delta, keep)  # current selection's error
                if objective == "scores":
                    diff = (error.unsqueeze(1) - delta).abs() * causal
                    scores += diff.sum(dim=(2, 3, 4)).double()
                else:
                    full = rot.sum(dim=1)  # [G, Hg, tb, S]: the original scores
                    scores += _attention_distance(full, full + error, delta, causal, D**-0.5).double()
        scores[chosen] = float("inf")
        best = scores.argmin(dim=1)  # [G]
        chosen[torch.arange(G, device=device), best] = True
        order.append(best)
        errors.append(scores.gather(1, best[:, None])[:, 0] / terms)
    return torch.stack(order, dim=1).cpu(), torch.stack(errors, dim=1).float().cpu()


def _attention_distance(
    full: torch.Tensor, current: torch.Tensor, delta: torch.Tensor, causal: torch.Tensor, scale: float
) -> torch.Tensor:
    """Summed total-variation distance between the original's causal attention rows and each candidate's.

    Args:
        full: original scores ``[G, Hg, tb, S]``; current: scores with the unchosen chunks unrotated (same shape);
        delta: ``[G, C, Hg, tb, S]``, the score change when chunk ``c`` loses RoPE (a pick removes it from current);
        causal: ``[tb, S]`` 1 where a query may attend.
    Returns: ``[G, C]``, summed over query heads and rows.
    """
    masked = torch.where(causal.bool(), 0.0, float("-inf"))
    original = torch.softmax(full * scale + masked, dim=-1).unsqueeze(1)  # [G, 1, Hg, tb, S]
    candidate = torch.softmax((current.unsqueeze(1) - delta) * scale + masked, dim=-1)
    return 0.5 * (candidate - original).abs().sum(dim=(2, 3, 4))


def select_chunks(
    strategy: str,
    r: int,
    queries: torch.Tensor | None = None,
    keys: torch.Tensor | None = None,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
    num_kv_heads: int | None = None,
    head_dim: int | None = None,
) -> torch.Tensor:
    """Chosen chunks ``[G, r]`` (sorted per head) by ``strategy``; see the module docstring."""
    if strategy in ("high", "low", "uniform"):
        if num_kv_heads is None or head_dim is None:
            if keys is None:
                raise ValueError("fixed strategies need num_kv_heads/head_dim or keys")
            num_kv_heads, head_dim = keys.shape[1], keys.shape[-1]
        return fixed_chunks(strategy, num_kv_heads, head_dim, r)
    if queries is None or keys is None:
        raise ValueError(f"strategy {strategy!r} needs calibration queries and keys")
    if strategy == "norm":
        return norm_chunks(queries, keys, r)
    if strategy == "elite":
        if cos is None or sin is None:
            raise ValueError("strategy 'elite' needs the rotary cos/sin tables")
        return elite_chunks(queries, keys, cos, sin, r)[0]
    raise ValueError(f"Unknown selection strategy {strategy!r}; choose one of {STRATEGIES}.")
