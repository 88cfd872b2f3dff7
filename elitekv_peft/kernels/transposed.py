"""Transposed single-pass variant of the fused decode kernel: keys (and latent dims) as the matrix rows.

Same inputs, outputs and math as `single_pass._single_pass_kernel` (one pass over the context, each latent tile
read once per program), with the products turned around so that their first dimension is large:

* scores as ``[BLOCK_S keys, BLOCK_M query rows]`` = ``c_k @ q_latent^T`` (plus the rotated chunks), ``M = BLOCK_S``;
* values accumulated as ``out^T [BLOCK_C latent dims, BLOCK_M rows]`` += ``c_v^T @ p^T``, ``M = BLOCK_C``.

With 32 query rows (the 7B shape's heads) the single-pass variant's products have ``M = 16`` (its row blocks),
which the tensor cores run at a fraction of their rate, and two row blocks read each latent tile; here one program
takes all the rows of a batch item, and the products have ``M`` of 64 or 128. The value dims are shared by
``VALUE_SPLITS`` neighbouring programs (``max_value_width``, 512 by default: an accumulator of 512 x 32 fp32 is
64 KB, 64 registers a thread at 8 warps), each recomputing the scores from the same latent lines (L2 hits).

Not yet timed on a GPU (interpreter-tested against the PyTorch reference); `benchmarks/decode.py --tune` tries it.
Compiled offline for sm_90 at the 7B shape, only ``block_s = 16`` with 512 value dims per program fits the
registers (201 a thread); wider key blocks or value slices spill, so its score products have ``M = 16`` like the
single-pass variant's, and only the value products are large.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .blocks import (
    block_keys,
    key_loop_bounds,
    mask_scores_t,
    mma,
    query_rows,
    rope_query_block,
    split_bounds,
    store_softmax_stats,
)


@triton.jit
def _transposed_kernel(
    QR,  # [B, ROWS, G*R] block-diagonal rotated query chunks
    QL,  # [B, ROWS, DK] absorbed NoPE queries (unused when not HAS_LATENT_K)
    KR,  # [B, G, S, R] rotated key chunks (any strides)
    C,  # [B, 1, S, d_c] latents (any strides)
    MASK,  # [B, T, S] int8 (1 = attend), when HAS_MASK
    KVLEN,  # [1] valid cache slots, when HAS_KVLEN
    PART_O,  # [B, NSPLIT, ROWS, DV] fp32
    PART_ML,  # [B, NSPLIT, ROWS, 2] fp32
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
    BLOCK_M: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_RC: tl.constexpr,
    BLOCK_C: tl.constexpr,
    NUM_KC: tl.constexpr,  # ceil(DK / BLOCK_C)
    NUM_VC: tl.constexpr,  # value chunks per program
    VALUE_SPLITS: tl.constexpr,  # programs sharing a row block's value dims (each recomputes the scores)
    REUSE_TILE: tl.constexpr,  # unused (the single-pass variant's option; kept for one launch signature)
    HAS_LATENT_K: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_KVLEN: tl.constexpr,
    IEEE: tl.constexpr,
    DYNAMIC_LOOP: tl.constexpr,
    STATIC_SPLIT_LEN: tl.constexpr,
):
    rb = tl.program_id(0) // VALUE_SPLITS
    v_first = (tl.program_id(0) % VALUE_SPLITS) * (NUM_VC * BLOCK_C)
    split = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)

    rows, row_ok, t_of_row, g_first = query_rows(rb, ROWS, T, ROWS_PER_GROUP, BLOCK_M)

    q_rope, cols, col_g, col_ok = rope_query_block(
        QR, b, stride_qr_b, stride_qr_row, rows, row_ok, g_first, G, R, BLOCK_RC
    )
    q_rope_t = tl.trans(q_rope)  # [BLOCK_RC, BLOCK_M]
    kv_len, start, end = split_bounds(KVLEN, S, split, split_len, HAS_KVLEN)

    chunk = tl.arange(0, BLOCK_C)
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    accs = ()
    for _j in tl.static_range(NUM_VC):
        accs = accs + (tl.zeros([BLOCK_C, BLOCK_M], tl.float32),)
    kr_base = KR + b * stride_kr_b + (col_g * stride_kr_g + cols % R)[None, :]
    c_base = C + b * stride_c_b
    ql_base = QL + b * stride_ql_b + rows[None, :] * stride_ql_row
    loop_start, loop_end = key_loop_bounds(start, end, DYNAMIC_LOOP, STATIC_SPLIT_LEN)
    for s0 in range(loop_start, loop_end, BLOCK_S):
        keys, key_ok = block_keys(s0, start, end, BLOCK_S, DYNAMIC_LOOP)
        k_rope = tl.load(
            kr_base + keys[:, None] * stride_kr_s, mask=key_ok[:, None] & col_ok[None, :], other=0.0
        )  # [BLOCK_S, BLOCK_RC]
        scores_t = mma(k_rope, q_rope_t, IEEE)  # [BLOCK_S, BLOCK_M]
        if HAS_LATENT_K:
            for i in tl.static_range(NUM_KC):
                kd = i * BLOCK_C + chunk
                kd_ok = kd < DK
                c_k = tl.load(
                    c_base + keys[:, None] * stride_c_s + (KEY_OFF + kd)[None, :],
                    mask=key_ok[:, None] & kd_ok[None, :],
                    other=0.0,
                )  # [BLOCK_S, BLOCK_C]
                q_lat_t = tl.load(ql_base + kd[:, None], mask=kd_ok[:, None] & row_ok[None, :], other=0.0)
                scores_t += mma(c_k, q_lat_t, IEEE)
        scores_t = scores_t * scale_log2
        scores_t = mask_scores_t(
            scores_t, keys, key_ok, row_ok, t_of_row, kv_len, T, MASK + b * stride_m_b, stride_m_t, stride_m_s, HAS_MASK
        )
        m_new = tl.maximum(m_i, tl.max(scores_t, axis=0))
        alpha = tl.exp2(m_i - m_new)
        p_t = tl.exp2(scores_t - m_new[None, :])
        l_i = l_i * alpha + tl.sum(p_t, axis=0)
        p_in = p_t.to(C.dtype.element_ty)  # [BLOCK_S, BLOCK_M]
        new_accs = ()
        for j in tl.static_range(NUM_VC):
            vd = v_first + j * BLOCK_C + chunk
            c_v_t = tl.load(
                c_base + keys[None, :] * stride_c_s + (VAL_OFF + vd)[:, None],
                mask=(vd < DV)[:, None] & key_ok[None, :],
                other=0.0,
            )  # [BLOCK_C, BLOCK_S]
            new_accs = new_accs + (accs[j] * alpha[None, :] + mma(c_v_t, p_in, IEEE),)
        accs = new_accs
        m_i = m_new

    part = (b * NSPLIT + split) * ROWS + rows
    for j in tl.static_range(NUM_VC):
        vd = v_first + j * BLOCK_C + chunk
        tl.store(PART_O + part[None, :] * DV + vd[:, None], accs[j], mask=row_ok[None, :] & (vd < DV)[:, None])
    if v_first == 0:
        store_softmax_stats(PART_ML, part, m_i, l_i, row_ok)
