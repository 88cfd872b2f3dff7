"""Single-pass decode kernel for joint (J-LRD) latents: each latent tile read once, for the scores and the values.

With J-LRD the NoPE keys and the values come from the same latent ``c`` ``[B, 1, S, d_c]``, shared by every query
head (multi-head latent attention, as in DeepSeek's MLA). `latent_decode`'s kernel reads it twice (scores, then
values). This one follows FlashMLA's plan: split-K over the context, an online softmax, and per key block

1. the rotated chunks ``[BLOCK_S, G*R]`` scored against the block-diagonal rotated queries (one product);
2. the latent in column chunks ``[BLOCK_S, BLOCK_C]``, each loaded once and used for ``q_latent . c^T``;
3. the softmax update, then ``p . c`` with the chunks still held from step 2 (no second load);

then `_single_pass_reduce` merges the splits. Programs take all query rows of a batch item (``BLOCK_M`` up to
`MAX_ROWS`: for a decode step every head of a layer), so a tile feeds all heads at once.

Why the value dims are shared out (arithmetic, Llama-2-7B shape at 25% cache: 32 heads, ``R = 16`` rotated dims per
head, ``d_c = 1536``, bf16, one new token): the float32 accumulator of 32 rows x 1536 dims is 192 KiB, three
quarters of a multiprocessor's register file (256 KiB), before the held tiles, queries and scores; with 8 warps
(256 threads) that is 192 registers a thread for the accumulator alone, past what a thread can hold besides the
rest (255). So ``VSPLIT`` neighbouring programs (program id 0 varies fastest, so they run at the same time over the
same key tiles) each own ``d_c / VSPLIT`` value dims. Each still scores the whole latent (the scores need all of
``d_c``): the key tile is fetched from DRAM by the first of them and from L2 by the others, so DRAM traffic stays
one read of the cache while L2 traffic and the score products grow with ``VSPLIT``. `value_splits` takes the
fewest shares whose per-thread registers (accumulator ``BLOCK_M x W`` float32 plus the held chunks ``BLOCK_S x W``,
``W = d_c / VSPLIT``) fit ``register_budget``: with 32 rows, 16 keys a block, 8 warps and the default budget, 1536
value dims need 2 shares (768 each: 96 + 24 registers a thread); a d_c of 512 (FlashMLA's) needs one.

Shared memory (`shared_bytes`): the absorbed queries of all rows stay in shared memory as dot operands (``rows x
d_c``: 96 KiB at 1536 dims in bf16), beside the block-diagonal rotated queries and the pipelined tiles. At 3072 dims
(the 7B shape at 50%) the queries alone take 192 KiB, so with the rotated ones nothing fits a block's 227 KiB:
`fits` says so and `fused.fused_latent_attention` runs the two-phase kernel there (as for float32 latents of the
7B shape).

Memory per split: each program writes its rows x ``W`` float32 partial output, which the reduce reads back; splits
are kept long enough for that to stay under ``partial_share`` of the cache bytes the split reads, and numerous
enough for ``programs_per_sm`` programs per multiprocessor (one, given the registers above).

The rotated chunks stay a block-diagonal product (one ``tl.dot``), as in `latent_decode`.

What this plan leaves on the table, by arithmetic: the absorbed queries (``rows x d_c``) are read again for every
key block (from L1/L2: Triton cannot pin them in shared memory as FlashMLA does), as many bytes per block as the
latent tile itself when ``BLOCK_S`` equals the row count, so larger key blocks cut that traffic but need more
registers for the held chunks (``hold_tiles=False`` loads the value chunks again instead of holding them); and 32
rows are fewer than a Hopper warpgroup product's 64, so the products are Ampere-style ``mma.sync``.

Keys and values must read the same latent columns (``key_slice == value_slice``); S-LRD latents (keys and values in
their own parts, each byte read once anyway) and layers without NoPE dims use `latent_decode`'s kernel.
"""

from __future__ import annotations

import math
import os

import torch
from triton.runtime.errors import OutOfResources

from .latent_decode import _alignment, _next_pow2, block_diagonal_queries, default_num_splits
from .single_pass_kernel import _single_pass_kernel, _single_pass_reduce
from .split_kernel import LOG2E

MAX_ROWS = 64  # query rows per program; more rows (many heads x tokens) take several row blocks
SHARED_MEMORY = 232_448  # bytes a block may use on an H100/H200 (the limit where the device cannot be asked)

# The launch configuration (`single_pass_config`); `benchmarks/decode_kernel.py` times others.
DEFAULTS = {
    "block_s": 16,
    "block_c": 128,
    "value_splits": None,  # None: the fewest that fit register_budget (`value_splits`)
    "register_budget": 160,  # 32-bit registers a thread for the accumulator and the held latent chunks
    "hold_tiles": True,  # False: the value product loads its chunks again (L1/L2 hits) instead of holding them
    "resident_queries": True,  # load the absorbed queries once per program (False: once per key block, from L2)
    "num_warps": 8,
    "num_stages": 2,
    "programs_per_sm": 1,
    "split_keys": 2048,  # at most this many keys per program (more splits), unless partial_share forbids
    "partial_share": 0.1,
}


def single_pass_config(**overrides: object) -> dict:
    """`DEFAULTS` with ``overrides`` (unknown names raise)."""
    unknown = set(overrides) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"unknown single-pass kernel options {sorted(unknown)}: choose from {sorted(DEFAULTS)}")
    return {**DEFAULTS, **overrides}


def value_splits(block_m: int, block_s: int, d_c: int, block_c: int, num_warps: int, elem: int, budget: int) -> int:
    """The fewest value shares for which one program's accumulator (``block_m x W`` float32) and held latent chunks
    (``block_s x W`` of ``elem`` bytes) fit ``budget`` registers a thread, ``W`` the share's width in whole chunks.
    At least one share; at most one per chunk."""
    chunks = math.ceil(d_c / block_c)
    threads = 32 * num_warps
    for shares in range(1, chunks + 1):
        width = math.ceil(chunks / shares) * block_c
        registers = (block_m * width * 4 + block_s * width * elem) / (4 * threads)
        if registers <= budget:
            return shares
    return chunks


def smaller_single_pass(cfg: dict) -> dict | None:
    """The next configuration when ``cfg`` needs more shared memory than the device has: one stage less, then half
    the key block (to 16), then half the latent chunk (to 32); None when nothing is left."""
    if cfg["num_stages"] > 1:
        return {**cfg, "num_stages": cfg["num_stages"] - 1}
    if cfg["block_s"] > 16:
        return {**cfg, "block_s": cfg["block_s"] // 2}
    if cfg["block_c"] > 32:
        return {**cfg, "block_c": cfg["block_c"] // 2}
    return None


def shared_bytes(block_m: int, block_s: int, block_rc: int, width: int, elem: int, stages: int) -> int:
    """Shared memory of one program (bytes), as Triton lays it out: the absorbed queries ``block_m x width`` (every
    chunk slot, ``width = VSPLIT * NUM_VC * BLOCK_C``) and the block-diagonal rotated ones ``block_m x block_rc``
    (dot operands), ``p`` ``block_m x block_s``, the rotated-key tile ``block_rc x block_s`` and, pipelined, the
    latent tile ``block_s x width`` per extra stage. The queries alone decide whether a wide latent fits at all."""
    buffers = max(1, stages - 1)
    latent_tiles = (stages - 1) * block_s * width if stages > 1 else 0
    return elem * (block_m * (width + block_rc + block_s) + buffers * block_rc * block_s + latent_tiles)


def device_shared_memory(device: torch.device) -> int:
    """The shared memory a block may use on ``device`` (`SHARED_MEMORY` where the device cannot be asked)."""
    if device.type == "cuda":  # (older torch builds lack the attribute)
        return getattr(torch.cuda.get_device_properties(device), "shared_memory_per_block_optin", SHARED_MEMORY)
    return SHARED_MEMORY


def fits(q_rope: torch.Tensor, rope_keys: torch.Tensor, latent: torch.Tensor, d_c: int) -> bool:
    """Whether the single-pass kernel's smallest configuration (one stage, 16 keys, 32-wide chunks, `DEFAULTS`
    otherwise) fits the device's shared memory for these shapes (`shared_bytes`); else use the two-phase kernel."""
    B, H, T, R = q_rope.shape
    G = rope_keys.shape[1]
    block_m = min(MAX_ROWS, _next_pow2(H * T, 16))
    block_rc = _next_pow2(min(G, math.ceil(block_m / ((H // G) * T)) + 1) * R, 16)
    width = math.ceil(d_c / 32) * 32
    needed = shared_bytes(block_m, 16, block_rc, width, latent.element_size(), 1)
    return needed <= device_shared_memory(latent.device)


_FITTED: dict[tuple, dict] = {}


def single_pass_attention(
    q_rope: torch.Tensor,
    q_latent: torch.Tensor,
    rope_keys: torch.Tensor,
    latent: torch.Tensor,
    *,
    key_slice: tuple[int, int],
    value_slice: tuple[int, int],
    scaling: float,
    allowed: torch.Tensor | None = None,
    kv_len: torch.Tensor | None = None,
    num_splits: int | None = None,
    **config: object,
) -> torch.Tensor:
    """The single-pass Triton version of `latent_attention_reference` for ``key_slice == value_slice``.

    Args:
        q_rope: ``[B, H, T, R]``; q_latent: ``[B, H, T, d_c]``; rope_keys: ``[B, G, S, R]``; latent:
            ``[B, 1, S, >= d_c]`` (last dim contiguous), read at ``key_slice`` (= ``value_slice``).
        allowed: bool ``[B, T, S]`` (True = attend, see `elitekv_peft.modeling.absorbed.allowed_keys`), or None for
            causal against ``kv_len`` (or the whole cache).
        num_splits: context splits (None: from ``programs_per_sm``, ``split_keys`` and ``partial_share``).
        config: overrides of `DEFAULTS`.

    Returns:
        ``[B, H, T, d_c]`` in the latent's dtype.
    """
    if q_latent is None or tuple(key_slice) != tuple(value_slice):
        raise ValueError(
            "the single-pass kernel needs keys and values on the same latent columns (J-LRD) and NoPE queries; "
            "use latent_decode.latent_attention_triton for other layouts"
        )
    if not fits(q_rope, rope_keys, latent, key_slice[1] - key_slice[0]):
        raise ValueError(
            f"the single-pass kernel's queries ({q_rope.shape[1] * q_rope.shape[2]} rows x d_c "
            f"{key_slice[1] - key_slice[0]}) do not fit the device's shared memory: use "
            "latent_decode.latent_attention_triton (fused.fused_latent_attention chooses)"
        )
    cfg = single_pass_config(**config)
    shape_key = (latent.dtype, key_slice, tuple(q_rope.shape[1:]), tuple(sorted(cfg.items())))
    fitted = _FITTED.get(shape_key, cfg)
    while True:
        try:
            out = _launch(
                q_rope, q_latent, rope_keys, latent, fitted, key_slice[0], key_slice[1] - key_slice[0], scaling,
                allowed, kv_len, num_splits,
            )  # fmt: skip
        except OutOfResources:
            fitted = smaller_single_pass(fitted)
            if fitted is None:
                raise
            continue
        _FITTED[shape_key] = fitted
        return out


def plan(
    B: int,
    rows: int,
    S: int,
    d_c: int,
    bytes_per_key: int,
    elem: int,
    cfg: dict,
    device: torch.device,
    num_splits: int | None = None,
) -> tuple[int, int, int, int, int, int]:
    """``(block_m, row_blocks, vsplit, num_vc, block_c, num_splits)`` of a launch: rows per program, row blocks,
    value shares, latent chunks per share, chunk width and context splits (see the module docstring)."""
    block_m = min(MAX_ROWS, _next_pow2(rows, 16))
    row_blocks = math.ceil(rows / block_m)
    block_c = min(cfg["block_c"], _next_pow2(d_c, 16))
    vsplit = cfg["value_splits"] or value_splits(
        block_m, cfg["block_s"] if cfg["hold_tiles"] else 0, d_c, block_c, cfg["num_warps"], elem,
        cfg["register_budget"],
    )  # fmt: skip
    chunks = math.ceil(d_c / block_c)
    vsplit = max(1, min(vsplit, chunks))
    num_vc = math.ceil(chunks / vsplit)
    vsplit = math.ceil(chunks / num_vc)  # no share left without a chunk
    split_keys = cfg["split_keys"]
    if cfg["partial_share"]:  # partial outputs (written + read) under this share of the split's cache bytes
        split_keys = max(split_keys, 2 * rows * d_c * 4 / (cfg["partial_share"] * bytes_per_key))
    if num_splits is None:
        programs = row_blocks * vsplit
        num_splits = default_num_splits(
            B, programs, S, cfg["block_s"], device, cfg["programs_per_sm"], math.ceil(split_keys)
        )
    return block_m, row_blocks, vsplit, num_vc, block_c, num_splits


def _launch(q_rope, q_latent, rope_keys, latent, cfg, offset, d_c, scaling, allowed, kv_len, num_splits):
    B, H, T, R = q_rope.shape
    G, S = rope_keys.shape[1], rope_keys.shape[2]
    rows = H * T
    dtype, device = latent.dtype, latent.device
    if rope_keys.stride(-1) != 1 or latent.stride(-1) != 1:
        raise ValueError("single_pass_attention needs the cache's last dim contiguous")
    elem = latent.element_size()
    block_m, row_blocks, vsplit, num_vc, block_c, num_splits = plan(
        B, rows, S, d_c, (G * R + d_c) * elem, elem, cfg, device, num_splits
    )
    block_s = cfg["block_s"]
    split_len = math.ceil(math.ceil(S / num_splits) / block_s) * block_s
    num_splits = math.ceil(S / split_len)
    rows_per_group = (H // G) * T
    groups_per_block = max(
        (min((rb + 1) * block_m, rows) - 1) // rows_per_group - (rb * block_m) // rows_per_group + 1
        for rb in range(row_blocks)
    )
    q_block = block_diagonal_queries(q_rope, G, dtype)  # [B, rows, G*R]
    block_rc = _next_pow2(groups_per_block * R, 16)
    q_lat = q_latent.to(dtype).reshape(B, rows, d_c).contiguous()
    mask_arg = allowed.to(torch.int8) if allowed is not None else q_block
    mask_strides = mask_arg.stride() if allowed is not None else (0, 0, 0)
    part_o = torch.empty(B, num_splits, rows, d_c, device=device, dtype=torch.float32)
    part_ml = torch.empty(B, num_splits, vsplit, rows, 2, device=device, dtype=torch.float32)
    out = torch.empty(B, rows, d_c, device=device, dtype=dtype)
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    _single_pass_kernel[(row_blocks * vsplit, num_splits, B)](
        q_block,
        q_lat,
        rope_keys,
        latent,
        mask_arg,
        kv_len if kv_len is not None else q_block,
        part_o,
        part_ml,
        q_block.stride(0),
        q_block.stride(1),
        q_lat.stride(0),
        q_lat.stride(1),
        *rope_keys.stride()[:3],
        latent.stride(0),
        latent.stride(2),
        *mask_strides,
        rows,
        T,
        rows_per_group,
        G,
        S,
        split_len,
        scaling * LOG2E,
        offset,
        R=R,
        DC=d_c,
        NSPLIT=num_splits,
        VSPLIT=vsplit,
        NUM_VC=num_vc,
        BLOCK_M=block_m,
        BLOCK_S=block_s,
        BLOCK_RC=block_rc,
        BLOCK_C=block_c,
        HOLD_TILES=bool(cfg["hold_tiles"]),
        Q_RESIDENT=bool(cfg["resident_queries"]),
        ALIGN_C=_alignment(latent.stride(0), latent.stride(2), offset),
        ALIGN_KR=_alignment(*rope_keys.stride()[:3]),
        ALIGN_Q=_alignment(*q_block.stride()[:2], *q_lat.stride()[:2]),
        HAS_MASK=allowed is not None,
        HAS_KVLEN=kv_len is not None,
        IEEE=dtype == torch.float32,
        DYNAMIC_LOOP=not interpreted,
        STATIC_SPLIT_LEN=split_len if interpreted else 0,
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    _single_pass_reduce[(B * rows, vsplit)](
        part_o,
        part_ml,
        out,
        rows,
        DC=d_c,
        NSPLIT=num_splits,
        VSPLIT=vsplit,
        NUM_VC=num_vc,
        BLOCK_SPLIT=_next_pow2(num_splits),
        BLOCK_C=block_c,
        num_warps=4,
    )
    return out.view(B, H, T, d_c)
