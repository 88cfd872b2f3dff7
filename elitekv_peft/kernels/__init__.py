"""Fused decode attention over the EliteKV latent cache: Triton kernels on CUDA, PyTorch elsewhere.

`latent_attention` is the one dispatch point: importing this package registers it with
`elitekv_peft.modeling.absorbed` (`use_kernel`), which the absorbed attention path calls. It runs the Triton kernels
(`fused.fused_latent_attention`: the single-pass kernel for joint J-LRD latents, `latent_decode`'s for S-LRD ones)
for CUDA tensors when triton imports (and on any device in triton's interpreter mode, ``TRITON_INTERPRET=1``), and
`elitekv_peft.modeling.absorbed.latent_attention_reference` otherwise.

The model config holds the one switch (``config.elitekv["attention_path"]``, see `elitekv_peft.set_attention_path`):
``"absorbed_reference"`` attends on the latent with the PyTorch reference (comparisons), the other absorbed paths
come here.
"""

from __future__ import annotations

import functools
import importlib
import os
from types import ModuleType

import torch

from ..modeling.absorbed import allowed_keys, latent_attention_reference, use_kernel

__all__ = [
    "allowed_keys",
    "latent_attention",
    "latent_attention_reference",
    "triton_available",
]


@functools.cache
def _triton_module() -> ModuleType | None:
    try:
        return importlib.import_module(f"{__name__}.fused")
    except ImportError:
        return None


@torch.compiler.assume_constant_result  # run once while tracing, not traced (imports the kernel module)
def triton_available() -> bool:
    """Whether triton imports (the kernels can run on CUDA, or anywhere in triton's interpreter mode)."""
    return _triton_module() is not None


def _use_triton(device: torch.device) -> bool:
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    return (device.type == "cuda" or interpreted) and triton_available()


def latent_attention(
    q_rope: torch.Tensor,
    q_latent: torch.Tensor | None,
    rope_keys: torch.Tensor,
    latent: torch.Tensor,
    *,
    key_slice: tuple[int, int],
    value_slice: tuple[int, int],
    scaling: float,
    attention_mask: torch.Tensor | None = None,
    kv_len: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention over the latent cache: ``[B, H, T, d_vc]`` (see `absorbed.latent_attention_reference`).

    Additive float masks are treated as binary by the Triton kernels (0 = attend, the dtype's minimum = masked),
    which is what transformers builds for Llama/Mistral/Qwen2.
    """
    args = (q_rope, q_latent, rope_keys, latent)
    kwargs = dict(key_slice=key_slice, value_slice=value_slice, scaling=scaling, kv_len=kv_len)
    if not _use_triton(latent.device):
        return latent_attention_reference(*args, attention_mask=attention_mask, **kwargs)
    B, _, T, _ = q_rope.shape
    S = rope_keys.shape[2]
    allowed = None
    if attention_mask is not None:
        allowed = allowed_keys(attention_mask, kv_len, B, T, S, latent.device)
    if torch.compiler.is_compiling():  # one opaque operator (`fused.latent_decode_op`): one graph
        return torch.ops.elitekv.latent_decode(*args, *key_slice, *value_slice, scaling, allowed, kv_len)
    return _triton_module().fused_latent_attention(*args, allowed=allowed, **kwargs)


use_kernel(latent_attention)
