"""The embedded default job, ``elitekv run``: SmolLM2-135M on the Debian documentation corpora.

Training on the mix of `elitekv_demo.corpora.CORPORA` (default the Python docs), evaluation and calibration on the
Python docs' held-out files, and retention on the unseen corpora (perplexity and top-1 agreement with the original);
the flow itself is the library's `elitekv_peft.pipeline.convert_and_evaluate`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from elitekv_peft.pipeline import JobSettings, convert_and_evaluate

__all__ = ["JobSettings", "describe_mix", "load_default_data", "load_unseen_eval", "run_job"]


def load_default_data(
    tokenizer: Any,
    seq_len: int,
    eval_windows: int,
    calib_samples: int,
    train_corpora: str | tuple[str, ...] = ("pydocs",),
) -> dict[str, torch.Tensor]:
    """Windows ``[N, seq_len]``: ``train`` (the train splits of ``train_corpora``, default the Python docs),
    ``eval`` (held-out Python-docs files) and ``calib`` (a Python-docs train subset), plus ``train/<name>`` and
    ``eval/<name>`` per corpus of the mix (see :func:`elitekv_demo.corpus_sets.load_corpus_data`)."""
    from .corpus_sets import load_corpus_data

    return load_corpus_data(tokenizer, seq_len, eval_windows, calib_samples, train_corpora=train_corpora)


def describe_mix(data: dict[str, torch.Tensor]) -> str:
    """``"pydocs 2,669,568 + linuxdoc 6,000,128"``: train tokens per corpus of a :func:`load_default_data` result."""
    from .corpus_sets import mix_tokens

    return " + ".join(f"{name} {tokens:,}" for name, tokens in mix_tokens(data).items())


def load_unseen_eval(tokenizer: Any, seq_len: int, max_windows: int) -> dict[str, torch.Tensor]:
    """Windows ``{name: LongTensor [N <= max_windows, seq_len]}`` of each installed unseen corpus
    (:data:`elitekv_demo.corpora.UNSEEN_CORPORA`, never trained on); a missing one is skipped with a note naming its
    Debian package."""
    from .corpora import UNSEEN_CORPORA
    from .corpus_sets import unseen_windows

    found: dict[str, torch.Tensor] = {}
    for name, corpus in UNSEEN_CORPORA.items():
        try:
            found.update(unseen_windows(tokenizer, seq_len, max_windows, names=[name]))
        except FileNotFoundError:
            print(f"[elitekv] unseen corpus {name} is not installed, skipped (apt-get install -y {corpus.package})")
    return found


def run_job(settings: JobSettings) -> dict[str, Any]:
    """``elitekv run``: SmolLM2-135M on the Debian documentation corpora; returns the summary (also written to
    ``<output_dir>/summary.json``)."""
    from .corpora import CORPORA, parse_corpora
    from .real_model import load_smollm2

    s = settings.resolved()
    s.train_corpora = parse_corpora(s.train_corpora)
    print(f"[elitekv] loading SmolLM2-135M on {s.device}")
    model, tokenizer = load_smollm2(device=s.device)
    data = load_default_data(tokenizer, s.seq_len, s.eval_windows, s.calib_samples, s.train_corpora)
    print(
        f"[elitekv] train tokens: {describe_mix(data)}; Python docs: {data['eval'].numel():,} held-out eval "
        f"tokens, {data['calib'].numel():,} calibration tokens"
    )
    packages = " + ".join(CORPORA[name].package for name in s.train_corpora)
    labels = {
        "model": "SmolLM2-135M",
        "train_data": f"{packages} (train split{'s' * (len(s.train_corpora) > 1)})",
        "eval_data": "python3.11-doc",
        "eval_split": "held-out files",
    }
    extra_eval = {name: data[f"eval/{name}"] for name in s.train_corpora if name != "pydocs"}
    unseen = load_unseen_eval(tokenizer, s.seq_len, s.eval_windows)
    summary = convert_and_evaluate(model, tokenizer, data, s, labels, extra_eval=extra_eval, retention_eval=unseen)
    summary["train_split_tokens"] = {name: int(data[f"train/{name}"].numel()) for name in s.train_corpora}
    # `elitekv eval --held-out` reads this: the embedded corpora have their own split, not the one of `--data`
    summary["data"] = {"data": labels["train_data"], "split": "embedded corpora (elitekv_demo.corpora)"}
    (Path(s.output_dir) / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
