"""The decode kernels' shared memory on an H100, from an offline sm_90 compile (no GPU; slow tier).

The H100 check of 2026-11-23 failed with ``OutOfResources`` for float32 latents: these tests would have caught it.
Default configurations must fit for bf16 (the hot path, no shrinking); for float32 the fallback of
`latent_decode.smaller_config` must reach a configuration that fits.
"""

from __future__ import annotations

import os

import pytest
import torch

from .kernel_resources import CASES, H100_SHARED_MEMORY, launches, shared_memory

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
    options = {k: v for k, v in cfg.items() if k != "variant"}
    return max(shared_memory(launch) for launch in launches(case, dtype, cfg["variant"], **options))


@pytest.mark.parametrize("variant", ["two_phase", "single_pass"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"dc{c[6]}_R{c[5]}")
def test_default_configuration_fits_an_h100_in_bfloat16(latent_decode, case, variant):
    assert needs(case, torch.bfloat16, latent_decode.kernel_config(variant)) <= H100_SHARED_MEMORY


def fitted_steps(latent_decode, case: tuple, dtype: torch.dtype, variant: str) -> int:
    """How many `smaller_config` steps from ``variant``'s defaults until every launch fits an H100."""
    cfg = latent_decode.kernel_config(variant)
    steps = 0
    while needs(case, dtype, cfg) > H100_SHARED_MEMORY:
        cfg = latent_decode.smaller_config(cfg)
        steps += 1
        assert cfg is not None, "no configuration fits"
    return steps


@pytest.mark.parametrize("case", [c for c in CASES if c[6] >= 1536], ids=lambda c: f"dc{c[6]}")
def test_float32_falls_back_to_a_configuration_that_fits(latent_decode, case):
    """A few steps, each one compile at run time: fewer stages, halved key blocks, then the two-phase defaults
    (whose 64-key blocks need halving again in float32)."""
    assert fitted_steps(latent_decode, case, torch.float32, "single_pass") <= 8
