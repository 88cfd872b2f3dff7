"""The fused Triton decode kernel against the PyTorch reference, in triton's interpreter mode on the CPU.

Triton reads ``TRITON_INTERPRET`` when a kernel is defined, so the cases run in a subprocess that sets it before
anything imports triton (`tests/kernel_cases.py`); this file only checks their errors. Skipped when triton is not
installed (it is not a dependency on CPU-only machines).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from elitekv_peft import kernels
from elitekv_peft.modeling.absorbed import latent_attention_reference

from .kernel_cases import ALL_CASES

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = {"float16": 1e-2}  # float32 cases: 1e-5


@pytest.fixture(scope="module")
def interpreted_errors() -> dict[str, float]:
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "tests.kernel_cases", "7"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("RESULTS "))
    return json.loads(line.removeprefix("RESULTS "))


@pytest.mark.parametrize(
    "case",
    [
        *ALL_CASES,
        "model_static_decode",
        "model_static_decode_separate",  # S-LRD: keys and values in their own parts of the latent
        "compiled_decode_step",
    ],
)
def test_kernel_matches_reference(interpreted_errors, case):
    error = interpreted_errors[case]
    assert error == error, f"{case}: NaN in the kernel's output"
    assert error < TOLERANCE.get(case, 1e-5), f"{case}: relative error {error:.3g}"


def test_compiled_decode_step_with_the_kernel_is_one_graph(interpreted_errors):
    """`torch.compile(fullgraph=True)` of the absorbed forward with the kernel forced, before any eager call: the
    kernel is one operator (`latent_decode.latent_decode_op`) and the kernels module is imported with the model's
    code, so each input shape (prefill, decode) is one graph (no launcher Python or import is traced)."""
    assert interpreted_errors["compiled_decode_step_graphs"] == 2


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q_rope, q_latent = torch.randn(1, 4, 1, 8, generator=g), torch.randn(1, 4, 1, 16, generator=g)
    rope_keys, latent = torch.randn(1, 2, 10, 8, generator=g), torch.randn(1, 1, 10, 16, generator=g)
    return (q_rope, q_latent, rope_keys, latent), dict(key_slice=(0, 16), value_slice=(0, 16), scaling=0.25)


def test_cpu_dispatch_uses_the_reference(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    args, kwargs = _inputs()
    for backend in ("auto", "torch"):
        kernels.set_kernel_backend(backend)
        assert not kernels._use_triton(torch.device("cpu"))
        assert torch.equal(kernels.latent_attention(*args, **kwargs), latent_attention_reference(*args, **kwargs))
    kernels.set_kernel_backend("auto")
    if kernels.triton_available():
        assert kernels._use_triton(torch.device("cuda"))


def test_backend_is_validated():
    with pytest.raises(ValueError, match="choose one of"):
        kernels.set_kernel_backend("cuda")
    kernels.set_kernel_backend("triton")
    try:
        if kernels.triton_available():
            assert kernels._use_triton(torch.device("cpu"))
        else:
            with pytest.raises(RuntimeError, match="triton is not installed"):
                kernels._use_triton(torch.device("cpu"))
    finally:
        kernels.set_kernel_backend("auto")


def test_kv_len_hides_the_empty_tail():
    """With ``kv_len``, slots past it (an unfilled pre-allocated cache) change nothing."""
    (q_rope, q_latent, rope_keys, latent), kwargs = _inputs(1)
    short = latent_attention_reference(q_rope, q_latent, rope_keys[:, :, :7], latent[:, :, :7], **kwargs)
    padded = latent_attention_reference(q_rope, q_latent, rope_keys, latent, kv_len=torch.tensor(7), **kwargs)
    assert torch.allclose(short, padded, atol=1e-6)
    assert not torch.allclose(short, latent_attention_reference(q_rope, q_latent, rope_keys, latent, **kwargs))


def test_kernel_settings_read_no_environment_variable(monkeypatch):
    """The decode path is the model config's choice (``attention_path``); the kernel reads no environment variable
    at import (``ELITEKV_KERNEL`` / ``ELITEKV_KERNEL_VARIANT`` were dropped)."""
    pytest.importorskip("triton")
    import importlib

    from elitekv_peft.kernels import latent_decode

    monkeypatch.setenv("ELITEKV_KERNEL", "torch")
    monkeypatch.setenv("ELITEKV_KERNEL_VARIANT", "single_pass")
    try:
        fresh = importlib.reload(latent_decode)
        assert fresh.kernel_config() == fresh.DEFAULTS and "variant" not in fresh.DEFAULTS
        assert importlib.reload(kernels).get_kernel_backend() == "auto"
    finally:
        monkeypatch.delenv("ELITEKV_KERNEL")
        monkeypatch.delenv("ELITEKV_KERNEL_VARIANT")
        importlib.reload(latent_decode)
        importlib.reload(kernels)


def test_unknown_kernel_options_raise():
    pytest.importorskip("triton")
    from elitekv_peft.kernels.latent_decode import kernel_config

    with pytest.raises(ValueError, match="block_c"):
        kernel_config(block_c=128)  # an option of the dropped single-pass variant
    assert kernel_config(block_v=128)["block_v"] == 128


def test_programs_per_sm_sets_the_context_splits():
    """More programs per multiprocessor, or fewer keys per program, more splits of the context; never more than one
    per two key blocks."""
    pytest.importorskip("triton")
    from elitekv_peft.kernels.latent_decode import default_num_splits

    cpu = torch.device("cpu")  # counts as 4 multiprocessors
    assert default_num_splits(1, 1, 4096, 64, cpu) == 8  # the default: 2 per multiprocessor
    assert default_num_splits(1, 1, 4096, 64, cpu, programs_per_sm=8) == 32
    assert default_num_splits(3, 2, 4096, 64, cpu, programs_per_sm=8) == 6  # the grid already has 6 per split
    assert default_num_splits(1, 1, 256, 64, cpu, programs_per_sm=16) == 2  # 4 key blocks: 2 splits of 2
    # a large batch fills the device with one split, but no program streams more than split_keys keys
    assert default_num_splits(105, 1, 32768, 64, cpu) == 32
    assert default_num_splits(105, 1, 32768, 64, cpu, split_keys=4096) == 8
    assert default_num_splits(105, 1, 32768, 64, cpu, split_keys=64) == 256  # one per two key blocks


def test_splits_stay_long_enough_for_their_partial_outputs():
    """Each split writes rows x value dims of float32 partials (and the reduce reads them): at most 2% of the cache
    bytes the split reads. The 7B shape at 25% keeps its 15 splits at batch 3; SmolLM2's gets 25."""
    pytest.importorskip("triton")
    from elitekv_peft.kernels.latent_decode import PARTIAL_SHARE, default_num_splits, min_split_keys

    floor = min_split_keys(32, 1536, 2048 * 2)
    assert floor == 4800
    assert 2 * 32 * 1536 * 4 <= PARTIAL_SHARE * floor * 2048 * 2 < 2 * 32 * 1536 * 4 + PARTIAL_SHARE * 2048 * 2
    assert min_split_keys(9, 72, 96 * 2) == 1350
    cpu = torch.device("cpu")  # 4 "multiprocessors": programs_per_sm scaled so the 7B case's rule gives the H100's 15
    assert default_num_splits(3, 6, 32768, 64, cpu, programs_per_sm=2 * 132 // 4, split_keys=max(1024, floor)) == 15
    assert default_num_splits(105, 1, 32768, 64, cpu, split_keys=max(1024, min_split_keys(9, 72, 192))) == 25


def test_alignment_is_the_largest_power_of_two_dividing_every_stride():
    """What the launcher tells the kernels about the cache strides (`aligned` in the kernels; capped at 16, the
    JIT's own specialisation)."""
    pytest.importorskip("triton")
    from elitekv_peft.kernels.latent_decode import _alignment

    assert _alignment(32768 * 72, 72, 0, 0) == 8  # SmolLM2 at 25%: 16-byte vectors of bf16
    assert _alignment(32768 * 36, 36, 0) == 4
    assert _alignment(1536, 1536 * 4096) == 16
    assert _alignment(72, 100) == 4 and _alignment(7, 16) == 1


def test_smaller_config_steps_down_to_nothing():
    pytest.importorskip("triton")
    from elitekv_peft.kernels.latent_decode import kernel_config, smaller_config

    cfg = kernel_config(num_stages=3, block_s=64)
    first = smaller_config(cfg)
    assert first["num_stages"] == 2 and first["block_s"] == 64  # one stage less first
    steps, current = [cfg], first
    while current is not None:
        steps.append(current)
        current = smaller_config(current)
    last = steps[-1]
    assert last["block_s"] == 16 and last["block_dk"] == 16 and last["num_stages"] == 1
    assert len(steps) < 20


def test_out_of_shared_memory_shrinks_the_blocks_once_per_shape(monkeypatch):
    pytest.importorskip("triton")
    from triton.runtime.errors import OutOfResources

    from elitekv_peft.kernels import latent_decode

    tried = []

    def fake_launch(*tensors, cfg, **options):  # "fits" only at one stage and key blocks of 16
        tried.append(cfg)
        if cfg["num_stages"] > 1 or cfg["block_s"] > 16:
            raise OutOfResources(300_000, 232_448, "shared memory")
        return torch.zeros(1)

    monkeypatch.setattr(latent_decode, "_launch", fake_launch)
    monkeypatch.setattr(latent_decode, "_FITTED", {})
    q_rope, latent = torch.zeros(1, 4, 1, 8), torch.zeros(1, 1, 32, 64)
    args = (q_rope, None, torch.zeros(1, 2, 32, 8), latent)
    kw = dict(key_slice=(0, 0), value_slice=(0, 64), scaling=1.0, block_s=64, num_stages=2)
    latent_decode.latent_attention_triton(*args, **kw)
    assert [(c["num_stages"], c["block_s"]) for c in tried] == [(2, 64), (1, 64), (1, 32), (1, 16)]
    tried.clear()
    latent_decode.latent_attention_triton(*args, **kw)
    assert [(c["num_stages"], c["block_s"]) for c in tried] == [(1, 16)]  # remembered

    def never_fits(*tensors, cfg, **options):
        raise OutOfResources(300_000, 232_448, "shared memory")

    monkeypatch.setattr(latent_decode, "_launch", never_fits)
    with pytest.raises(OutOfResources):
        latent_decode.latent_attention_triton(*args, **{**kw, "block_s": 32})


def test_importing_the_package_registers_the_kernel_dispatch_with_absorbed():
    """`elitekv_peft.kernels` registers its dispatch point with `modeling.absorbed` on import (not on first use, which a
    compiled step would trace); without it the absorbed path would silently run the PyTorch reference."""
    from elitekv_peft.modeling import absorbed

    assert absorbed.current_kernel() is kernels.latent_attention
    absorbed.use_kernel(None)
    try:
        assert absorbed.current_kernel() is absorbed.latent_attention_reference
    finally:
        absorbed.use_kernel(kernels.latent_attention)
