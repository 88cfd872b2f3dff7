"""Pieces of the decode kernel (`latent_decode._split_kernel`), one ``@triton.jit`` helper per idea.

Triton inlines these ``@triton.jit`` helpers into the kernels that call them; they work in the interpreter too.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def aligned(x, ALIGN: tl.constexpr):
    """``x`` (an integer argument: a stride or offset, in elements, that the host found divisible by ``ALIGN``), in
    a form whose divisibility the compiler sees, so that loads along a contiguous dim vectorise. The JIT marks only
    multiples of 16 by itself, and ``tl.multiple_of`` on a scalar argument is dropped; ``x // ALIGN * ALIGN`` equals
    ``x`` and carries the fact."""
    if ALIGN > 1:
        x = x // ALIGN * ALIGN
    return x


@triton.jit
def mma(a, b, IEEE: tl.constexpr):
    """``a @ b`` (``[M, K] @ [K, N]``, float32 result); exact float32 products when ``IEEE`` (float32 inputs)."""
    if IEEE:
        out = tl.dot(a, b, input_precision="ieee")
    else:
        out = tl.dot(a, b)
    return out


@triton.jit
def mask_scores(
    scores,  # [BLOCK_M, BLOCK_S] fp32
    keys,  # [BLOCK_S] cache positions
    key_ok,  # [BLOCK_S] inside this split and the filled length
    row_ok,  # [BLOCK_M]
    t_of_row,  # [BLOCK_M] query position of each row, 0..T-1
    kv_len,
    T,
    mask_base,  # MASK + b * stride_m_b
    stride_m_t,
    stride_m_s,
    HAS_MASK: tl.constexpr,
):
    """Masked scores: the given boolean mask ``[T, S]``, or else causal against the filled length (row ``t`` sees
    keys ``s <= kv_len - T + t``); masked entries get -1e30, keys past the split -inf (no weight at all)."""
    if HAS_MASK:
        mask = tl.load(
            mask_base + t_of_row[:, None] * stride_m_t + keys[None, :] * stride_m_s,
            mask=key_ok[None, :] & row_ok[:, None],
            other=0,
        )
        scores = tl.where(mask != 0, scores, -1.0e30)
    else:
        scores = tl.where(keys[None, :] <= (kv_len - T + t_of_row)[:, None], scores, -1.0e30)
    return tl.where(key_ok[None, :], scores, float("-inf"))


@triton.jit
def rope_query_block(
    QR, b, stride_qr_b, stride_qr_row, rows, row_ok, g_first, G, R: tl.constexpr, BLOCK_RC: tl.constexpr
):
    """The rotated query chunks of a block of rows, for the key/value groups those rows belong to.

    Returns ``(q_rope [BLOCK_M, BLOCK_RC], cols, col_g, col_ok)``: column ``j`` is chunk ``j % R`` of group
    ``g_first + j // R`` (``col_g``), valid where ``col_ok``; the rotated keys are read with the same columns.
    """
    cols = tl.arange(0, BLOCK_RC)
    col_g = g_first + cols // R
    col_ok = col_g < G
    q_rope = tl.load(
        QR + b * stride_qr_b + rows[:, None] * stride_qr_row + (g_first * R + cols)[None, :],
        mask=row_ok[:, None] & col_ok[None, :],
        other=0.0,
    )
    return q_rope, cols, col_g, col_ok


@triton.jit
def split_bounds(KVLEN, S, split, split_len, HAS_KVLEN: tl.constexpr):
    """``(kv_len, start, end)``: the filled length (``KVLEN`` of a static cache, else ``S``) and this split's keys."""
    kv_len = S
    if HAS_KVLEN:
        kv_len = tl.minimum(tl.load(KVLEN).to(tl.int32), S)
    start = split * split_len
    end = tl.minimum(start + split_len, kv_len)
    return kv_len, start, end


@triton.jit
def query_rows(rb, ROWS, T, ROWS_PER_GROUP, BLOCK_M: tl.constexpr):
    """The query rows of row block ``rb``: ``(rows, row_ok, t_of_row, g_first)`` (``[BLOCK_M]`` each but the last,
    the key/value group of the block's first row; a row is a ``(head, token)`` pair, ``T`` tokens per head)."""
    rows = rb * BLOCK_M + tl.arange(0, BLOCK_M)
    return rows, rows < ROWS, rows % T, (rb * BLOCK_M) // ROWS_PER_GROUP


@triton.jit
def key_loop_bounds(start, end, DYNAMIC_LOOP: tl.constexpr, STATIC_SPLIT_LEN: tl.constexpr):
    """Bounds of the loop over a split's keys: compiled, ``start..end`` (stop at the valid length); interpreted,
    ``0..STATIC_SPLIT_LEN`` as Python ints (`block_keys` adds ``start``; the masks do the rest)."""
    if DYNAMIC_LOOP:
        return start, end
    else:
        return 0, STATIC_SPLIT_LEN


@triton.jit
def block_keys(s0, start, end, BLOCK_S: tl.constexpr, DYNAMIC_LOOP: tl.constexpr):
    """``(keys, key_ok)`` ``[BLOCK_S]`` of the key block at loop index ``s0`` (see `key_loop_bounds`)."""
    keys = s0 + tl.arange(0, BLOCK_S)
    if not DYNAMIC_LOOP:
        keys += start
    return keys, keys < end


@triton.jit
def store_softmax_stats(PART_ML, part, m_i, l_i, row_ok):
    """Write a split's running max and sum of each row (``PART_ML [.., 2]`` fp32 at the rows' ``part`` indices)."""
    tl.store(PART_ML + part * 2, m_i, mask=row_ok)
    tl.store(PART_ML + part * 2 + 1, l_i, mask=row_ok)
