"""The fused Triton decode kernels against the PyTorch reference, in triton's interpreter mode on the CPU.

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

from .kernel_cases import ALL_CASES, TOLERANCE

ROOT = Path(__file__).resolve().parents[1]


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
    """`torch.compile(fullgraph=True)` of the absorbed forward with the kernel, before any eager call: the kernel is
    one operator (`fused.latent_decode_op`) and the kernels module is imported with the model's code, so each input
    shape (prefill, decode) is one graph (no launcher Python or import is traced)."""
    assert interpreted_errors["compiled_decode_step_graphs"] == 2


def test_the_kernel_benchmark_runs_end_to_end(interpreted_errors):
    """`benchmarks/decode_kernel.py` (the GPU job's part k) on a tiny shape in the interpreter: batches 2 and "max"
    (4 on a CPU), J-LRD rows of both kernels plus S-LRD rows, every row with its bandwidth and fraction of copy, the
    JSON written equal to the result, the on-device check run."""
    smoke = interpreted_errors["benchmark_smoke"]
    # per batch: single pass (tuned; and default when another won), two-phase, S-LRD two-phase
    assert smoke["rows"] in (2 * 3, 2 * 4) and smoke["rows_complete"] and smoke["saved_equals_result"]
    assert smoke["tuned"] == 2 and smoke["check_error"] < 1e-5
    assert smoke["report_rows"] == smoke["rows"]  # the Markdown report beside the JSON has every row


def test_model_decode_takes_the_measured_faster_two_phase_kernel(interpreted_errors):
    """The absorbed path of a J-LRD model and of an S-LRD one runs the two-phase kernel (the single pass measured
    slower everywhere, benchmarks/results/decode_kernel.md)."""
    assert interpreted_errors["model_static_decode_two_phase_calls"] > 0
    assert interpreted_errors["model_static_decode_separate_two_phase_calls"] > 0


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q_rope, q_latent = torch.randn(1, 4, 1, 8, generator=g), torch.randn(1, 4, 1, 16, generator=g)
    rope_keys, latent = torch.randn(1, 2, 10, 8, generator=g), torch.randn(1, 1, 10, 16, generator=g)
    return (q_rope, q_latent, rope_keys, latent), dict(key_slice=(0, 16), value_slice=(0, 16), scaling=0.25)


def test_cpu_dispatch_uses_the_reference(monkeypatch):
    """Outside triton's interpreter, CPU tensors take the PyTorch reference; CUDA ones the kernels (with triton)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    args, kwargs = _inputs()
    assert not kernels._use_triton(torch.device("cpu"))
    assert torch.equal(kernels.latent_attention(*args, **kwargs), latent_attention_reference(*args, **kwargs))
    assert kernels._use_triton(torch.device("cuda")) == kernels.triton_available()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert kernels._use_triton(torch.device("cpu")) == kernels.triton_available()


def test_the_global_backend_switch_is_gone():
    """One switch, the model config's ``attention_path`` (issue 17): no process-wide backend override."""
    import elitekv_peft

    assert not hasattr(kernels, "set_kernel_backend") and not hasattr(elitekv_peft, "set_kernel_backend")


def test_only_joint_layouts_with_nope_queries_take_the_single_pass_kernel():
    pytest.importorskip("triton")
    from elitekv_peft.kernels.fused import single_pass_applies
    from elitekv_peft.kernels.single_pass import single_pass_attention

    (q_rope, q_latent, rope_keys, latent), kwargs = _inputs()
    tensors = (q_rope, q_latent, rope_keys, latent)
    assert single_pass_applies(*tensors, (0, 16), (0, 16))
    assert not single_pass_applies(*tensors, (0, 8), (8, 16))  # S-LRD
    assert not single_pass_applies(q_rope, None, rope_keys, latent, (0, 0), (0, 16))  # every head dim rotated
    with pytest.raises(ValueError, match="latent_attention_triton"):
        single_pass_attention(q_rope, None, rope_keys, latent, **{**kwargs, "key_slice": (0, 0)})


def test_wide_latents_whose_queries_overflow_shared_memory_take_the_two_phase_kernel():
    """The 7B shape (32 heads, one new token): bf16 at 25% (d_c 1536, R 16) fits a block's shared memory; at 50% (d_c
    3072, R 32) the absorbed queries alone take 192 KiB, so the two-phase kernel runs; so for float32 at 25%. The
    estimate matches what triton 3.9 allocates for the sm_90 compiles of the default configuration."""
    pytest.importorskip("triton")
    from elitekv_peft.kernels.fused import single_pass_applies
    from elitekv_peft.kernels.single_pass import SHARED_MEMORY, fits, shared_bytes

    def shapes(R, d_c, dtype):
        return torch.zeros(1, 32, 1, R, dtype=dtype), torch.zeros(1, 32, 8, R, dtype=dtype), torch.zeros(1, 1, 8, d_c)

    assert shared_bytes(32, 16, 512, 1536, 2, 2) == 197_632 <= SHARED_MEMORY  # the compiled default at 25%
    q_rope, rope_keys, latent = shapes(16, 1536, torch.bfloat16)
    assert fits(q_rope, rope_keys, latent.bfloat16(), 1536)
    q_rope, rope_keys, latent = shapes(32, 3072, torch.bfloat16)
    assert not fits(q_rope, rope_keys, latent.bfloat16(), 3072)
    q_latent = torch.zeros(1, 32, 1, 3072, dtype=torch.bfloat16)
    assert not single_pass_applies(q_rope, q_latent, rope_keys, latent.bfloat16(), (0, 3072), (0, 3072))
    q_rope, rope_keys, latent = shapes(16, 1536, torch.float32)
    assert not fits(q_rope, rope_keys, latent, 1536)
    q_rope, rope_keys, latent = shapes(8, 72, torch.float32)  # SmolLM2 at 25%: 9 heads, d_c 72
    assert fits(q_rope[:, :9], rope_keys[:, :3], latent, 72)


def test_single_pass_shrinks_stages_then_blocks():
    pytest.importorskip("triton")
    from elitekv_peft.kernels.single_pass import single_pass_config, smaller_single_pass

    steps, cfg = [], single_pass_config(num_stages=2, block_s=32, block_c=64)
    while cfg is not None:
        steps.append((cfg["num_stages"], cfg["resident_queries"], cfg["block_s"], cfg["block_c"]))
        cfg = smaller_single_pass(cfg)
    assert steps == [(2, True, 32, 64), (1, True, 32, 64), (1, True, 16, 64), (1, True, 16, 32)]


def test_value_shares_are_the_fewest_that_fit_the_register_budget():
    """The 7B shape (32 rows, 32 keys a block, 8 warps, chunks of 128): 1536 value dims in 2 shares of 768 (96
    accumulator + 48 held-chunk registers a thread), 3072 in 4; FlashMLA's 512 in one."""
    pytest.importorskip("triton")
    from elitekv_peft.kernels.single_pass import DEFAULTS, plan, single_pass_config, value_splits

    budget = DEFAULTS["register_budget"]
    assert value_splits(32, 32, 1536, 128, 8, 2, budget=144) == 2
    assert value_splits(32, 32, 1536, 128, 8, 2, budget=143) == 3
    assert value_splits(32, 32, 3072, 128, 8, 2, budget=144) == 4
    assert value_splits(32, 32, 512, 128, 8, 2, budget=budget) == 1
    assert value_splits(32, 32, 72, 128, 8, 2, budget=budget) == 1
    cfg = single_pass_config()
    cpu = torch.device("cpu")
    # block_m, row blocks, shares, chunks per share, chunk width, splits
    block_m, row_blocks, shares, per_share, width, splits = plan(3, 32, 32768, 1536, 4096, 2, cfg, cpu)
    assert (block_m, row_blocks, shares * per_share * width) == (32, 1, 1536) and shares >= 2
    assert plan(1, 9, 4096, 72, 192, 2, cfg, cpu)[:5] == (16, 1, 1, 1, 128)
    assert plan(1, 80, 4096, 72, 192, 2, cfg, cpu)[:2] == (64, 2)  # more rows than a program takes
    with pytest.raises(ValueError, match="block_v"):
        single_pass_config(block_v=128)  # an option of the other kernel


def test_kv_len_hides_the_empty_tail():
    """With ``kv_len``, slots past it (an unfilled pre-allocated cache) change nothing."""
    (q_rope, q_latent, rope_keys, latent), kwargs = _inputs(1)
    short = latent_attention_reference(q_rope, q_latent, rope_keys[:, :, :7], latent[:, :, :7], **kwargs)
    padded = latent_attention_reference(q_rope, q_latent, rope_keys, latent, kv_len=torch.tensor(7), **kwargs)
    assert torch.allclose(short, padded, atol=1e-6)
    assert not torch.allclose(short, latent_attention_reference(q_rope, q_latent, rope_keys, latent, **kwargs))


def test_kernel_settings_read_no_environment_variable(monkeypatch):
    """The decode path is the model config's choice (``attention_path``); the kernels read no environment variable
    at import (``ELITEKV_KERNEL`` / ``ELITEKV_KERNEL_VARIANT`` were dropped)."""
    pytest.importorskip("triton")
    import importlib

    from elitekv_peft.kernels import latent_decode, single_pass

    monkeypatch.setenv("ELITEKV_KERNEL", "torch")
    monkeypatch.setenv("ELITEKV_KERNEL_VARIANT", "two_phase")
    try:
        fresh = importlib.reload(latent_decode)
        assert fresh.kernel_config() == fresh.DEFAULTS and "variant" not in fresh.DEFAULTS
        assert importlib.reload(single_pass).single_pass_config() == single_pass.DEFAULTS
    finally:
        monkeypatch.delenv("ELITEKV_KERNEL")
        monkeypatch.delenv("ELITEKV_KERNEL_VARIANT")
        importlib.reload(latent_decode)
        importlib.reload(single_pass)


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


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="compiles for sm_90; run without the interpreter")
def test_single_pass_default_fits_an_h100_without_spills():
    """The 7B shape at 25% (32 rows, d_c 1536, R 16), bf16, default configuration, compiled offline for sm_90 (no
    GPU): within an H100's shared memory, latent loads pipelined with asynchronous copies, no register spills."""
    triton = pytest.importorskip("triton")
    import re
    import tempfile

    from elitekv_peft.kernels import single_pass

    from .kernel_resources import H100_SHARED_MEMORY, _Recorder, compile_for_h100

    B, H, G, R, S, d_c = 3, 32, 32, 16, 4096, 1536
    dtype = torch.bfloat16
    tensors = (torch.zeros(B, H, 1, R, dtype=dtype), torch.zeros(B, H, 1, d_c, dtype=dtype))
    tensors += (torch.zeros(B, G, S, R, dtype=dtype), torch.zeros(B, 1, S, d_c, dtype=dtype))
    recorded = []
    names = ("_single_pass_kernel", "_single_pass_reduce")
    saved = {name: getattr(single_pass, name) for name in names}
    try:
        for name, kernel in saved.items():
            setattr(single_pass, name, _Recorder(kernel, recorded))
        single_pass._launch(*tensors, single_pass.single_pass_config(), 0, d_c, 0.1, None, torch.tensor(S), 8)
    finally:
        for name, kernel in saved.items():
            setattr(single_pass, name, kernel)
    compiled = compile_for_h100(recorded[0])
    assert recorded[0].constexprs["VSPLIT"] == 2 and recorded[0].constexprs["BLOCK_M"] == 32
    assert compiled.metadata.shared <= H100_SHARED_MEMORY
    assert "cp.async" in compiled.asm["ptx"]
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([str(cuobjdump), "-res-usage", cubin.name], capture_output=True, text=True).stdout
    assert re.search(r"STACK:0\b", usage), f"register spills: {usage}"
