"""Cache-size arithmetic: from a ``kv_ratio`` to ``r`` rotated chunks per head and a latent of ``d_c`` values.

Per token and layer the original model caches ``2 * G * D`` values (keys and values of ``G`` heads of dim ``D``).
EliteKV caches ``G * 2r`` rotated values plus a ``d_c`` latent, so::

    kv_ratio = (G * 2r + d_c) / (2 * G * D)

Default rule for ``r`` when only ``kv_ratio`` is given: a quarter of the cache budget goes to rotated chunks,
``r = max(1, floor(kv_ratio * D / 4))``. For a head dim of 128 this gives r = 16 / 8 / 4 at 50% / 25% / 12.5%
(and half that for ``D = 64``, e.g. SmolLM2: r = 8 / 4 / 2); the rest of the budget is the latent. At
``kv_ratio=1`` every chunk keeps RoPE (``r = D/2``, a latent of ``G * D`` values): the original attention, exactly.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Budget:
    """The resolved cache layout of one layer."""

    rope_chunks: int  # r
    latent_dim: int  # d_c
    num_kv_heads: int  # G
    head_dim: int  # D

    @property
    def values_per_token(self) -> int:
        return self.num_kv_heads * 2 * self.rope_chunks + self.latent_dim

    @property
    def kv_ratio(self) -> float:
        """The cache size actually achieved, as a fraction of the original."""
        return self.values_per_token / (2 * self.num_kv_heads * self.head_dim)


def default_rope_chunks(kv_ratio: float, head_dim: int) -> int:
    """``r`` from the documented rule: a quarter of the budget for rotated chunks; every chunk at ``kv_ratio=1``
    (nothing is compressed, so the converted model is the original)."""
    if kv_ratio >= 1.0:
        return head_dim // 2
    return max(1, min(head_dim // 2, math.floor(kv_ratio * head_dim / 4)))


def resolve_budget(
    *,
    num_kv_heads: int,
    head_dim: int,
    hidden_size: int,
    kv_ratio: float | None,
    rope_chunks: int | None = None,
    latent_dim: int | None = None,
) -> Budget:
    """Turn the user's ``kv_ratio`` / ``rope_chunks`` / ``latent_dim`` into a consistent `Budget`.

    Raises ``ValueError`` naming the fix for impossible settings (ratio out of (0, 1], fewer values than one
    rotated chunk per head plus a latent of one value, ``r`` beyond ``D/2``).
    """
    G, D = num_kv_heads, head_dim
    full = 2 * G * D
    min_values = 2 * G + 1
    if rope_chunks is not None and not (1 <= rope_chunks <= D // 2):
        raise ValueError(
            f"rope_chunks={rope_chunks} is impossible: each head has {D // 2} rotary chunks; choose 1..{D // 2}."
        )
    if latent_dim is not None and latent_dim < 1:
        raise ValueError(f"latent_dim={latent_dim} must be at least 1.")
    if kv_ratio is None:
        if rope_chunks is None or latent_dim is None:
            raise ValueError("Give `kv_ratio`, or both `rope_chunks` and `latent_dim`.")
        return Budget(rope_chunks, latent_dim, G, D)
    if not (0.0 < kv_ratio <= 1.0):
        raise ValueError(f"kv_ratio={kv_ratio} must be in (0, 1]: it is the fraction of the original KV cache kept.")
    budget_values = math.floor(kv_ratio * full + 1e-9)
    if budget_values < min_values:
        raise ValueError(
            f"kv_ratio={kv_ratio} leaves {budget_values} cached values per token, fewer than the {min_values} that "
            f"one rotated chunk per key/value head ({G} heads) and a 1-value latent need; use kv_ratio >= "
            f"{min_values / full:.4f}."
        )
    if rope_chunks is None:
        rope_chunks = default_rope_chunks(kv_ratio, D)
        rope_chunks = min(rope_chunks, (budget_values - 1) // (2 * G))
    rope_values = 2 * G * rope_chunks
    if latent_dim is None:
        latent_dim = budget_values - rope_values
        if latent_dim < 1:
            raise ValueError(
                f"kv_ratio={kv_ratio} with rope_chunks={rope_chunks} leaves no room for a latent "
                f"({budget_values} values per token, {rope_values} taken by rotated chunks); lower rope_chunks."
            )
    elif rope_values + latent_dim > budget_values:
        raise ValueError(
            f"rope_chunks={rope_chunks} and latent_dim={latent_dim} cache {rope_values + latent_dim} values per "
            f"token, more than kv_ratio={kv_ratio} allows ({budget_values}); lower one of them, or raise kv_ratio to "
            f"{math.ceil((rope_values + latent_dim) / full * 1e4) / 1e4} or more."
        )
    return Budget(rope_chunks, latent_dim, G, D)


def max_useful_latent(hidden_size: int, num_kv_heads: int, head_dim: int, rope_chunks: int) -> int:
    """Rank of the joint ``[W_k_nope | W_v]`` matrix at most: a larger latent stores nothing more."""
    return min(hidden_size, num_kv_heads * (head_dim - 2 * rope_chunks) + num_kv_heads * head_dim)


def latent_bounds(latent_dim: int, useful: int) -> tuple[int, int]:
    """Per-layer latent range of ``latent_allocation="energy"``: ``[ceil(d_c / 2), min(2 d_c, useful)]``."""
    high = max(latent_dim, min(2 * latent_dim, useful))
    return max(1, math.ceil(latent_dim / 2)), high


def allocate_latents(energies: Sequence[Sequence[float]], totals: Sequence[float], total: int, low: int) -> list[int]:
    """Split ``total`` latent values over layers so that the summed relative residual energy is smallest.

    Layer ``l`` at rank ``k`` leaves ``(totals[l] - sum(energies[l][:k])) / totals[l]`` of its (activation-weighted)
    map unexplained. The gains ``energies[l][k] / totals[l]`` do not increase with ``k`` (squared singular values,
    descending), so giving each next value to the layer with the largest gain is optimal.

    Args:
        energies: per layer, squared singular values, descending; a layer's list length is its highest rank.
        totals: per layer, the whole map's energy (at least the sum of its listed values).
        total: latent values to spread (``num_layers * d_c``).
        low: every layer's lowest rank.
    Returns: one rank per layer, summing to ``total``.
    """
    if low < 0 or total < low * len(energies) or total > sum(len(e) for e in energies):
        raise ValueError(f"cannot spread {total} latent values over {len(energies)} layers within their ranges")
    # the gain of layer l going from rank k to k + 1
    return _spread_by_gains([[x / t for x in e] for e, t in zip(energies, totals, strict=True)], total, low)


def rope_chunk_bounds(rope_chunks: int, head_dim: int) -> tuple[int, int]:
    """Per-layer range of ``r`` under ``rope_allocation="sensitivity"``: ``[ceil(r / 2), min(2 r, D / 2)]``."""
    return max(1, math.ceil(rope_chunks / 2)), max(rope_chunks, min(2 * rope_chunks, head_dim // 2))


def allocate_rope_chunks(errors: Sequence[Sequence[float]], total: int, low: int) -> list[int]:
    """Split ``total`` rotated chunks per head over layers so that the summed score error is smallest.

    Layer ``l`` keeping ``k`` chunks per head leaves the mean absolute score error ``errors[l][k - 1]`` (summed over
    its key/value heads; the RoPElite search's error after ``k`` rounds, `rope_selection.elite_order`). Each next
    chunk goes to the layer whose error drops most by it (greedy on the drops; the search's errors fall by less with
    every round, so this is close to the best split).

    Args:
        errors: per layer, the error after 1, 2, ... chunks; a layer's list length is its highest ``r``.
        total: chunks to spread (``num_layers * r``).
        low: every layer's lowest ``r`` (at least 1).
    Returns: ``r`` per layer, summing to ``total``.
    """
    if low < 1 or total < low * len(errors) or total > sum(len(e) for e in errors):
        raise ValueError(f"cannot spread {total} rotary chunks over {len(errors)} layers within their ranges")
    # the gain of layer l going from k to k + 1 chunks (k >= 1): its error drop; k = 0 is below every layer's low
    return _spread_by_gains([[0.0] + [e[k - 1] - e[k] for k in range(1, len(e))] for e in errors], total, low)


def _spread_by_gains(gains: Sequence[Sequence[float]], total: int, low: int) -> list[int]:
    """Greedy split of ``total`` units over layers, each starting at ``low``: the next unit goes to the layer whose
    gain ``gains[l][k]`` (of going from ``k`` to ``k + 1`` units) is largest; a layer's list length is its highest
    count. Optimal where every layer's gains do not increase with ``k``. Returns the count per layer."""
    counts = [low] * len(gains)
    heap = [(-g[low], layer) for layer, g in enumerate(gains) if len(g) > low]
    heapq.heapify(heap)
    for _ in range(total - low * len(gains)):
        _, layer = heapq.heappop(heap)
        counts[layer] += 1
        g, k = gains[layer], counts[layer]
        if k < len(g):
            heapq.heappush(heap, (-g[k], layer))
    return counts
