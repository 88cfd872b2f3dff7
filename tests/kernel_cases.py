"""Cases for tests/test_kernels.py, run in a subprocess with ``TRITON_INTERPRET=1`` set before triton is imported.

Each case draws fresh random inputs, runs the Triton kernel (interpreted on the CPU) and the PyTorch reference, and
reports the relative error ``|out - ref| / |ref|`` (NaN if the kernel wrote NaN anywhere). Printed as one JSON line.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

# the kernel config of the case "programs_per_sm_many_splits" below
MANY_SPLITS = dict(block_s=16, programs_per_sm=16)

# name: batch, groups, heads per group, new tokens, cache length, rotated dims R, latent d_c, key slice, value slice,
#       mask kind, kv_len, splits, dtype, kernel config
CASES = {
    "gqa_one_token": dict(B=1, G=3, Hg=3, T=1, S=37, R=8, dc=24, ks=(0, 24), vs=(0, 24)),
    # several key blocks per split (online softmax rescaling), one split
    "many_blocks_one_split": dict(
        B=2, G=2, Hg=2, T=1, S=100, R=8, dc=24, ks=(0, 24), vs=(0, 24), splits=1, cfg=dict(block_s=16)
    ),
    "few_tokens_left_padding": dict(
        B=2, G=2, Hg=2, T=3, S=50, R=8, dc=24, ks=(0, 24), vs=(0, 24), mask="bool", splits=2, cfg=dict(block_s=16)
    ),
    # value dims in two blocks: scores in a first launch (two-phase, the default then) ...
    "mha_separate_latent_static": dict(
        B=2,
        G=4,
        Hg=1,
        T=1,
        S=45,
        R=4,
        dc=40,
        ks=(0, 16),
        vs=(16, 40),
        kv_len=30,
        splits=2,
        cfg=dict(block_v=16, block_s=16),
    ),
    "two_phase_few_tokens_mask": dict(
        B=2,
        G=2,
        Hg=3,
        T=2,
        S=77,
        R=8,
        dc=48,
        ks=(0, 48),
        vs=(0, 48),
        mask="bool",
        splits=2,
        cfg=dict(block_v=16, block_s=16),
    ),
    # ... or fused, recomputing the scores per value block
    "fused_value_blocks": dict(
        B=1, G=2, Hg=2, T=1, S=40, R=8, dc=48, ks=(0, 48), vs=(0, 48), kv_len=35, cfg=dict(block_v=16, two_phase=False)
    ),
    "no_nope_two_row_blocks": dict(B=1, G=5, Hg=4, T=1, S=33, R=16, dc=20, ks=(0, 0), vs=(0, 20), splits=2),
    "float_mask_many_splits": dict(
        B=3, G=1, Hg=6, T=1, S=70, R=2, dc=36, ks=(0, 36), vs=(0, 36), mask="float", splits=5
    ),
    "static_few_tokens_causal": dict(
        B=1, G=2, Hg=3, T=2, S=64, R=8, dc=32, ks=(0, 32), vs=(0, 32), kv_len=41, splits=4
    ),
    # more programs per multiprocessor (splits from the config: 4 "multiprocessors" on CPU x 16 = 64, capped at one
    # split per two 16-key blocks: 7 splits)
    "programs_per_sm_many_splits": dict(
        B=1, G=3, Hg=3, T=1, S=200, R=8, dc=24, ks=(0, 24), vs=(0, 24), kv_len=190, cfg=MANY_SPLITS
    ),
    # half precision: float16 (the interpreter's tl.dot is wrong for bfloat16, which numpy lacks; bf16 is checked on
    # the GPU by benchmarks/decode.py --check)
    "float16": dict(B=2, G=2, Hg=4, T=1, S=48, R=8, dc=40, ks=(0, 40), vs=(0, 40), mask="bool", dtype=torch.float16),
}


# The single-pass kernel (`kernels/single_pass.py`, joint latents: key slice = value slice), same fields; ``off``:
# where the latent's columns start in a wider cache row (``width`` values)
SINGLE_PASS_CASES = {
    "single_pass_mha_value_shares": dict(  # 3 chunks of 16 in 2 shares (the last slot padded), 3 splits
        B=2, G=4, Hg=1, T=1, S=70, R=8, dc=48, splits=3, cfg=dict(block_s=16, block_c=16, value_splits=2)
    ),
    "single_pass_gqa_few_tokens_mask": dict(
        B=2, G=2, Hg=3, T=2, S=50, R=8, dc=40, mask="bool", splits=2, cfg=dict(block_s=16, block_c=16)
    ),
    # d_c 72 (SmolLM2 at 25%): chunks of 32, the last one partly past d_c; a static cache's kv_len
    "single_pass_odd_latent_kv_len": dict(
        B=1, G=3, Hg=3, T=1, S=64, R=8, dc=72, kv_len=41, splits=4, cfg=dict(block_s=16, block_c=32)
    ),
    "single_pass_float_mask_one_share": dict(
        B=3, G=1, Hg=6, T=1, S=40, R=2, dc=24, mask="float", splits=2, cfg=dict(block_s=16)
    ),
    "single_pass_static_few_tokens_causal": dict(  # causal against kv_len, every share its own statistics
        B=1, G=2, Hg=3, T=2, S=64, R=8, dc=32, kv_len=41, cfg=dict(block_s=16, block_c=16, value_splits=2)
    ),
    "single_pass_two_row_blocks": dict(B=1, G=2, Hg=20, T=2, S=20, R=8, dc=16, cfg=dict(block_s=16)),
    "single_pass_reloaded_value_chunks": dict(  # value chunks and queries loaded again per key block
        B=2,
        G=2,
        Hg=2,
        T=1,
        S=60,
        R=8,
        dc=48,
        kv_len=50,
        splits=2,
        cfg=dict(block_s=32, block_c=16, hold_tiles=False, resident_queries=False),
    ),
    "single_pass_latent_offset": dict(B=1, G=2, Hg=2, T=1, S=33, R=8, dc=16, off=8, width=40, cfg=dict(block_s=16)),
    # float16 (the interpreter's tl.dot is wrong for bfloat16; bf16 is checked on the GPU by
    # benchmarks/decode_kernel.py)
    "single_pass_float16": dict(
        B=2, G=2, Hg=4, T=1, S=48, R=8, dc=40, mask="bool", dtype=torch.float16, cfg=dict(block_s=16)
    ),
}
TOLERANCE = {"float16": 1e-2, "single_pass_float16": 1e-2}  # others: 1e-5

ALL_CASES = {**CASES, **SINGLE_PASS_CASES}


def run_case(
    B, G, Hg, T, S, R, dc, ks=None, vs=None, mask=None, kv_len=None, splits=None, dtype=torch.float32, cfg=None,
    off=None, width=None,
):  # fmt: skip
    """One case of `CASES` (the two-phase kernel) or, without ``ks``/``vs``, of `SINGLE_PASS_CASES`."""
    from elitekv_peft.kernels.latent_decode import latent_attention_triton
    from elitekv_peft.kernels.single_pass import single_pass_attention
    from elitekv_peft.modeling.absorbed import allowed_keys, latent_attention_reference

    kernel = latent_attention_triton
    if ks is None:  # single pass: keys and values on the same columns
        kernel, ks = single_pass_attention, (off or 0, (off or 0) + dc)
        vs, dc = ks, width or dc
    H = G * Hg
    q_rope = torch.randn(B, H, T, R, dtype=dtype)
    q_latent = torch.randn(B, H, T, ks[1] - ks[0], dtype=dtype) if ks[1] > ks[0] else None
    rope_keys = torch.randn(B, G, S, R, dtype=dtype)
    latent = torch.randn(B, 1, S, dc, dtype=dtype)
    attention_mask = None
    if mask is not None:
        allowed = torch.ones(B, 1, T, S, dtype=torch.bool).tril(S - T)
        allowed[0, ..., : S // 4] = False  # left padding of the first sequence
        attention_mask = allowed
        if mask == "float":
            attention_mask = torch.zeros(B, 1, T, S).masked_fill(~allowed, torch.finfo(torch.float32).min)
    kv = torch.tensor(kv_len) if kv_len is not None else None
    kwargs = dict(key_slice=ks, value_slice=vs, scaling=0.3, kv_len=kv)
    args = (q_rope, q_latent, rope_keys, latent)
    ref = latent_attention_reference(
        *[a.double() if a is not None else None for a in args], **kwargs, attention_mask=attention_mask
    )
    allowed = allowed_keys(attention_mask, kv, B, T, S, latent.device) if attention_mask is not None else None
    out = kernel(*args, allowed=allowed, num_splits=splits, **kwargs, **(cfg or {}))
    assert out.shape == ref.shape and out.dtype == dtype
    assert out.isfinite().all()
    return ((out.double() - ref).norm() / ref.norm()).item()


def run_model_case(decomposition: str = "joint") -> tuple[float, int]:
    """A converted tiny model (latent ``decomposition``) decoding on the absorbed path (the Triton kernels: the
    interpreter counts as a device they run on) vs the reconstruct path, static cache: relative error of the logits
    and how many attention calls the dispatch sent to the two-phase kernel."""
    from elitekv_peft import EliteKVStaticCache, set_attention_path
    from elitekv_peft.compat import cache_kwargs
    from elitekv_peft.kernels import fused
    from tests.tiny import VOCAB, convert, tiny_model

    two_phase_calls = []
    counted = fused.latent_attention_triton
    fused.latent_attention_triton = lambda *a, **k: two_phase_calls.append(1) or counted(*a, **k)

    model = convert(tiny_model("llama_gqa"), kv_ratio=0.25, decomposition=decomposition)
    ids = torch.randint(3, VOCAB, (2, 20), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    outs = []
    for path in ("reconstruct", "absorbed"):
        set_attention_path(model, path)
        cache = EliteKVStaticCache(model.config, max_cache_len=32)
        with torch.no_grad():
            steps = [model(ids[:, :14], attention_mask=mask[:, :14], **cache_kwargs(cache), use_cache=True).logits]
            for t in range(14, 20):
                out = model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], **cache_kwargs(cache), use_cache=True)
                steps.append(out.logits)
        outs.append(torch.cat(steps, 1)[mask.bool()])
    fused.latent_attention_triton = counted
    return ((outs[1] - outs[0]).norm() / outs[0].norm()).item(), len(two_phase_calls)


def run_compiled_case() -> dict[str, float]:
    """The absorbed decode step with the kernel under ``torch.compile(fullgraph=True)`` (aot_eager) vs eager:
    relative error of the logits and the number of graphs (2, prefill and decode: no graph break around the kernel).

    The compiled run goes first, prefill included: nothing the attention needs may be set up lazily on its first
    (traced) call."""
    from elitekv_peft import EliteKVStaticCache, set_attention_path
    from elitekv_peft.compat import cache_kwargs
    from tests.tiny import VOCAB, convert, tiny_model

    model = convert(tiny_model("llama_gqa"), kv_ratio=0.25)
    set_attention_path(model, "absorbed")
    ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(4))
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    def decode(step) -> torch.Tensor:
        """Prefill 8 tokens, then decode one at a time, every call through ``step``: ``[B, 12, vocab]``."""
        cache = EliteKVStaticCache(model.config, max_cache_len=16)
        logits = []
        with torch.no_grad():
            for start, end in [(0, 8), *((t, t + 1) for t in range(8, ids.shape[1]))]:
                position = torch.arange(start, end).expand(ids.shape[0], -1)
                out = step(input_ids=ids[:, start:end], **cache_kwargs(cache), position_ids=position, use_cache=True)
                logits.append(out.logits)
        return torch.cat(logits, 1)

    compiled = decode(torch.compile(model.forward, backend=counting, fullgraph=True, dynamic=False))
    eager = decode(model)
    return {"error": ((compiled - eager).norm() / eager.norm()).item(), "graphs": float(len(graphs))}


def run_benchmark_smoke() -> dict:
    """`benchmarks/decode_kernel.py` end to end on a tiny shape (one timed call per row, interpreter): what the GPU
    job's part k runs, so that it cannot fail for a reason a CPU shows."""
    import tempfile

    from tests.benchmark_modules import load_benchmark

    bench = load_benchmark("decode_kernel")
    with tempfile.TemporaryDirectory() as tmp:
        argv = "--device cpu --shape tiny-shape --context 40 --batches 2,max --ratios 0.25 --separate --steps 1"
        result = bench.main([*argv.split(), "--warmup", "0", "--out", f"{tmp}/k.json"])
        saved = json.loads(Path(tmp, "k.json").read_text())
        report = Path(tmp, "k.md").read_text()
    rows = result["rows"]
    return {
        "rows": len(rows),
        "rows_complete": all({"decomposition", "kernel", "gbps", "fraction_of_copy"} <= set(r) for r in rows),
        "saved_equals_result": saved == result,
        "check_error": max(v for v in result["check"].values()),
        "tuned": len(result["tuning"]),
        "report_rows": sum(line.startswith(("| joint", "| separate")) for line in report.splitlines()),
    }


def main() -> None:
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("run with TRITON_INTERPRET=1 (set before triton is imported)")
    torch.manual_seed(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
    # first, while nothing has run eagerly yet: a lazy import on first use would happen inside the traced step
    compiled = run_compiled_case()
    results = {name: run_case(**case) for name, case in ALL_CASES.items()}
    results["model_static_decode"], results["model_static_decode_two_phase_calls"] = run_model_case()
    separate = run_model_case(decomposition="separate")
    results["model_static_decode_separate"], results["model_static_decode_separate_two_phase_calls"] = separate
    results["compiled_decode_step"] = compiled["error"]
    results["compiled_decode_step_graphs"] = compiled["graphs"]
    results["benchmark_smoke"] = run_benchmark_smoke()
    print("RESULTS " + json.dumps(results))


if __name__ == "__main__":
    main()
