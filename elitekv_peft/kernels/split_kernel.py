"""The Triton programs of the decode kernel (`latent_decode` launches them; see there for what they compute).

* ``_split_kernel``: one split of the context for a block of query rows: scores over the rotated chunks and the key
  latent, an online softmax, and the unnormalised output over a block of latent value dims (``SCORES_MODE`` 1 writes
  only the scores, 2 reads them back instead of computing them, 0 does both in one launch);
* ``_reduce_kernel``: merges the splits' partial outputs.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .blocks import (
    aligned,
    block_keys,
    key_loop_bounds,
    mask_scores,
    mma,
    query_rows,
    rope_query_block,
    split_bounds,
    store_softmax_stats,
)

LOG2E = 1.4426950408889634


@triton.jit
def _split_kernel(
    QR,  # [B, ROWS, G*R] block-diagonal rotated query chunks
    QL,  # [B, ROWS, DK] absorbed NoPE queries (unused when not HAS_LATENT_K)
    KR,  # [B, G, S, R] rotated key chunks (any strides)
    C,  # [B, 1, S, d_c] latents (any strides)
    MASK,  # [B, T, S] int8 (1 = attend), when HAS_MASK
    KVLEN,  # [1] valid cache slots, when HAS_KVLEN
    PART_O,  # [B, NSPLIT, ROWS, DV] fp32
    PART_ML,  # [B, NSPLIT, ROWS, 2] fp32
    SCORES,  # [B, ROWS, S] fp32 scaled, masked scores (SCORES_MODE 1 writes them, 2 reads them)
    stride_qr_b,
    stride_qr_row,
    stride_ql_b,
    stride_ql_row,
    stride_kr_b,
    stride_kr_g,
    stride_kr_s,
    stride_c_b,
    stride_c_s,
    stride_m_b,
    stride_m_t,
    stride_m_s,
    stride_sc_b,
    stride_sc_row,
    ROWS,
    T,
    ROWS_PER_GROUP,  # Hg * T
    G,
    S,
    split_len,
    scale_log2,
    KEY_OFF,
    VAL_OFF,
    R: tl.constexpr,
    DK: tl.constexpr,
    DV: tl.constexpr,
    NSPLIT: tl.constexpr,
    NUM_VB: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_RC: tl.constexpr,
    BLOCK_DK: tl.constexpr,
    BLOCK_V: tl.constexpr,
    ALIGN_C: tl.constexpr,  # the latent's strides and offsets are multiples of this (elements): see `_alignment`
    ALIGN_KR: tl.constexpr,  # the rotated keys' strides
    ALIGN_Q: tl.constexpr,  # the queries' strides
    HAS_LATENT_K: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_KVLEN: tl.constexpr,
    IEEE: tl.constexpr,
    DYNAMIC_LOOP: tl.constexpr,
    STATIC_SPLIT_LEN: tl.constexpr,
    SCORES_MODE: tl.constexpr,  # 0: fused; 1: write scores only; 2: read scores, softmax and values
):
    # divisibility the JIT does not see when it is below 16 (e.g. d_c = 72): without it every load is scalar
    stride_c_b = aligned(stride_c_b, ALIGN_C)
    stride_c_s = aligned(stride_c_s, ALIGN_C)
    KEY_OFF = aligned(KEY_OFF, ALIGN_C)
    VAL_OFF = aligned(VAL_OFF, ALIGN_C)
    stride_kr_b = aligned(stride_kr_b, ALIGN_KR)
    stride_kr_g = aligned(stride_kr_g, ALIGN_KR)
    stride_kr_s = aligned(stride_kr_s, ALIGN_KR)
    stride_qr_b = aligned(stride_qr_b, ALIGN_Q)
    stride_qr_row = aligned(stride_qr_row, ALIGN_Q)
    stride_ql_b = aligned(stride_ql_b, ALIGN_Q)
    stride_ql_row = aligned(stride_ql_row, ALIGN_Q)
    pid_rv = tl.program_id(0)
    split = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    rb = pid_rv // NUM_VB
    vb = pid_rv % NUM_VB

    rows, row_ok, t_of_row, g_first = query_rows(rb, ROWS, T, ROWS_PER_GROUP, BLOCK_M)

    q_rope, cols, col_g, col_ok = rope_query_block(
        QR, b, stride_qr_b, stride_qr_row, rows, row_ok, g_first, G, R, BLOCK_RC
    )
    kv_len, start, end = split_bounds(KVLEN, S, split, split_len, HAS_KVLEN)

    vdims = vb * BLOCK_V + tl.arange(0, BLOCK_V)
    v_ok = vdims < DV
    kdims = tl.arange(0, BLOCK_DK)

    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_V], tl.float32)
    kr_base = KR + b * stride_kr_b + (col_g * stride_kr_g + cols % R)[:, None]
    c_base = C + b * stride_c_b
    loop_start, loop_end = key_loop_bounds(start, end, DYNAMIC_LOOP, STATIC_SPLIT_LEN)
    for s0 in range(loop_start, loop_end, BLOCK_S):
        keys, key_ok = block_keys(s0, start, end, BLOCK_S, DYNAMIC_LOOP)
        score_ptrs = SCORES + b * stride_sc_b + rows[:, None] * stride_sc_row + keys[None, :]
        if SCORES_MODE == 2:
            scores = tl.load(score_ptrs, mask=row_ok[:, None] & key_ok[None, :], other=float("-inf"))
        else:
            k_rope = tl.load(
                kr_base + keys[None, :] * stride_kr_s, mask=col_ok[:, None] & key_ok[None, :], other=0.0
            )  # [BLOCK_RC, BLOCK_S]
            scores = mma(q_rope, k_rope, IEEE)
            if HAS_LATENT_K:
                for k0 in range(0, DK, BLOCK_DK):
                    kd = k0 + kdims
                    kd_ok = kd < DK
                    q_lat = tl.load(
                        QL + b * stride_ql_b + rows[:, None] * stride_ql_row + kd[None, :],
                        mask=row_ok[:, None] & kd_ok[None, :],
                        other=0.0,
                    )
                    c_k = tl.load(
                        c_base + keys[None, :] * stride_c_s + (KEY_OFF + kd)[:, None],
                        mask=kd_ok[:, None] & key_ok[None, :],
                        other=0.0,
                    )  # [BLOCK_DK, BLOCK_S]
                    scores += mma(q_lat, c_k, IEEE)
            scores = scores * scale_log2
            scores = mask_scores(
                scores,
                keys,
                key_ok,
                row_ok,
                t_of_row,
                kv_len,
                T,
                MASK + b * stride_m_b,
                stride_m_t,
                stride_m_s,
                HAS_MASK,
            )
        if SCORES_MODE == 1:
            tl.store(score_ptrs, scores, mask=row_ok[:, None] & key_ok[None, :])
        else:
            m_new = tl.maximum(m_i, tl.max(scores, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(scores - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            c_v = tl.load(
                c_base + keys[:, None] * stride_c_s + (VAL_OFF + vdims)[None, :],
                mask=key_ok[:, None] & v_ok[None, :],
                other=0.0,
            )  # [BLOCK_S, BLOCK_V]
            acc = acc * alpha[:, None] + mma(p.to(c_v.dtype), c_v, IEEE)
            m_i = m_new

    if SCORES_MODE != 1:
        part = (b * NSPLIT + split) * ROWS + rows
        tl.store(PART_O + part[:, None] * DV + vdims[None, :], acc, mask=row_ok[:, None] & v_ok[None, :])
        if vb == 0:
            store_softmax_stats(PART_ML, part, m_i, l_i, row_ok)


@triton.jit
def _reduce_kernel(
    PART_O,  # [B, NSPLIT, ROWS, DV] fp32
    PART_ML,  # [B, NSPLIT, ROWS, 2] fp32
    OUT,  # [B, ROWS, DV]
    ROWS,
    DV: tl.constexpr,
    NSPLIT: tl.constexpr,
    BLOCK_SPLIT: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)  # b * ROWS + row
    vb = tl.program_id(1)
    b = pid // ROWS
    row = pid % ROWS
    splits = tl.arange(0, BLOCK_SPLIT)
    split_ok = splits < NSPLIT
    part = (b * NSPLIT + splits) * ROWS + row
    m = tl.load(PART_ML + part * 2, mask=split_ok, other=float("-inf"))
    l = tl.load(PART_ML + part * 2 + 1, mask=split_ok, other=0.0)
    m_max = tl.max(m, axis=0)
    w = tl.exp2(m - m_max)
    w = tl.where(split_ok, w, 0.0)
    vdims = vb * BLOCK_V + tl.arange(0, BLOCK_V)
    v_ok = vdims < DV
    o = tl.load(PART_O + part[:, None] * DV + vdims[None, :], mask=split_ok[:, None] & v_ok[None, :], other=0.0)
    out = tl.sum(o * w[:, None], axis=0) / tl.sum(l * w, axis=0)
    tl.store(OUT + pid * DV + vdims, out.to(OUT.dtype.element_ty), mask=v_ok)
