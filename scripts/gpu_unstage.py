"""GPU-machine side of ``scripts/stage_gpu.py``: keep, join, verify and unpack the staged pieces.

Run by ``scripts/gpu_env.sh`` from the repo root; uses only the standard library (the image's
``python3`` may lack ``xz``).  Every step is idempotent, so any later call on a warm machine can
source ``gpu_env.sh`` again at no cost.

1. ``.stage/part1/`` in the tree (call 1): verify it and copy it to ``$HOLD/part1``.
2. ``.stage/part2/`` in the tree (call 2), GGUF not yet in ``$SMOLLM2_DIR``: join
   ``$HOLD/part1`` + part2, xz-decompress, check the SHA-256 against ``MANIFEST.json``, and move
   the GGUF into place.
3. Unpack ``pydocs_sources.tar.xz`` into ``$PYDOCS_PARENT/_sources``.
4. Unpack ``wheels.tar.xz`` and ``pip install --no-index --no-deps --target $SITE`` them.
5. ``.stage/corpora/`` in the tree (with call 1, or a call of its own): unpack each
   ``<name>.tar.xz`` into ``$CORPORA_PARENT/<name>`` (the folder ``gpu_env.sh`` points
   ``ELITEKV_LINUXDOC_DIR`` / ``ELITEKV_PGDOCS_DIR`` at).
6. ``.stage/bnb/`` in the tree (any call): unpack ``bitsandbytes.tar.xz`` into ``$SITE``.

Paths come from the environment (defaults for the GPU machine): ``ELITEKV_HOLD`` (/root/stage),
``ELITEKV_SMOLLM2_DIR`` (/root/smollm2), ``ELITEKV_PYDOCS_PARENT`` (/root/pydocs),
``ELITEKV_CORPORA_PARENT`` (/root/corpora),
``ELITEKV_SITE`` (/tmp/site), ``ELITEKV_PIP_EXTRA`` (extra pip arguments, for tests elsewhere).
Exit status 0 when everything present is in place, 1 on a missing or corrupt piece.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _env_path(name: str, default: str) -> Path:
    return Path(os.environ.get(name) or default)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def log(msg: str) -> None:
    print(f"[gpu_unstage] {msg}", flush=True)


def matches(path: Path, meta: dict) -> bool:
    """Whether the file ``path`` has the size and SHA-256 that the manifest entry ``meta`` records."""
    return path.stat().st_size == meta["bytes"] and sha256_file(path) == meta["sha256"]


def check_staged(path: Path, meta: dict, manifest: str) -> None:
    """Exit unless the staged file ``path`` matches its ``manifest`` entry ``meta`` (size and SHA-256)."""
    if not matches(path, meta):
        raise SystemExit(f"[gpu_unstage] {path} does not match {manifest} (size or SHA-256)")


def keep_part1(stage: Path, hold: Path) -> None:
    src = stage / "part1"
    meta = json.loads((src / "part1.json").read_text())
    kept = hold / "part1" / meta["file"]
    if kept.is_file() and matches(kept, meta):
        log(f"part1 already kept in {kept.parent}")
        return
    if sha256_file(src / meta["file"]) != meta["sha256"]:
        raise SystemExit(f"[gpu_unstage] {src / meta['file']} is corrupt (SHA-256 mismatch)")
    kept.parent.mkdir(parents=True, exist_ok=True)
    for name in (meta["file"], "part1.json"):
        shutil.copyfile(src / name, kept.parent / name)
    log(f"kept part1 in {kept.parent} ({meta['bytes'] / 1e6:.1f} MB)")


def join_gguf(part2: Path, hold: Path, manifest: dict, smollm2_dir: Path) -> bool:
    target = smollm2_dir / manifest["gguf_name"]
    if target.is_file() and target.stat().st_size == manifest["gguf_bytes"]:
        log(f"GGUF already in place: {target}")
        return True
    p1_meta, p2_meta = manifest["parts"]
    first, second = hold / "part1" / p1_meta["file"], part2 / p2_meta["file"]
    if not first.is_file():
        log(
            f"part1 is not at {first}: this machine did not get call 1 (it may have been given back)."
            " Run call 1 (carry .stage/part1) and then this call again, back to back."
        )
        return False
    for path, meta in ((first, p1_meta), (second, p2_meta)):
        check_staged(path, meta, "MANIFEST.json")
    smollm2_dir.mkdir(parents=True, exist_ok=True)
    decomp = lzma.LZMADecompressor()
    h = hashlib.sha256()
    fd, tmp_name = tempfile.mkstemp(dir=smollm2_dir, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            for piece in (first, second):
                with piece.open("rb") as f:
                    for block in iter(lambda f=f: f.read(1 << 22), b""):
                        data = decomp.decompress(block)
                        h.update(data)
                        out.write(data)
        if not decomp.eof or h.hexdigest() != manifest["gguf_sha256"]:
            raise SystemExit("[gpu_unstage] the joined GGUF does not match MANIFEST.json's SHA-256")
        os.replace(tmp_name, target)
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
    log(f"joined and verified {target} ({manifest['gguf_bytes'] / 1e6:.1f} MB)")
    return True


def unpack_pydocs(part2: Path, manifest: dict, parent: Path) -> None:
    stamp = parent / ".elitekv_sha256"
    if stamp.is_file() and stamp.read_text().strip() == manifest["pydocs_sha256"]:
        log(f"pydocs already in {parent / '_sources'}")
        return
    shutil.rmtree(parent / "_sources", ignore_errors=True)
    parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(part2 / "pydocs_sources.tar.xz", "r:xz") as tar:
        tar.extractall(parent, filter="data")
    n = sum(1 for _ in (parent / "_sources").rglob("*.txt"))
    if n != manifest["pydocs_files"]:
        raise SystemExit(f"[gpu_unstage] unpacked {n} pydocs files, expected {manifest['pydocs_files']}")
    stamp.write_text(manifest["pydocs_sha256"])
    log(f"unpacked {n} pydocs files into {parent / '_sources'}")


def extract_within(archive: Path, dest: Path, prefixes: tuple[str, ...], what: str) -> None:
    """Unpack the tar.xz ``archive`` into ``dest``, refusing it if any member's path starts with none of
    ``prefixes`` (``what`` names them in the error)."""
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "r:xz") as tar:
        members = tar.getmembers()
        if any(not m.name.startswith(prefixes) for m in members):
            raise SystemExit(f"[gpu_unstage] {archive} holds files outside {what}")
        tar.extractall(dest, members=members, filter="data")


def unpack_corpora(folder: Path, parent: Path) -> None:
    """Unpack each corpus listed in ``folder/CORPORA.json`` into ``parent/<name>`` (checked, idempotent)."""
    manifest = json.loads((folder / "CORPORA.json").read_text())
    for name, meta in manifest.items():
        target = parent / name
        stamp = parent / f".{name}.elitekv_sha256"
        if stamp.is_file() and stamp.read_text().strip() == meta["sha256"] and target.is_dir():
            log(f"{name} already in {target}")
            continue
        archive = folder / meta["file"]
        check_staged(archive, meta, "CORPORA.json")
        shutil.rmtree(target, ignore_errors=True)
        extract_within(archive, parent, (f"{name}/",), f"{name}/")
        n = sum(1 for p in target.rglob("*") if p.is_file())
        if n != meta["files"]:
            raise SystemExit(f"[gpu_unstage] unpacked {n} {name} files, expected {meta['files']}")
        stamp.write_text(meta["sha256"])
        log(f"unpacked {n} {name} files into {target}")


def install_wheels(part2: Path, manifest: dict, site: Path) -> None:
    stamp = site / ".elitekv_wheels_sha256"
    if stamp.is_file() and stamp.read_text().strip() == manifest["wheels_sha256"]:
        log(f"wheels already installed in {site}")
        return
    with tempfile.TemporaryDirectory(prefix="elitekv_whl_") as tmp:
        with tarfile.open(part2 / "wheels.tar.xz", "r:xz") as tar:
            tar.extractall(tmp, filter="data")
        wheels = sorted(str(p) for p in Path(tmp).glob("*.whl"))
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
        cmd += ["--no-cache-dir", "--upgrade", "--target", str(site)]
        cmd += shlex.split(os.environ.get("ELITEKV_PIP_EXTRA", ""))
        subprocess.run([*cmd, *wheels], check=True)
    stamp.write_text(manifest["wheels_sha256"])
    log(f"installed {len(wheels)} wheels into {site}")


def install_bitsandbytes(folder: Path, site: Path) -> None:
    """Unpack the staged bitsandbytes (``folder/BNB.json``) into ``site`` (checked, idempotent)."""
    meta = json.loads((folder / "BNB.json").read_text())
    stamp = site / ".elitekv_bnb_sha256"
    if stamp.is_file() and stamp.read_text().strip() == meta["sha256"]:
        log(f"bitsandbytes already in {site}")
        return
    archive = folder / meta["file"]
    check_staged(archive, meta, "BNB.json")
    extract_within(archive, site, ("bitsandbytes/", "bitsandbytes-"), "bitsandbytes")
    stamp.write_text(meta["sha256"])
    log(f"unpacked bitsandbytes {meta['version']} (CUDA {meta['cuda']}) into {site}")


def main() -> int:
    stage = Path(".stage")
    hold = _env_path("ELITEKV_HOLD", "/root/stage")
    smollm2_dir = _env_path("ELITEKV_SMOLLM2_DIR", "/root/smollm2")
    pydocs_parent = _env_path("ELITEKV_PYDOCS_PARENT", "/root/pydocs")
    site = _env_path("ELITEKV_SITE", "/tmp/site")
    corpora_parent = _env_path("ELITEKV_CORPORA_PARENT", "/root/corpora")
    ok = True
    if (stage / "corpora" / "CORPORA.json").is_file():
        unpack_corpora(stage / "corpora", corpora_parent)
    if (stage / "bnb" / "BNB.json").is_file():
        install_bitsandbytes(stage / "bnb", site)
    if (stage / "part1" / "part1.json").is_file():
        keep_part1(stage, hold)
    part2 = stage / "part2"
    if (part2 / "MANIFEST.json").is_file():
        manifest = json.loads((part2 / "MANIFEST.json").read_text())
        ok = join_gguf(part2, hold, manifest, smollm2_dir)
        unpack_pydocs(part2, manifest, pydocs_parent)
        install_wheels(part2, manifest, site)
    elif not (smollm2_dir / GGUF_NAME).is_file() and not (stage / "part1").is_dir():
        log("no .stage/part1 or .stage/part2 carried and no GGUF in place: see scripts/README_GPU.md")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
