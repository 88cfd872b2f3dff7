"""Triton kernel: decode attention of a few new query tokens over the EliteKV latent cache, split over the context.

Computes what `elitekv_peft.modeling.absorbed.latent_attention_reference` computes (see there for the math and the
shapes) in two or three launches:

1. ``_split_kernel``, grid ``(row blocks x value blocks, splits, B)``: each program takes ``BLOCK_M`` query rows
   (rows are ``(head, token)`` pairs, ``H*T`` per batch item) of one batch item and one slice of the context (a
   split), streams that slice's rotated key chunks and latents in ``BLOCK_S`` tokens at a time, and keeps an online
   softmax (running max ``m``, running sum ``l``) and an unnormalised output over ``BLOCK_V`` latent value dims.
   Scores are one matrix product over the rotated chunks of the groups its rows belong to (the query is laid out
   block-diagonally: row ``(h, t)`` is zero outside its group's ``R`` columns) plus one over the key latent. The
   latent is read once for the scores and, for the value dims, from the same lines just loaded.
   When the value dims need several blocks, the scores would be recomputed (and the key latent re-read) once per
   value block; then a first launch of the same kernel (``SCORES_MODE=1``, a few key blocks per program) writes
   the scaled, masked scores ``[B, H*T, S]`` in float32 once, and the second (``SCORES_MODE=2``) reads them.
2. ``_reduce_kernel``, grid ``(B * H*T, value blocks)``: merges the splits' partial results
   (``out = sum_i 2^(m_i - M) o_i / sum_i 2^(m_i - M) l_i``).

Masking: either a bool mask ``[B, T, S]`` (True = attend; padding, causality), or causal against ``kv_len`` valid
slots (a device tensor, so that a pre-allocated cache and CUDA graphs work: keys at or past ``kv_len`` are never
read). A masked score is ``-1e30``, so a row with every key masked gets a uniform softmax, as eager attention's
finite minimum gives.

Blocks that need more shared memory than the GPU has are shrunk at launch (`smaller_config`). Joint (J-LRD)
latents take `single_pass` instead (the latent read once); this kernel serves S-LRD latents and layers without NoPE
dims (`fused.fused_latent_attention` chooses; under ``torch.compile`` it is one custom operator).

This module imports triton; `elitekv_peft.kernels` imports it only when triton is installed.
"""

from __future__ import annotations

import math
import os

import torch
from triton.runtime.errors import OutOfResources

from .split_kernel import LOG2E, _reduce_kernel, _split_kernel

# The block sizes; `latent_attention_triton` takes overrides (the benchmark tries a few: `benchmarks/decode.py
# --tune`, its results in benchmarks/results/). block_m None: all query rows of a batch item in one block, between 16
# and 32. Configurations that do not fit the device are shrunk (`smaller_config`).
DEFAULTS = {
    "block_m": None,
    "block_s": 64,
    "block_dk": 64,
    "block_v": 256,
    "num_warps": 4,
    "num_stages": 4,
    # the score launch of the two-phase variant (None: the value launch's setting)
    "score_block_s": 64,
    "score_keys": 2,  # key blocks per score program
    "score_warps": None,
    "score_stages": None,
    # context splits: enough for about this many programs per multiprocessor and at most this many keys per
    # program (`default_num_splits`; raised where the partial outputs would cost more, `min_split_keys`)
    "programs_per_sm": 2,
    "split_keys": 1024,
}


def _next_pow2(n: int, at_least: int = 1) -> int:
    return max(at_least, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


def default_num_splits(
    batch: int,
    programs_per_split: int,
    cache_len: int,
    block_s: int,
    device: torch.device,
    programs_per_sm: int = 2,
    split_keys: int = 1024,
) -> int:
    """Splits of the context: enough for about ``programs_per_sm`` programs per multiprocessor and for no program
    to stream more than ``split_keys`` keys, but each over at least two key blocks.

    The second bound matters for narrow latents over large batches, where the first would leave each program a long
    stretch of the context (timings: benchmarks/results/decode.md)."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    else:
        sms = 4
    wanted = max(
        math.ceil(programs_per_sm * sms / max(1, batch * programs_per_split)), math.ceil(cache_len / split_keys)
    )
    return max(1, min(wanted, math.ceil(cache_len / (2 * block_s))))


# Each split writes a partial output (rows x value dims, float32) that the reduce reads back: splits are kept long
# enough for that traffic to stay under this share of the cache bytes they read.
PARTIAL_SHARE = 0.02


def min_split_keys(rows: int, value_dims: int, cache_bytes_per_key: int) -> int:
    """The fewest keys per split for which a split's partial output (``rows x value_dims`` float32, written once and
    read once) stays under `PARTIAL_SHARE` of the cache bytes the split reads. E.g. the 7B shape at 25% (32 rows,
    1536 value dims, 4 KiB a key): 4800 keys, at most 7 splits of 32k (its 15 for the multiprocessors stay); SmolLM2's
    at 25% (9 rows, 72 dims, 192 bytes a key): 1350 keys, 25 splits of 32k."""
    return math.ceil(2 * rows * value_dims * 4 / (PARTIAL_SHARE * cache_bytes_per_key))


def _alignment(*values: int, cap: int = 16) -> int:
    """The largest power of two up to ``cap`` dividing every one of ``values`` (0 divides by anything)."""
    align = cap
    while align > 1 and any(v % align for v in values):
        align //= 2
    return align


def kernel_config(**overrides: object) -> dict:
    """The launch configuration: `DEFAULTS` with ``overrides``."""
    unknown = set(overrides) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"unknown kernel options {sorted(unknown)}: choose from {sorted(DEFAULTS)}")
    return {**DEFAULTS, **overrides}


# Configurations that replaced a requested one whose blocks did not fit the device (see `smaller_config`), by the
# shape of the call and the requested configuration, so that the shrinking is done once.
_FITTED: dict[tuple, dict] = {}


def smaller_config(cfg: dict) -> dict | None:
    """The next configuration to try when ``cfg``'s blocks need more shared memory than the device has.

    In order: one pipeline stage less (down to 1); half the key block (down to 16); then half the key latent column
    block ``block_dk`` (down to 16). None when nothing is left to shrink.
    """
    # the score launch's own setting, None meaning num_stages
    stages = {"num_stages": cfg["num_stages"], "score_stages": cfg["score_stages"] or cfg["num_stages"]}
    if any(value > 1 for value in stages.values()):
        return {**cfg, **{name: max(1, value - 1) for name, value in stages.items()}}
    if cfg["block_s"] > 16:
        halved = {"block_s": cfg["block_s"] // 2}
        if cfg.get("score_block_s"):
            halved["score_block_s"] = max(16, cfg["score_block_s"] // 2)
        return {**cfg, **halved}
    if cfg.get("score_block_s") and cfg["score_block_s"] > 16:
        return {**cfg, "score_block_s": cfg["score_block_s"] // 2}
    if cfg["block_dk"] > 16:
        return {**cfg, "block_dk": cfg["block_dk"] // 2}
    return None


def block_diagonal_queries(q_rope: torch.Tensor, groups: int, dtype: torch.dtype) -> torch.Tensor:
    """The rotated queries ``[B, H, T, R]`` laid out block-diagonally, ``[B, H*T, G*R]`` in ``dtype``: row ``(h, t)``
    holds ``q_rope[h, t]`` in the ``R`` columns of its group and zeros elsewhere (one product scores every group)."""
    B, H, T, R = q_rope.shape
    rows_per_group = (H // groups) * T
    q_rows = q_rope.to(dtype).reshape(B, groups, rows_per_group, R)
    q_block = torch.zeros(B, groups, rows_per_group, groups, R, device=q_rope.device, dtype=dtype)
    index = torch.arange(groups, device=q_rope.device)
    q_block[:, index, :, index] = q_rows.permute(1, 0, 2, 3)
    return q_block.reshape(B, H * T, groups * R)


def latent_attention_triton(
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
    num_splits: int | None = None,
    two_phase: bool | None = None,
    **config: int,
) -> torch.Tensor:
    """The Triton version of `latent_attention_reference` (same arguments, except the mask).

    Args:
        allowed: bool ``[B, T, S]`` (True = attend) from `elitekv_peft.modeling.absorbed.allowed_keys`, or None for
            causal against ``kv_len`` (or against the whole cache when ``kv_len`` is None).
        num_splits: context splits (None: enough for ``programs_per_sm`` programs per multiprocessor and at most
            ``split_keys`` keys per program, see `default_num_splits`).
        two_phase: compute the scores in a first launch and the softmax and values in a second (None: when the value
            dims need more than one block, so that the fused launch would recompute the scores per block).
        config: overrides of the block sizes in `DEFAULTS` (``block_m``, ``block_s``, ``block_dk``, ``block_v``,
            ``num_warps``, ``num_stages``; ``score_block_s``, ``score_keys``, ``score_warps``, ``score_stages`` for the
            score launch; ``programs_per_sm`` and ``split_keys``: how many context splits, when ``num_splits`` is
            None).

    Returns:
        ``[B, H, T, d_vc]`` in the latent's dtype.

    A configuration whose blocks need more shared memory than the device has (e.g. float32 latents, or ``d_c``
    3072) is shrunk step by step (`smaller_config`) instead of failing; the fitted one is remembered per shape.
    """
    cfg = kernel_config(**config)
    tensors = (q_rope, q_latent, rope_keys, latent)
    options = dict(
        key_slice=key_slice,
        value_slice=value_slice,
        scaling=scaling,
        allowed=allowed,
        kv_len=kv_len,
        num_splits=num_splits,
        two_phase=two_phase,
    )
    shape_key = (latent.dtype, latent.shape[-1], tuple(q_rope.shape[1:]), tuple(sorted(cfg.items())))
    cfg = _FITTED.get(shape_key, cfg)
    while True:
        try:
            out = _launch(*tensors, cfg=cfg, **options)
        except OutOfResources:
            cfg = smaller_config(cfg)
            if cfg is None:
                raise
            continue
        _FITTED[shape_key] = cfg
        return out


def _launch(
    q_rope: torch.Tensor,
    q_latent: torch.Tensor | None,
    rope_keys: torch.Tensor,
    latent: torch.Tensor,
    *,
    cfg: dict,
    key_slice: tuple[int, int],
    value_slice: tuple[int, int],
    scaling: float,
    allowed: torch.Tensor | None,
    kv_len: torch.Tensor | None,
    num_splits: int | None,
    two_phase: bool | None,
) -> torch.Tensor:
    """`latent_attention_triton` with a resolved configuration ``cfg`` (`kernel_config`): the launches."""
    B, H, T, R = q_rope.shape
    G, S = rope_keys.shape[1], rope_keys.shape[2]
    rows = H * T
    rows_per_group = (H // G) * T
    dk = key_slice[1] - key_slice[0] if q_latent is not None else 0
    dv = value_slice[1] - value_slice[0]
    dtype = latent.dtype
    device = latent.device
    if rope_keys.stride(-1) != 1 or latent.stride(-1) != 1:
        raise ValueError("latent_attention_triton needs the cache's last dim contiguous")

    block_m = cfg["block_m"] or min(32, _next_pow2(rows, 16))
    row_blocks = math.ceil(rows / block_m)
    groups_per_block = max(
        (min((rb + 1) * block_m, rows) - 1) // rows_per_group - (rb * block_m) // rows_per_group + 1
        for rb in range(row_blocks)
    )
    block_v = min(cfg.get("block_v", 256), _next_pow2(dv, 16))
    num_vb = math.ceil(dv / block_v)
    block_s = cfg["block_s"]
    if two_phase is None:
        two_phase = num_vb > 1
    programs_per_split = row_blocks * num_vb
    if num_splits is None:
        bytes_per_key = (G * R + latent.shape[-1]) * latent.element_size()
        split_keys = max(cfg["split_keys"], min_split_keys(rows, dv, bytes_per_key))
        num_splits = default_num_splits(B, programs_per_split, S, block_s, device, cfg["programs_per_sm"], split_keys)
    split_len = math.ceil(math.ceil(S / num_splits) / block_s) * block_s
    num_splits = math.ceil(S / split_len)

    q_block = block_diagonal_queries(q_rope, G, dtype)
    q_lat = (q_latent.to(dtype) if q_latent is not None else q_block).reshape(B, rows, -1).contiguous()
    mask_arg = allowed.to(torch.int8) if allowed is not None else q_block
    mask_strides = mask_arg.stride() if allowed is not None else (0, 0, 0)
    part_o = torch.empty(B, num_splits, rows, dv, device=device, dtype=torch.float32)
    part_ml = torch.empty(B, num_splits, rows, 2, device=device, dtype=torch.float32)
    out = torch.empty(B, rows, dv, device=device, dtype=dtype)
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    common = (
        q_block,
        q_lat,
        rope_keys,
        latent,
        mask_arg,
        kv_len if kv_len is not None else q_block,
        part_o,
        part_ml,
    )
    strides = (
        q_block.stride(0),
        q_block.stride(1),
        q_lat.stride(0),
        q_lat.stride(1),
        rope_keys.stride(0),
        rope_keys.stride(1),
        rope_keys.stride(2),
        latent.stride(0),
        latent.stride(2),
        *mask_strides,
    )
    sizes = (rows, T, rows_per_group, G, S)
    flags = dict(
        R=R,
        DK=dk,
        DV=dv,
        BLOCK_M=block_m,
        BLOCK_S=block_s,
        BLOCK_RC=_next_pow2(groups_per_block * R, 16),
        HAS_LATENT_K=q_latent is not None,
        HAS_MASK=allowed is not None,
        HAS_KVLEN=kv_len is not None,
        IEEE=dtype == torch.float32,
        ALIGN_C=_alignment(latent.stride(0), latent.stride(2), key_slice[0], value_slice[0]),
        ALIGN_KR=_alignment(*rope_keys.stride()[:3]),
        ALIGN_Q=_alignment(*q_block.stride()[:2], *q_lat.stride()[:2]),
        DYNAMIC_LOOP=not interpreted,
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )

    scores = torch.empty(B, rows, S, device=device, dtype=torch.float32) if two_phase else part_o

    def launch(
        mode: int, grid: tuple[int, int, int], length: int, splits: int, vblocks: int, **launch_flags: int
    ) -> None:
        _split_kernel[grid](
            *common,
            scores,
            *strides,
            scores.stride(0) if two_phase else 0,
            scores.stride(1) if two_phase else 0,
            *sizes,
            length,
            scaling * LOG2E,
            key_slice[0],
            value_slice[0],
            NSPLIT=splits,
            NUM_VB=vblocks,
            BLOCK_DK=min(cfg["block_dk"], _next_pow2(max(dk, 1), 16)),
            BLOCK_V=block_v,
            STATIC_SPLIT_LEN=length if interpreted else 0,
            SCORES_MODE=mode,
            **{**flags, **launch_flags},
        )

    if two_phase:  # scores once per row block, a few key blocks per program
        score_block_s = cfg["score_block_s"] or block_s
        score_len = cfg["score_keys"] * score_block_s
        score_splits = math.ceil(S / score_len)
        launch(
            1,
            (row_blocks, score_splits, B),
            score_len,
            score_splits,
            1,
            BLOCK_S=score_block_s,
            num_warps=cfg["score_warps"] or cfg["num_warps"],
            num_stages=cfg["score_stages"] or cfg["num_stages"],
        )
    launch(2 if two_phase else 0, (row_blocks * num_vb, num_splits, B), split_len, num_splits, num_vb)
    _reduce_kernel[(B * rows, num_vb)](
        part_o,
        part_ml,
        out,
        rows,
        DV=dv,
        NSPLIT=num_splits,
        BLOCK_SPLIT=_next_pow2(num_splits),
        BLOCK_V=block_v,
        num_warps=4,
    )
    return out.view(B, H, T, dv)
