"""Shared memory of the decode kernels' launches, compiled offline for an H100 (sm_90) without a GPU.

`launches` runs `latent_attention_triton` on CPU tensors with the kernels swapped for recorders, so it yields the
exact specialisation (argument types, divisibility by 16, constexprs, warps, stages) each launch would compile;
`compile_for_h100` compiles one with triton's own compiler and ptxas for sm_90, and `shared_memory` returns the
bytes of shared memory it needs. Used by `tests/test_kernel_resources.py`; also a command
(``python -m tests.kernel_resources``) that prints the table for the GPU check's shapes.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from .benchmark_modules import load_benchmark

H100_SHARED_MEMORY = 232_448  # bytes per block (the limit triton reports on an H100)
TRITON_TYPES = {
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.float32: "fp32",
    torch.int8: "i8",
    torch.int64: "i64",
}

# (B, G, Hg, T, S, R, d_c, kv_len, mask): the GPU check's cases of benchmarks/decode.py (7B shape: G=32, R=16,
# d_c=1536 at 25%; d_c=3072 at 50%)
CASES = load_benchmark("decode").GPU_CHECK_CASES


@dataclass
class Launch:
    kernel: Any  # the @triton.jit function
    signature: dict[str, str]
    constexprs: dict[str, Any]
    options: dict[str, int]
    attrs: dict[tuple[int], list] = field(default_factory=dict)  # the JIT's divisibility-16 specialisation

    @property
    def name(self) -> str:
        mode = self.constexprs.get("SCORES_MODE")
        return self.kernel.fn.__name__ + ("" if mode is None else f"[mode {mode}]")


class _Recorder:
    """Stands in for a jit kernel: ``kernel[grid](*args, **kwargs)`` records a `Launch` instead of running."""

    def __init__(self, kernel: Any, out: list[Launch]):
        self.kernel, self.out = kernel, out

    def __getitem__(self, grid: Any):
        def record(*args: Any, **kwargs: Any) -> None:
            options = {"num_warps": kwargs.pop("num_warps", 4), "num_stages": kwargs.pop("num_stages", 3)}
            bound = dict(zip(self.kernel.arg_names, args, strict=False)) | kwargs
            signature, constexprs, attrs = {}, {}, {}
            for index, param in enumerate(self.kernel.params):
                value = bound[param.name]
                if param.is_constexpr:
                    signature[param.name], constexprs[param.name] = "constexpr", value
                elif isinstance(value, torch.Tensor):
                    signature[param.name] = "*" + TRITON_TYPES[value.dtype]
                    attrs[(index,)] = [["tt.divisibility", 16]]  # CUDA allocations are 16-byte aligned
                else:
                    signature[param.name] = "fp32" if isinstance(value, float) else "i32"
                    if isinstance(value, int) and value % 16 == 0:  # as the JIT specialises integer arguments
                        attrs[(index,)] = [["tt.divisibility", 16]]
            self.out.append(Launch(self.kernel, signature, constexprs, options, attrs))

        return record


def launches(case: tuple, dtype: torch.dtype, **config: Any) -> list[Launch]:
    """The launches `latent_attention_triton` makes for ``case`` (see `CASES`) with this config."""
    from elitekv_peft.kernels import latent_decode

    B, G, Hg, T, S, R, dc, kv, use_mask = case
    H = G * Hg
    tensors = (
        torch.zeros(B, H, T, R, dtype=dtype),
        torch.zeros(B, H, T, dc, dtype=dtype),
        torch.zeros(B, G, S, R, dtype=dtype),
        torch.zeros(B, 1, S, dc, dtype=dtype),
    )
    recorded: list[Launch] = []
    names = ("_split_kernel", "_reduce_kernel")
    saved = {name: getattr(latent_decode, name) for name in names}
    try:
        for name, kernel in saved.items():
            setattr(latent_decode, name, _Recorder(kernel, recorded))
        latent_decode._launch(
            *tensors,
            cfg=latent_decode.kernel_config(**config),
            key_slice=(0, dc),
            value_slice=(0, dc),
            scaling=0.1,
            allowed=torch.ones(B, T, S, dtype=torch.bool) if use_mask else None,
            kv_len=torch.tensor(kv) if kv is not None else None,
            num_splits=8,
            two_phase=None,
        )
    finally:
        for name, kernel in saved.items():
            setattr(latent_decode, name, kernel)
    return recorded


def compile_for_h100(launch: Launch) -> Any:
    """The launch's kernel compiled for sm_90 (no GPU needed): ``.metadata.shared``, ``.asm["ptx"]``, ..."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    source = ASTSource(fn=launch.kernel, signature=launch.signature, constexprs=launch.constexprs, attrs=launch.attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=launch.options)


def shared_memory(launch: Launch) -> int:
    """Bytes of shared memory the launch's kernel needs on an H100."""
    return compile_for_h100(launch).metadata.shared


def table(dtypes: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float32)) -> Iterator[tuple[str, int]]:
    """``(description, shared bytes)`` of every launch of the default configuration on `CASES`."""
    for dtype in dtypes:
        for case in CASES:
            for launch in launches(case, dtype):
                yield f"{str(dtype)[6:]} d_c={case[6]} R={case[5]} {launch.name}", shared_memory(launch)


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: this compiles the kernels for sm_90")
    for description, nbytes in table():
        flag = "  > H100 limit" if nbytes > H100_SHARED_MEMORY else ""
        print(f"{description:60} {nbytes:>8}{flag}", flush=True)
