"""Single-pass variant of the fused decode kernel, for wide latents: each latent tile read once per row block.

Same math, inputs and partial outputs as `latent_decode._split_kernel` (see `latent_decode` for the layout of the
block-diagonal rotated queries, the masks and the split-K reduce); the difference is how the value dims are handled.

``_single_pass_kernel``, grid ``(row blocks x value splits, splits, B)``: one program takes ``BLOCK_M`` query rows
of one batch item and one slice of the context, and for each block of ``BLOCK_S`` keys

1. scores the block: rotated chunks (one matrix product) plus the key latent in ``NUM_KC`` static column chunks of
   ``BLOCK_C`` (``q_latent[:, chunk] @ c_k[keys, chunk]^T``);
2. updates the online softmax (running max and sum);
3. accumulates ``p @ c_v[keys, chunk]`` into ``NUM_VC`` accumulators ``[BLOCK_M, BLOCK_C]`` (a tuple unrolled by
   ``tl.static_range``, so each chunk keeps its own registers), the whole value width in one program, or, with
   ``VALUE_SPLITS > 1`` (latents too wide for one program's registers, e.g. ``d_c = 3072``), a share of it, each of
   the ``VALUE_SPLITS`` neighbouring programs recomputing the scores from the same latent lines (L2 hits).

When keys and values read the same latent columns (J-LRD, the default factorisation) and ``REUSE_TILE`` is set, the
chunks loaded for the scores are kept (registers) and multiplied by ``p`` without a second load; otherwise the
value chunks are loaded again right after the scores loaded them (L1/L2 hits, not DRAM).

Why this layout (Llama-2-7B shape at 25% cache: 32 heads (MHA), ``R = 16`` rotated dims per head, ``d_c = 1536``
shared by keys and values; batch 3, 32k context, bf16; per token and layer the cache holds ``32*16 + 1536 = 2048``
values, 4 KiB, so 402 MB per layer):

* The two-phase variant splits the value dims over programs (blocks of 256): its score launch reads the latent once
  per row block and writes fp32 scores (``B*H*S*4`` = 12.6 MB), its value launch reads the scores once per value
  block (6 x 12.6 = 75 MB) and the latent again: at least ~2 x 302 MB of latent + 100 MB of rotated chunks + ~90 MB
  of scores from DRAM, about 800 MB per layer, twice the cache.
* Single pass with ``BLOCK_M = 16``: the two row blocks of a (split, batch) pair are neighbouring program ids (row
  block varies fastest), so they run at the same time and the second one's latent reads come from L2 (50 MB on an
  H100; a split's slice is a few MB). DRAM traffic: the cache once (402 MB) + fp32 partials ``B*splits*H*d_c*4``
  written and read by the reduce (3 x 44 x 32 x 1536 x 4 = 26 MB): ~430 MB per layer, about half the two-phase
  bytes. L2-to-SM traffic: 2 x 3 KiB latent + 1 KiB rotated chunks per token.
* Register budget: the accumulator of 16 rows x 1536 fp32 is 96 KB, i.e. 96 registers per thread at 8 warps; a
  kept latent tile of 16 keys x 1536 bf16 adds 48. ``BLOCK_M = 32`` needs 192 KB of accumulator: 96 registers a
  thread at 16 warps, the most a thread may have then being 128. Compiled offline for sm_90 with the JIT's
  specialisation (triton 3.9's ptxas, no GPU needed; not timed), d_c = 1536, ``R = 16``, ``BLOCK_S = 16``,
  ``BLOCK_C = 256``: 16 rows at 8 warps, 166 registers, no spills (the default); 32 rows at 16 warps, 128 registers
  and 320 bytes of spills a thread, 247 KB of shared memory (so one stage: `--tune` candidates). (Earlier
  compiles without the JIT's divisibility specialisation: ``BLOCK_C = 128``, ``BLOCK_S = 32`` or 4 warps spilled
  88 to 460 bytes.) At ``d_c = 3072`` (50% cache) a program takes 1536 value dims (``max_value_width``), two
  programs per row block. (A variant scoring the rotated chunks with a multiply-and-sum per row instead of the
  block-diagonal dot spilled more in every configuration, so the dot stays.)

Measured on an H100 (2026-11-23, that shape, ``benchmarks/results/decode.md``): 676-840 GB/s on the cache bytes,
against 1250-1334 GB/s for the tuned two-phase variant, whose launches each stream at 85-90% of copy bandwidth but
read the latent twice. So two-phase stays the default; this variant's programs (one per SM at 166 registers a
thread) do not keep enough loads in flight. A faster single pass needs all heads of a latent tile in one program
(``BLOCK_M = 32``: it spills at d_c = 1536 but not for an S-LRD latent of 768 value dims; `--tune` candidates).
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


@triton.jit
def _single_pass_kernel(
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
    NUM_VC: tl.constexpr,  # value chunks per program: ceil(DV / BLOCK_C / VALUE_SPLITS)
    VALUE_SPLITS: tl.constexpr,  # programs sharing a row block's value dims (each recomputes the scores)
    REUSE_TILE: tl.constexpr,  # keys and values read the same columns (KEY_OFF == VAL_OFF, DK == DV)
    ALIGN_C: tl.constexpr,  # the latent's strides and offsets are multiples of this (elements): see `_alignment`
    ALIGN_KR: tl.constexpr,  # the rotated keys' strides
    ALIGN_Q: tl.constexpr,  # the queries' strides
    HAS_LATENT_K: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_KVLEN: tl.constexpr,
    IEEE: tl.constexpr,
    DYNAMIC_LOOP: tl.constexpr,
    STATIC_SPLIT_LEN: tl.constexpr,
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
    rb = tl.program_id(0) // VALUE_SPLITS
    v_first = (tl.program_id(0) % VALUE_SPLITS) * (NUM_VC * BLOCK_C)
    split = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)

    rows, row_ok, t_of_row, g_first = query_rows(rb, ROWS, T, ROWS_PER_GROUP, BLOCK_M)

    q_rope, cols, col_g, col_ok = rope_query_block(
        QR, b, stride_qr_b, stride_qr_row, rows, row_ok, g_first, G, R, BLOCK_RC
    )
    kv_len, start, end = split_bounds(KVLEN, S, split, split_len, HAS_KVLEN)

    chunk = tl.arange(0, BLOCK_C)
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    accs = ()
    for _j in tl.static_range(NUM_VC):
        accs = accs + (tl.zeros([BLOCK_M, BLOCK_C], tl.float32),)
    kr_base = KR + b * stride_kr_b + (col_g * stride_kr_g + cols % R)[:, None]
    c_base = C + b * stride_c_b
    ql_base = QL + b * stride_ql_b + rows[:, None] * stride_ql_row
    loop_start, loop_end = key_loop_bounds(start, end, DYNAMIC_LOOP, STATIC_SPLIT_LEN)
    for s0 in range(loop_start, loop_end, BLOCK_S):
        keys, key_ok = block_keys(s0, start, end, BLOCK_S, DYNAMIC_LOOP)
        k_rope = tl.load(
            kr_base + keys[None, :] * stride_kr_s, mask=col_ok[:, None] & key_ok[None, :], other=0.0
        )  # [BLOCK_RC, BLOCK_S]
        scores = mma(q_rope, k_rope, IEEE)
        tiles = ()
        if HAS_LATENT_K:
            for i in tl.static_range(NUM_KC):
                kd = i * BLOCK_C + chunk
                kd_ok = kd < DK
                q_lat = tl.load(ql_base + kd[None, :], mask=row_ok[:, None] & kd_ok[None, :], other=0.0)
                c_k = tl.load(
                    c_base + keys[:, None] * stride_c_s + (KEY_OFF + kd)[None, :],
                    mask=key_ok[:, None] & kd_ok[None, :],
                    other=0.0,
                )  # [BLOCK_S, BLOCK_C]
                if REUSE_TILE:
                    tiles = tiles + (c_k,)
                scores += mma(q_lat, tl.trans(c_k), IEEE)
        scores = scores * scale_log2
        scores = mask_scores(
            scores, keys, key_ok, row_ok, t_of_row, kv_len, T, MASK + b * stride_m_b, stride_m_t, stride_m_s, HAS_MASK
        )
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        p_in = p.to(C.dtype.element_ty)
        new_accs = ()
        for j in tl.static_range(NUM_VC):
            if REUSE_TILE and HAS_LATENT_K:
                c_v = tiles[j]
            else:
                vd = v_first + j * BLOCK_C + chunk
                c_v = tl.load(
                    c_base + keys[:, None] * stride_c_s + (VAL_OFF + vd)[None, :],
                    mask=key_ok[:, None] & (vd < DV)[None, :],
                    other=0.0,
                )  # [BLOCK_S, BLOCK_C]
            new_accs = new_accs + (accs[j] * alpha[:, None] + mma(p_in, c_v, IEEE),)
        accs = new_accs
        m_i = m_new

    part = (b * NSPLIT + split) * ROWS + rows
    for j in tl.static_range(NUM_VC):
        vd = v_first + j * BLOCK_C + chunk
        tl.store(PART_O + part[:, None] * DV + vd[None, :], accs[j], mask=row_ok[:, None] & (vd < DV)[None, :])
    if v_first == 0:
        store_softmax_stats(PART_ML, part, m_i, l_i, row_ok)
