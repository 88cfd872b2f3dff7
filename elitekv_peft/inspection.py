"""Pictures of a conversion, from a live config or a saved folder (``elitekv inspect <folder>``).

* `plot_chunk_choices`: a heatmap with one row per layer and, per key/value head, one column per rotary chunk;
  kept chunks are coloured by their frequency (chunk 0 = fastest), dropped chunks are blank.
* `plot_cache_breakdown`: cache bytes per token and layer, stacked (rotated chunks, latent) beside the original.
* `plot_calibration_errors`: the conversion's calibration errors, RoPElite score error per layer and key/value head
  and the low-rank output error per layer (saved in the adapter config's ``report`` at conversion time).

`inspect_artifact` reads a folder written by ``save_pretrained`` and writes the three PNGs (next to it by default).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


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
    counts = sorted({len(layer[0]) for layer in chunk_indices})
    kept = str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]} by layer"
    ax.set_title(title or f"Rotary chunks kept (r = {kept} of {num_chunks} per head)")
    colorbar = fig.colorbar(image, ax=ax)
    colorbar.set_label("chunk index (0 = highest frequency)")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return path


def cache_breakdown(
    chunk_indices: list, latent_dims: list[int], num_kv_heads: int, head_dim: int, bytes_per_value: int
) -> dict[str, list[int]]:
    """Cache bytes per token for each layer: ``rotated`` (``G*2r``), ``latent`` (``d_c``) and ``original``
    (``2*G*D``) values, times ``bytes_per_value``; each a list of length ``L``."""
    rotated = [sum(2 * len(head) for head in layer) * bytes_per_value for layer in chunk_indices]
    latent = [int(d) * bytes_per_value for d in latent_dims]
    original = [2 * num_kv_heads * head_dim * bytes_per_value] * len(latent_dims)
    return {"rotated": rotated, "latent": latent, "original": original}


def plot_cache_breakdown(breakdown: dict[str, list[int]], path: str | Path, dtype: str = "bfloat16") -> Path:
    """Stacked bars per layer (rotated chunks + latent) next to the original cache; saves a PNG."""
    plt = _pyplot()
    L = len(breakdown["latent"])
    x = torch.arange(L).numpy()
    width = 0.4
    fig, ax = plt.subplots(figsize=(max(6.0, L / 3), 4.0))
    ax.bar(x - width / 2, breakdown["original"], width, color="lightgray", label="original (K and V)")
    ax.bar(x + width / 2, breakdown["rotated"], width, color="tab:orange", label="EliteKV: rotated chunks")
    latent = breakdown["latent"]
    ax.bar(x + width / 2, latent, width, bottom=breakdown["rotated"], color="tab:blue", label="EliteKV: latent")
    total = sum(breakdown["rotated"]) + sum(breakdown["latent"])
    ax.set_title(f"KV cache bytes per token ({dtype}): {total:,} vs {sum(breakdown['original']):,} over {L} layers")
    ax.set_xlabel("layer")
    ax.set_ylabel("bytes per token")
    ax.set_xticks(x[:: max(1, L // 16)])
    ax.legend(loc="upper right", fontsize="small")
    return _save(fig, path)


def plot_calibration_errors(
    selection_errors: list[list[float | None]],
    lowrank_errors: list[float | None],
    path: str | Path,
    objective: str = "scores",
) -> Path:
    """Heatmap of the RoPElite search's error ``[layer][kv head]`` (in the unit of its ``objective``) and a bar per
    layer of the low-rank output error."""
    plt = _pyplot()
    selection = torch.tensor([[math.nan if e is None else e for e in layer] for layer in selection_errors])
    lowrank = [math.nan if e is None else e for e in lowrank_errors]
    L, G = selection.shape
    fig, (left, right) = plt.subplots(1, 2, figsize=(10.0, max(3.0, L / 4)), width_ratios=[max(1, G), 2])
    image = left.imshow(selection.numpy(), aspect="auto", cmap="magma", interpolation="nearest")
    left.set_xlabel("key/value head")
    left.set_ylabel("layer")
    left.set_xticks(range(G))
    left.set_title("RoPElite: mean |score error|" if objective == "scores" else "RoPElite: attention-row distance")
    fig.colorbar(image, ax=left)
    if torch.isnan(selection).all():
        left.text(G / 2 - 0.5, L / 2 - 0.5, "not measured\n(heuristic selection)", ha="center", va="center")
    right.barh(range(L), lowrank, color="tab:blue")
    right.invert_yaxis()
    ticks = list(range(0, L, max(1, L // 16)))
    left.set_yticks(ticks)
    right.set_yticks(ticks)
    right.set_xlabel("relative output error of [K_nope | V]")
    right.set_title("low-rank latent")
    return _save(fig, path)


@dataclass
class ArtifactInfo:
    """What `inspect_artifact` reads from a saved folder."""

    chunk_indices: list  # [L][G][r]
    latent_dims: list[int]  # [L]
    num_kv_heads: int
    head_dim: int
    dtype: str
    report: dict  # the conversion's report ({} when the folder has none)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(
            f"{path} is not valid JSON ({error}); save the model again or copy the folder again."
        ) from None


def read_artifact(folder: str | Path) -> ArtifactInfo:
    """Read the conversion of a folder written by ``save_pretrained`` (adapter config, else ``config.json``)."""
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"{folder} does not exist; pass the folder written by `model.save_pretrained(...)`.")
    if not folder.is_dir():
        raise NotADirectoryError(f"{folder} is a file; pass the folder written by `model.save_pretrained(...)`.")
    adapter = _read_json(folder / "adapter_config.json") if (folder / "adapter_config.json").is_file() else {}
    model = _read_json(folder / "config.json") if (folder / "config.json").is_file() else {}
    dtype = str(model.get("dtype") or model.get("torch_dtype") or "bfloat16").removeprefix("torch.")
    if adapter.get("peft_type") == "ELITEKV" and adapter.get("chunk_indices"):
        shape = adapter.get("base_shape") or {}
        return ArtifactInfo(
            adapter["chunk_indices"],
            adapter["latent_dims"],
            shape.get("num_key_value_heads") or len(adapter["chunk_indices"][0]),
            shape.get("head_dim") or model.get("head_dim"),
            dtype,
            adapter.get("report") or {},
        )
    elitekv = model.get("elitekv")
    if isinstance(elitekv, dict) and elitekv.get("chunk_indices"):
        head_dim = model.get("head_dim") or model["hidden_size"] // model["num_attention_heads"]
        return ArtifactInfo(
            elitekv["chunk_indices"],
            elitekv["latent_dims"],
            model["num_key_value_heads"],
            head_dim,
            dtype,
            elitekv.get("report") or {},
        )
    if adapter.get("peft_type") == "ELITEKV" or isinstance(elitekv, dict):  # converted, by another method
        method = adapter.get("method") if adapter.get("peft_type") == "ELITEKV" else elitekv.get("method")
        raise ValueError(
            f"{folder} holds a model converted with method={method!r}; `inspect` draws RoPElite's chunk choices, so "
            "it reads EliteKV (method='elitekv') folders only. `elitekv eval FOLDER --data ...` measures any method."
        )
    raise ValueError(
        f"{folder} holds no converted EliteKV model (neither an adapter_config.json with peft_type ELITEKV nor a "
        "config.json with an `elitekv` entry). Pass the folder that `save_pretrained` wrote after "
        "`get_peft_model(model, EliteKVConfig(...))`."
    )


def inspect_artifact(folder: str | Path, out: str | Path | None = None) -> dict[str, Path]:
    """Write ``chunk_choices.png``, ``cache_breakdown.png`` and (when recorded) ``calibration_errors.png``.

    ``out`` defaults to ``folder``. Returns the written paths by name.
    """
    info = read_artifact(folder)
    out = Path(out) if out is not None else Path(folder)
    written = {
        "chunk_choices": plot_chunk_choices(info.chunk_indices, info.head_dim, out / "chunk_choices.png"),
        "cache_breakdown": plot_cache_breakdown(
            cache_breakdown(
                info.chunk_indices, info.latent_dims, info.num_kv_heads, info.head_dim, DTYPE_BYTES.get(info.dtype, 2)
            ),
            out / "cache_breakdown.png",
            info.dtype,
        ),
    }
    if info.report.get("selection_errors") and info.report.get("lowrank_errors"):
        written["calibration_errors"] = plot_calibration_errors(
            info.report["selection_errors"],
            info.report["lowrank_errors"],
            out / "calibration_errors.png",
            info.report.get("selection_objective", "scores"),
        )
    return written
