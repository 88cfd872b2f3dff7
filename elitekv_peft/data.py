"""Real and synthetic token data for calibration, uptraining and evaluation.

Real text: the reStructuredText sources of the Python 3.11 documentation, installed by Debian's
``python3.11-doc`` package under ``/usr/share/doc/python3.11/html/_sources/`` (497 ``.txt`` files,
about 12 MB, about 2.8 million SmolLM2 tokens).  The folder can be overridden with the environment
variable ``ELITEKV_PYDOCS_DIR`` (used on the GPU machine, where the text is unpacked by hand).

The split is fixed and by file, so evaluation text is never trained on:

* every file gets a key, its path relative to the corpus root in POSIX form
  (e.g. ``"library/os.rst.txt"``);
* ``u = int(sha1("elitekv-split-v1:" + key)[:8 bytes]) / 2**64`` is a number in ``[0, 1)`` that
  depends on nothing but the key;
* ``u < 0.10`` puts the file in ``"eval"``, every other file is in ``"train"``;
* ``0.10 <= u < 0.20`` also puts a train file in ``"calib"`` (a subset of ``"train"``, used for
  RoPE-dimension selection and low-rank initialisation).

Debian's ``debian-reference-en`` is reserved and must never be added to any set built here.

Tokenised streams are cached on disk (``$ELITEKV_CACHE`` or ``~/.cache/elitekv_peft``), keyed by
the tokenizer's fingerprint and vocabulary size, the files' contents and the split name, since
tokenising 12 MB on two cores takes a while.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    import datasets

PYDOCS_ROOT = Path("/usr/share/doc/python3.11/html/_sources")
"""Where Debian's ``python3.11-doc`` puts the documentation sources."""

PYDOCS_ENV = "ELITEKV_PYDOCS_DIR"
"""Environment variable that overrides :data:`PYDOCS_ROOT`."""

CACHE_ENV = "ELITEKV_CACHE"
"""Environment variable that overrides the cache folder ``~/.cache/elitekv_peft``."""

EVAL_FRACTION = 0.10
"""Share of files (by hash, not by size) in the ``"eval"`` split."""

CALIB_FRACTION = 0.10
"""Share of all files (taken from ``"train"``) that also form the ``"calib"`` split."""

_SPLIT_SALT = "elitekv-split-v1:"
_TOKEN_CACHE_VERSION = 1


def cache_root() -> Path:
    """Return the folder for cached models and token streams (not created here).

    ``$ELITEKV_CACHE`` if set, else ``~/.cache/elitekv_peft``.
    """
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "elitekv_peft"


def default_pydocs_root() -> Path:
    """Return ``$ELITEKV_PYDOCS_DIR`` if set, else :data:`PYDOCS_ROOT`."""
    env = os.environ.get(PYDOCS_ENV)
    return Path(env).expanduser() if env else PYDOCS_ROOT


def pydocs_files(root: str | os.PathLike[str] | None = None) -> list[Path]:
    """List the ``.txt`` files of the Python documentation sources, sorted by relative path.

    Args:
        root: the ``_sources`` folder; default :func:`default_pydocs_root`.

    Returns:
        Absolute paths, sorted by their POSIX path relative to ``root`` (497 files for Debian 12's
        ``python3.11-doc``).

    Raises:
        FileNotFoundError: the folder is missing or holds no ``.txt`` file.
    """
    root_path = Path(root) if root is not None else default_pydocs_root()
    hint = (
        f"the Python documentation sources are not at {root_path}: install them with "
        f"`apt-get install -y python3.11-doc`, or point {PYDOCS_ENV} at a folder holding them"
    )
    if not root_path.is_dir():
        raise FileNotFoundError(hint)
    root_path = root_path.resolve()
    files = sorted(root_path.rglob("*.txt"), key=lambda p: p.relative_to(root_path).as_posix())
    files = [p for p in files if p.is_file()]
    if not files:
        raise FileNotFoundError(hint)
    return files


def _split_root(files: Sequence[Path], root: str | os.PathLike[str] | None) -> Path:
    if root is not None:
        return Path(root).resolve()
    default = default_pydocs_root()
    if default.is_dir():
        default = default.resolve()
        if all(p.is_relative_to(default) for p in files):
            return default
    return Path(os.path.commonpath([str(p.parent) for p in files]))


def split_key(path: str | os.PathLike[str], root: str | os.PathLike[str]) -> str:
    """Return the key a file is split by: its POSIX path relative to ``root``."""
    return Path(path).resolve().relative_to(Path(root).resolve()).as_posix()


def split_unit(key: str) -> float:
    """Map a split key to a number in ``[0, 1)`` by SHA-1 (stable across runs and machines)."""
    digest = hashlib.sha1((_SPLIT_SALT + key).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_files(
    files: Iterable[str | os.PathLike[str]],
    root: str | os.PathLike[str] | None = None,
    *,
    eval_fraction: float = EVAL_FRACTION,
    calib_fraction: float = CALIB_FRACTION,
) -> dict[str, list[Path]]:
    """Split files into ``"train"``, ``"eval"`` and ``"calib"`` by a hash of their relative path.

    A file with ``u = split_unit(key)`` is in ``"eval"`` if ``u < eval_fraction``, otherwise in
    ``"train"``; a train file with ``u < eval_fraction + calib_fraction`` is also in ``"calib"``.
    The assignment of a file never depends on which other files are passed, as long as ``root`` is
    the same.

    Args:
        files: the corpus files (e.g. :func:`pydocs_files`).
        root: the folder keys are relative to.  Default: the pydocs root if every file lies under
            it, else the deepest folder holding them all (pass ``root`` for other corpora, so that
            a subset of files keeps its assignment).
        eval_fraction: expected share of files in ``"eval"``.
        calib_fraction: expected share of all files that are also in ``"calib"``.

    Returns:
        ``{"train": [...], "eval": [...], "calib": [...]}``, each list in input order;
        ``"calib"`` is a subset of ``"train"``, ``"train"`` and ``"eval"`` are disjoint.
    """
    if not 0.0 <= eval_fraction <= 1.0 or not 0.0 <= calib_fraction <= 1.0 - eval_fraction:
        raise ValueError(f"bad fractions: eval {eval_fraction}, calib {calib_fraction}")
    paths = [Path(f).resolve() for f in files]
    out: dict[str, list[Path]] = {"train": [], "eval": [], "calib": []}
    if not paths:
        return out
    base = _split_root(paths, root)
    for p in paths:
        u = split_unit(split_key(p, base))
        if u < eval_fraction:
            out["eval"].append(p)
        else:
            out["train"].append(p)
            if u < eval_fraction + calib_fraction:
                out["calib"].append(p)
    return out


def _tokenizer_fingerprint(tokenizer: Any) -> str:
    """SHA-1 of the tokenizer's full serialisation (fast tokenizers) or of its vocabulary."""
    h = hashlib.sha1()
    h.update(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        h.update(backend.to_str().encode("utf-8"))
    else:
        for tok, idx in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
            h.update(f"{idx}\t{tok}\n".encode())
    return h.hexdigest()


def _read_text(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def _separator_id(tokenizer: Any) -> int:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id to separate files with")
    return int(eos)


def _atomic_torch_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def token_stream(
    tokenizer: Any,
    files: Sequence[str | os.PathLike[str]],
    *,
    split: str | None = None,
    cache: bool = True,
    batch_files: int = 64,
) -> torch.Tensor:
    """Tokenise the files' texts into one stream, each file followed by the EOS token.

    No BOS or other special tokens are added.  The result is cached on disk under
    ``cache_root()/tokens/`` keyed by the tokenizer (fingerprint and vocabulary size), the separator
    id and the files' contents; ``split`` only names the cache file.

    Args:
        tokenizer: a Hugging Face tokenizer with ``eos_token_id``.
        files: text files, read as UTF-8 (undecodable bytes replaced), in the given order.
        split: a name for the cache file (e.g. ``"eval"``).
        cache: read and write the on-disk cache.
        batch_files: files given to the tokenizer per call.

    Returns:
        int64 tensor ``[T]`` with ``T`` = total tokens of all files + ``len(files)`` separators.
    """
    paths = [Path(f) for f in files]
    sep = _separator_id(tokenizer)
    vocab = len(tokenizer)
    key = hashlib.sha1()
    key.update(f"v{_TOKEN_CACHE_VERSION}|{_tokenizer_fingerprint(tokenizer)}|{vocab}|{sep}".encode())
    for p in paths:
        key.update(hashlib.sha1(p.read_bytes()).digest())
    digest = key.hexdigest()[:16]
    name = f"{split or 'files'}-n{len(paths)}-v{vocab}-{digest}.pt"
    cache_file = cache_root() / "tokens" / name
    if cache and cache_file.is_file():
        return torch.load(cache_file, weights_only=True)["tokens"].long()

    pieces: list[torch.Tensor] = []
    sep_t = torch.tensor([sep], dtype=torch.int32)
    for start in range(0, len(paths), batch_files):
        texts = [_read_text(p) for p in paths[start : start + batch_files]]
        enc = tokenizer(texts, add_special_tokens=False, return_attention_mask=False, verbose=False)
        for ids in enc["input_ids"]:
            pieces.append(torch.tensor(ids, dtype=torch.int32))
            pieces.append(sep_t)
    stream = torch.cat(pieces) if pieces else torch.empty(0, dtype=torch.int32)
    if cache:
        _atomic_torch_save({"tokens": stream, "files": len(paths), "vocab": vocab}, cache_file)
    return stream.long()


def windows_from_stream(stream: torch.Tensor, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """Cut a token stream ``[T]`` into non-overlapping windows ``[N, seq_len]``.

    The last ``T % seq_len`` tokens are dropped.  With ``max_windows`` smaller than the number of
    windows ``W = T // seq_len``, windows ``round(linspace(0, W - 1, max_windows))`` are kept, so a
    small evaluation set still spans the whole stream (all files) rather than its first files.
    """
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    n = stream.numel() // seq_len
    win = stream[: n * seq_len].reshape(n, seq_len).long()
    if max_windows is not None and max_windows < n:
        if max_windows <= 0:
            return win[:0]
        idx = torch.linspace(0, n - 1, max_windows, dtype=torch.float64).round().long()
        win = win[idx]
    return win.contiguous()


def token_windows(
    tokenizer: Any,
    files: Sequence[str | os.PathLike[str]],
    seq_len: int,
    max_windows: int | None = None,
    *,
    split: str | None = None,
    cache: bool = True,
) -> torch.Tensor:
    """Tokenise files (EOS between them) and cut the stream into non-overlapping windows.

    Args:
        tokenizer: a Hugging Face tokenizer with ``eos_token_id``.
        files: text files in the order they are concatenated.
        seq_len: tokens per window.
        max_windows: keep at most this many windows, evenly spaced over the stream.
        split: name used in the cache file (e.g. ``"train"``).
        cache: use the on-disk token cache (see :func:`token_stream`).

    Returns:
        LongTensor ``[N, seq_len]``; ``N = min(max_windows, T // seq_len)``.
    """
    stream = token_stream(tokenizer, files, split=split, cache=cache)
    return windows_from_stream(stream, seq_len, max_windows)


def synthetic_windows(vocab_size: int, n: int, seq_len: int, seed: int = 0, *, branching: int = 4) -> torch.Tensor:
    """Sample token sequences from a small random Markov chain (learnable, unlike uniform noise).

    Each token ``v`` has ``branching`` random successors ``succ[v]`` (repeats allowed) with random
    probabilities
    ``p[v]`` (a sharp Dirichlet-like draw), so the entropy rate is at most ``log(branching)``
    nats per token, far below ``log(vocab_size)``: a tiny model's loss can go down quickly.
    The chain itself and the samples are both fixed by ``seed``.

    Args:
        vocab_size: tokens are in ``[0, vocab_size)``.
        n: number of sequences.
        seq_len: tokens per sequence.
        seed: seed of a private ``torch.Generator`` (the global RNG is untouched).
        branching: successors per token (at least 1).

    Returns:
        LongTensor ``[n, seq_len]``.
    """
    if vocab_size < 2 or n < 0 or seq_len < 1 or branching < 1:
        raise ValueError(f"bad arguments: vocab_size={vocab_size} n={n} seq_len={seq_len} branching={branching}")
    g = torch.Generator().manual_seed(seed)
    k = min(branching, vocab_size)
    succ = torch.randint(0, vocab_size, (vocab_size, k), generator=g)  # [V, k] successors
    weights = torch.rand(vocab_size, k, generator=g) ** 3 + 1e-3  # [V, k], uneven
    probs = weights / weights.sum(dim=1, keepdim=True)
    out = torch.empty(n, seq_len, dtype=torch.long)
    if n == 0:
        return out
    cur = torch.randint(0, vocab_size, (n,), generator=g)
    out[:, 0] = cur
    for t in range(1, seq_len):
        choice = torch.multinomial(probs[cur], 1, generator=g).squeeze(1)  # [n]
        cur = succ[cur, choice]
        out[:, t] = cur
    return out


def lm_dataset(windows: torch.Tensor) -> datasets.Dataset:
    """Wrap windows ``[N, T]`` as a ``datasets.Dataset`` for the Hugging Face Trainer.

    Columns ``input_ids`` and ``labels`` (equal; the model shifts labels itself), each a list of
    ``T`` int64 per row.  ``transformers.default_data_collator`` stacks them into ``[B, T]``.
    """
    import datasets

    if windows.dim() != 2:
        raise ValueError(f"windows must be [N, T], got shape {tuple(windows.shape)}")
    arr = windows.detach().cpu().long().numpy()
    return datasets.Dataset.from_dict({"input_ids": arr, "labels": arr.copy()})
