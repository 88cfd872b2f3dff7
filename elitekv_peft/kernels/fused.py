"""Which Triton kernel a latent attention call runs, and that choice as one ``torch.compile`` operator.

Every layout runs `latent_decode.latent_attention_triton` (the two-phase kernel: scores, then the softmax-weighted
latent). `single_pass.single_pass_attention` reads each latent tile once for the scores and the values, and applies to
joint (J-LRD) latents with NoPE queries that fit a program's shared memory (`single_pass_applies`); measured on an
H200 it is slower than the two-phase kernel at every shape of `benchmarks/results/decode_kernel.md`, so the dispatch
does not take it: it stays reachable directly (the benchmark times it) until it wins somewhere measured.

This module imports triton; `elitekv_peft.kernels` imports it only when triton is installed.
"""

from __future__ import annotations

import torch

from .latent_decode import latent_attention_triton
from .single_pass import fits


def single_pass_applies(
    q_rope: torch.Tensor,
    q_latent: torch.Tensor | None,
    rope_keys: torch.Tensor,
    latent: torch.Tensor,
    key_slice: tuple[int, int],
    value_slice: tuple[int, int],
) -> bool:
    """Whether the single-pass kernel can run these arguments: J-LRD with NoPE dims, and all query rows' absorbed
    queries fit a program's shared memory (`single_pass.fits`)."""
    joint = q_latent is not None and tuple(key_slice) == tuple(value_slice)
    return joint and fits(q_rope, rope_keys, latent, key_slice[1] - key_slice[0])


def fused_latent_attention(
    q_rope: torch.Tensor,
    q_latent: torch.Tensor | None,
    rope_keys: torch.Tensor,
    latent: torch.Tensor,
    *,
    key_slice: tuple[int, int],
    value_slice: tuple[int, int],
    scaling: float,
    allowed: torch.Tensor | None = None,
    kv_len: torch.Tensor | None = None,
) -> torch.Tensor:
    """`latent_attention_reference` on the fastest measured Triton kernel (see the module docstring):
    ``[B, H, T, d_vc]`` (``allowed``: bool ``[B, T, S]`` or None, see `latent_decode.latent_attention_triton`)."""
    kwargs = dict(key_slice=key_slice, value_slice=value_slice, scaling=scaling, allowed=allowed, kv_len=kv_len)
    return latent_attention_triton(q_rope, q_latent, rope_keys, latent, **kwargs)


@torch.library.custom_op("elitekv::latent_decode", mutates_args=())
def latent_decode_op(
    q_rope: torch.Tensor,
    q_latent: torch.Tensor | None,
    rope_keys: torch.Tensor,
    latent: torch.Tensor,
    key_start: int,
    key_end: int,
    value_start: int,
    value_end: int,
    scaling: float,
    allowed: torch.Tensor | None,
    kv_len: torch.Tensor | None,
) -> torch.Tensor:
    """`fused_latent_attention` (default configurations) as one opaque operator for ``torch.compile``.

    Compiling a decode step traces through this operator instead of into the launchers' Python (shape arithmetic,
    the shared-memory fallback), so the step stays one graph and Inductor can fuse the work around it.
    Returns ``[B, H, T, value_end - value_start]``.
    """
    return fused_latent_attention(
        q_rope,
        q_latent,
        rope_keys,
        latent,
        key_slice=(key_start, key_end),
        value_slice=(value_start, value_end),
        scaling=scaling,
        allowed=allowed,
        kv_len=kv_len,
    )


@latent_decode_op.register_fake
def _latent_decode_shape(q_rope, q_latent, rope_keys, latent, key_start, key_end, value_start, value_end, *rest):
    B, H, T, _ = q_rope.shape
    return latent.new_empty(B, H, T, value_end - value_start)
