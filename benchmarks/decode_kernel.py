"""Bandwidth of the decode kernels alone: the single-pass J-LRD kernel against the two-phase one, on one layer's cache.

For a model shape (``--shape``, from `benchmarks/decode.py`'s ``SHAPES``), each cache ratio (``--ratios``) and batch
(``--batches``: numbers, or ``max`` for the largest batch whose cache of every layer plus the bf16 weights fits in
the free GPU memory, by arithmetic), one layer's cache is allocated with ``--context`` filled slots (random bf16,
no model), and each kernel is timed on one decode step's queries (one new token a head), the call captured in a CUDA
graph and replayed (CUDA events, warm-up, median). Bandwidth = the cache bytes of the layer (rotated chunks +
latent of every filled slot, each counted once) / kernel time; ``fraction_of_copy`` divides it by the device's
copy bandwidth measured in the same run (a 1 GiB device-to-device copy, bytes read + written / time).

Rows (``rows`` in the JSON): ``decomposition`` (``joint``: J-LRD, keys and values from one latent; ``separate``:
S-LRD halves, ``--separate``), ``kernel`` (``single_pass``, ``two_phase``), ``config`` (the single-pass kernel's
options, tuned once per ratio at the first batch over ``CANDIDATES``: ``tuning`` lists each one's GB/s), ``gbps``,
``fraction_of_copy``, ``ms``. ``check`` (run first): relative errors of the single-pass kernel against a float64
PyTorch reference on the device, bf16 and float32 (a few shapes). A Markdown report is written beside the JSON.

    python benchmarks/decode_kernel.py --out decode_kernel.json               # 7B shape, 32k, batches 1, 3, max
    TRITON_INTERPRET=1 python benchmarks/decode_kernel.py --device cpu --shape tiny-shape --context 64 \\
        --batches 1,2 --out /tmp/k.json                                      # the code paths on a CPU (interpreter)
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.decode import SHAPES  # noqa: E402

# Single-pass configurations tried at the first batch of each ratio (`single_pass.DEFAULTS` first); the fastest one
# is used for the other batches. value_splits None: the fewest shares that fit the register budget.
CANDIDATES = [
    {},
    dict(value_splits=3),
    dict(block_s=32, num_stages=1),
    dict(resident_queries=False),
    dict(hold_tiles=False, block_s=32, num_stages=1),
    dict(hold_tiles=False, block_s=64, num_stages=1),
    dict(block_c=64),
    dict(programs_per_sm=2),
    dict(split_keys=1024, partial_share=0.3),
    dict(value_splits=4, block_s=32, num_stages=1),
    dict(value_splits=3, num_warps=4),
]
CHECK_SHAPES = [  # B, G, Hg, T, S, R, d_c, kv_len, mask: the 7B shape at 25%, SmolLM2's at 25% with two new tokens
    (2, 32, 1, 1, 3001, 16, 1536, 2900, False),
    (2, 3, 3, 2, 777, 8, 72, None, True),
]


def layer_shape(shape: str, ratio: float) -> tuple[int, int, int, int]:
    """``(H, G, R, d_c)`` of an EliteKV layer of ``shape`` at ``ratio`` (`elitekv_peft.resolve_budget`)."""
    from elitekv_peft import resolve_budget

    s = SHAPES[shape]
    G = s["num_key_value_heads"]
    budget = resolve_budget(num_kv_heads=G, head_dim=s["head_dim"], hidden_size=s["hidden_size"], kv_ratio=ratio)
    return s["num_attention_heads"], G, 2 * budget.rope_chunks, budget.latent_dim


def weight_bytes(shape: str, elem: int = 2) -> int:
    """Bytes of a Llama of ``shape`` (the original attention's weights: EliteKV's are not larger)."""
    s = SHAPES[shape]
    d, L, V, D = s["hidden_size"], s["num_hidden_layers"], s["vocab_size"], s["head_dim"]
    attention = d * D * (2 * s["num_attention_heads"] + 2 * s["num_key_value_heads"])
    return elem * (L * (attention + 3 * d * s["intermediate_size"] + 2 * d) + 2 * V * d + d)


def largest_batch(shape: str, ratio: float, context: int, device: str, margin: float = 0.9) -> int:
    """The largest batch whose cache (every layer, ``context`` tokens) plus the weights fit ``margin`` of the free
    device memory (arithmetic; 4 on a CPU)."""
    if device != "cuda":
        return 4
    _, G, R, d_c = layer_shape(shape, ratio)
    free, _ = torch.cuda.mem_get_info()
    per_sequence = SHAPES[shape]["num_hidden_layers"] * context * (G * R + d_c) * 2
    return max(1, int((free * margin - weight_bytes(shape)) // per_sequence))


STEPS, WARMUP = 20, 3  # timed calls and warm-up calls of `time_ms` (``--steps``, ``--warmup``)


def time_ms(call: Callable[[], object], device: str, steps: int | None = None, warmup: int | None = None) -> float:
    """Median milliseconds of ``call``: a CUDA graph replay timed with CUDA events (wall clock on a CPU)."""
    steps, warmup = steps or STEPS, WARMUP if warmup is None else warmup
    if device != "cuda":
        times = []
        for i in range(warmup + steps):
            start = time.perf_counter()
            call()
            if i >= warmup:
                times.append((time.perf_counter() - start) * 1000)
        return sorted(times)[len(times) // 2]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    times = []
    for i in range(warmup + steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def copy_gbps(device: str) -> float:
    """Device-to-device copy bandwidth, GB/s of bytes read + written (1 GiB; 64 MiB on a CPU)."""
    x = torch.empty(2**30 if device == "cuda" else 2**26, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    ms = time_ms(lambda: y.copy_(x), device, steps=10, warmup=2)
    return round(2 * x.numel() / (ms / 1000) / 1e9, 1)


def make_layer(B: int, H: int, G: int, R: int, d_c: int, context: int, dtype: torch.dtype, device: str):
    """Random queries and one layer's cache (``context`` filled slots of ``context + 64``): the kernels' inputs."""
    S = context + 64
    q_rope = torch.randn(B, H, 1, R, device=device, dtype=dtype)
    q_latent = torch.randn(B, H, 1, d_c, device=device, dtype=dtype)
    rope_keys = torch.randn(B, G, S, R, device=device, dtype=dtype)
    latent = torch.randn(B, 1, S, d_c, device=device, dtype=dtype)
    return q_rope, q_latent, rope_keys, latent, torch.tensor(context, device=device)


def kernel_call(kernel: str, decomposition: str, tensors, scaling: float, config: dict) -> Callable[[], object]:
    """One call of ``kernel`` on ``tensors`` (`make_layer`); S-LRD reads keys and values from the latent's halves."""
    from elitekv_peft.kernels.latent_decode import latent_attention_triton
    from elitekv_peft.kernels.single_pass import single_pass_attention

    q_rope, q_latent, rope_keys, latent, kv_len = tensors
    d_c = latent.shape[-1]
    key_slice = value_slice = (0, d_c)
    if decomposition == "separate":
        key_slice, value_slice = (0, d_c // 2), (d_c // 2, d_c)
        q_latent = q_latent[..., : d_c // 2]
    kw = dict(key_slice=key_slice, value_slice=value_slice, scaling=0.088, kv_len=kv_len, **config)
    fn = single_pass_attention if kernel == "single_pass" else latent_attention_triton
    return lambda: fn(q_rope, q_latent, rope_keys, latent, **kw)


def measure(kernel: str, decomposition: str, tensors, context: int, copy: float, device: str, config: dict) -> dict:
    """Time one kernel: ``{gbps, fraction_of_copy, ms}`` (or ``error``)."""
    B, G, _, R = tensors[2].shape
    d_c = tensors[3].shape[-1]
    nbytes = B * context * (G * R + d_c) * tensors[3].element_size()
    try:
        ms = time_ms(kernel_call(kernel, decomposition, tensors, 0.088, config), device)
    except Exception as error:  # noqa: BLE001 - e.g. out of resources for one configuration; the run goes on
        return {"error": f"{type(error).__name__}: {str(error)[:300]}"}
    gbps = nbytes / (ms / 1000) / 1e9
    return {"gbps": round(gbps, 1), "fraction_of_copy": round(gbps / copy, 3), "ms": round(ms, 4), "bytes": nbytes}


@torch.no_grad()
def check(device: str, shapes: list[tuple] = CHECK_SHAPES) -> dict[str, float | str]:
    """Relative errors of the single-pass kernel against the float64 reference on ``device``, bf16 and float32."""
    from elitekv_peft.kernels.single_pass import fits, single_pass_attention
    from elitekv_peft.modeling.absorbed import allowed_keys, latent_attention_reference

    dtypes = (torch.bfloat16, torch.float32) if device == "cuda" else (torch.float32,)
    errors: dict[str, float | str] = {}
    for dtype in dtypes:
        for B, G, Hg, T, S, R, dc, kv, use_mask in shapes:
            H = G * Hg
            q_rope, q_latent = (torch.randn(B, H, T, n, device=device, dtype=dtype) for n in (R, dc))
            rope_keys = torch.randn(B, G, S, R, device=device, dtype=dtype)
            latent = torch.randn(B, 1, S, dc, device=device, dtype=dtype)
            mask = None
            if use_mask:
                mask = torch.ones(B, 1, T, S, dtype=torch.bool, device=device).tril(S - T)
                mask[0, ..., : S // 3] = False
            kv_len = torch.tensor(kv, device=device) if kv is not None else None
            kw = dict(key_slice=(0, dc), value_slice=(0, dc), scaling=0.088, kv_len=kv_len)
            ref = latent_attention_reference(
                *(t.double() for t in (q_rope, q_latent, rope_keys, latent)), attention_mask=mask, **kw
            )
            allowed = allowed_keys(mask, kv_len, B, T, S, latent.device) if mask is not None else None
            name = f"single_pass_{str(dtype).removeprefix('torch.')}_B{B}_G{G}_Hg{Hg}_T{T}_S{S}_R{R}_dc{dc}"
            if not fits(q_rope, rope_keys, latent, dc):
                errors[name] = "not run: does not fit shared memory (the two-phase kernel serves this shape)"
                continue
            try:
                out = single_pass_attention(q_rope, q_latent, rope_keys, latent, allowed=allowed, **kw)
                errors[name] = ((out.double() - ref).norm() / ref.norm()).item()
            except Exception as error:  # noqa: BLE001 - recorded per case
                errors[name] = f"{type(error).__name__}: {str(error)[:300]}"
    return errors


def write_markdown(result: dict, path: Path) -> None:
    """The run as a report next to its JSON: device, date, command, copy bandwidth, the rows, tuning and check."""
    lines = [
        "# Decode kernels alone: single-pass J-LRD vs two-phase (one layer's cache, one new token a head)",
        "",
        f"Device: {result['device']}. Date: {result['date']}. Command: `{result['command']}`. Copy bandwidth (bytes "
        f"read + written, same run): {result['copy_gbps']} GB/s. Shape {result['shape']}, context {result['context']},"
        f" {result['dtype']}; GB/s = the layer's cache bytes (rotated chunks + latent, each once) / kernel time.",
        "",
        "| decomposition | kernel | cache | batch | GB/s | of copy | ms | config |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in result["rows"]:
        timed = (f"{row['gbps']} | {row['fraction_of_copy']:.0%} | {row['ms']}" if "gbps" in row
                 else f"error: {row['error'][:80]} | | ")  # fmt: skip
        config = json.dumps(row["config"]) if row["config"] else "default"
        lines.append(
            f"| {row['decomposition']} | {row['kernel']} | {row['kv_ratio']:.0%} | {row['batch']} | {timed} | "
            f"`{config}` |"
        )
    if result["tuning"]:
        tried = "; ".join(
            f"{json.dumps(t['config']) if t['config'] else 'default'} ({t['kv_ratio']:.0%}, batch {t['batch']}): "
            + (f"{t['gbps']} GB/s" if "gbps" in t else t["error"][:80])
            for t in result["tuning"]
        )
        lines += ["", f"Single-pass configurations tried: {tried}."]
    if result.get("check"):
        checks = result["check"].items()
        checked = "; ".join(f"{k}: {v:.2e}" if isinstance(v, float) else f"{k}: {v}" for k, v in checks)
        lines += ["", f"Check against a float64 reference on the device (relative error): {checked}."]
    path.write_text("\n".join(lines) + "\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="llama2-7b-shape", choices=sorted(SHAPES))
    parser.add_argument("--ratios", default="0.25,0.5")
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--batches", default="3,1,max", help="numbers or 'max'; the first is where tuning runs")
    parser.add_argument("--separate", action="store_true", help="also S-LRD rows (two-phase kernel) at each batch")
    parser.add_argument("--no-tune", action="store_true", help="only the default single-pass configuration")
    parser.add_argument("--tune-limit", type=float, default=120, help="seconds of tuning per ratio (compiles)")
    parser.add_argument("--no-check", action="store_true", help="skip the on-device check against the reference")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--steps", type=int, default=STEPS, help="timed calls per measurement (median)")
    parser.add_argument("--warmup", type=int, default=WARMUP)
    parser.add_argument("--time-limit", type=float, default=0, help="seconds; start no new row after this")
    parser.add_argument("--out", required=True)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    global STEPS, WARMUP
    args = parse_args(argv)
    STEPS, WARMUP = args.steps, args.warmup
    device = args.device
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    started = time.monotonic()
    result: dict = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu (smoke run, triton interpreter)",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": "python benchmarks/decode_kernel.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "shape": args.shape,
        "context": args.context,
        "dtype": str(dtype).removeprefix("torch."),
        "batch_rule": "max: the largest batch whose cache of every layer + the weights fit 90% of free memory",
        "rows": [],
        "tuning": [],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        out.write_text(json.dumps(result, indent=2))
        write_markdown(result, out.with_suffix(".md"))

    def out_of_time() -> bool:
        return bool(args.time_limit) and time.monotonic() - started > args.time_limit

    result["copy_gbps"] = copy = copy_gbps(device)
    print(f"copy bandwidth {copy} GB/s", flush=True)
    if not args.no_check:
        result["check"] = check(device) if device == "cuda" else check(device, [(1, 2, 2, 1, 40, 8, 24, 30, False)])
        print(json.dumps({"check": result["check"]}), flush=True)
        save()
    for ratio in (float(r) for r in args.ratios.split(",")):
        H, G, R, d_c = layer_shape(args.shape, ratio)
        batches = [largest_batch(args.shape, ratio, args.context, device) if b == "max" else int(b)
                   for b in args.batches.split(",")]  # fmt: skip
        best: dict = {}
        for index, B in enumerate(dict.fromkeys(batches)):
            if out_of_time():
                result.setdefault("skipped", []).append({"kv_ratio": ratio, "batch": B, "reason": "time limit"})
                continue
            tensors = make_layer(B, H, G, R, d_c, args.context, dtype, device)
            base = dict(shape=args.shape, kv_ratio=ratio, batch=B, context=args.context, d_c=d_c, rope_dims=G * R)
            if index == 0 and not args.no_tune:
                tried, tune_start = [], time.monotonic()
                for config in CANDIDATES if device == "cuda" else CANDIDATES[:2]:
                    timed = measure("single_pass", "joint", tensors, args.context, copy, device, config)
                    tried.append({**base, "config": config, **timed})
                    print(json.dumps({"tune": tried[-1]}), flush=True)
                    if out_of_time() or time.monotonic() - tune_start > args.tune_limit:
                        break
                result["tuning"].extend(tried)
                fastest = max((t for t in tried if "gbps" in t), key=lambda t: t["gbps"], default=None)
                best = fastest["config"] if fastest else {}
            rows = [("joint", "single_pass", best), ("joint", "two_phase", {})]
            if best:
                rows.insert(1, ("joint", "single_pass", {}))  # the defaults too, when tuning chose others
            if args.separate:
                rows.append(("separate", "two_phase", {}))
            for decomposition, kernel, config in rows:
                timed = measure(kernel, decomposition, tensors, args.context, copy, device, config)
                row = {"decomposition": decomposition, "kernel": kernel, "config": config, **base, **timed}
                result["rows"].append(row)
                print(json.dumps(row), flush=True)
                save()
            del tensors
            if device == "cuda":
                torch.cuda.empty_cache()
    result["seconds"] = round(time.monotonic() - started, 1)
    save()
    return result


if __name__ == "__main__":
    main()
