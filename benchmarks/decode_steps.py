"""Decode benchmark, the steps: model shapes, models with random weights, caches filled directly, one-token decode
steps (eager, CUDA-graph replayed or compiled) and their timing. Part of `benchmarks/decode.py` (see its docstring).

``DEVICE`` and ``DTYPE`` are read here at call time; `decode.py --device cpu` sets them on this module.
"""

from __future__ import annotations

import contextlib
import gc
import signal
import time
from collections.abc import Callable

import torch

SHAPES = {
    "llama2-7b-shape": dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        head_dim=128,
        vocab_size=32000,
    ),
    "tiny-shape": dict(  # for CPU smoke runs of the code paths (--device cpu)
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=32,
        vocab_size=256,
    ),
    "smollm2-135m-shape": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        vocab_size=49152,
    ),
}
DTYPE = torch.bfloat16  # float32 with --device cpu
DEVICE = "cuda"  # "cpu" with --device cpu: a smoke run of the code paths (no graphs, no memory search, no kernel)
COMMON = dict(max_position_embeddings=65536, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})


# ----------------------------------------------------------------------------------------------------- models


def build_base(shape: str) -> torch.nn.Module:
    """Random-weight Llama of ``shape`` on the GPU, bf16, SDPA attention."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SHAPES[shape], **COMMON, attn_implementation="sdpa")
    return _on_gpu(lambda: LlamaForCausalLM(config))


def build_elitekv(shape: str, kv_ratio: float, layout: str = "joint") -> torch.nn.Module:
    """Random-weight EliteKV Llama of ``shape`` with the cache layout of ``kv_ratio`` (highest-frequency chunks).

    Built directly from an EliteKV config (no calibration or SVD: speed does not depend on the weights' values).
    ``layout="separate"``: S-LRD, the latent split in half between keys and values (the conversion sizes the two
    parts by their ranks; half is the speed-relevant case of equal parts).
    """
    from elitekv_peft import EliteKVLlamaConfig, EliteKVLlamaForCausalLM, resolve_budget

    s = SHAPES[shape]
    budget = resolve_budget(
        num_kv_heads=s["num_key_value_heads"], head_dim=s["head_dim"], hidden_size=s["hidden_size"], kv_ratio=kv_ratio
    )
    layers, G, r = s["num_hidden_layers"], s["num_key_value_heads"], budget.rope_chunks
    elitekv = dict(
        chunk_indices=[[list(range(r)) for _ in range(G)] for _ in range(layers)],
        latent_dims=[budget.latent_dim] * layers,
        key_latent_dims=[budget.latent_dim // 2] * layers if layout == "separate" else None,
        attention_path="auto",
    )
    config = EliteKVLlamaConfig(**s, **COMMON, elitekv=elitekv, attn_implementation="sdpa")
    return _on_gpu(lambda: EliteKVLlamaForCausalLM(config))


def _on_gpu(make: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(DTYPE)
    try:
        with torch.device(DEVICE):
            return make().eval()
    finally:
        torch.set_default_dtype(previous)


# ----------------------------------------------------------------------------------------------------- caches


def make_cache(model, method: str, path: str | None, batch: int, context: int, slack: int, fill: bool = True):
    """A cache holding ``context`` random tokens for ``method``; static caches get ``slack`` free slots."""
    from transformers import DynamicCache, StaticCache

    from elitekv_peft import EliteKVCache, EliteKVCacheLayer, EliteKVStaticCache

    c = model.config
    init = torch.randn if fill else torch.empty
    if method == "baseline_dynamic":
        cache = DynamicCache(config=c)
        for layer in range(c.num_hidden_layers):
            shape = (batch, c.num_key_value_heads, context, c.head_dim)
            cache.update(init(shape, device=DEVICE, dtype=DTYPE), init(shape, device=DEVICE, dtype=DTYPE), layer)
        return cache
    if method in ("baseline_static", *COMPILED_BASELINES):  # the same cache; compiled rows compile the step
        cache = StaticCache(config=c, max_cache_len=context + slack)
        one = torch.zeros(batch, c.num_key_value_heads, 1, c.head_dim, device=DEVICE, dtype=DTYPE)
        _fill_static(cache, one, one, context, fill)
        return cache
    spec = model.model.layers[0].self_attn.spec
    rope = torch.zeros(batch, spec.num_kv_heads, 1, spec.rope_dim, device=DEVICE, dtype=DTYPE)
    latent = torch.zeros(batch, 1, 1, spec.latent_dim, device=DEVICE, dtype=DTYPE)
    if path == "reconstruct":  # dynamic latent cache
        cache = EliteKVCache()
        for _ in range(c.num_hidden_layers):
            layer = EliteKVCacheLayer()
            layer.update(
                init((batch, spec.num_kv_heads, context, spec.rope_dim), device=DEVICE, dtype=DTYPE),
                init((batch, 1, context, spec.latent_dim), device=DEVICE, dtype=DTYPE),
            )
            cache.layers.append(layer)
        return cache
    cache = EliteKVStaticCache(c, max_cache_len=context + slack)
    _fill_static(cache, rope, latent, context, fill)
    return cache


def _fill_static(cache, keys_one: torch.Tensor, values_one: torch.Tensor, context: int, fill: bool) -> None:
    """Allocate every static layer and mark its first ``context`` slots filled (random values when ``fill``)."""
    for layer in cache.layers:
        layer.lazy_initialization(keys_one, values_one)
        if fill:
            layer.keys[:, :, :context].normal_()
            layer.values[:, :, :context].normal_()
        layer.cumulative_length.fill_(context)


# ----------------------------------------------------------------------------------------------------- timing


def time_steps(step: Callable[[], object], steps: int, warmup: int, host: list[float] | None = None) -> float:
    """Median milliseconds of ``step()`` over ``steps`` calls after ``warmup``, timed with CUDA events.

    Each step starts on an idle GPU (as in `generate`, which waits for every token), so the time includes what the
    host spends before the GPU gets work (Python, guards, graph launch). ``host``, if given, receives the median
    milliseconds the ``step()`` call itself took on the host (with a CUDA graph: until the replay is queued).
    """
    times, host_times = [], []
    if DEVICE == "cpu":
        for i in range(warmup + steps):
            start = time.perf_counter()
            step()
            if i >= warmup:
                times.append((time.perf_counter() - start) * 1000)
        return sorted(times)[len(times) // 2]
    for i in range(warmup + steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        called = time.perf_counter()
        step()
        called = time.perf_counter() - called
        end.record()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(start.elapsed_time(end))
            host_times.append(called * 1000)
    if host is not None:
        host.append(sorted(host_times)[len(host_times) // 2])
    return sorted(times)[len(times) // 2]


def decode_step(
    model, cache, batch: int, context: int, forward: Callable | None = None, compiler_graphs: bool = True
) -> Callable[[], object]:
    """One decode step (one new token per sequence) that advances its own position each call.

    ``forward``: what to call instead of ``model`` (a compiled ``model.forward``); ``compiler_graphs``: whether it
    replays CUDA graphs of its own (``reduce-overhead``), which must be told where a step begins.
    """
    from elitekv_peft.compat import cache_kwargs

    ids = torch.randint(0, model.config.vocab_size, (batch, 1), device=DEVICE)
    position = torch.full((batch, 1), context, device=DEVICE)
    call = forward or model
    given = cache_kwargs(cache)  # the cache under this transformers' argument name

    def step():
        if forward is not None and compiler_graphs and DEVICE == "cuda":
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs may be overwritten
        call(input_ids=ids, **given, position_ids=position, use_cache=True)
        position.add_(1)

    return step


def graphed(step: Callable[[], object], warmup: int = 2) -> Callable[[], object]:
    """``step`` captured in a CUDA graph (after ``warmup`` eager calls on a side stream); returns its replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth (GB/s, bytes read + written), median of 10 copies of 1 GiB (64 MiB on CPU)."""
    x = torch.empty(2**30 if DEVICE == "cuda" else 2**26, dtype=torch.uint8, device=DEVICE)
    y = torch.empty_like(x)
    ms = time_steps(lambda: y.copy_(x), steps=10, warmup=2)
    return round(2 * x.numel() / (ms / 1000) / 1e9, 1)


def free() -> None:
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------------- runs

SLACK = 64  # free slots of static caches: capture warm-up + timed steps


COMPILED_BASELINES = ("baseline_compiled", "baseline_compiled_graph")
ABSORBED_PATHS = ("absorbed_kernel", "absorbed_compiled", "absorbed_compiled_graph")


def is_graphed(method: str, path: str | None) -> bool:
    """Rows whose step is captured in a CUDA graph by hand (``reduce-overhead`` rows get theirs from the compiler)."""
    by_hand = ("baseline_static", "baseline_compiled_graph", "absorbed_kernel", "absorbed_compiled_graph")
    return DEVICE == "cuda" and (method in by_hand or path in by_hand)


def is_compiled(method: str, path: str | None) -> bool:
    return method in COMPILED_BASELINES or path in ("absorbed_compiled", "absorbed_compiled_graph")


class CompileTimeout(Exception):
    """Compilation (and warm-up) of a step ran past ``--compile-budget``."""


@contextlib.contextmanager
def time_budget(seconds: float, expired: list[bool]):
    """Raise `CompileTimeout` in this (main) thread after ``seconds`` (0: no limit); appends to ``expired`` then
    (the compiler may wrap the exception in its own)."""
    if not seconds:
        yield
        return

    def expire(signum, frame):
        expired.append(True)
        raise CompileTimeout(f"compile + warm-up exceeded the {seconds:g} s budget (--compile-budget)")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def compiled_forward(model, args, mode: str) -> Callable:
    """``torch.compile(model.forward)`` as transformers' `CompileConfig` does for static-cache decoding by default
    (Inductor, ``mode="reduce-overhead"``: CUDA graphs of the compiled step; ``fullgraph=False``, ``dynamic=False``),
    fresh for each row (every cache shape compiles anyway; a reset keeps Dynamo's recompile limit out of the way).
    ``--compile-backend`` changes the backend; ``mode``: Inductor's mode (``--compile-mode``, or ``"default"`` for a
    step the caller captures in a CUDA graph), unused by other backends."""
    torch._dynamo.reset()
    options = dict(backend=args.compile_backend, fullgraph=False, dynamic=False)
    if args.compile_backend == "inductor":
        options["mode"] = mode
    return torch.compile(model.forward, **options)


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()
