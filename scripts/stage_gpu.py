"""Prepare ``.stage/`` with everything the GPU machine needs but cannot download.

The device machine reaches no registry and one call carries at most 64 MiB, so the payload is
split over two calls (see ``scripts/README_GPU.md``):

``.stage/part1/`` (at most 45 MB)
    ``smollm2.gguf.xz.part1``: the first bytes of the xz-compressed GGUF, and ``part1.json``
    (its size and SHA-256).
``.stage/part2/`` (about 53 MB)
    ``smollm2.gguf.xz.part2``: the rest of the compressed GGUF;
    ``pydocs_sources.tar.xz``: the Python 3.11 documentation sources (``_sources/...``);
    ``wheels.tar.xz``: the pure-Python wheels the GPU image lacks or has at other versions, each
    re-zipped without compression (still a valid wheel, same RECORD) so that xz compresses them
    as one stream (16 MB of wheels -> about 5 MB);
    ``MANIFEST.json``: SHA-256 of every piece and of the original GGUF.
``.stage/bnb/`` (about 3.5 MB)
    ``bitsandbytes.tar.xz``: the bitsandbytes installed here (``.[dev]``) with only the native
    library for the GPU image's CUDA (13.0) and the CPU one (the wheel holds one per CUDA, ROCm
    and XPU version, 125 MB unpacked), and ``BNB.json`` (version, size, SHA-256).  Carried with
    any call that quantizes (``--quantize 4bit``).
``.stage/corpora/`` (about 10 MB)
    ``<name>.tar.xz`` for each extra training corpus installed here (``linuxdoc``: the kernel
    documentation's reStructuredText; ``pgdocs``: the PostgreSQL manual's HTML, whose text the
    library extracts itself, so both machines tokenise the same text) and each unseen evaluation
    corpus of the retention benchmark (``manpages``, ``gnustandards``, ``fortunes``: only the
    package's own files, as the library reads them, in their raw form: roff, info, fortune), each
    as ``<name>/<relative path>``, and ``CORPORA.json`` (file counts and SHA-256).  Small enough to
    ride with part1.

The downloaded wheels stay in ``.whl/`` (ignored, not carried).  Intermediate files live in
``.stage/build/`` (not carried).  Rerunning reuses what is already there and up to date.

Usage (repo root, with network to PyPI)::

    python scripts/stage_gpu.py [--part1-bytes 44900000] [--force] [--corpora linuxdoc,pgdocs]
    python scripts/stage_gpu.py --corpora-only      # only .stage/corpora (no PyPI, no GGUF)
    python scripts/stage_gpu.py --bnb-only          # only .stage/bnb (no PyPI, no GGUF)
"""

from __future__ import annotations

import argparse
import importlib.metadata
import io
import json
import lzma
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from gpu_unstage import sha256_file  # noqa: E402  (same folder; the GPU side checks with the same function)

from elitekv_demo.corpora import CORPORA, UNSEEN_CORPORA, corpus_files, default_pydocs_root, get_corpus, pydocs_files  # noqa: E402
from elitekv_demo.real_model import GGUF_NAME, smollm2_gguf_path  # noqa: E402

WHEELS = [
    "transformers==5.24.0",
    "peft==0.21.2",
    "trl==1.16.0",
    "gguf==0.19.0",
    "datasets==5.2.0",
    # needed by datasets and absent from the GPU image:
    "dill==0.4.1",
    "multiprocess==0.70.19",
]
"""Wheels to carry.  Everything else they require is on the GPU image at a suitable version:
transformers 5.24 checks at import regex>=2025.10.22, tokenizers>=0.23.1,<0.24 (image 0.23.2),
huggingface-hub>=1.31,<3 (image 1.33), safetensors>=0.8 (image 0.8.0), accelerate>=1.1 (image
1.15), and needs typer (on the image); datasets needs pyarrow, pandas, xxhash, fsspec, requests;
trl needs jinja2, pandas, psutil, pyarrow; gguf needs requests, pyyaml, tqdm (all on the image)."""

PIP_PLATFORM = [
    "--python-version",
    "3.12",
    "--implementation",
    "cp",
    "--platform",
    "manylinux_2_28_x86_64",
    "--platform",
    "manylinux_2_27_x86_64",
    "--platform",
    "manylinux_2_17_x86_64",
    "--platform",
    "manylinux2014_x86_64",
    "--platform",
    "manylinux1_x86_64",
]

PART1_MAX = 45_000_000
"""Limit on everything in part1 (the GGUF piece and part1.json)."""
PART1_GGUF_BYTES = 44_900_000
PART2_SOFT_MAX = 60_000_000
CALL_MAX = 64 * 2**20
"""What one device call carries, the working tree included."""
BNB_CUDA = "130"
"""The CUDA version of the GPU image's torch (2.11+cu130): the bitsandbytes library kept for it."""
EXTRA_CORPORA = tuple(name for name in CORPORA if name != "pydocs") + tuple(UNSEEN_CORPORA)
"""Staged by default: the extra training corpora and the unseen evaluation corpora (retention benchmark)."""


def compress_gguf(gguf: Path, build: Path, gguf_sha: str, force: bool) -> Path:
    """``build/smollm2.gguf.xz`` (xz CLI with all cores if present, else Python's lzma)."""
    out = build / "smollm2.gguf.xz"
    stamp = build / "smollm2.gguf.xz.source"
    if out.is_file() and not force and stamp.is_file() and stamp.read_text().strip() == gguf_sha:
        return out
    tmp = out.with_suffix(".xz.tmp")
    print(f"compressing {gguf} ({gguf.stat().st_size / 1e6:.1f} MB) with xz ...", flush=True)
    if shutil.which("xz"):
        with tmp.open("wb") as f:
            subprocess.run(["xz", "-T0", "-6", "-c", str(gguf)], stdout=f, check=True)
    else:
        with gguf.open("rb") as src, lzma.open(tmp, "wb", preset=6) as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    os.replace(tmp, out)
    stamp.write_text(gguf_sha)
    return out


def split_file(src: Path, first: Path, second: Path, first_bytes: int) -> None:
    with src.open("rb") as f:
        first.write_bytes(f.read(first_bytes))
        second.write_bytes(f.read())


def _tarinfo(name: str, size: int, mode: int = 0o644) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, mode, 0
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info


def pack_pydocs(out: Path) -> int:
    """``out`` = tar.xz of every ``.txt`` under the pydocs root, as ``_sources/<relative path>``."""
    root = default_pydocs_root().resolve()
    files = pydocs_files(root)
    with tarfile.open(out, "w:xz", preset=9) as tar:
        for p in files:
            data = p.read_bytes()
            tar.addfile(_tarinfo("_sources/" + p.relative_to(root).as_posix(), len(data)), io.BytesIO(data))
    return len(files)


def pack_corpus(name: str, out: Path) -> int:
    """``out`` = tar.xz of the corpus's files (``corpus_files(name)``) as ``<name>/<relative path>``."""
    root = get_corpus(name).root().resolve()
    files = corpus_files(name, root)
    with tarfile.open(out, "w:xz", preset=9) as tar:
        for p in files:
            data = p.read_bytes()
            tar.addfile(_tarinfo(f"{name}/{p.relative_to(root).as_posix()}", len(data)), io.BytesIO(data))
    return len(files)


def stage_corpora(folder: Path, names: tuple[str, ...]) -> None:
    """``folder/<name>.tar.xz`` for each installed corpus of ``names`` and ``folder/CORPORA.json``."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.iterdir():
        old.unlink()
    manifest = {}
    for name in names:
        corpus = get_corpus(name)
        if not corpus.root().is_dir():
            print(f"skipping {name}: {corpus.install_hint(corpus.root())}", file=sys.stderr)
            continue
        out = folder / f"{name}.tar.xz"
        print(f"packing {name} from {corpus.root()} ...", flush=True)
        try:
            n = pack_corpus(name, out)
        except FileNotFoundError as err:  # e.g. an unseen corpus's package is not installed (shared folder exists)
            out.unlink(missing_ok=True)
            print(f"skipping {name}: {err}", file=sys.stderr)
            continue
        manifest[name] = {"file": out.name, "files": n, "bytes": out.stat().st_size, "sha256": sha256_file(out)}
        manifest[name]["env"] = corpus.env
    (folder / "CORPORA.json").write_text(json.dumps(manifest, indent=1))


def stage_bitsandbytes(folder: Path, cuda: str = BNB_CUDA) -> None:
    """``folder/bitsandbytes.tar.xz`` (the installed bitsandbytes package and its dist-info, native libraries
    other than the CPU one and CUDA ``cuda``'s left out) and ``folder/BNB.json``."""
    dist = importlib.metadata.distribution("bitsandbytes")
    site = Path(dist.locate_file(""))
    keep = {"libbitsandbytes_cpu.so", f"libbitsandbytes_cuda{cuda}.so"}
    if not (site / "bitsandbytes" / f"libbitsandbytes_cuda{cuda}.so").is_file():
        raise SystemExit(f"bitsandbytes {dist.version} in {site} has no CUDA {cuda} library: install a wheel with it")
    files = sorted(
        path
        for top in (site / "bitsandbytes", site / f"bitsandbytes-{dist.version}.dist-info")
        for path in top.rglob("*")
        if path.is_file()
        and "__pycache__" not in path.parts
        and not (path.name.startswith("libbitsandbytes_") and path.name not in keep)
    )
    folder.mkdir(parents=True, exist_ok=True)
    archive = folder / "bitsandbytes.tar.xz"
    with tarfile.open(archive, "w:xz", preset=9) as tar:
        for path in files:
            tar.add(path, arcname=str(path.relative_to(site)), filter=_normalise)
    meta = {
        "file": archive.name,
        "version": dist.version,
        "cuda": cuda,
        "files": len(files),
        "bytes": archive.stat().st_size,
        "sha256": sha256_file(archive),
    }
    (folder / "BNB.json").write_text(json.dumps(meta, indent=1))


def report_sizes(folders: list[Path], limits: dict[Path, int]) -> None:
    for d in folders:
        total = sum(p.stat().st_size for p in d.iterdir())
        print(f"{d.relative_to(REPO) if d.is_relative_to(REPO) else d}: {total / 1e6:.1f} MB")
        for p in sorted(d.iterdir()):
            print(f"    {p.name:28s} {p.stat().st_size / 1e6:8.2f} MB")
        if total > limits[d]:
            print(f"WARNING: {d.name} is {total / 1e6:.1f} MB, over {limits[d] / 1e6:.0f} MB", file=sys.stderr)


def download_wheels(whl_dir: Path) -> list[Path]:
    """Download each pinned wheel into ``whl_dir`` (pip's platform flags for the GPU image)."""
    whl_dir.mkdir(exist_ok=True)
    paths = []
    for spec in WHEELS:
        name, version = spec.split("==")
        pattern = f"{name.replace('-', '_')}-{version}-*.whl"
        found = sorted(whl_dir.glob(pattern))
        if not found:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", *PIP_PLATFORM]
            subprocess.run([*cmd, "-d", str(whl_dir), spec], check=True)
            found = sorted(whl_dir.glob(pattern))
        if len(found) != 1:
            raise RuntimeError(f"expected one wheel for {spec} in {whl_dir}, found {found}")
        paths.append(found[0])
    return paths


def rezip_stored(wheel: Path, out: Path) -> None:
    """Copy a wheel with every member stored uncompressed (contents and RECORD unchanged)."""
    with zipfile.ZipFile(wheel) as zin, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info)
            info.compress_type = zipfile.ZIP_STORED
            zout.writestr(info, data)


def _normalise(ti: tarfile.TarInfo) -> tarfile.TarInfo:
    ti.mtime, ti.uid, ti.gid, ti.uname, ti.gname = 0, 0, 0, "root", "root"
    return ti


def pack_wheels(wheels: list[Path], build: Path, out: Path) -> None:
    """``out`` = tar.xz of the wheels, each re-zipped uncompressed (see :func:`rezip_stored`)."""
    with tempfile.TemporaryDirectory(dir=build) as tmp, tarfile.open(out, "w:xz", preset=9) as tar:
        for w in wheels:
            target = Path(tmp) / w.name
            rezip_stored(w, target)
            tar.add(target, arcname=w.name, filter=_normalise)


def main() -> None:
    ap = argparse.ArgumentParser(description="Prepare .stage/ for the GPU machine.")
    ap.add_argument("--stage", type=Path, default=REPO / ".stage")
    ap.add_argument("--whl", type=Path, default=REPO / ".whl")
    ap.add_argument("--part1-bytes", type=int, default=PART1_GGUF_BYTES)
    ap.add_argument("--force", action="store_true", help="recompress the GGUF even if up to date")
    ap.add_argument(
        "--corpora",
        default=",".join(EXTRA_CORPORA),
        help=f"extra corpora for .stage/corpora (default {','.join(EXTRA_CORPORA)}; 'none' for none)",
    )
    ap.add_argument("--corpora-only", action="store_true", help="build only .stage/corpora")
    ap.add_argument("--bnb-only", action="store_true", help="build only .stage/bnb (bitsandbytes for the GPU image)")
    args = ap.parse_args()
    if args.part1_bytes > PART1_MAX:
        raise SystemExit(f"--part1-bytes must be at most {PART1_MAX}")

    stage: Path = args.stage
    if args.bnb_only:
        stage_bitsandbytes(stage / "bnb")
        report_sizes([stage / "bnb"], {stage / "bnb": CALL_MAX})
        return
    corpora_dir = stage / "corpora"
    names = () if args.corpora == "none" else tuple(n.strip() for n in args.corpora.split(",") if n.strip())
    for name in names:
        get_corpus(name)  # unknown names: ValueError listing the known ones
    if "pydocs" in names:
        raise SystemExit("--corpora: the Python docs travel in part2 already; name only extra corpora")
    stage_corpora(corpora_dir, names)
    if args.corpora_only:
        report_sizes([corpora_dir], {corpora_dir: CALL_MAX})
        return
    build, part1, part2 = stage / "build", stage / "part1", stage / "part2"
    for d in (build, part1, part2):
        d.mkdir(parents=True, exist_ok=True)
    for d in (part1, part2):
        for old in d.iterdir():
            old.unlink()

    gguf = smollm2_gguf_path()
    gguf_sha = sha256_file(gguf)
    xz = compress_gguf(gguf, build, gguf_sha, args.force)
    p1, p2 = part1 / "smollm2.gguf.xz.part1", part2 / "smollm2.gguf.xz.part2"
    split_file(xz, p1, p2, args.part1_bytes)
    (part1 / "part1.json").write_text(
        json.dumps({"file": p1.name, "bytes": p1.stat().st_size, "sha256": sha256_file(p1)}, indent=1)
    )

    n_docs = pack_pydocs(part2 / "pydocs_sources.tar.xz")
    wheels = download_wheels(args.whl)
    pack_wheels(wheels, build, part2 / "wheels.tar.xz")

    manifest = {
        "gguf_name": GGUF_NAME,
        "gguf_bytes": gguf.stat().st_size,
        "gguf_sha256": gguf_sha,
        "gguf_xz_sha256": sha256_file(xz),
        "parts": [
            {"dir": "part1", "file": p1.name, "bytes": p1.stat().st_size, "sha256": sha256_file(p1)},
            {"dir": "part2", "file": p2.name, "bytes": p2.stat().st_size, "sha256": sha256_file(p2)},
        ],
        "pydocs_files": n_docs,
        "pydocs_sha256": sha256_file(part2 / "pydocs_sources.tar.xz"),
        "wheels": [w.name for w in wheels],
        "wheels_sha256": sha256_file(part2 / "wheels.tar.xz"),
    }
    (part2 / "MANIFEST.json").write_text(json.dumps(manifest, indent=1))

    report_sizes([part1, part2, corpora_dir], {part1: PART1_MAX, part2: PART2_SOFT_MAX, corpora_dir: CALL_MAX})
    with_corpora = sum(p.stat().st_size for d in (part1, corpora_dir) for p in d.iterdir())
    if with_corpora > PART2_SOFT_MAX:
        print(
            f"part1 + corpora = {with_corpora / 1e6:.1f} MB: carry .stage/corpora in a call of its own",
            file=sys.stderr,
        )


if __name__ == "__main__":
    main()
