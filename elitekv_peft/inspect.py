"""Pictures of a conversion: which rotary chunks each layer and head kept.

`plot_chunk_choices` draws a heatmap with one row per layer and, per key/value head, one column per rotary
chunk; kept chunks are coloured by their frequency (chunk 0 = fastest), dropped chunks are blank.
"""

from __future__ import annotations

from pathlib import Path

import torch


def chunk_matrix(chunk_indices: list, head_dim: int) -> torch.Tensor:
    """``[layer][kv_head][r]`` chunk indices -> float matrix ``[L, G * D/2]``: chunk index + 1 where kept, 0 else."""
    num_chunks = head_dim // 2
    L, G = len(chunk_indices), len(chunk_indices[0])
    matrix = torch.zeros(L, G * num_chunks)
    for layer, heads in enumerate(chunk_indices):
        for g, chunks in enumerate(heads):
            for c in chunks:
                matrix[layer, g * num_chunks + int(c)] = int(c) + 1
    return matrix


def plot_chunk_choices(chunk_indices: list, head_dim: int, path: str | Path, title: str | None = None) -> Path:
    """Save the chunk-choice heatmap of a conversion as a PNG and return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = chunk_matrix(chunk_indices, head_dim)
    num_chunks = head_dim // 2
    L, width = matrix.shape
    G = width // num_chunks
    masked = torch.where(matrix > 0, matrix - 1, torch.full_like(matrix, float("nan")))
    fig, ax = plt.subplots(figsize=(max(6.0, width / 8), max(3.0, L / 4)))
    image = ax.imshow(
        masked.numpy(), aspect="auto", cmap="viridis_r", interpolation="nearest", vmin=0, vmax=num_chunks - 1
    )
    for g in range(1, G):
        ax.axvline(g * num_chunks - 0.5, color="black", linewidth=1)
    ax.set_xticks([g * num_chunks + num_chunks / 2 - 0.5 for g in range(G)])
    ax.set_xticklabels([f"KV head {g}" for g in range(G)])
    ax.set_ylabel("layer")
    ax.set_title(title or f"Rotary chunks kept (r = {len(chunk_indices[0][0])} of {num_chunks} per head)")
    colorbar = fig.colorbar(image, ax=ax)
    colorbar.set_label("chunk index (0 = highest frequency)")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
