"""Decode benchmark, the measurements: one row per method/path (speed, peak memory, profiles), the kernel's
bandwidth, tuning and breakdown, the largest batch that fits and the on-GPU kernel check. Part of
`benchmarks/decode.py` (see its docstring).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import decode_steps
import torch
from decode_steps import (
    ABSORBED_PATHS,
    SLACK,
    _sync,
    compiled_forward,
    decode_step,
    free,
    graphed,
    is_compiled,
    is_graphed,
    make_cache,
    time_budget,
    time_steps,
)


@torch.no_grad()
def measure(model, label: str, method: str, ratio: float, path: str | None, batch: int, context: int, args) -> dict:
    """One row: decode speed and peak memory of ``method`` at ``batch`` x ``context``."""
    row = dict(
        model=label,
        context=context,
        batch=batch,
        method=method,
        kv_ratio=ratio,
        path=path,
        tokens_per_s=None,
        ms_per_step=None,
        peak_mem_gib=None,
        max_batch_fits=None,
        kernel_bandwidth_gbps=None,
    )
    if method == "elitekv":
        row["decomposition"] = args.decomposition
    if path in ABSORBED_PATHS:
        row["kernel_variant"] = kernel_variant()
    free()
    if decode_steps.DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    cache = step = None
    try:
        cache = make_cache(model, method, path, batch, context, SLACK)
        steps = args.steps
        if is_compiled(method, path):
            by_hand = is_graphed(method, path)
            mode = "default" if by_hand else args.compile_mode  # by hand: no CUDA graphs of Inductor's own
            row["compile"] = args.compile_backend + (f"/{mode}" if args.compile_backend == "inductor" else "")
            forward = compiled_forward(model, args, mode)
            step = decode_step(model, cache, batch, context, forward=forward, compiler_graphs=not by_hand)
            started, expired = time.time(), []
            try:
                with time_budget(args.compile_budget, expired):
                    for _ in range(3):  # compile, then (reduce-overhead) record the CUDA graph
                        step()
                    _sync()
            except Exception:
                if not expired:
                    raise
                row["error"] = f"not timed: compile + warm-up exceeded the {args.compile_budget:g} s --compile-budget"
                return row
            row["compile_s"] = round(time.time() - started, 1)
            steps = args.graph_steps
        else:
            step = decode_step(model, cache, batch, context)
        if is_graphed(method, path):
            try:
                step, steps = graphed(step), args.graph_steps
            except Exception as error:  # noqa: BLE001 - recorded; the step is then timed eagerly
                row["graph_error"] = f"{type(error).__name__}: {str(error)[:300]}"
                free()
        host = []
        ms = time_steps(step, steps=steps, warmup=2, host=host)
        row.update(ms_per_step=round(ms, 3), tokens_per_s=round(batch * 1000 / ms, 1))
        if host:  # on the GPU: how long the host took to queue the step (near ms_per_step: the step is host-bound)
            row["host_ms_per_step"] = round(host[0], 3)
        if decode_steps.DEVICE == "cuda":
            row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        if args.profile and decode_steps.DEVICE == "cuda":
            row["step_profile"] = profile_step(step)
        if args.profile and is_compiled(method, path):
            row["host_profile"] = host_profile(step)
        if path == "absorbed_kernel" and decode_steps.DEVICE == "cuda":
            row["kernel_bandwidth_gbps"] = kernel_bandwidth(model, cache, batch, context)
    except torch.OutOfMemoryError:
        row["error"] = "out of memory"
    except Exception as error:  # noqa: BLE001 - a failed row is recorded, the run goes on
        row["error"] = f"{type(error).__name__}: {' '.join(str(error).split())[:300]}"
    finally:
        cache = step = None
        if is_compiled(method, path):
            torch._dynamo.reset()
        free()
    return row


def profile_step(step: Callable[[], object], steps: int = 2, top: int = 15) -> dict | str:
    """Where a decode step's GPU time goes: microseconds and launches per step by kernel name (the ``top`` ones),
    and the total over all kernels, from the profiler over ``steps`` steps (CUDA graph replays included)."""
    from torch.profiler import ProfilerActivity, profile

    try:
        step()
        _sync()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                step()
            _sync()
        kernels = [e for e in prof.key_averages() if e.device_type.name == "CUDA" and e.device_time_total > 0]
        kernels.sort(key=lambda e: e.device_time_total, reverse=True)
        return {
            "total_us": round(sum(e.device_time_total for e in kernels) / steps, 1),
            "top": [
                [e.key[:100], round(e.device_time_total / steps, 1), round(e.count / steps, 1)] for e in kernels[:top]
            ],
        }
    except Exception as error:  # noqa: BLE001 - a diagnostic only
        return f"{type(error).__name__}: {str(error)[:200]}"


def host_profile(step: Callable[[], object], steps: int = 10, top: int = 15) -> list | str:
    """Where the host's time in ``step()`` goes (Python's profiler over ``steps`` calls, each waited for as in
    `time_steps`): ``[function, own ms per step, calls per step]`` for the ``top`` functions by own time. For
    compiled steps, whose host time (``host_ms_per_step``) is part of what a token costs."""
    import cProfile
    import pstats

    try:
        profiler = cProfile.Profile()
        for _ in range(steps):
            profiler.enable()
            step()
            profiler.disable()
            _sync()
        stats = pstats.Stats(profiler).stats  # {(file, line, name): (calls, primitive calls, own s, cumulative s, _)}
        rows = sorted(stats.items(), key=lambda item: item[1][2], reverse=True)[:top]
        return [
            [f"{Path(file).name}:{line}({name})", round(own * 1000 / steps, 4), round(calls / steps, 1)]
            for (file, line, name), (calls, _, own, _, _) in rows
        ]
    except Exception as error:  # noqa: BLE001 - a diagnostic only
        return f"{type(error).__name__}: {str(error)[:200]}"


def kernel_variant() -> str:
    """The kernel the absorbed path runs: "two_phase" (the one Triton kernel), "torch" without triton."""
    try:
        from elitekv_peft.kernels import latent_decode  # noqa: F401
    except ImportError:
        return "torch"
    return "two_phase"


def kernel_call(model, cache, batch: int, context: int, **config) -> Callable[[], torch.Tensor]:
    """One call of the fused kernel on layer 0's cache (``context`` filled slots), random queries, ``config`` blocks."""
    from elitekv_peft.kernels.latent_decode import latent_attention_triton

    attn = model.model.layers[0].self_attn
    spec, layer = attn.spec, cache.layers[0]
    H, dk = spec.num_heads, spec.key_latent[1] - spec.key_latent[0]
    q_rope = torch.randn(batch, H, 1, spec.rope_dim, device=decode_steps.DEVICE, dtype=decode_steps.DTYPE)
    q_latent = (
        torch.randn(batch, H, 1, dk, device=decode_steps.DEVICE, dtype=decode_steps.DTYPE)
        if attn.k_up_proj is not None
        else None
    )
    kv_len = torch.tensor(context, device=decode_steps.DEVICE)
    kwargs = dict(key_slice=spec.key_latent, value_slice=spec.value_latent, scaling=attn.scaling, kv_len=kv_len)
    return lambda: latent_attention_triton(q_rope, q_latent, layer.keys, layer.values, **kwargs, **config)


def kernel_bandwidth(model, cache, batch: int, context: int, **config) -> float:
    """GB/s of the fused kernel alone on one layer's cache: bytes of the ``context`` cached tokens / time."""
    spec = model.model.layers[0].self_attn.spec
    call = kernel_call(model, cache, batch, context, **config)
    ms = time_steps(graphed(call), steps=20, warmup=3)
    nbytes = batch * context * spec.cache_values_per_token() * torch.finfo(decode_steps.DTYPE).bits // 8
    return round(nbytes / (ms / 1000) / 1e9, 1)


@torch.no_grad()
def fits(model, method: str, path: str | None, batch: int, context: int) -> bool:
    """Whether a cache of ``batch`` x ``context`` plus one decode step fit in GPU memory."""
    free()
    cache = None
    try:
        cache = make_cache(model, method, path, batch, context, SLACK, fill=False)
        decode_step(model, cache, batch, context)()
        torch.cuda.synchronize()
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        cache = None
        free()


def largest_batch(model, method: str, path: str | None, context: int) -> int:
    """Largest batch that fits, by trying: an estimate from free memory, then bisection."""
    free()
    before = torch.cuda.memory_allocated()
    cache = make_cache(model, method, path, 1, context, SLACK, fill=False)
    per_sequence = max(1, torch.cuda.memory_allocated() - before)
    del cache
    free()
    free_bytes, _ = torch.cuda.mem_get_info()
    low, high = 0, max(2, int(free_bytes / per_sequence * 1.05) + 1)  # fits(low), not fits(high)
    guess = max(1, int(high * 0.9))
    while guess > low and not fits(model, method, path, guess, context):
        high, guess = guess, guess // 2
    low = max(low, guess if guess > low else 0)
    while high - low > max(1, low // 50):
        mid = (low + high) // 2
        if fits(model, method, path, mid, context):
            low = mid
        else:
            high = mid
    return low


TUNING_CANDIDATES = [
    # value launch: block_m (None: all rows, 16..32), block_v, block_s, num_warps, num_stages
    dict(block_m=None, block_v=256, block_s=64, num_warps=4),
    dict(block_m=None, block_v=256, block_s=32, num_warps=4),
    dict(block_m=None, block_v=256, block_s=32, num_warps=4, num_stages=3),
    dict(block_m=None, block_v=256, block_s=32, num_warps=4, num_stages=4),
    dict(block_m=None, block_v=256, block_s=64, num_warps=4, num_stages=3),
    dict(block_m=None, block_v=128, block_s=64, num_warps=4, num_stages=3),
    dict(block_m=None, block_v=256, block_s=64, num_warps=8, num_stages=3),
    dict(block_m=None, block_v=512, block_s=32, num_warps=8, num_stages=3),
]
# Then, on top of the fastest configuration, the score launch's own blocks (it reads the whole key
# latent: its key block, key blocks per program, warps, stages, and the latent column block).
SCORE_TUNING = [
    dict(score_block_s=64),
    dict(score_block_s=64, score_keys=8),
    dict(score_block_s=32, score_keys=8),
    dict(score_block_s=64, score_keys=2),
    dict(score_block_s=64, score_warps=8),
    dict(score_block_s=64, score_stages=3),
    dict(score_block_s=64, score_stages=1),
    dict(score_block_s=64, block_dk=128),
    dict(score_block_s=64, block_dk=128, score_warps=8),
    dict(score_block_s=128, score_keys=2, score_warps=8),
    dict(score_block_s=32, score_keys=16, score_stages=3),
]
# Last, on top of the fastest configuration of all: other context splits (the default: about 2 programs per
# multiprocessor and at most 1024 keys per program, or more where a split's partial output would cost over 2% of
# its bytes). split_keys 4096: fewer splits for narrow latents; more programs per multiprocessor helped SmolLM2's
# shape at 25% (batch 105: 430 -> 641 GB/s).
SPLIT_TUNING = [dict(split_keys=4096), *(dict(programs_per_sm=n) for n in (4, 8, 16, 32))]


def _try(model, cache, batch: int, context: int, config: dict, results: list, log: Callable[[dict], None]) -> None:
    try:
        gbps = kernel_bandwidth(model, cache, batch, context, **config)
    except Exception as error:  # noqa: BLE001 - e.g. out of shared memory for a large block
        gbps, error_name = None, f"{type(error).__name__}: {str(error)[:200]}"
    else:
        error_name = None
    results.append({**config, "gbps": gbps, "error": error_name})
    log({"tune": results[-1]})


def _fastest(results: list[dict]) -> dict | None:
    timed = [r for r in results if r["gbps"] is not None]
    if not timed:
        return None
    best = max(timed, key=lambda r: r["gbps"])
    return {k: v for k, v in best.items() if k not in ("gbps", "error")}


@torch.no_grad()
def tune_kernel(model, batch: int, context: int, log: Callable[[dict], None]) -> dict:
    """Try the kernel's block configurations on this model's cache; make the fastest one the default.

    Three rounds: `TUNING_CANDIDATES`, then `SCORE_TUNING` on top of the fastest, then `SPLIT_TUNING` on top of the
    fastest of all. The chosen configuration's launches are profiled once
    (``breakdown``: microseconds per launch, in order).
    """
    from elitekv_peft.kernels import latent_decode

    cache = make_cache(model, "elitekv", "absorbed_kernel", batch, context, SLACK)
    results: list[dict] = []
    for config in TUNING_CANDIDATES:
        _try(model, cache, batch, context, config, results, log)
    first = _fastest(results)
    if first is not None:
        for extra in SCORE_TUNING:
            _try(model, cache, batch, context, {**first, **extra}, results, log)
    best = _fastest(results)
    if best is not None:
        for extra in SPLIT_TUNING:
            _try(model, cache, batch, context, {**best, **extra}, results, log)
        best = _fastest(results)
    breakdown = None
    if best is not None:
        latent_decode.DEFAULTS.update(best)
        breakdown = kernel_breakdown(model, cache, batch, context)
        log({"breakdown": breakdown})
    del cache
    free()
    chosen = latent_decode.kernel_config()
    return {"batch": batch, "context": context, "tried": results, "chosen": chosen, "breakdown": breakdown}


TRITON_KERNELS = ("_split_kernel", "_reduce_kernel")


def kernel_breakdown(model, cache, batch: int, context: int, calls: int = 5) -> list | str:
    """Mean GPU microseconds of each launch of one kernel call (default configuration), in launch order."""
    from torch.profiler import ProfilerActivity, profile

    call = kernel_call(model, cache, batch, context)
    try:
        call()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(calls):
                call()
            torch.cuda.synchronize()
        launches = sorted(
            (e for e in prof.events() if e.name in TRITON_KERNELS and e.device_type.name == "CUDA"),
            key=lambda e: e.time_range.start,
        )
        per_call = len(launches) // calls
        return [
            [launches[i].name, round(sum(launches[i + c * per_call].device_time for c in range(calls)) / calls, 1)]
            for i in range(per_call)
        ]
    except Exception as error:  # noqa: BLE001 - a diagnostic only
        return f"{type(error).__name__}: {str(error)[:200]}"


# The shapes of `gpu_check` (also those whose shared memory tests/test_kernel_resources.py checks offline):
# B, G, Hg, T, S, R, d_c, kv_len, mask. The first is the 7B shape at 25% (d_c 1536), the last at 50% (d_c 3072:
# the single-pass value dims over two programs).
GPU_CHECK_CASES = [
    (2, 32, 1, 1, 3001, 16, 1536, None, False),
    (3, 3, 3, 1, 2500, 8, 72, 2100, False),
    (2, 8, 4, 2, 777, 32, 512, None, True),
    (1, 32, 1, 1, 40000, 8, 768, 39000, False),
    (1, 32, 1, 1, 5000, 32, 3072, 4900, False),
]


@torch.no_grad()
def gpu_check() -> dict:
    """The kernel vs the PyTorch reference on the GPU: relative errors over a few shapes, bf16 and fp32."""
    from elitekv_peft.kernels.latent_decode import latent_attention_triton
    from elitekv_peft.modeling.absorbed import allowed_keys, latent_attention_reference

    errors = {}
    for dtype in (torch.bfloat16, torch.float32):
        for B, G, Hg, T, S, R, dc, kv, use_mask in GPU_CHECK_CASES:
            H = G * Hg
            q_rope, q_latent = (torch.randn(B, H, T, n, device="cuda", dtype=dtype) for n in (R, dc))
            rope_keys = torch.randn(B, G, S, R, device="cuda", dtype=dtype)
            latent = torch.randn(B, 1, S, dc, device="cuda", dtype=dtype)
            mask = None
            if use_mask:
                mask = torch.ones(B, 1, T, S, dtype=torch.bool, device="cuda").tril(S - T)
                mask[0, ..., : S // 3] = False
            kv_len = torch.tensor(kv, device="cuda") if kv is not None else None
            kw = dict(key_slice=(0, dc), value_slice=(0, dc), scaling=0.088, kv_len=kv_len)
            args64 = [t.double() for t in (q_rope, q_latent, rope_keys, latent)]
            ref = latent_attention_reference(*args64, attention_mask=mask, **kw)
            allowed = allowed_keys(mask, kv_len, B, T, S, latent.device) if mask is not None else None
            name = f"two_phase_{str(dtype).removeprefix('torch.')}_B{B}_G{G}_Hg{Hg}_T{T}_S{S}_R{R}_dc{dc}"
            try:
                out = latent_attention_triton(q_rope, q_latent, rope_keys, latent, allowed=allowed, **kw)
            except Exception as error:  # noqa: BLE001 - recorded per case; the other cases still run
                errors[name] = f"{type(error).__name__}: {str(error)[:300]}"
                continue
            errors[name] = ((out.double() - ref).norm() / ref.norm()).item()
    return errors
