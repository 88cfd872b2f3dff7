"""Decode speed: one new token over a long cache, transformers' DynamicCache vs EliteKV (reconstruct / absorbed).

Random weights (speed does not depend on their values; said in the output). For each model shape, context and
batch, the cache is filled directly with random tensors of the right shapes (no prefill), then decode steps are
timed with CUDA events (median of ``--steps`` after warm-up). Each step appends one token, as in `generate`.
This is a first, partial version of issue 5's benchmark: no Triton kernel and no StaticCache + compile rows yet.

Usage::

    python benchmarks/decode.py --out benchmarks/results/decode_partial.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {
    "smollm2-135m-shape": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        vocab_size=49152,
    ),
    "llama2-7b-shape": dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        head_dim=128,
        vocab_size=32000,
    ),
}


def build(shape: str, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        **SHAPES[shape],
        max_position_embeddings=65536,
        attn_implementation="sdpa",
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(dtype).eval()
    return model


def convert(model, kv_ratio: float):
    import warnings

    from peft import get_peft_model

    from elitekv_peft import EliteKVConfig

    config = EliteKVConfig(
        kv_ratio=kv_ratio, selection="high", lowrank_init="weight", calibration_data=torch.zeros(1, 8, dtype=torch.long)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(model, config).base_model.model.eval()


def fill_dynamic(model, batch: int, context: int):
    from transformers import DynamicCache

    c = model.config
    cache = DynamicCache(config=c)
    shape = (batch, c.num_key_value_heads, context, c.head_dim)
    for layer in range(c.num_hidden_layers):
        k = torch.randn(shape, device="cuda", dtype=model.dtype)
        cache.update(k, torch.randn_like(k), layer)
    return cache


def fill_latent(model, batch: int, context: int):
    from elitekv_peft import EliteKVCache
    from elitekv_peft.cache import latent_layer

    cache = EliteKVCache()
    for idx, layer in enumerate(model.model.layers):
        spec = layer.self_attn.spec
        rope = torch.randn(batch, spec.num_kv_heads, context, spec.rope_dim, device="cuda", dtype=model.dtype)
        lat = torch.randn(batch, 1, context, spec.latent_dim, device="cuda", dtype=model.dtype)
        latent_layer(cache, idx).update(rope, lat)
    return cache


@torch.no_grad()
def time_decode(model, cache, batch: int, context: int, steps: int, warmup: int = 3) -> float:
    ids = torch.randint(0, model.config.vocab_size, (batch, 1), device="cuda")
    times = []
    for i in range(warmup + steps):
        pos = torch.full((batch, 1), context + i, device="cuda")
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        model(input_ids=ids, past_key_values=cache, position_ids=pos, use_cache=True)
        end.record()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def measure(rows, model, label_model, method, kv_ratio, path, batch, context, steps):
    from elitekv_peft import set_attention_path

    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    row = dict(
        model=label_model,
        context=context,
        batch=batch,
        method=method,
        kv_ratio=kv_ratio,
        path=path,
        tokens_per_s=None,
        ms_per_step=None,
        peak_mem_gib=None,
        max_batch_fits=None,
        kernel_bandwidth_gbps=None,
    )
    try:
        if method == "baseline_dynamic":
            cache = fill_dynamic(model, batch, context)
        else:
            set_attention_path(model, path)
            cache = fill_latent(model, batch, context)
        ms = time_decode(model, cache, batch, context, steps)
        row.update(
            ms_per_step=round(ms, 3),
            tokens_per_s=round(batch * 1000 / ms, 1),
            peak_mem_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
        )
    except torch.OutOfMemoryError:
        row["error"] = "out of memory"
    finally:
        cache = None
        gc.collect()
        torch.cuda.empty_cache()
    rows.append(row)
    print(json.dumps(row), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default="smollm2-135m-shape,llama2-7b-shape")
    parser.add_argument("--contexts", default="2048,8192,32768")
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--ratios", default="0.25")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "decode_partial.json"))
    args = parser.parse_args()
    torch.manual_seed(0)
    dtype = torch.bfloat16
    rows: list[dict] = []
    started = time.time()
    for shape in args.shapes.split(","):
        contexts = [int(c) for c in args.contexts.split(",")]
        batches = [int(b) for b in args.batches.split(",")]
        model = build(shape, dtype)
        for context in contexts:
            for batch in batches:
                measure(rows, model, shape, "baseline_dynamic", 1.0, None, batch, context, args.steps)
        del model  # so that peak memory of the EliteKV rows counts one model
        gc.collect()
        torch.cuda.empty_cache()
        for ratio in [float(r) for r in args.ratios.split(",")]:
            converted = convert(build(shape, dtype), ratio) if ratio else None
            for context in contexts:
                for batch in batches:
                    for path in ("reconstruct", "absorbed"):
                        measure(rows, converted, shape, "elitekv", ratio, path, batch, context, args.steps)
            del converted
        gc.collect()
        torch.cuda.empty_cache()
    result = {
        "device": torch.cuda.get_device_name(),
        "date": dt.date.today().isoformat(),
        "command": "python benchmarks/decode.py " + " ".join(sys.argv[1:]),
        "notes": "random weights (speed only); bf16; cache filled directly; median of steps; partial: no Triton "
        "kernel, no StaticCache+compile baseline yet; 'absorbed' is the PyTorch reference path",
        "copy_bandwidth_gbps": copy_bandwidth(),
        "rows": rows,
        "seconds": round(time.time() - started, 1),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}))


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth (GB/s, bytes read + written), median of 10."""
    x = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    times = []
    for _ in range(12):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        y.copy_(x)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    ms = sorted(times[2:])[5]
    return round(2 * x.numel() / (ms / 1000) / 1e9, 1)


if __name__ == "__main__":
    main()
