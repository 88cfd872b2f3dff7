"""Draw ``docs/elitekv.png``: what EliteKV caches per token and layer, and where keys and values come from.

Left: the cache of one token in one layer, original (keys and values of ``G`` heads of dim ``D``) against EliteKV
(``r`` rotary chunks per key head, still rotated, plus one shared latent of ``d_c`` values), drawn to scale for a
model with ``G = 3``, ``D = 64`` at ``kv_ratio = 0.25`` (SmolLM2-135M's attention shape; ``r`` and ``d_c`` from
the library's rule for ``kv_ratio`` alone). Right: the data flow of one converted attention layer.

    python docs/make_figure.py            # writes docs/elitekv.png
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Rectangle  # noqa: E402

OUT = Path(__file__).resolve().parent / "elitekv.png"
ROPE, LATENT, KEY, VALUE, GREY = "#d95f02", "#1b9e77", "#7570b3", "#a6a6a6", "#444444"


def default_layout(kv_heads: int, head_dim: int, kv_ratio: float) -> tuple[int, int]:
    """``(r, d_c)`` for ``kv_ratio`` alone, by the library's rule: a quarter of the budget to rotated chunks."""
    values = math.floor(kv_ratio * 2 * kv_heads * head_dim + 1e-9)
    rope_chunks = max(1, min(head_dim // 2, math.floor(kv_ratio * head_dim / 4), (values - 1) // (2 * kv_heads)))
    return rope_chunks, values - 2 * kv_heads * rope_chunks


def draw_cache(ax: plt.Axes, kv_heads: int, head_dim: int, kv_ratio: float) -> None:
    """Stacked bars of cached values per token and layer (x axis: values), original vs EliteKV."""
    rope_chunks, latent = default_layout(kv_heads, head_dim, kv_ratio)
    rotated, full = kv_heads * 2 * rope_chunks, kv_heads * head_dim
    bars = [
        (1.0, [(full, KEY, f"K  (G·D = {full})"), (full, VALUE, f"V  (G·D = {full})")]),
        (0.0, [(rotated, ROPE, ""), (latent, LATENT, "")]),
    ]
    for y, parts in bars:
        left = 0
        for width, colour, label in parts:
            ax.add_patch(Rectangle((left, y - 0.3), width, 0.6, color=colour, ec="white", lw=1.5))
            if label:
                ax.text(left + width / 2, y, label, ha="center", va="center", color="white", fontsize=9)
            left += width
    ax.text(rotated + latent + 8, 0.0, f"latent c (d_c = {latent})", va="center", fontsize=9, color=LATENT)
    ax.annotate(
        f"RoPE chunks (G·2r = {rotated})",
        xy=(rotated / 2, -0.3),
        xytext=(rotated / 2, -0.85),
        ha="left",
        fontsize=9,
        color=ROPE,
        arrowprops={"arrowstyle": "-", "color": ROPE},
    )
    ax.set_yticks([1.0, 0.0], ["original", f"EliteKV {kv_ratio:.0%}"], fontsize=10)
    ax.set_xlim(0, 2 * full)
    ax.set_ylim(-1.1, 1.5)
    ax.set_xlabel("values cached per token and layer", fontsize=9)
    ax.set_title(
        f"kv_ratio = (G·2r + d_c) / (2·G·D)\nG = {kv_heads}, D = {head_dim}: r = {rope_chunks}, d_c = {latent}",
        fontsize=10,
    )
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)


def box(ax: plt.Axes, x: float, y: float, text: str, colour: str, width: float = 1.9) -> None:
    ax.add_patch(
        FancyBboxPatch((x - width / 2, y - 0.32), width, 0.64, boxstyle="round,pad=0.05", fc=colour, ec="none")
    )
    ax.text(x, y, text, ha="center", va="center", color="white", fontsize=9)


def arrow(ax: plt.Axes, start: tuple[float, float], end: tuple[float, float], text: str = "", dy: float = 0.2) -> None:
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=12, color=GREY, lw=1.2))
    if text:
        ax.text((start[0] + end[0]) / 2 - 0.15, (start[1] + end[1]) / 2 + dy, text, ha="right", fontsize=9, color=GREY)


def draw_flow(ax: plt.Axes) -> None:
    """x -> (chosen chunks of W_k, rotated) and (W_down -> latent -> W_up -> NoPE keys, values)."""
    box(ax, 0.9, 1.0, "hidden x", GREY, width=1.3)
    box(ax, 3.6, 1.9, "k_rope: r chunks\nper head, rotated", ROPE)
    box(ax, 3.6, 0.1, "c = x · W_down", LATENT)
    box(ax, 6.7, 0.85, "k_nope = c · W_up,k", KEY, width=2.3)
    box(ax, 6.7, -0.65, "v = c · W_up,v", VALUE, width=2.3)
    arrow(ax, (1.55, 1.15), (2.65, 1.8), "RoPElite", dy=0.15)
    arrow(ax, (1.55, 0.85), (2.65, 0.2), "J-LRD", dy=-0.35)
    arrow(ax, (4.55, 0.25), (5.75, 0.8))
    arrow(ax, (4.55, -0.05), (5.75, -0.6))
    ax.text(3.6, 2.55, "cached", ha="center", fontsize=9, color=ROPE, weight="bold")
    ax.text(3.6, -0.55, "cached", ha="center", fontsize=9, color=LATENT, weight="bold")
    ax.text(
        6.7,
        1.75,
        "rebuilt at attention time,\nor W_up absorbed into the\nquery and output projections",
        ha="center",
        fontsize=8,
        color=GREY,
    )
    ax.set_xlim(0, 7.9)
    ax.set_ylim(-1.2, 2.9)
    ax.axis("off")
    ax.set_title("one converted attention layer", fontsize=10)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.4), gridspec_kw={"width_ratios": [1, 1.1]})
    draw_cache(left, kv_heads=3, head_dim=64, kv_ratio=0.25)
    draw_flow(right)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110, metadata={"Software": None})
    plt.close(fig)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
