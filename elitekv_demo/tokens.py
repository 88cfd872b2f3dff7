"""Corpus files to token windows: tokenised with `datasets.Dataset.map`, packed with TRL's `trl.pack_dataset`.

The rule every committed number was measured with:

* each file's text (:func:`elitekv_demo.text_formats.read_text` in the corpus's ``text_format``) is tokenised
  without special tokens and followed by the tokenizer's EOS token;
* the files, in the order given, make one stream;
* the stream is cut into non-overlapping windows of ``seq_len`` tokens (TRL's ``"wrapped"`` packing over the whole
  stream), the last ``T % seq_len`` tokens dropped;
* a limited number of windows is taken evenly spaced, ``round(linspace(0, W - 1, max_windows))``, so a small
  evaluation set still spans all the files.

Tokenising tens of megabytes on a few cores takes a while, so the per-file tokens are kept in a `datasets` Arrow
cache file under ``cache_root()/tokens/`` (``$ELITEKV_CACHE`` or ``~/.cache/elitekv_peft``). Its name holds a
fingerprint of the tokenizer (its serialisation and vocabulary size), the separator, the text format (and its
extractor's version, :data:`elitekv_demo.text_formats.FORMAT_VERSIONS`) and every file's bytes: another
tokenizer, format or text gives another file.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .corpora import cache_root
from .text_formats import FORMAT_VERSIONS, TEXT_FORMATS, read_text

if TYPE_CHECKING:
    import datasets

TOKEN_CACHE_VERSION = 2
"""Part of the cache key; version 1 was a ``torch.save`` file per stream (those files are no longer read)."""

BATCH_FILES = 64
"""Files given to the tokenizer per call (one `Dataset.map` batch)."""


def tokenizer_fingerprint(tokenizer: Any) -> str:
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


def separator_id(tokenizer: Any) -> int:
    """The token put after every file: the tokenizer's EOS (``ValueError`` naming the fix without one)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id to separate files with: give a tokenizer that has one")
    return int(eos)


def token_cache_key(tokenizer: Any, files: Sequence[Path], text_format: str) -> str:
    """The fingerprint of a tokenisation: tokenizer, vocabulary size, separator, text format, the files' bytes."""
    key = hashlib.sha1()
    version = FORMAT_VERSIONS.get(text_format, 0)
    key.update(f"v{TOKEN_CACHE_VERSION}|{tokenizer_fingerprint(tokenizer)}|{len(tokenizer)}".encode())
    key.update(f"|{separator_id(tokenizer)}|{text_format}{version}".encode())
    for p in files:
        key.update(hashlib.sha1(p.read_bytes()).digest())
    return key.hexdigest()[:16]


def document_tokens(
    tokenizer: Any,
    files: Sequence[str | os.PathLike[str]],
    *,
    split: str | None = None,
    cache: bool = True,
    text_format: str = "plain",
) -> datasets.Dataset:
    """One row per file, in the given order: ``input_ids`` (int32) = the file's tokens, then EOS.

    Tokenised with `datasets.Dataset.map` (:data:`BATCH_FILES` files per batch, no special tokens added). With
    ``cache``, the result is the Arrow file ``cache_root()/tokens/<split>-n<files>-v<vocab>-<key>.arrow``
    (:func:`token_cache_key`), read back without tokenising when it exists; without, everything stays in memory.

    Args:
        tokenizer: a Hugging Face tokenizer with ``eos_token_id``.
        files: the files, read with :func:`~elitekv_demo.text_formats.read_text`.
        split: a name for the cache file (e.g. ``"eval"``).
        cache: read and write the cache file.
        text_format: one of :data:`~elitekv_demo.text_formats.TEXT_FORMATS`.
    """
    import datasets

    if text_format not in TEXT_FORMATS:
        raise ValueError(f"text_format={text_format!r}: choose one of {TEXT_FORMATS}")
    paths = [Path(f) for f in files]
    sep = separator_id(tokenizer)
    key = token_cache_key(tokenizer, paths, text_format)

    def encode(batch: dict[str, list[str]]) -> dict[str, list[list[int]]]:
        texts = [read_text(p, text_format) for p in batch["path"]]
        ids = tokenizer(texts, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
        return {"input_ids": [row + [sep] for row in ids]}

    table = datasets.Dataset.from_dict(
        {"path": [str(p) for p in paths]}, features=datasets.Features({"path": datasets.Value("string")})
    )
    where: dict[str, Any] = {"keep_in_memory": True}
    if cache:
        folder = cache_root() / "tokens"
        folder.mkdir(parents=True, exist_ok=True)
        name = f"{split or 'files'}-n{len(paths)}-v{len(tokenizer)}-{key}.arrow"
        where = {"cache_file_name": str(folder / name), "load_from_cache_file": True}
    return table.map(
        encode,
        batched=True,
        batch_size=BATCH_FILES,
        remove_columns=["path"],
        features=datasets.Features({"input_ids": datasets.List(datasets.Value("int32"))}),
        new_fingerprint=key,
        desc=f"tokenising {split or 'files'}",
        **where,
    )


def token_stream(
    tokenizer: Any,
    files: Sequence[str | os.PathLike[str]],
    *,
    split: str | None = None,
    cache: bool = True,
    text_format: str = "plain",
) -> torch.Tensor:
    """The files' tokens as one stream (:func:`document_tokens`, rows concatenated).

    Returns:
        int64 tensor ``[T]`` with ``T`` = total tokens of all files + ``len(files)`` separators.
    """
    return flat_ids(document_tokens(tokenizer, files, split=split, cache=cache, text_format=text_format))


def flat_ids(rows: datasets.Dataset) -> torch.Tensor:
    """The ``input_ids`` of all rows, concatenated in order: int64 ``[sum of row lengths]``."""
    if len(rows) == 0:
        return torch.empty(0, dtype=torch.long)
    values = rows.with_format("arrow")[:]["input_ids"].combine_chunks().flatten()
    return torch.from_numpy(values.to_numpy(zero_copy_only=False).astype(np.int64))


def pack_windows(rows: datasets.Dataset, seq_len: int) -> datasets.Dataset:
    """The full windows of ``seq_len`` tokens of the rows' concatenation, in order (column ``input_ids``).

    TRL's ``"wrapped"`` packing over all rows at once (one `map` batch), so windows run across row boundaries
    exactly as a cut of the concatenated stream does; the shorter last window is dropped."""
    from trl import pack_dataset

    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    map_kwargs = {"batch_size": None, "keep_in_memory": True, "desc": f"packing windows of {seq_len}"}
    packed = pack_dataset(rows, seq_len, strategy="wrapped", map_kwargs=map_kwargs)
    full = len(packed)
    if full and len(packed[full - 1]["input_ids"]) < seq_len:
        full -= 1
    return packed.select(range(full))


def spaced_indices(n: int, max_windows: int | None) -> torch.Tensor:
    """Indices of at most ``max_windows`` of ``n`` windows: all of them, or ``round(linspace(0, n - 1, max))``."""
    if max_windows is None or max_windows >= n:
        return torch.arange(n)
    if max_windows <= 0:
        return torch.arange(0)
    return torch.linspace(0, n - 1, max_windows, dtype=torch.float64).round().long()


def windows_from_stream(stream: torch.Tensor, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """Cut a token stream ``[T]`` into non-overlapping windows ``[N, seq_len]`` (a tensor already in memory).

    The last ``T % seq_len`` tokens are dropped; with ``max_windows``, the windows :func:`spaced_indices` keeps.
    """
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    n = stream.numel() // seq_len
    win = stream[: n * seq_len].reshape(n, seq_len).long()
    return win[spaced_indices(n, max_windows)].contiguous()


def token_windows(
    tokenizer: Any,
    files: Sequence[str | os.PathLike[str]],
    seq_len: int,
    max_windows: int | None = None,
    *,
    split: str | None = None,
    cache: bool = True,
    text_format: str = "plain",
) -> torch.Tensor:
    """Tokenise files (EOS after each, :func:`document_tokens`) and pack them into windows (:func:`pack_windows`).

    Args:
        tokenizer: a Hugging Face tokenizer with ``eos_token_id``.
        files: text files in the order they are concatenated.
        seq_len: tokens per window.
        max_windows: keep at most this many windows, evenly spaced over the stream (:func:`spaced_indices`).
        split: name used in the cache file (e.g. ``"train"``).
        cache: use the token cache.
        text_format: how the files are read (see :func:`~elitekv_demo.text_formats.read_text`).

    Returns:
        LongTensor ``[N, seq_len]``; ``N = min(max_windows, T // seq_len)``.
    """
    rows = document_tokens(tokenizer, files, split=split, cache=cache, text_format=text_format)
    windows = pack_windows(rows, seq_len)
    chosen = windows.select(spaced_indices(len(windows), max_windows).tolist())
    return flat_ids(chosen).reshape(len(chosen), seq_len)
