"""The Triton programs of the single-pass J-LRD decode kernel (`single_pass` launches them and explains the layout).

* ``_single_pass_kernel``: one split of the context for a block of query rows and one share of the latent's value
  dims. Per key block it loads each latent column chunk once and uses it for the scores (``q_latent . c``) and, for
  the chunks of its own value share, for the output (``p . c``); online softmax in between;
* ``_single_pass_reduce``: merges the splits' partial outputs, each value share with its own softmax statistics.
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
)


@triton.jit
def _single_pass_kernel(
    QR,  # [B, ROWS, G*R] block-diagonal rotated query chunks
    QL,  # [B, ROWS, DC] absorbed NoPE queries
    KR,  # [B, G, S, R] rotated key chunks (any strides)
    C,  # [B, 1, S, >= LAT_OFF + DC] latents (any strides); keys and values both read columns LAT_OFF..LAT_OFF+DC
    MASK,  # [B, T, S] int8 (1 = attend), when HAS_MASK
    KVLEN,  # [1] valid cache slots, when HAS_KVLEN
    PART_O,  # [B, NSPLIT, ROWS, DC] fp32 unnormalised outputs
    PART_ML,  # [B, NSPLIT, VSPLIT, ROWS, 2] fp32 running max and sum of each value share
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
    LAT_OFF,
    R: tl.constexpr,
    DC: tl.constexpr,
    NSPLIT,  # context splits (a runtime value: batches of other sizes reuse the compiled program)
    VSPLIT: tl.constexpr,  # value shares: neighbouring programs over the same key tiles
    NUM_VC: tl.constexpr,  # latent chunks of BLOCK_C per value share
    BLOCK_M: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_RC: tl.constexpr,
    BLOCK_C: tl.constexpr,
    ALIGN_C: tl.constexpr,  # the latent's strides and offset are multiples of this (elements)
    ALIGN_KR: tl.constexpr,
    ALIGN_Q: tl.constexpr,
    HOLD_TILES: tl.constexpr,  # keep the share's chunks from the score loads (else load them again: L1/L2 hits)
    Q_RESIDENT: tl.constexpr,  # load the absorbed queries once, before the key loop
    HAS_MASK: tl.constexpr,
    HAS_KVLEN: tl.constexpr,
    IEEE: tl.constexpr,
    DYNAMIC_LOOP: tl.constexpr,
    STATIC_SPLIT_LEN: tl.constexpr,
):
    stride_c_b = aligned(stride_c_b, ALIGN_C)
    stride_c_s = aligned(stride_c_s, ALIGN_C)
    LAT_OFF = aligned(LAT_OFF, ALIGN_C)
    stride_kr_b = aligned(stride_kr_b, ALIGN_KR)
    stride_kr_g = aligned(stride_kr_g, ALIGN_KR)
    stride_kr_s = aligned(stride_kr_s, ALIGN_KR)
    stride_qr_b = aligned(stride_qr_b, ALIGN_Q)
    stride_qr_row = aligned(stride_qr_row, ALIGN_Q)
    stride_ql_b = aligned(stride_ql_b, ALIGN_Q)
    stride_ql_row = aligned(stride_ql_row, ALIGN_Q)
    rb = tl.program_id(0) // VSPLIT
    share = tl.program_id(0) % VSPLIT  # fastest: the shares of a key tile run side by side (L2 serves re-reads)
    split = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)

    rows, row_ok, t_of_row, g_first = query_rows(rb, ROWS, T, ROWS_PER_GROUP, BLOCK_M)
    q_rope, cols, col_g, col_ok = rope_query_block(
        QR, b, stride_qr_b, stride_qr_row, rows, row_ok, g_first, G, R, BLOCK_RC
    )
    kv_len, start, end = split_bounds(KVLEN, S, split, split_len, HAS_KVLEN)

    chunk = tl.arange(0, BLOCK_C)
    NUM_SLOTS: tl.constexpr = VSPLIT * NUM_VC  # chunk slots covering DC (the last ones may be past it: masked)
    accs = ()
    for _j in tl.static_range(NUM_VC):
        accs = accs + (tl.zeros([BLOCK_M, BLOCK_C], tl.float32),)
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    kr_base = KR + b * stride_kr_b + (col_g * stride_kr_g + cols % R)[:, None]
    c_base = C + b * stride_c_b + LAT_OFF
    ql_base = QL + b * stride_ql_b + rows[:, None] * stride_ql_row
    # with Q_RESIDENT the absorbed queries of every chunk slot are loaded once, before the key loop (the compiler
    # keeps them in shared memory, as the rotated queries); else once per key block (from L1/L2)
    q_lats = ()
    if Q_RESIDENT:
        for j in tl.static_range(NUM_SLOTS):
            dims = ((share * NUM_VC + j) % NUM_SLOTS) * BLOCK_C + chunk
            q_lat = tl.load(ql_base + dims[None, :], mask=row_ok[:, None] & (dims < DC)[None, :], other=0.0)
            q_lats = q_lats + (q_lat,)
    loop_start, loop_end = key_loop_bounds(start, end, DYNAMIC_LOOP, STATIC_SPLIT_LEN)
    for s0 in range(loop_start, loop_end, BLOCK_S):
        keys, key_ok = block_keys(s0, start, end, BLOCK_S, DYNAMIC_LOOP)
        k_rope = tl.load(
            kr_base + keys[None, :] * stride_kr_s, mask=col_ok[:, None] & key_ok[None, :], other=0.0
        )  # [BLOCK_RC, BLOCK_S]
        scores = mma(q_rope, k_rope, IEEE)
        # every chunk of the latent once, this share's own chunks first; those stay for the value product
        tiles = ()
        for j in tl.static_range(NUM_SLOTS):
            dims = ((share * NUM_VC + j) % NUM_SLOTS) * BLOCK_C + chunk
            dims_ok = dims < DC
            if Q_RESIDENT:
                q_lat = q_lats[j]
            else:
                q_lat = tl.load(ql_base + dims[None, :], mask=row_ok[:, None] & dims_ok[None, :], other=0.0)
            tile = tl.load(
                c_base + keys[:, None] * stride_c_s + dims[None, :],
                mask=key_ok[:, None] & dims_ok[None, :],
                other=0.0,
            )  # [BLOCK_S, BLOCK_C]
            scores += mma(q_lat, tl.trans(tile), IEEE)
            if HOLD_TILES and j < NUM_VC:
                tiles = tiles + (tile,)
        scores = mask_scores(
            scores * scale_log2,
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
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        p_in = p.to(C.dtype.element_ty)
        updated = ()
        for j in tl.static_range(NUM_VC):
            if HOLD_TILES:
                c_v = tiles[j]
            else:
                dims = (share * NUM_VC + j) * BLOCK_C + chunk
                c_v = tl.load(
                    c_base + keys[:, None] * stride_c_s + dims[None, :],
                    mask=key_ok[:, None] & (dims < DC)[None, :],
                    other=0.0,
                )
            updated = updated + (accs[j] * alpha[:, None] + mma(p_in, c_v, IEEE),)
        accs = updated
        m_i = m_new

    part = (b * NSPLIT + split) * ROWS + rows
    for j in tl.static_range(NUM_VC):
        dims = (share * NUM_VC + j) * BLOCK_C + chunk
        tl.store(PART_O + part[:, None] * DC + dims[None, :], accs[j], mask=row_ok[:, None] & (dims < DC)[None, :])
    stats = ((b * NSPLIT + split) * VSPLIT + share) * ROWS + rows
    tl.store(PART_ML + stats * 2, m_i, mask=row_ok)
    tl.store(PART_ML + stats * 2 + 1, l_i, mask=row_ok)


@triton.jit
def _single_pass_reduce(
    PART_O,  # [B, NSPLIT, ROWS, DC] fp32
    PART_ML,  # [B, NSPLIT, VSPLIT, ROWS, 2] fp32
    OUT,  # [B, ROWS, DC]
    ROWS,
    DC: tl.constexpr,
    NSPLIT,  # context splits (a runtime value: batches of other sizes reuse the compiled program)
    VSPLIT: tl.constexpr,
    NUM_VC: tl.constexpr,
    BLOCK_SPLIT: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """``out = sum_i 2^(m_i - M) o_i / sum_i 2^(m_i - M) l_i`` over the splits ``i``, for one row and value share."""
    pid = tl.program_id(0).to(tl.int64)  # b * ROWS + row
    share = tl.program_id(1)
    b = pid // ROWS
    row = pid % ROWS
    splits = tl.arange(0, BLOCK_SPLIT)
    split_ok = splits < NSPLIT
    stats = ((b * NSPLIT + splits) * VSPLIT + share) * ROWS + row
    m = tl.load(PART_ML + stats * 2, mask=split_ok, other=float("-inf"))
    l = tl.load(PART_ML + stats * 2 + 1, mask=split_ok, other=0.0)
    w = tl.where(split_ok, tl.exp2(m - tl.max(m, axis=0)), 0.0)
    denominator = tl.sum(l * w, axis=0)
    part = (b * NSPLIT + splits) * ROWS + row
    chunk = tl.arange(0, BLOCK_C)
    for j in tl.static_range(NUM_VC):
        dims = (share * NUM_VC + j) * BLOCK_C + chunk
        dims_ok = dims < DC
        o = tl.load(PART_O + part[:, None] * DC + dims[None, :], mask=split_ok[:, None] & dims_ok[None, :], other=0.0)
        out = tl.sum(o * w[:, None], axis=0) / denominator
        tl.store(OUT + pid * DC + dims, out.to(OUT.dtype.element_ty), mask=dims_ok)
