"""The window sets of the corpora: training mixes, the Python docs' evaluation and calibration sets, the unseen
corpora of the retention evaluation; each a LongTensor ``[N, seq_len]`` of :func:`elitekv_demo.tokens.token_windows`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .corpora import DEFAULT_CORPUS, UNSEEN_CORPORA, corpus_splits, get_corpus, parse_corpora
from .tokens import token_windows


def corpus_windows(
    tokenizer: Any,
    name: str,
    split: str,
    seq_len: int,
    max_windows: int | None = None,
    *,
    root: str | os.PathLike[str] | None = None,
    cache: bool = True,
) -> torch.Tensor:
    """Windows of one split (``"train"``, ``"eval"`` or ``"calib"``) of one corpus.

    The cache file is named by the split for ``"pydocs"`` (as before corpora existed) and
    ``"<name>-<split>"`` for the others.

    Returns:
        LongTensor ``[N, seq_len]`` (see :func:`token_windows`).
    """
    corpus = get_corpus(name)
    splits = corpus_splits(name, root)
    if split not in splits:
        raise ValueError(f"split={split!r}: choose one of {', '.join(splits)}")
    return token_windows(
        tokenizer,
        splits[split],
        seq_len,
        max_windows,
        split=split if name == DEFAULT_CORPUS else f"{name}-{split}",
        cache=cache,
        text_format=corpus.text_format,
    )


def load_corpus_data(
    tokenizer: Any,
    seq_len: int,
    eval_windows: int | None = None,
    calib_samples: int | None = None,
    *,
    train_corpora: str | Sequence[str] = (DEFAULT_CORPUS,),
    roots: Mapping[str, str | os.PathLike[str]] | None = None,
    cache: bool = True,
) -> dict[str, torch.Tensor]:
    """Token windows for calibration, uptraining on a mix of corpora, and evaluation.

    The evaluation and calibration sets are always the Python docs' (``"pydocs"``), whatever the
    mix, so that every perplexity stays comparable; the mix only decides the training text.

    Args:
        tokenizer: a Hugging Face tokenizer with ``eos_token_id``.
        seq_len: tokens per window.
        eval_windows: at most this many evaluation windows per corpus (evenly spaced).
        calib_samples: at most this many calibration windows.
        train_corpora: the corpora whose ``"train"`` splits are trained on (names of
            :data:`elitekv_demo.corpora.CORPORA`, or a comma list such as ``"pydocs,linuxdoc"``).
        roots: folders per corpus name, overriding the environment variables and Debian paths.
        cache: use the on-disk token cache.

    Returns:
        ``"train"`` ``[N, seq_len]``: the train windows of the corpora, in the order given (each
        corpus cut into windows on its own; the Trainer shuffles them);
        ``"train/<name>"``: each corpus's rows of ``"train"`` (views, no copy);
        ``"eval"`` and ``"calib"``: the Python docs' held-out and calibration windows;
        ``"eval/<name>"``: each corpus's own held-out windows (``"eval/pydocs"`` is ``"eval"``).

    Raises:
        ValueError: an unknown or repeated corpus name.
        FileNotFoundError: a corpus that is not installed (the message names the fix).
    """
    names = parse_corpora(train_corpora)
    roots = dict(roots or {})
    data = {
        "eval": corpus_windows(
            tokenizer, DEFAULT_CORPUS, "eval", seq_len, eval_windows, root=roots.get(DEFAULT_CORPUS), cache=cache
        ),
        "calib": corpus_windows(
            tokenizer, DEFAULT_CORPUS, "calib", seq_len, calib_samples, root=roots.get(DEFAULT_CORPUS), cache=cache
        ),
    }
    parts = [corpus_windows(tokenizer, n, "train", seq_len, root=roots.get(n), cache=cache) for n in names]
    data["train"] = torch.cat(parts) if len(parts) > 1 else parts[0]
    start = 0
    for name, part in zip(names, parts, strict=True):
        data[f"train/{name}"] = data["train"][start : start + len(part)]
        start += len(part)
        if name == DEFAULT_CORPUS:
            data[f"eval/{name}"] = data["eval"]
        else:
            data[f"eval/{name}"] = corpus_windows(
                tokenizer, name, "eval", seq_len, eval_windows, root=roots.get(name), cache=cache
            )
    return data


def unseen_windows(
    tokenizer: Any,
    seq_len: int,
    max_windows: int | None = None,
    *,
    names: Sequence[str] | None = None,
    roots: Mapping[str, str | os.PathLike[str]] | None = None,
    cache: bool = True,
) -> dict[str, torch.Tensor]:
    """Evaluation windows of the unseen corpora: ``{name: LongTensor [N, seq_len]}``, ``N <= max_windows`` windows
    evenly spaced over the whole corpus (all its files, in key order, EOS between files).

    Args:
        names: which of :data:`UNSEEN_CORPORA` (default all).
        roots: folders per name, overriding the environment variables and the Debian folders.

    Raises:
        ValueError: a name that is not an unseen corpus.
        FileNotFoundError: a corpus that is not installed (the message names the fix).
    """
    names = list(UNSEEN_CORPORA) if names is None else list(names)
    for n in names:
        if n not in UNSEEN_CORPORA:
            raise ValueError(f"{n!r} is not an unseen corpus: choose from {', '.join(UNSEEN_CORPORA)}")
    roots = dict(roots or {})
    return {
        n: corpus_windows(tokenizer, n, "eval", seq_len, max_windows, root=roots.get(n), cache=cache) for n in names
    }


def retention_eval_sets(
    tokenizer: Any,
    seq_len: int,
    max_windows: int | None = None,
    *,
    names: Sequence[str] | None = None,
    roots: Mapping[str, str | os.PathLike[str]] | None = None,
    cache: bool = True,
) -> dict[str, torch.Tensor]:
    """The retention evaluation sets: ``"indomain"`` (the Python docs' held-out files, as every other table of the
    library) then each unseen corpus (:func:`unseen_windows`); each a LongTensor ``[N, seq_len]``."""
    roots = dict(roots or {})
    indomain = corpus_windows(
        tokenizer, DEFAULT_CORPUS, "eval", seq_len, max_windows, root=roots.get(DEFAULT_CORPUS), cache=cache
    )
    return {
        "indomain": indomain,
        **unseen_windows(tokenizer, seq_len, max_windows, names=names, roots=roots, cache=cache),
    }


def mix_tokens(data: Mapping[str, torch.Tensor], split: str = "train") -> dict[str, int]:
    """Tokens per corpus of a :func:`load_corpus_data` result: ``{name: rows * seq_len}`` for ``split``."""
    prefix = f"{split}/"
    return {key[len(prefix) :]: int(value.numel()) for key, value in data.items() if key.startswith(prefix)}
