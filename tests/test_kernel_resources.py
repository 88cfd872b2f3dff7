"""The decode kernels' shared memory on an H100, from an offline sm_90 compile (no GPU; slow tier).

The H100 check of 2026-11-23 failed with ``OutOfResources`` for float32 latents: these tests would have caught it.
Default configurations must fit for bf16 (the hot path, no shrinking); for float32 the fallback of
`latent_decode.smaller_config` must reach a configuration that fits.
"""

from __future__ import annotations

import os
import re

import pytest
import torch

from .kernel_resources import CASES, H100_SHARED_MEMORY, compile_for_h100, launches, shared_memory

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        os.environ.get("TRITON_INTERPRET") == "1", reason="compiles for sm_90; run without the interpreter"
    ),
]


@pytest.fixture(scope="module")
def latent_decode():
    pytest.importorskip("triton")
    from elitekv_peft.kernels import latent_decode

    return latent_decode


def needs(case: tuple, dtype: torch.dtype, cfg: dict) -> int:
    """The largest shared memory of the launches of one call with ``cfg``."""
    return max(shared_memory(launch) for launch in launches(case, dtype, **cfg))


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"dc{c[6]}_R{c[5]}")
def test_default_configuration_fits_an_h100_in_bfloat16(latent_decode, case):
    """The default configuration runs its own blocks in bf16, no shrinking."""
    assert needs(case, torch.bfloat16, latent_decode.kernel_config()) <= H100_SHARED_MEMORY


def fitted_steps(latent_decode, case: tuple, dtype: torch.dtype) -> int:
    """How many `smaller_config` steps from the defaults until every launch fits an H100."""
    cfg = latent_decode.kernel_config()
    steps = 0
    while needs(case, dtype, cfg) > H100_SHARED_MEMORY:
        cfg = latent_decode.smaller_config(cfg)
        steps += 1
        assert cfg is not None, "no configuration fits"
    return steps


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", [c for c in CASES if c[6] >= 1536], ids=lambda c: f"dc{c[6]}")
def test_wide_latents_fall_back_to_a_configuration_that_fits(latent_decode, case, dtype):
    """A few steps, each one compile at run time: fewer stages, then halved key blocks."""
    assert fitted_steps(latent_decode, case, dtype) <= 8


@pytest.mark.parametrize(("d_c", "rotated", "vector"), [(72, 8, "v4"), (36, 4, "v2")])
def test_latent_loads_vectorise_when_d_c_is_not_a_multiple_of_16(latent_decode, d_c, rotated, vector):
    """SmolLM2's shape at 25% (d_c 72) and 12.5% (d_c 36): the JIT marks only multiples of 16, so without the host's
    alignment hints every cache load was a 2-byte scalar load with no asynchronous copies (H100: 15-22% of copy
    bandwidth at 25%, against 54-63% at 50%, where d_c = 144). With them the cache loads are 16- or 8-byte vectors,
    pipelined with asynchronous copies."""
    case = (8, 3, 3, 1, 4096, rotated, d_c, 4096, False)  # B, G, Hg, T, S, R, d_c, kv_len, mask
    for launch in launches(case, torch.bfloat16):
        if launch.name.startswith("_reduce_kernel"):
            continue
        ptx = compile_for_h100(launch).asm["ptx"]
        loads = re.findall(r"ld\.global(?:\.[a-z0-9]+)*", ptx)
        scalar = [op for op in loads if op.endswith(".b16")]
        assert len(scalar) <= 2, f"{launch.name}: {len(scalar)} scalar 2-byte loads"  # 82-124 without the hints
        assert "cp.async" in ptx and any(f".{vector}." in op for op in loads), f"{launch.name}: not vectorised"
