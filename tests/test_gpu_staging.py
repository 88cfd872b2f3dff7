"""The bitsandbytes staging for the GPU machine (`scripts/stage_gpu.py --bnb-only`, `scripts/gpu_unstage.py`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("bitsandbytes", reason="bitsandbytes is a dev dependency; install `.[dev]`")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import gpu_unstage  # noqa: E402
import stage_gpu  # noqa: E402


def test_bitsandbytes_staged_with_one_cuda_library_and_unpacked(tmp_path):
    stage_gpu.stage_bitsandbytes(tmp_path / "bnb")
    meta = json.loads((tmp_path / "bnb" / "BNB.json").read_text())
    assert meta["cuda"] == stage_gpu.BNB_CUDA and meta["bytes"] < 20_000_000  # one library, not all of them
    site = tmp_path / "site"
    gpu_unstage.install_bitsandbytes(tmp_path / "bnb", site)
    libraries = sorted(p.name for p in (site / "bitsandbytes").glob("libbitsandbytes_*"))
    assert libraries == ["libbitsandbytes_cpu.so", f"libbitsandbytes_cuda{stage_gpu.BNB_CUDA}.so"]
    assert (site / "bitsandbytes" / "__init__.py").is_file()
    assert (site / f"bitsandbytes-{meta['version']}.dist-info" / "METADATA").is_file()
    # idempotent: a second call finds the stamp and leaves the files alone
    (site / "bitsandbytes" / "__init__.py").write_text("# kept")
    gpu_unstage.install_bitsandbytes(tmp_path / "bnb", site)
    assert (site / "bitsandbytes" / "__init__.py").read_text() == "# kept"


def test_corrupt_bitsandbytes_archive_is_refused(tmp_path):
    stage_gpu.stage_bitsandbytes(tmp_path / "bnb")
    archive = tmp_path / "bnb" / "bitsandbytes.tar.xz"
    data = bytearray(archive.read_bytes())
    data[len(data) // 2] ^= 0xFF
    archive.write_bytes(bytes(data))
    with pytest.raises(SystemExit, match="does not match BNB.json"):
        gpu_unstage.install_bitsandbytes(tmp_path / "bnb", tmp_path / "site")
